//! The `agent` command line: `replay`, `protect`, `resync`, `bookmark`, `digest`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use runtime::tls::{PeerRole, TlsFiles};
use wire_protocol::{Compression, DiskAttach, LocationKind};

use crate::engine::Engine;
use crate::error::{Error, IoContext, Result};
use crate::link::{Endpoint, Link};
use crate::replay::{self, ReplayOpts};
use crate::source::{hex, image_digest, SourceDisk};

/// The source side of failback: captures a VM's writes (here: replays recorded block
/// traces against a source disk file), streams them to the process server, and resyncs.
#[derive(Debug, Parser)]
#[command(name = "agent", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the disk is and where it goes.
#[derive(Debug, Clone, Args)]
pub struct DiskArgs {
    /// The source disk file.
    #[arg(long)]
    pub source: PathBuf,
    /// Create the source disk (zeroed) if it does not exist. Without it a missing source is
    /// an error: a typo must not become an empty disk replicated over the target.
    #[arg(long)]
    pub create_source: bool,
    /// Its size (e.g. 16GiB); must match an existing file.
    #[arg(long, default_value = "1GiB")]
    pub disk_size: String,
    /// The disk's id in the data plane.
    #[arg(long, default_value_t = 1)]
    pub disk_id: u64,
    /// The VM's id. Default: the VM its certificate names (agent.pem in --tls-dir).
    #[arg(long)]
    pub vm_id: Option<String>,
    /// The disk's UUID (32 hex digits). Default: derived from vm id and disk id.
    #[arg(long)]
    pub disk_uuid: Option<String>,
    /// On the master target: the existing VMDK (original) or the datastore directory (alternate).
    #[arg(long, default_value = "")]
    pub target: String,
    /// original: the on-premises disk exists; alternate: create a new one.
    #[arg(long, value_enum, default_value = "alternate")]
    pub location: Location,
    /// The replication group of this VM (the ID of the process server's `--group
    /// ID[:OS]=VM,...` setting): its disks then get group-consistent recovery points with
    /// the group's other VMs.
    #[arg(long, default_value = "")]
    pub group: String,
    /// The VM's operating system as reported to the process server (every VM of a group
    /// has the same one).
    #[arg(long, default_value = std::env::consts::OS)]
    pub os_type: String,
    /// A filesystem (its mountpoint; repeat for several) frozen for each app-consistent
    /// bookmark of the group (process-server group-bookmark): flushed and still while the
    /// group is cut, thawed at once after. Never the filesystem holding --source or
    /// --state-dir.
    #[arg(long, requires = "group")]
    pub freeze_on_group_bookmark: Vec<PathBuf>,
    /// How long the first attach keeps trying while the process server answers "not
    /// ready" or cannot be reached (after that the agent stops with the last answer).
    #[arg(long, default_value_t = 120)]
    pub connect_timeout_s: u64,
    /// The process server, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:7444")]
    pub process_server: String,
    /// Name in the process server's certificate. Default: its host.
    #[arg(long)]
    pub server_name: Option<String>,
    /// Directory with ca.pem, agent.pem, agent.key: this VM's agent certificate
    /// (failback certs --role agent --vm VM).
    #[arg(long, default_value = "/etc/failback/tls")]
    pub tls_dir: PathBuf,
    /// Directory for the agent's bookmarks and resync progress.
    #[arg(long, default_value = "agent-state")]
    pub state_dir: PathBuf,
    /// Writes kept until acknowledged (e.g. 256MiB); past it, dirty regions are tracked.
    #[arg(long, default_value = "256MiB")]
    pub buffer: String,
    /// zstd level toward the process server (0: none).
    #[arg(long, default_value_t = 0)]
    pub compression_level: i32,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: String,
}

/// Location kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Location {
    /// The on-premises disk exists.
    Original,
    /// Create a new disk.
    Alternate,
}

/// Resync modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResyncMode {
    /// None.
    None,
    /// Only blocks whose digests differ.
    Differential,
    /// Every block.
    Full,
}

/// `agent replay`.
#[derive(Debug, Args)]
struct ReplayCmd {
    #[command(flatten)]
    disk: DiskArgs,
    #[command(flatten)]
    opts: ReplayOpts,
    /// Resync before replaying.
    #[arg(long, value_enum, default_value = "none")]
    resync: ResyncMode,
    /// Take a last app-consistent bookmark with this tag when the trace ends.
    #[arg(long)]
    final_bookmark: Option<String>,
    /// When the trace ends, keep the stream open (as a VM whose writer stopped) and take
    /// bookmarks asked for with `agent bookmark`, until SIGTERM or SIGINT; then drain.
    #[arg(long)]
    stay: bool,
}

/// Making a bookmark app-consistent: hooks around it and filesystems frozen while it is
/// taken (`agent bookmark`).
#[derive(Debug, Args)]
struct FreezeArgs {
    /// Freeze the filesystem mounted here (FIFREEZE) while the bookmark is taken, and thaw
    /// it at once after (always: also on error or timeout). Repeat for several.
    #[arg(long = "freeze", value_name = "MOUNTPOINT")]
    mountpoints: Vec<PathBuf>,
    /// The longest the filesystems stay frozen: the bookmark is taken within it or not at
    /// all.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=crate::freeze::MAX_FREEZE_S))]
    freeze_timeout_s: u64,
    /// A command (sh -c) run before the freeze, to quiesce an application (flush a
    /// database); a failure stops here and nothing is frozen or taken.
    #[arg(long)]
    pre_hook: Option<String>,
    /// A command (sh -c) run after the thaw (resume the application), whenever the
    /// pre-hook succeeded (or there is none), also when the bookmark failed.
    #[arg(long)]
    post_hook: Option<String>,
}

/// The longest a hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// `agent protect`.
#[derive(Debug, Args)]
struct ProtectCmd {
    #[command(flatten)]
    disk: DiskArgs,
    /// An empty directory where the disk appears as one file (MOUNT_DIR/NAME), served
    /// through FUSE: put a loop device on it (losetup -f --show MOUNT_DIR/NAME) and use
    /// that as the VM's disk. Every write to it is captured before it completes.
    #[arg(long)]
    mount_dir: PathBuf,
    /// The file's name in the mount directory.
    #[arg(long, default_value = "disk.img")]
    name: String,
    /// Resync before capturing (a restart after a crash resyncs differentially anyway).
    #[arg(long, value_enum, default_value = "none")]
    resync: ResyncMode,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay a block trace against the source disk and stream it.
    Replay(ReplayCmd),
    /// Protect a live disk: serve the source disk as a file through FUSE (root) and stream
    /// every write to it, until the mount is unmounted or SIGTERM; then drain.
    Protect(ProtectCmd),
    /// Resync the target disk with the source.
    Resync {
        #[command(flatten)]
        disk: DiskArgs,
        /// differential: send only differing blocks; full: send everything.
        #[arg(long, value_enum)]
        mode: ResyncMode,
    },
    /// Take an app-consistent bookmark in the running agent and wait until it is durable on
    /// the master target. Prints its LSN; exits non-zero if no agent runs, the bookmark cannot
    /// be taken, or it is not durable in time.
    Bookmark {
        /// The running agent's state directory.
        #[arg(long, default_value = "agent-state")]
        state_dir: PathBuf,
        /// The bookmark's tag.
        #[arg(long)]
        tag: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout_s: u64,
        #[command(flatten)]
        freeze: FreezeArgs,
    },
    /// Print the disk digest of an image (to check an exported recovery point).
    Digest {
        /// The image (raw, or a VMDK's flat extent).
        image: PathBuf,
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
    runtime::cli::block_on_cli("agent", run(cli))
}

/// The smallest disk (the master target refuses smaller ones).
pub const MIN_DISK_BYTES: u64 = 1 << 20;
/// The largest disk (a VMDK's limit, 62 TiB).
pub const MAX_DISK_BYTES: u64 = 62 << 40;
/// The smallest resend buffer: one batch of the usual size must fit (a larger one is
/// admitted alone).
pub const MIN_BUFFER_BYTES: u64 = crate::engine::BATCH_BYTES as u64;
/// The largest resend buffer (it lives in memory).
pub const MAX_BUFFER_BYTES: u64 = 64 << 30;

/// Builds the engine for a disk: checks every setting, opens the source and the TLS
/// files, then connects and attaches (nothing is registered anywhere before the checks
/// passed).
pub async fn engine(d: &DiskArgs) -> Result<Engine> {
    runtime::log::init_logging(runtime::log::parse_log_format(Some(&d.log_format))?);
    let (size, buffer) = check_sizes(d)?;
    for (param, v) in [("group", &d.group), ("os-type", &d.os_type)] {
        if !v.is_empty() {
            wire_protocol::message::validate_name(param, v).map_err(|e| {
                Error::InvalidParameter {
                    param,
                    reason: e.to_string(),
                }
            })?;
        }
    }
    let tls = TlsFiles::of_role(&d.tls_dir, PeerRole::Agent);
    let vm_id = vm_of_certificate(d, &tls)?;
    let attach = DiskAttach {
        request_id: 0,
        os_type: d.os_type.clone(),
        disk_id: d.disk_id,
        disk_uuid: disk_uuid(d, &vm_id)?,
        vm_id,
        group_id: d.group.clone(),
        size_bytes: size,
        sector_size: 512,
        location: if d.location == Location::Original {
            LocationKind::Original
        } else {
            LocationKind::Alternate
        },
        target: d.target.clone(),
    };
    let host = d
        .process_server
        .rsplit_once(':')
        .map_or(d.process_server.as_str(), |(h, _)| h)
        .to_owned();
    let ep = Endpoint {
        addr: d.process_server.clone(),
        server_name: d.server_name.clone().unwrap_or(host),
        tls,
    };
    let compression = if d.compression_level > 0 {
        Compression::Zstd(d.compression_level)
    } else {
        Compression::None
    };
    let link = Link::new(ep, attach, compression, buffer)?;
    let created = d.create_source && !d.source.exists();
    let source = SourceDisk::open(&d.source, size, d.create_source)?;
    let started = Engine::start(
        link,
        source,
        d.disk_id,
        &d.state_dir,
        Duration::from_secs(d.connect_timeout_s),
    )
    .await
    .map(|mut e| {
        e.freeze_on_cut.clone_from(&d.freeze_on_group_bookmark);
        e
    });
    if started.is_err() && created {
        // A run that never started leaves no empty disk behind.
        let _ = std::fs::remove_file(&d.source);
    }
    started
}

/// The disk's size and the resend buffer's, checked with the other numeric settings.
fn check_sizes(d: &DiskArgs) -> Result<(u64, usize)> {
    let size = runtime::units::bytes_in("disk-size", &d.disk_size, MIN_DISK_BYTES, MAX_DISK_BYTES)?;
    if !size.is_multiple_of(512) {
        return Err(Error::InvalidParameter {
            param: "disk-size",
            reason: format!("{} is not a multiple of 512 bytes", d.disk_size),
        });
    }
    let buffer =
        runtime::units::bytes_in("buffer", &d.buffer, MIN_BUFFER_BYTES, MAX_BUFFER_BYTES)? as usize;
    runtime::units::check_range(
        "compression-level",
        d.compression_level,
        0,
        19,
        d.compression_level,
    )?;
    runtime::units::check_range("disk-id", d.disk_id, 1, u64::MAX, d.disk_id)?;
    Ok((size, buffer))
}

/// The VM this agent is: the one its certificate names (`--vm-id` may only repeat it).
fn vm_of_certificate(d: &DiskArgs, tls: &TlsFiles) -> Result<String> {
    tls.check()?;
    let identity = runtime::tls::identity_of_file(&tls.cert)?;
    if identity.role != PeerRole::Agent {
        return Err(Error::InvalidParameter {
            param: "tls-dir",
            reason: format!(
                "{} is a {} certificate ({identity}); an agent needs its VM's agent certificate (failback certs --role agent --vm VM)",
                tls.cert.display(),
                identity.role
            ),
        });
    }
    match &d.vm_id {
        Some(v) if *v != identity.name => Err(Error::InvalidParameter {
            param: "vm-id",
            reason: format!(
                "{v:?}, but the certificate in {} is VM {:?}'s: use that VM's certificate, or leave --vm-id out",
                d.tls_dir.display(),
                identity.name
            ),
        }),
        _ => Ok(identity.name),
    }
}

/// `--disk-uuid`, or one derived from the VM and disk ids (stable across runs).
fn disk_uuid(d: &DiskArgs, vm_id: &str) -> Result<[u8; 16]> {
    match &d.disk_uuid {
        Some(h) => {
            // Exactly 32 hex digits: a 33rd (a typo) is an error, not ignored.
            let bytes: Option<Vec<u8>> = (h.len() == 32
                && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| {
                (0..16)
                    .map(|i| u8::from_str_radix(&h[i * 2..i * 2 + 2], 16).ok())
                    .collect()
            })
            .flatten();
            bytes
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| Error::InvalidParameter {
                    param: "disk-uuid",
                    reason: format!("{h:?} is not 32 hex digits"),
                })
        }
        None => {
            let h = blake3::hash(format!("{vm_id}/{}", d.disk_id).as_bytes());
            Ok(h.as_bytes()[..16].try_into().expect("16 bytes"))
        }
    }
}

fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let p = indicatif::ProgressBar::new(len);
    p.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
        ))
        .expect("valid template"),
    );
    p
}

/// `agent replay`: the trace, with a resync interleaved if asked for (or if the last run
/// crashed), then a final bookmark, an open stream until SIGTERM with `--stay`, a drain.
async fn replay_cmd(c: ReplayCmd) -> Result<()> {
    // Everything that can be checked here is, before the disk is registered.
    c.opts.check()?;
    let mut e = engine(&c.disk).await?;
    let resync = if c.resync == ResyncMode::None && e.unclean_start {
        ResyncMode::Differential
    } else {
        c.resync
    };
    // A resync runs interleaved with the replay's writes, as it would with a live VM.
    let mut rs = if resync != ResyncMode::None {
        Some(e.resync_begin(resync == ResyncMode::Full).await?)
    } else {
        None
    };
    let p = indicatif::ProgressBar::new_spinner();
    let sum = replay::replay(&mut e, &c.opts, &mut rs, |s| {
        if s.writes % 256 == 0 {
            p.set_message(format!("{} writes, {} bytes", s.writes, s.bytes));
            p.tick();
        }
    })
    .await?;
    finish_resync(&mut e, rs).await?;
    if let Some(tag) = c.final_bookmark {
        e.bookmark(&tag).await?;
    }
    if c.stay && !sum.stopped_by_signal {
        eprintln!("the trace ended; the agent stays (agent bookmark --state-dir {} --tag TAG takes bookmarks) until SIGTERM", c.disk.state_dir.display());
        e.serve_until_stopped().await?;
    }
    e.drain(Duration::from_secs(600)).await?;
    p.finish_and_clear();
    report_replay(&sum, &e);
    Ok(())
}

/// `agent protect`: the disk served and captured until unmounted or told to stop (a
/// resync first if asked for or if the last run crashed, interleaved with live writes),
/// then a drain.
async fn protect_cmd(c: ProtectCmd) -> Result<()> {
    if c.name.is_empty() || c.name.contains('/') || c.name == "." || c.name == ".." {
        return Err(Error::InvalidParameter {
            param: "name",
            reason: format!("{:?} is not a file name", c.name),
        });
    }
    runtime::log::init_logging(runtime::log::parse_log_format(Some(&c.disk.log_format))?);
    // Before the disk is registered anywhere: a wrong directory costs nothing.
    crate::protect::check_mount_dir(&c.mount_dir)?;
    crate::protect::check_outside(
        &c.mount_dir,
        &[("source", &c.disk.source), ("state-dir", &c.disk.state_dir)],
    )?;
    let mut e = engine(&c.disk).await?;
    let resync = match c.resync {
        ResyncMode::None if e.unclean_start => ResyncMode::Differential,
        m => m,
    };
    let rs = if resync == ResyncMode::None {
        None
    } else {
        Some(e.resync_begin(resync == ResyncMode::Full).await?)
    };
    let sum = crate::protect::protect(&mut e, &c.mount_dir, &c.name, rs).await?;
    e.drain(Duration::from_secs(600)).await?;
    let mut v = serde_json::to_value(&sum).expect("serializable");
    v["last_lsn"] = (e.next_lsn() - 1).into();
    v["bookmarks"] = e.stats.bookmarks.into();
    v["resync_compared_bytes"] = e.stats.resync_compared_bytes.into();
    v["resync_sent_bytes"] = e.stats.resync_sent_bytes.into();
    println!("{v}");
    println!(
        "protected {} for {:.1} s: {} writes ({} bytes), {} flushes, {} bookmarks; everything is held by the process server (last lsn {})",
        c.disk.source.display(), sum.seconds, sum.writes, sum.bytes, sum.syncs, e.stats.bookmarks, e.next_lsn() - 1
    );
    Ok(())
}

/// Completes a resync the replay left under way (or one the process server asked for).
async fn finish_resync(e: &mut Engine, mut rs: Option<crate::engine::Resync>) -> Result<()> {
    e.link.poll().await;
    if rs.is_none() && e.link.take_resync_requested() {
        rs = Some(e.resync_begin(false).await?);
    }
    let Some(mut r) = rs else {
        return Ok(());
    };
    while !r.done() {
        e.resync_step(&mut r).await?;
    }
    e.resync_end(r).await?;
    eprintln!(
        "resync: compared {} bytes, sent {} bytes",
        e.stats.resync_compared_bytes, e.stats.resync_sent_bytes
    );
    Ok(())
}

/// The replay's summary: a JSON line, then a sentence.
fn report_replay(sum: &replay::ReplaySummary, e: &Engine) {
    let mut v = serde_json::to_value(sum).expect("serializable");
    v["last_lsn"] = (e.next_lsn() - 1).into();
    v["resync_compared_bytes"] = e.stats.resync_compared_bytes.into();
    v["resync_sent_bytes"] = e.stats.resync_sent_bytes.into();
    // Every bookmark of the run: periodic, requested and the final one.
    v["bookmarks"] = e.stats.bookmarks.into();
    println!("{v}");
    let devices = if sum.other_device > 0 {
        format!(
            "; {} writes of other devices left out (--device all merges them)",
            sum.other_device
        )
    } else {
        String::new()
    };
    println!(
        "replayed {} writes ({} bytes) of device {:?} over {:.2} s of trace; {} wrapped into the disk, {} skipped, {} bad lines skipped; {} bookmarks; last lsn {}{devices}",
        sum.writes, sum.bytes, sum.device, sum.trace_seconds, sum.wrapped, sum.skipped, sum.bad_lines, e.stats.bookmarks, e.next_lsn() - 1
    );
}

/// `agent bookmark`: the pre-hook, the freeze, the bookmark taken by the running agent,
/// the thaw (always), the post-hook, then the wait until it is durable on the master target.
async fn bookmark_cmd(
    state_dir: &Path,
    tag: &str,
    timeout: Duration,
    f: &FreezeArgs,
) -> Result<()> {
    crate::freeze::check_targets(&f.mountpoints, state_dir)?;
    if let Some(h) = &f.pre_hook {
        crate::freeze::run_hook("pre", h, HOOK_TIMEOUT)?;
    }
    let taken = take_frozen(state_dir, tag, timeout, f).await;
    // After the bookmark is in the stream (or could not be): the application resumes.
    let post = match &f.post_hook {
        Some(h) => crate::freeze::run_hook("post", h, HOOK_TIMEOUT),
        None => Ok(()),
    };
    let (mut client, pause_ms) = match (taken, &post) {
        (Ok(t), _) => t,
        (Err(e), Ok(())) => return Err(e),
        (Err(e), Err(p)) => return Err(Error::Refused(format!("{e}; and {p}"))),
    };
    let r = client.answer(timeout + Duration::from_secs(10)).await?;
    if !r.ok {
        return Err(Error::Refused(format!("bookmark {tag:?}: {}", r.error)));
    }
    let frozen = match pause_ms {
        Some(ms) => format!(
            "; {} frozen for {ms} ms",
            f.mountpoints
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => String::new(),
    };
    println!(
        "bookmark {:?} taken at lsn {} and durable on the master target: its recovery point has lsn {} (master-target points lists it as app-consistent); source disk digest {}{frozen}",
        r.tag, r.lsn, r.lsn, r.disk_digest
    );
    if let Err(p) = post {
        return Err(Error::Refused(format!(
            "the bookmark is durable (lsn {}), but {p}",
            r.lsn
        )));
    }
    Ok(())
}

/// Freezes the filesystems (if any), has the agent take the bookmark, and thaws as soon as
/// it is taken or the freeze window ends. Returns the request (its last answer still to
/// come) and how long the filesystems were frozen. Without filesystems to freeze it still
/// waits until the bookmark is taken, so a post-hook never resumes an application before.
async fn take_frozen(
    state_dir: &Path,
    tag: &str,
    timeout: Duration,
    f: &FreezeArgs,
) -> Result<(crate::control::Client, Option<u64>)> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut req = crate::control::BookmarkRequest {
        tag: tag.to_owned(),
        timeout_ms: timeout.as_millis() as u64,
        take_before_mono_ms: 0,
        report_taken: true,
    };
    if f.mountpoints.is_empty() {
        let mut client = crate::control::Client::send(state_dir, &req).await?;
        let first = client.answer(timeout + Duration::from_secs(10)).await?;
        return taken_or_why(tag, first, None).map(|()| (client, None));
    }
    // While frozen, SIGINT, SIGTERM and SIGHUP are caught, not fatal: dying here would
    // leave the filesystems frozen. They end the command once thawed.
    let kinds = [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
    ];
    let mut caught = Vec::new();
    for k in kinds {
        caught.push(signal(k).ctx(|| "catch signals".into())?);
    }
    let window = Duration::from_secs(f.freeze_timeout_s);
    // The window starts before the first freeze: no filesystem stays frozen longer.
    let started = crate::freeze::mono_ms();
    req.take_before_mono_ms = started + window.as_millis() as u64;
    let frozen = crate::freeze::Frozen::freeze(&f.mountpoints, window)?;
    let answered = match crate::control::Client::send(state_dir, &req).await {
        Ok(mut client) => {
            let left = Duration::from_millis(
                req.take_before_mono_ms
                    .saturating_sub(crate::freeze::mono_ms()),
            );
            client.answer(left).await.map(|a| (client, a))
        }
        Err(e) => Err(e),
    };
    // Thawed before anything else is looked at: applications wait while frozen.
    frozen.thaw()?;
    let pause_ms = crate::freeze::mono_ms() - started;
    if caught
        .iter_mut()
        .any(|s| futures::FutureExt::now_or_never(s.recv()).is_some())
    {
        return Err(Error::Refused(format!(
            "interrupted: the filesystems were thawed after {pause_ms} ms; the bookmark may have been taken before the thaw (master-target points shows it once durable)"
        )));
    }
    let (client, first) = answered.map_err(|e| {
        Error::Refused(format!(
            "bookmark {tag:?} not taken within the {} s freeze window (thawed after {pause_ms} ms): {e}; the agent takes none after the window; retry, with a longer --freeze-timeout-s if the agent is busy",
            window.as_secs()
        ))
    })?;
    taken_or_why(tag, first, Some(pause_ms)).map(|()| (client, Some(pause_ms)))
}

/// The first answer must say the bookmark was taken.
fn taken_or_why(
    tag: &str,
    first: crate::control::BookmarkReply,
    pause_ms: Option<u64>,
) -> Result<()> {
    if first.taken {
        return Ok(());
    }
    let thawed = pause_ms.map_or(String::new(), |ms| format!(" (thawed after {ms} ms)"));
    let why = if first.error.is_empty() {
        "the agent did not say it was taken (an agent older than this command: restart it with this version)".to_owned()
    } else {
        first.error
    };
    Err(Error::Refused(format!("bookmark {tag:?}{thawed}: {why}")))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Replay(c) => replay_cmd(c).await,
        Command::Protect(c) => protect_cmd(c).await,
        Command::Resync { disk, mode } => {
            let mut e = engine(&disk).await?;
            let p = bar(0, "resync");
            let started = std::time::Instant::now();
            e.resync(mode == ResyncMode::Full, Some(&p)).await?;
            e.drain(Duration::from_secs(600)).await?;
            p.finish_and_clear();
            let (c, s) = (e.stats.resync_compared_bytes, e.stats.resync_sent_bytes);
            let mode = if mode == ResyncMode::Full {
                "full"
            } else {
                "differential"
            };
            println!("resync {mode}: compared {c} bytes, sent {s} bytes, saved {} bytes ({:.1}%), {:.2} s", c - s.min(c), 100.0 * (c - s.min(c)) as f64 / c.max(1) as f64, started.elapsed().as_secs_f64());
            Ok(())
        }
        Command::Bookmark {
            state_dir,
            tag,
            timeout_s,
            freeze,
        } => bookmark_cmd(&state_dir, &tag, Duration::from_secs(timeout_s), &freeze).await,
        Command::Digest { image } => {
            println!("{}  {}", hex(&image_digest(&image)?), image.display());
            Ok(())
        }
    }
}
