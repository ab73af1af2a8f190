//! The `master-target` command line: `serve`, `points`, `export`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Settings;
use crate::error::Result;
use crate::export::{self, ExportOpts, Format, PointSel};
use crate::server::RequestRefusals;
use crate::service::Disks;
use runtime::admin::{AdminResponse, Method};
use runtime::net::Refusals;

/// The on-premises end of failback: applies replicated writes to VMDK disks, keeps a
/// retention journal of recovery points, exports any point.
#[derive(Debug, Parser)]
#[command(name = "master-target", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// TOML configuration file; flags override its keys.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
    /// List recovery points (also while the service runs: the journals are only read).
    Points {
        /// TOML configuration file (for data-dir and retention-dir). Default:
        /// /etc/failback/master-target.toml if it exists.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
        /// Only this disk.
        #[arg(long)]
        disk: Option<u64>,
        /// The group points of this replication group (points present on every disk of
        /// the group, from one cut) instead of disks' points.
        #[arg(long, conflicts_with = "disk")]
        group: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Detach a disk from the running service: it finishes what is queued and releases the
    /// disk's lock, so the on-premises VM can boot from it.
    Detach {
        /// The running master target, HOST:PORT.
        #[arg(long, default_value = "127.0.0.1:7443")]
        connect: String,
        /// Name in its certificate. Default: the host part of --connect.
        #[arg(long)]
        server_name: Option<String>,
        /// Directory with ca.pem, operator.pem, operator.key (an operator's certificate:
        /// failback certs --role operator).
        #[arg(long, default_value = "/etc/failback/tls")]
        tls_dir: PathBuf,
        /// The disk.
        #[arg(long)]
        disk: u64,
    },
    /// Recover a disk whose retention journal is damaged (the service refuses to serve it and
    /// says so): the damaged journal is kept aside, the disk stays as of its last commit, and
    /// the points before it are dropped. Run it with the service running or stopped; the
    /// process server's next attach serves the disk again.
    RecoverJournal {
        /// TOML configuration file (for data-dir and retention-dir). Default:
        /// /etc/failback/master-target.toml if it exists.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
        /// The disk.
        #[arg(long)]
        disk: u64,
    },
    /// Write a disk as it was at a recovery point, to a new file (the disk must be detached,
    /// or the service stopped). Never writes over a disk; an existing file only with --force.
    Export {
        /// TOML configuration file (for data-dir and retention-dir). Default:
        /// /etc/failback/master-target.toml if it exists.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
        /// The disk.
        #[arg(long, required_unless_present = "group", conflicts_with = "group")]
        disk: Option<u64>,
        /// Every disk of this replication group, at one group point (its id from `points
        /// --group`, latest or latest-app); --out is then a directory.
        #[arg(long)]
        group: Option<String>,
        /// latest, latest-app, a point id, tag:NAME (the point of the bookmark tagged NAME;
        /// refused if several carry it), or an RFC 3339 time (the newest point at or before it).
        #[arg(long)]
        point: PointSel,
        /// Output file (for vmdk: the descriptor; the flat extent goes beside it); with
        /// --group, the directory the disks go to (as VM-disk-ID.img or .vmdk).
        #[arg(long)]
        out: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "raw")]
        format: Format,
        /// Replace an existing output file (a disk's file is never replaced).
        #[arg(long)]
        force: bool,
        /// Give a VMDK export the replicated disk's ddb.uuid (when it is to replace that
        /// disk); without it the export gets a new UUID, so both can sit on one datastore.
        #[arg(long)]
        keep_uuid: bool,
    },
}

/// Where the offline commands look for the service's configuration by default.
pub const DEFAULT_CONFIG: &str = "/etc/failback/master-target.toml";

fn settings(config: Option<PathBuf>, flags: Settings) -> Result<crate::config::Config> {
    let file = match config {
        Some(p) => Settings::from_file(&p)?,
        None => Settings::default(),
    };
    flags.or(file).resolve()
}

/// Settings of the offline commands: the named file, else the service's own if present.
fn offline_settings(config: Option<PathBuf>, flags: Settings) -> Result<crate::config::Config> {
    let default = Path::new(DEFAULT_CONFIG);
    settings(
        config.or_else(|| default.exists().then(|| default.to_path_buf())),
        flags,
    )
}

/// Runs the command line with `args` (the first is the program name). Returns the exit code.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("master-target: error: {e}");
            1
        }
    }
}

fn fmt_time(us: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_micros(us))
        .to_string()
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().map_err(|e| crate::error::Error::Io {
        context: "start runtime".into(),
        source: e,
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve {
            config,
            settings: s,
        } => {
            let cfg = settings(config, s)?;
            runtime::log::init_logging(cfg.log_json);
            tokio_runtime()?.block_on(serve(cfg))
        }
        Command::Points {
            config,
            settings: s,
            disk,
            group,
            json,
        } => {
            runtime::cli::quiet_on_broken_pipe();
            let cfg = offline_settings(config, s)?;
            match group {
                Some(g) => print_group_points(&cfg, &g, json),
                None => print_points(&cfg, disk, json),
            }
        }
        Command::Detach {
            connect,
            server_name,
            tls_dir,
            disk,
        } => detach(&connect, server_name, &tls_dir, disk),
        Command::RecoverJournal {
            config,
            settings: s,
            disk,
        } => recover_journal(offline_settings(config, s)?, disk),
        Command::Export {
            config,
            settings: s,
            disk,
            group,
            point,
            out,
            format,
            force,
            keep_uuid,
        } => {
            let cfg = offline_settings(config, s)?;
            let opts = ExportOpts {
                force,
                keep_uuid,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let Some(disk) = disk else {
                let group = group.expect("clap: --disk or --group");
                let (gp, done) = crate::group_export::export(
                    &cfg.data_dir,
                    &cfg.retention_dir,
                    &group,
                    &point,
                    &out,
                    format,
                    opts,
                )?;
                println!(
                    "group {group}: group point {} ({}, tag {:?}), {} disks:",
                    gp.id,
                    fmt_time(gp.time_us),
                    gp.tag,
                    done.len()
                );
                for (m, e) in gp.members.iter().zip(&done) {
                    print_export(m.disk, e);
                }
                return Ok(());
            };
            let e = export::export(
                &cfg.data_dir,
                &cfg.retention_dir,
                disk,
                &point,
                &out,
                format,
                opts,
            )?;
            print_export(disk, &e);
            Ok(())
        }
    }
}

/// `master-target detach`: asks the running master target (as an operator) to stop
/// replicating a disk and release it for failback.
fn detach(connect: &str, server_name: Option<String>, tls_dir: &Path, disk: u64) -> Result<()> {
    let name = server_name.unwrap_or_else(|| {
        connect
            .rsplit_once(':')
            .map_or(connect, |(h, _)| h)
            .to_owned()
    });
    let files = runtime::tls::TlsFiles::of_role(tls_dir, runtime::tls::PeerRole::Operator);
    let lsn = tokio_runtime()?.block_on(crate::admin::detach(connect, &name, &files, disk))?;
    println!("disk {disk} detached at lsn {lsn}; its lock is released and the on-premises VM can boot from it");
    Ok(())
}

/// `master-target recover-journal`: a damaged journal set aside, a new one begun.
fn recover_journal(cfg: crate::config::Config, disk: u64) -> Result<()> {
    let (lsn, aside) = export::recover_journal(&cfg.data_dir, &cfg.retention_dir, disk)?;
    println!("disk {disk}: the damaged journal is kept at {}; a new one starts at lsn {lsn} (the disk as of its last commit; earlier points are gone). The process server's next attach serves the disk again.", aside.display());
    Ok(())
}

/// `master-target points`: each disk's points, as a table or one JSON object per line.
fn print_points(cfg: &crate::config::Config, disk: Option<u64>, json: bool) -> Result<()> {
    for (disk_id, points, committed) in export::list(&cfg.data_dir, &cfg.retention_dir, disk)? {
        if json {
            for p in &points {
                let mut v = serde_json::to_value(p).expect("serializable");
                v["disk"] = disk_id.into();
                v["time"] = fmt_time(p.time_us).into();
                println!("{v}");
            }
            continue;
        }
        println!(
            "disk {disk_id}: {} points, committed lsn {committed}",
            points.len()
        );
        println!(
            "{:>8}  {:<24}  {:<16}  {:>12}  tag",
            "id", "time", "kind", "lsn"
        );
        for p in &points {
            let kind = match p.kind {
                crate::journal::PointKind::AppConsistent => "app-consistent",
                _ => "crash-consistent",
            };
            println!(
                "{:>8}  {:<24}  {:<16}  {:>12}  {}",
                p.id,
                fmt_time(p.time_us),
                kind,
                p.lsn,
                p.tag
            );
        }
    }
    Ok(())
}

/// `master-target points --group G`: the group's points, as a table or one JSON object per
/// line.
fn print_group_points(cfg: &crate::config::Config, group: &str, json: bool) -> Result<()> {
    let points = crate::groups::list(&cfg.data_dir, &cfg.retention_dir, group)?;
    if json {
        for p in &points {
            let mut v = serde_json::to_value(p).expect("serializable");
            v["time"] = fmt_time(p.time_us).into();
            println!("{v}");
        }
        return Ok(());
    }
    println!("group {group}: {} group points", points.len());
    println!(
        "{:>20}  {:<24}  {:<16}  {:<40}  tag",
        "id", "time", "kind", "disk:lsn"
    );
    for p in &points {
        let kind = match p.kind {
            crate::journal::PointKind::AppConsistent => "app-consistent",
            _ => "crash-consistent",
        };
        let lsns: Vec<String> = p
            .members
            .iter()
            .map(|m| format!("{}:{}", m.disk, m.point.lsn))
            .collect();
        println!(
            "{:>20}  {:<24}  {:<16}  {:<40}  {}",
            p.id,
            fmt_time(p.time_us),
            kind,
            lsns.join(" "),
            p.tag
        );
    }
    Ok(())
}

fn print_export(disk: u64, e: &export::Exported) {
    let p = &e.point;
    println!(
        "exported disk {disk} at {} (lsn {}, {}, tag {:?}; {} journal records applied) to {}",
        if p.id == 0 {
            "the latest state".to_owned()
        } else {
            format!("point {}", p.id)
        },
        p.lsn,
        fmt_time(p.time_us),
        p.tag,
        e.applied,
        e.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ")
    );
    println!(
        "disk digest {} (read back from the device after fsync; `agent digest` of the image prints the same)",
        wire_protocol::digest::hex(&e.digest)
    );
}

async fn serve(cfg: crate::config::Config) -> Result<()> {
    let vol = crate::retention::check(
        &cfg.retention_dir,
        &[("the data directory", &cfg.data_dir)],
        cfg.allow_shared_retention_volume,
    )?;
    if vol.free_bytes == 0 {
        tracing::warn!(retention = %cfg.retention_dir.display(), "the retention volume is full: journals are pruned to their quota, the oldest points go first; writes wait until there is room (nothing acknowledged is lost)");
    } else {
        tracing::info!(retention = %cfg.retention_dir.display(), free_bytes = vol.free_bytes, total_bytes = vol.total_bytes, "retention volume accepted");
    }
    let tls = runtime::tls::server_config(&cfg.tls)?;
    let disks = Disks::open(cfg.clone())?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| crate::error::Error::Io {
            context: format!("listen on {}", cfg.listen),
            source: e,
        })?;
    let refusals = Arc::new(Refusals::default());
    let requests = Arc::new(RequestRefusals::default());
    let (d, r, q) = (
        Arc::clone(&disks),
        Arc::clone(&refusals),
        Arc::clone(&requests),
    );
    let admin = runtime::admin::serve_admin(cfg.admin_listen, move |req| {
        let (d, r, q) = (Arc::clone(&d), Arc::clone(&r), Arc::clone(&q));
        async move {
            match (req.method, req.path.as_str()) {
                (Method::Get, "/metrics") => {
                    AdminResponse::metrics(crate::metrics::render(&d, &r, &q))
                }
                (Method::Get, "/health") => AdminResponse::text(200, "ok\n"),
                _ => AdminResponse::text(404, "try GET /metrics or /health\n"),
            }
        }
    })
    .await
    .map_err(|e| crate::error::Error::Io {
        context: format!("admin endpoint on {}", cfg.admin_listen),
        source: e,
    })?;
    let local = listener.local_addr().map_err(|e| crate::error::Error::Io {
        context: "local addr".into(),
        source: e,
    })?;
    let node = std::env::var("HOSTNAME").unwrap_or_else(|_| "master-target".into());
    crate::server::spawn(
        listener,
        TlsAcceptor::from(tls),
        disks,
        node,
        refusals,
        requests,
    );
    tracing::info!(listen = %local, admin = %admin, datastores = ?cfg.datastore_dirs, "master-target ready");
    let stop = runtime::cli::shutdown_signal();
    runtime::cli::notify_ready();
    stop.await;
    runtime::cli::notify_stopping();
    tracing::info!("master-target shutting down");
    Ok(())
}
