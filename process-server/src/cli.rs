//! The `process-server` command line: `serve` and `status`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::state::State;
use runtime::admin::{AdminRequest, AdminResponse, Method};
use runtime::net::Refusals;

/// The Azure end of failback: caches the change streams of many VMs durably, then
/// coalesces, compresses and ships them to the master target over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "process-server", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service. SIGHUP re-reads max-bandwidth from the config file.
    Serve {
        /// TOML configuration file; flags override its keys.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Print a table of every disk: LSNs, backlog, RPO, rates, compression.
    Status {
        /// The admin endpoint of the running service.
        #[arg(long, default_value = "127.0.0.1:9444")]
        admin: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Wait until nothing is pending: every LSN cached here is durable on the master target
    /// (for one disk, or all). Exits non-zero if that does not happen in time.
    Drain {
        /// The admin endpoint of the running service.
        #[arg(long, default_value = "127.0.0.1:9444")]
        admin: String,
        /// Only this disk (repeat for a group of disks); default: every disk.
        #[arg(long)]
        disk: Vec<u64>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_s: u64,
    },
    /// List every disk with its state (linked, resyncing, resync-required, link-down,
    /// detached, retired) and where it replicates to.
    Disks {
        /// The admin endpoint of the running service.
        #[arg(long, default_value = "127.0.0.1:9444")]
        admin: String,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Retire a disk that was detached for failback: its cache is removed and it is never
    /// attached again (its agent's attaches are refused).
    Retire {
        /// The admin endpoint of the running service.
        #[arg(long, default_value = "127.0.0.1:9444")]
        admin: String,
        /// The disk.
        #[arg(long)]
        disk: u64,
    },
    /// Print every replication group: its disks, RPO (the age of its last group point, or
    /// its disks' own if older), cuts made, abandoned and skipped (and why), and how long
    /// cuts held writes.
    Groups {
        /// The admin endpoint of the running service.
        #[arg(long, default_value = "127.0.0.1:9444")]
        admin: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Take an app-consistent bookmark of a whole replication group now: every VM holds its
    /// writes for a moment, and each disk's stream gets the same marker. Waits until the
    /// group point is durable on the master target; exits non-zero if the cut was abandoned
    /// or is not durable in time.
    GroupBookmark {
        /// The admin endpoint of the running service.
        #[arg(long, default_value = "127.0.0.1:9444")]
        admin: String,
        /// The group.
        #[arg(long)]
        group: String,
        /// The bookmark's tag.
        #[arg(long)]
        tag: String,
        /// Seconds to wait for the group point to be durable on the master target (at most 25).
        #[arg(long, default_value_t = 20)]
        wait_s: u64,
        /// Print the result as JSON (cut id, each disk's marker LSN, durable).
        #[arg(long)]
        json: bool,
    },
    /// Change the bandwidth limit of the running service (e.g. 200Mbit; 0 for none).
    SetBandwidth {
        /// The admin endpoint of the running service.
        #[arg(long, default_value = "127.0.0.1:9444")]
        admin: String,
        /// The new limit.
        rate: String,
    },
}

/// Runs the command line with `args`. Returns the exit code.
pub fn main_with(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    runtime::cli::block_on_cli("process-server", run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config, settings } => {
            let file = match &config {
                Some(p) => Settings::from_file(p)?,
                None => Settings::default(),
            };
            let cfg = settings.clone().or(file).resolve()?;
            runtime::log::init_logging(cfg.log_json);
            serve(cfg, config, *settings).await
        }
        Command::Status { admin, json } => {
            runtime::cli::quiet_on_broken_pipe();
            crate::commands::status(&admin, json).await
        }
        Command::Disks { admin, json } => {
            runtime::cli::quiet_on_broken_pipe();
            crate::commands::disks(&admin, json).await
        }
        Command::Drain {
            admin,
            disk,
            timeout_s,
        } => crate::commands::drain(&admin, &disk, timeout_s).await,
        Command::Retire { admin, disk } => crate::commands::retire(&admin, disk).await,
        Command::Groups { admin, json } => {
            runtime::cli::quiet_on_broken_pipe();
            crate::commands::groups(&admin, json).await
        }
        Command::GroupBookmark {
            admin,
            group,
            tag,
            wait_s,
            json,
        } => crate::commands::group_bookmark(&admin, (&group, &tag), wait_s, json).await,
        Command::SetBandwidth { admin, rate } => {
            crate::commands::set_bandwidth(&admin, &rate).await
        }
    }
}

async fn serve(cfg: crate::config::Config, config: Option<PathBuf>, flags: Settings) -> Result<()> {
    let (txs, rxs): (Vec<_>, Vec<_>) = cfg
        .master_targets
        .iter()
        .map(|_| tokio::sync::mpsc::channel(64))
        .unzip();
    let state = State::open(cfg.clone(), txs)?;
    let tls = runtime::tls::server_config(&cfg.tls_server)?;
    runtime::tls::client_config(&cfg.tls_client)?;
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| Error::Io {
        context: format!("listen on {}", cfg.listen),
        source: e,
    })?;
    let refusals = Arc::new(Refusals::default());
    let (st, r) = (Arc::clone(&state), Arc::clone(&refusals));
    let admin = runtime::admin::serve_admin(cfg.admin_listen, move |req| {
        let (st, r) = (Arc::clone(&st), Arc::clone(&r));
        async move {
            if req.method == Method::Post && req.path == "/groups/bookmark" {
                return group_bookmark(&st, &req.body).await;
            }
            admin(&st, &r, req)
        }
    })
    .await
    .map_err(|e| Error::Io {
        context: format!("admin endpoint on {}", cfg.admin_listen),
        source: e,
    })?;
    crate::cuts::spawn(&state);
    for (index, rx) in rxs.into_iter().enumerate() {
        tokio::spawn(crate::uplink::run(Arc::clone(&state), index, rx));
    }
    let st = Arc::clone(&state);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            crate::metrics::sample_rates(&st, 1.0);
            crate::metrics::check_rpo(&st);
        }
    });
    spawn_reload(Arc::clone(&state), config, flags);
    let local = listener.local_addr().map_err(|e| Error::Io {
        context: "local addr".into(),
        source: e,
    })?;
    crate::ingest::spawn(listener, TlsAcceptor::from(tls), state, refusals);
    tracing::info!(listen = %local, admin = %admin, master_targets = ?cfg.master_targets.iter().map(|m| m.addr.as_str()).collect::<Vec<_>>(), "process-server ready");
    let stop = runtime::cli::shutdown_signal();
    runtime::cli::notify_ready();
    stop.await;
    runtime::cli::notify_stopping();
    tracing::info!("process-server shutting down");
    Ok(())
}

/// SIGHUP reloads the configuration: the bandwidth limit takes the new value.
fn spawn_reload(state: Arc<State>, config: Option<PathBuf>, flags: Settings) {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            let file = config.as_deref().map(Settings::from_file).transpose();
            match file.and_then(|f| flags.clone().or(f.unwrap_or_default()).resolve()) {
                Ok(c) => {
                    state
                        .max_bandwidth_bps
                        .store(c.max_bandwidth_bps, Ordering::Relaxed);
                    tracing::info!(
                        max_bandwidth_bps = c.max_bandwidth_bps,
                        "configuration reloaded"
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "reload failed; keeping the running configuration")
                }
            }
        }
    });
}

fn admin(state: &State, refusals: &Refusals, req: AdminRequest) -> AdminResponse {
    match (req.method, req.path.as_str()) {
        (Method::Get, "/metrics") => {
            AdminResponse::metrics(crate::metrics::render(state, refusals))
        }
        (Method::Get, "/health") => {
            if state
                .uplinks
                .iter()
                .all(|u| u.connected.load(Ordering::Acquire))
            {
                AdminResponse::text(200, "ok: linked to the master target\n")
            } else {
                AdminResponse::text(503, "the master target is not reachable\n")
            }
        }
        (Method::Get, "/status") => AdminResponse::json(
            200,
            serde_json::to_string(&crate::metrics::status(state)).expect("serializable"),
        ),
        (Method::Get, "/groups") => AdminResponse::json(
            200,
            serde_json::to_string(&crate::cuts::status(state, &crate::metrics::status(state)))
                .expect("serializable"),
        ),
        (Method::Post, "/bandwidth") => set_bandwidth(state, &req.body),
        (Method::Post, "/disks/retire") => retire(state, &req.body),
        (Method::Get, "/bandwidth") => AdminResponse::text(
            405,
            "the bandwidth limit changes by POST only (process-server set-bandwidth)\n",
        ),
        _ => AdminResponse::text(
            404,
            "try GET /metrics, /health, /status or /groups, or POST /bandwidth, /disks/retire or /groups/bookmark\n",
        ),
    }
}

/// The body of `POST /groups/bookmark`.
#[derive(serde::Deserialize, serde::Serialize)]
pub struct GroupBookmarkRequest {
    /// The group.
    pub group: String,
    /// The bookmark's tag.
    pub tag: String,
    /// How long to wait for the group point to be durable on the master target, seconds.
    pub wait_s: u64,
}

/// The longest `POST /groups/bookmark` waits for durability: the admin client gives up on
/// an answer after 30 s.
pub const MAX_GROUP_BOOKMARK_WAIT_S: u64 = 25;

/// `POST /groups/bookmark`: an app-consistent group bookmark now.
async fn group_bookmark(state: &State, body: &[u8]) -> AdminResponse {
    let req: GroupBookmarkRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return AdminResponse::text(
                400,
                format!("the body is not a group bookmark request ({e})\n"),
            )
        }
    };
    let wait = Duration::from_secs(req.wait_s.min(MAX_GROUP_BOOKMARK_WAIT_S));
    match crate::cuts::bookmark(state, &req.group, &req.tag, wait).await {
        Ok(r) => AdminResponse::json(200, serde_json::to_string(&r).expect("serializable")),
        Err(why) => AdminResponse::text(409, format!("{why}\n")),
    }
}

/// `POST /bandwidth`: a new link limit (`0` or `none` lifts it).
fn set_bandwidth(state: &State, body: &[u8]) -> AdminResponse {
    let rate = String::from_utf8_lossy(body).trim().to_owned();
    match rate.as_str() {
        "0" | "none" => {
            state.max_bandwidth_bps.store(0, Ordering::Relaxed);
            tracing::info!("bandwidth limit removed");
            AdminResponse::text(200, "bandwidth limit removed\n")
        }
        r => match runtime::units::parse_rate(r) {
            Ok(bps) if bps < crate::config::MIN_BANDWIDTH_BPS => AdminResponse::text(
                400,
                format!("{r} is below 8kbit, the lowest limit (0 lifts it)\n"),
            ),
            Ok(bps) => {
                state.max_bandwidth_bps.store(bps, Ordering::Relaxed);
                tracing::info!(max_bandwidth_bps = bps, "bandwidth limit changed");
                AdminResponse::text(
                    200,
                    format!(
                        "bandwidth limit set to {}\n",
                        runtime::units::fmt_rate(bps as f64)
                    ),
                )
            }
            Err(e) => AdminResponse::text(400, format!("{e}\n")),
        },
    }
}

/// `POST /disks/retire`: a detached disk's cache goes, and it is never attached again.
fn retire(state: &State, body: &[u8]) -> AdminResponse {
    let id = String::from_utf8_lossy(body).trim().to_owned();
    let Some(disk) = id.parse().ok().and_then(|id| state.disk(id)) else {
        return AdminResponse::text(
            404,
            format!("disk {id:?} is not known to this process server\n"),
        );
    };
    match disk.retire() {
        Ok(()) => AdminResponse::text(
            200,
            format!(
                "disk {} retired: its cache is removed and it is never attached again\n",
                disk.attach.disk_id
            ),
        ),
        Err(e) => AdminResponse::text(409, format!("{e}\n")),
    }
}
