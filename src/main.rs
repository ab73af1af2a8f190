//! `failback`: the one-command demo, certificate generation, and the three services.
//!
//! `failback master-target ...`, `failback process-server ...` and `failback agent ...` run
//! the services exactly as their own binaries do; the demo starts them as separate
//! processes from this one binary, so `cargo run --release -- demo` needs nothing else.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod demo;

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
    /// Make a CA and server and client certificates for a deployment.
    Certs {
        /// Directory to write ca.pem, ca.key, server.pem, server.key, client.pem, client.key.
        #[arg(long)]
        out: PathBuf,
        /// Names (DNS or IP) the servers are reached by; repeat for several.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
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

fn with_name(name: &str, args: Vec<OsString>) -> Vec<OsString> {
    std::iter::once(OsString::from(name)).chain(args).collect()
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Certs { out, names } => match wire_protocol::tls::generate(&out, &names) {
            Ok(()) => {
                println!("wrote ca.pem, ca.key, server.pem, server.key, client.pem, client.key to {} (server names: {}); keep ca.key offline", out.display(), names.join(", "));
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
