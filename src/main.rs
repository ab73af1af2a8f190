//! `failback`: the one-command demo, certificate generation, and the three services.
//!
//! `failback master-target ...`, `failback process-server ...` and `failback agent ...` run
//! the services exactly as their own binaries do; the demo starts them as separate
//! processes from this one binary, so `cargo run --release -- demo` needs nothing else.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod demo;
mod demo_group;
mod demo_live;

/// Failback data plane: bring VMs home from Azure.
#[derive(Debug, Parser)]
#[command(name = "failback", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole failback on this machine, on built-in defaults, and verify it.
    Demo(demo::DemoArgs),
    /// Make the deployment's CA, or issue one identity's certificate from it.
    ///
    /// Without --role: a new CA in --out (ca.pem, ca.key; keep ca.key offline). With --role:
    /// ROLE.pem, ROLE.key and a copy of ca.pem in --out, for one host.
    Certs(CertArgs),
    /// Run the master target (same as the master-target binary).
    #[command(disable_help_flag = true)]
    MasterTarget {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the process server (same as the process-server binary).
    #[command(disable_help_flag = true)]
    ProcessServer {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the agent (same as the agent binary).
    #[command(disable_help_flag = true)]
    Agent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// `failback certs` options.
#[derive(Debug, clap::Args)]
struct CertArgs {
    /// Where to write.
    #[arg(long)]
    out: PathBuf,
    /// Issue a certificate for this role instead of making a CA.
    #[arg(long, value_parser = ["agent", "process-server", "master-target", "operator"])]
    role: Option<String>,
    /// The VM an agent's certificate is for (required with --role agent).
    #[arg(long)]
    vm: Option<String>,
    /// The identity's name (process-server, master-target, operator): unique per host, since
    /// a disk is written only by the process server that attached it. Default: the first
    /// --dns name (servers); required for operators.
    #[arg(long)]
    name: Option<String>,
    /// DNS names or IP addresses a server is reached by (process-server, master-target);
    /// repeat for several.
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// The CA's directory (ca.pem, ca.key). Default: --out.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = runtime::tls::LEAF_VALIDITY_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
}

fn certs(a: CertArgs) -> Result<String, String> {
    use runtime::tls::{issue, make_ca, Identity, IssueRequest, PeerRole};
    let Some(role) = a.role.as_deref() else {
        if a.vm.is_some() || a.name.is_some() || !a.dns.is_empty() || a.ca.is_some() {
            return Err(
                "--vm, --name, --dns and --ca go with --role: without it a new CA is made".into(),
            );
        }
        make_ca(&a.out).map_err(|e| e.to_string())?;
        return Ok(format!(
            "made a CA in {0} (ca.pem, ca.key); keep ca.key offline. Next, one certificate per identity:\n  failback certs --ca {0} --role master-target --dns MT_HOST --out DIR\n  failback certs --ca {0} --role process-server --dns PS_HOST --out DIR\n  failback certs --ca {0} --role agent --vm VM --out DIR     (one per VM)\n  failback certs --ca {0} --role operator --name NAME --out DIR",
            a.out.display()
        ));
    };
    let role = PeerRole::parse(role).expect("clap checked the role");
    let name =
        match (role, a.vm, a.name) {
            (PeerRole::Agent, Some(vm), None) => vm,
            (PeerRole::Agent, _, _) => return Err(
                "--role agent needs --vm VM (and no --name): an agent's certificate names its VM"
                    .into(),
            ),
            (_, Some(_), _) => return Err("--vm goes with --role agent only".into()),
            (PeerRole::Operator, None, None) => {
            return Err("--role operator needs --name NAME: each operator has an identity of their own".into())
        }
        (_, None, Some(name)) => name,
        (_, None, None) => match a.dns.first() {
            Some(d) => d.clone(),
            None => return Err(format!("--role {} needs --dns NAME (the names its peers reach it by; the first also names the identity)", role)),
        },
        };
    let req = IssueRequest {
        identity: Identity { role, name },
        server_names: a.dns,
        days: a.days,
    };
    let ca = a.ca.unwrap_or_else(|| a.out.clone());
    let written = issue(&ca, &req, &a.out).map_err(|e| e.to_string())?;
    Ok(format!(
        "issued {} ({}) valid {} days: {}",
        req.identity.uri(),
        if req.server_names.is_empty() {
            "client".to_owned()
        } else {
            format!("server names {}", req.server_names.join(", "))
        },
        a.days,
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

fn with_name(name: &str, args: Vec<OsString>) -> Vec<OsString> {
    std::iter::once(OsString::from(name)).chain(args).collect()
}

/// Files and directories the services make are their owner's alone: cache segments, the
/// retention journal, the agent's state and the on-premises disks hold replicated data,
/// which a 0644 file gave any local user to read.
const PRIVATE_UMASK: libc::mode_t = 0o077;

fn main() {
    // SAFETY: umask(2) cannot fail and touches no memory.
    unsafe { libc::umask(PRIVATE_UMASK) };
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Certs(a) => match certs(a) {
            Ok(said) => {
                println!("{said}");
                0
            }
            Err(e) => {
                eprintln!("failback certs: error: {e}");
                1
            }
        },
        Command::MasterTarget { args } => {
            master_target::cli::main_with(with_name("master-target", args))
        }
        Command::ProcessServer { args } => {
            process_server::cli::main_with(with_name("process-server", args))
        }
        Command::Agent { args } => agent::cli::main_with(with_name("agent", args)),
    };
    std::process::exit(code);
}
