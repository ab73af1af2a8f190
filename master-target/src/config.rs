//! Configuration: a TOML file (kebab-case keys), every key also a command-line flag; flags
//! win. `master-target serve --help` explains each key with its unit and default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::Result;

/// Settings as given (file or flags); `None` means "use the default".
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Address process servers connect to (mutual TLS). Default: 0.0.0.0:7443
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address of the admin endpoint (/metrics, /health). Default: 127.0.0.1:9443
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Directory of the master target's own state (disk list). Default: /var/lib/failback/master-target
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Retention journal directory; must be a volume of its own. Default: /mnt/retention
    #[arg(long)]
    pub retention_dir: Option<PathBuf>,
    /// Datastore directories (comma-separated on the command line, a list in TOML): the only places whose disks peers may name or create. New disks of an alternate location that names no directory go to the first. Default: /var/lib/failback/datastore
    #[arg(long, value_delimiter = ',')]
    pub datastore_dirs: Option<Vec<PathBuf>>,
    /// CA certificate (PEM) of the deployment (signs process servers' and operators' certificates). Default: /etc/failback/tls/ca.pem
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// This server's certificate (PEM), issued with `failback certs --role master-target`. Default: /etc/failback/tls/master-target.pem
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// This server's private key (PEM). Default: /etc/failback/tls/master-target.key
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// A crash-consistent recovery point at least this often, in milliseconds of replicated time. Default: 5000
    #[arg(long)]
    pub crash_point_interval_ms: Option<u64>,
    /// Recovery-point retention window, in hours. Default: 24
    #[arg(long)]
    pub retention_hours: Option<u64>,
    /// Size limit of each disk's retention journal (e.g. 100GiB); the oldest points go first. Default: 64GiB
    #[arg(long)]
    pub journal_quota: Option<String>,
    /// Allow the retention directory on a filesystem shared with disks or data (demos and tests only). Default: false
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub allow_shared_retention_volume: Option<bool>,
    /// Disk I/O of the apply path: auto (io_uring where the kernel allows it), uring, or syscall. Default: auto
    #[arg(long, value_enum)]
    pub io_backend: Option<crate::uring::IoChoice>,
    /// Log format: text or json. Default: text
    #[arg(long)]
    pub log_format: Option<String>,
}

/// The smallest journal quota: a few of the largest undo records (8 MiB each) must fit.
pub const MIN_JOURNAL_QUOTA_BYTES: u64 = 32 << 20;

/// Resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// See [`Settings::listen`].
    pub listen: SocketAddr,
    /// See [`Settings::admin_listen`].
    pub admin_listen: SocketAddr,
    /// See [`Settings::data_dir`].
    pub data_dir: PathBuf,
    /// See [`Settings::retention_dir`].
    pub retention_dir: PathBuf,
    /// See [`Settings::datastore_dirs`].
    pub datastore_dirs: Vec<PathBuf>,
    /// TLS files.
    pub tls: runtime::tls::TlsFiles,
    /// See [`Settings::crash_point_interval_ms`].
    pub crash_point_interval_ms: u64,
    /// See [`Settings::retention_hours`].
    pub retention_hours: u64,
    /// See [`Settings::journal_quota`], in bytes.
    pub journal_quota_bytes: u64,
    /// See [`Settings::allow_shared_retention_volume`].
    pub allow_shared_retention_volume: bool,
    /// Apply-path I/O backend.
    pub io_backend: crate::uring::IoChoice,
    /// JSON logs.
    pub log_json: bool,
}

impl Settings {
    /// Reads a TOML file of settings.
    pub fn from_file(path: &Path) -> Result<Settings> {
        Ok(runtime::config::load_toml(path)?)
    }

    /// `self` with every unset key taken from `base`.
    pub fn or(self, base: Settings) -> Settings {
        Settings {
            listen: self.listen.or(base.listen),
            admin_listen: self.admin_listen.or(base.admin_listen),
            data_dir: self.data_dir.or(base.data_dir),
            retention_dir: self.retention_dir.or(base.retention_dir),
            datastore_dirs: self.datastore_dirs.or(base.datastore_dirs),
            tls_ca: self.tls_ca.or(base.tls_ca),
            tls_cert: self.tls_cert.or(base.tls_cert),
            tls_key: self.tls_key.or(base.tls_key),
            crash_point_interval_ms: self
                .crash_point_interval_ms
                .or(base.crash_point_interval_ms),
            retention_hours: self.retention_hours.or(base.retention_hours),
            journal_quota: self.journal_quota.or(base.journal_quota),
            allow_shared_retention_volume: self
                .allow_shared_retention_volume
                .or(base.allow_shared_retention_volume),
            io_backend: self.io_backend.or(base.io_backend),
            log_format: self.log_format.or(base.log_format),
        }
    }

    /// Applies defaults and checks values.
    pub fn resolve(self) -> Result<Config> {
        let journal_quota_bytes = runtime::units::bytes_in(
            "journal-quota",
            self.journal_quota.as_deref().unwrap_or("64GiB"),
            MIN_JOURNAL_QUOTA_BYTES,
            u64::MAX,
        )?;
        let crash_point_interval_ms = runtime::units::check_range(
            "crash-point-interval-ms",
            self.crash_point_interval_ms.unwrap_or(5000),
            100,
            3_600_000,
            self.crash_point_interval_ms.unwrap_or(5000),
        )?;
        let retention_hours = runtime::units::check_range(
            "retention-hours",
            self.retention_hours.unwrap_or(24),
            1,
            24 * 90,
            self.retention_hours.unwrap_or(24),
        )?;
        let log_json = runtime::log::parse_log_format(self.log_format.as_deref())?;
        let tls_dir = Path::new("/etc/failback/tls");
        Ok(Config {
            listen: self.listen.unwrap_or(([0, 0, 0, 0], 7443).into()),
            admin_listen: self.admin_listen.unwrap_or(([127, 0, 0, 1], 9443).into()),
            data_dir: self
                .data_dir
                .unwrap_or_else(|| "/var/lib/failback/master-target".into()),
            retention_dir: self
                .retention_dir
                .unwrap_or_else(|| "/mnt/retention".into()),
            datastore_dirs: self
                .datastore_dirs
                .unwrap_or_else(|| vec!["/var/lib/failback/datastore".into()]),
            tls: runtime::tls::TlsFiles {
                ca: self.tls_ca.unwrap_or_else(|| tls_dir.join("ca.pem")),
                cert: self
                    .tls_cert
                    .unwrap_or_else(|| tls_dir.join("master-target.pem")),
                key: self
                    .tls_key
                    .unwrap_or_else(|| tls_dir.join("master-target.key")),
            },
            crash_point_interval_ms,
            retention_hours,
            journal_quota_bytes,
            allow_shared_retention_volume: self.allow_shared_retention_volume.unwrap_or(false),
            io_backend: self.io_backend.unwrap_or_default(),
            log_json,
        })
    }
}
