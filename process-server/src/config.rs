//! Configuration: a TOML file (kebab-case keys), every key also a flag; flags win.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// Settings as given; `None` means "use the default".
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Address agents connect to (mutual TLS). Default: 0.0.0.0:7444
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Admin endpoint (/metrics, /health, /status). Default: 127.0.0.1:9444
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// The master target(s), HOST:PORT, over the VPN/ExpressRoute link; a comma-separated list is filled in order (at most 60 disks each). Default: 127.0.0.1:7443
    #[arg(long)]
    pub master_target: Option<String>,
    /// Name(s) the master targets' certificates carry (DNS name or IP), one per master target. Default: the host part of each
    #[arg(long)]
    pub master_target_name: Option<String>,
    /// Cache directory (its own volume in production). Default: /var/cache/failback/process-server
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Cache size limit (e.g. 500GiB); past it agents wait (nothing is dropped). Default: 90% of the cache volume
    #[arg(long)]
    pub cache_limit: Option<String>,
    /// CA certificate (PEM) that signs agents' and the master target's certificates. Default: /etc/failback/tls/ca.pem
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// This process server's certificate (PEM), issued with `failback certs --role process-server`; it serves agents and is the client toward master targets. Default: /etc/failback/tls/process-server.pem
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Its key (PEM). Default: /etc/failback/tls/process-server.key
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Certificate toward the master targets, if not the one above (PEM). Default: the tls-cert
    #[arg(long)]
    pub tls_client_cert: Option<PathBuf>,
    /// Its key (PEM). Default: the tls-key
    #[arg(long)]
    pub tls_client_key: Option<PathBuf>,
    /// zstd level on the link: auto (adapts 1-9 to whichever of link or CPU is the bottleneck), 1-19 fixed, or 0 for none. Default: auto
    #[arg(long)]
    pub compression_level: Option<String>,
    /// Bandwidth limit on the link (e.g. 200Mbit, 50MB/s); 0 or unset: none. Reloaded on SIGHUP. Default: none
    #[arg(long)]
    pub max_bandwidth: Option<String>,
    /// Bytes in flight to the master target (size it to bandwidth x round-trip time). Default: 64MiB
    #[arg(long)]
    pub window: Option<String>,
    /// RPO threshold per disk, in seconds: a WARN when passed and when recovered. Default: 900
    #[arg(long)]
    pub rpo_threshold_s: Option<u64>,
    /// The link to a master target is dead after this many seconds without a word from it
    /// (heartbeats go every quarter of it); the process server then reconnects. Default: 30
    #[arg(long)]
    pub link_timeout_s: Option<u64>,
    /// Log format: text or json. Default: text
    #[arg(long)]
    pub log_format: Option<String>,
    /// A replication group, ID[:OS]=VM,VM,... (e.g. erp:linux=vm-db,vm-app): its VMs' disks
    /// get group-consistent recovery points (every VM of a group attaches with `agent
    /// --group ID`, has the same OS, given or else the first VM's, and the same master
    /// target). Repeat the flag for several; in TOML a list of strings. Default: none
    #[arg(long)]
    pub group: Option<Vec<String>>,
    /// Seconds between a group's crash-consistent cuts. Default: 10
    #[arg(long)]
    pub group_cut_interval_s: Option<u64>,
}

/// The smallest window: one largest frame (16 MiB) must fit, or nothing ships.
pub const MIN_WINDOW_BYTES: u64 = 16 << 20;
/// The largest window (it is memory: frames in flight are held until acknowledged).
pub const MAX_WINDOW_BYTES: u64 = 4 << 30;
/// The smallest cache limit: smaller is a mistake for a larger unit (1KiB for 1TiB).
pub const MIN_CACHE_LIMIT_BYTES: u64 = 1 << 20;
/// The lowest bandwidth limit (bytes/s): 8 kbit/s; below it a frame would take hours.
pub const MIN_BANDWIDTH_BPS: u64 = 1_000;

/// A master target the process server ships to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterTarget {
    /// HOST:PORT.
    pub addr: String,
    /// The name its certificate carries.
    pub name: String,
}

/// Resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Agent listener.
    pub listen: SocketAddr,
    /// Admin endpoint.
    pub admin_listen: SocketAddr,
    /// The master targets, in the order new disks fill them.
    pub master_targets: Vec<MasterTarget>,
    /// Cache directory.
    pub cache_dir: PathBuf,
    /// Cache limit in bytes (None: 90% of the volume).
    pub cache_limit_bytes: Option<u64>,
    /// Server TLS files.
    pub tls_server: runtime::tls::TlsFiles,
    /// Client TLS files.
    pub tls_client: runtime::tls::TlsFiles,
    /// zstd level, 0 for none (the starting level when adaptive).
    pub compression_level: i32,
    /// Adapt the level to the bottleneck.
    pub adaptive_compression: bool,
    /// Bytes per second, 0 for no limit.
    pub max_bandwidth_bps: u64,
    /// In-flight window in bytes.
    pub window_bytes: u64,
    /// See [`Settings::link_timeout_s`].
    pub link_timeout_s: u64,
    /// RPO threshold.
    pub rpo_threshold_s: u64,
    /// JSON logs.
    pub log_json: bool,
    /// Replication groups.
    pub groups: Vec<crate::groups::GroupDef>,
    /// Milliseconds between a group's crash-consistent cuts.
    pub group_cut_interval_ms: u64,
}

impl Settings {
    /// Reads a TOML file of settings.
    pub fn from_file(path: &Path) -> Result<Settings> {
        Ok(runtime::config::load_toml(path)?)
    }

    /// `self` with every unset key taken from `base`.
    pub fn or(self, b: Settings) -> Settings {
        Settings {
            listen: self.listen.or(b.listen),
            admin_listen: self.admin_listen.or(b.admin_listen),
            master_target: self.master_target.or(b.master_target),
            master_target_name: self.master_target_name.or(b.master_target_name),
            cache_dir: self.cache_dir.or(b.cache_dir),
            cache_limit: self.cache_limit.or(b.cache_limit),
            tls_ca: self.tls_ca.or(b.tls_ca),
            tls_cert: self.tls_cert.or(b.tls_cert),
            tls_key: self.tls_key.or(b.tls_key),
            tls_client_cert: self.tls_client_cert.or(b.tls_client_cert),
            tls_client_key: self.tls_client_key.or(b.tls_client_key),
            compression_level: self.compression_level.or(b.compression_level),
            max_bandwidth: self.max_bandwidth.or(b.max_bandwidth),
            window: self.window.or(b.window),
            rpo_threshold_s: self.rpo_threshold_s.or(b.rpo_threshold_s),
            link_timeout_s: self.link_timeout_s.or(b.link_timeout_s),
            log_format: self.log_format.or(b.log_format),
            group: self.group.or(b.group),
            group_cut_interval_s: self.group_cut_interval_s.or(b.group_cut_interval_s),
        }
    }

    /// Applies defaults and checks values.
    pub fn resolve(self) -> Result<Config> {
        let master_targets = master_targets(
            self.master_target.as_deref(),
            self.master_target_name.as_deref(),
        )?;
        let (level, adaptive_compression) = compression(self.compression_level.as_deref())?;
        let max_bandwidth_bps = bandwidth(self.max_bandwidth.as_deref())?;
        let log_json = runtime::log::parse_log_format(self.log_format.as_deref())?;
        let tls = Path::new("/etc/failback/tls");
        let ca = self.tls_ca.unwrap_or_else(|| tls.join("ca.pem"));
        Ok(Config {
            listen: self.listen.unwrap_or(([0, 0, 0, 0], 7444).into()),
            admin_listen: self.admin_listen.unwrap_or(([127, 0, 0, 1], 9444).into()),
            master_targets,
            cache_dir: self
                .cache_dir
                .unwrap_or_else(|| "/var/cache/failback/process-server".into()),
            cache_limit_bytes: self
                .cache_limit
                .as_deref()
                .map(|v| {
                    runtime::units::bytes_in("cache-limit", v, MIN_CACHE_LIMIT_BYTES, u64::MAX)
                })
                .transpose()?,
            tls_client: runtime::tls::TlsFiles {
                ca: ca.clone(),
                cert: self
                    .tls_client_cert
                    .or_else(|| self.tls_cert.clone())
                    .unwrap_or_else(|| tls.join("process-server.pem")),
                key: self
                    .tls_client_key
                    .or_else(|| self.tls_key.clone())
                    .unwrap_or_else(|| tls.join("process-server.key")),
            },
            tls_server: runtime::tls::TlsFiles {
                ca,
                cert: self
                    .tls_cert
                    .unwrap_or_else(|| tls.join("process-server.pem")),
                key: self
                    .tls_key
                    .unwrap_or_else(|| tls.join("process-server.key")),
            },
            compression_level: level,
            adaptive_compression,
            max_bandwidth_bps,
            window_bytes: runtime::units::bytes_in(
                "window",
                self.window.as_deref().unwrap_or("64MiB"),
                MIN_WINDOW_BYTES,
                MAX_WINDOW_BYTES,
            )?,
            link_timeout_s: runtime::units::check_range(
                "link-timeout-s",
                self.link_timeout_s.unwrap_or(30),
                2,
                600,
                self.link_timeout_s.unwrap_or(30),
            )?,
            rpo_threshold_s: runtime::units::check_range(
                "rpo-threshold-s",
                self.rpo_threshold_s.unwrap_or(900),
                1,
                7 * 86_400,
                self.rpo_threshold_s.unwrap_or(900),
            )?,
            log_json,
            groups: groups(self.group.as_deref().unwrap_or_default())?,
            group_cut_interval_ms: 1000
                * runtime::units::check_range(
                    "group-cut-interval-s",
                    self.group_cut_interval_s.unwrap_or(10),
                    1,
                    86_400,
                    self.group_cut_interval_s.unwrap_or(10),
                )?,
        })
    }
}

/// The replication groups, parsed and checked against each other.
fn groups(specs: &[String]) -> Result<Vec<crate::groups::GroupDef>> {
    let bad = |reason: String| Error::InvalidParameter {
        param: "group",
        reason,
    };
    let groups = specs
        .iter()
        .map(|s| crate::groups::parse_group(s).map_err(bad))
        .collect::<Result<Vec<_>>>()?;
    crate::groups::check_groups(&groups).map_err(bad)?;
    Ok(groups)
}

/// One or more master targets, filled in order: a master target takes at most 60 disks, so
/// a larger site lists several (`addrs` comma-separated; `names` one per address, or none:
/// each address's host).
fn master_targets(addrs: Option<&str>, names: Option<&str>) -> Result<Vec<MasterTarget>> {
    let addrs: Vec<String> = addrs
        .unwrap_or("127.0.0.1:7443")
        .split(',')
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    let names: Vec<String> = names
        .map(|n| n.split(',').map(|a| a.trim().to_owned()).collect())
        .unwrap_or_default();
    if addrs.is_empty() || (!names.is_empty() && names.len() != addrs.len()) {
        return Err(Error::InvalidParameter {
            param: "master-target-name",
            reason: format!(
                "{} names for {} master targets: give one per master target, or none",
                names.len(),
                addrs.len()
            ),
        });
    }
    Ok(addrs
        .into_iter()
        .enumerate()
        .map(|(i, addr)| {
            let host = addr
                .rsplit_once(':')
                .map_or(addr.as_str(), |(h, _)| h)
                .trim_matches(['[', ']'])
                .to_owned();
            MasterTarget {
                name: names.get(i).cloned().unwrap_or(host),
                addr,
            }
        })
        .collect())
}

/// The zstd level and whether it adapts: `auto` (from 3), 0 (none) or 1 to 19.
fn compression(level: Option<&str>) -> Result<(i32, bool)> {
    let (level, adaptive) = match level.unwrap_or("auto") {
        "auto" => (3, true),
        l => (
            l.parse().map_err(|_| Error::InvalidParameter {
                param: "compression-level",
                reason: format!("{l:?}: use auto, 0 (none) or 1 to 19"),
            })?,
            false,
        ),
    };
    if !(0..=19).contains(&level) {
        return Err(Error::InvalidParameter {
            param: "compression-level",
            reason: format!("{level}: use 0 (none) to 19"),
        });
    }
    Ok((level, adaptive))
}

/// The link limit in bytes per second (0: none; at least 8 kbit/s).
fn bandwidth(rate: Option<&str>) -> Result<u64> {
    match rate {
        None | Some("0") | Some("") => Ok(0),
        Some(r) => {
            let bps = runtime::units::parse_rate(r).map_err(|reason| Error::InvalidParameter {
                param: "max-bandwidth",
                reason,
            })?;
            if bps < MIN_BANDWIDTH_BPS {
                return Err(Error::InvalidParameter {
                    param: "max-bandwidth",
                    reason: format!("{r} is below 8kbit, the lowest limit (0 for none)"),
                });
            }
            Ok(bps)
        }
    }
}
