//! `failback demo`: the whole failback on one machine, on built-in defaults, verified.
//!
//! 1. certificates; 2. master target and process server as separate processes on loopback;
//! 3. a source disk and an on-premises VMDK differing in a few percent of its blocks;
//! 4. a differential resync, then a real trace replayed with app-consistent bookmarks;
//! 5. live progress; then the planned failback: drain, take the final point, detach, verify
//!    the on-premises disk equals the source, export the latest app-consistent point and
//!    verify it against the digest recorded at its bookmark; 6. a summary.

use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use failback::harness::{file_blake3, first_difference, Cluster, DiskStatus, Error, Result};
use serde_json::json;

/// The trace the demo replays by default (MIT; see tests/data/traces/README.md).
pub(crate) const DEFAULT_TRACE: &[u8] = include_bytes!("../tests/data/traces/tpcc-small.disksim");
const DISK_ID: u64 = 1;
const BLOCK: u64 = 64 << 10;

/// Demo options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Replay this trace instead of the built-in TPC-C sample.
    #[arg(long, requires = "format")]
    pub trace: Option<PathBuf>,
    /// Its format: msr, disksim (ms), disksim-ns, vscsi or blkparse.
    #[arg(long)]
    pub format: Option<String>,
    /// Size of the disk (with units, e.g. 16GiB).
    #[arg(long, default_value = "1GiB")]
    pub disk_size: String,
    /// How compressible the written data is (0.0 random .. 1.0 zeros).
    #[arg(long, default_value_t = 0.5)]
    pub compressibility: f64,
    /// Limit the link between process server and master target (e.g. 100mbit).
    #[arg(long)]
    pub link: Option<String>,
    /// Percent of the on-premises disk's blocks that differ before the resync.
    #[arg(long, default_value_t = 3.0)]
    pub differ_percent: f64,
    /// Keep everything in this directory (disks, logs, data) instead of a temporary one.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
    /// Protect a live ext4 filesystem instead of replaying a trace: `agent protect` serves
    /// the disk through FUSE, sqlite3 commits transactions and a file tree is untarred on
    /// it, with frozen bookmarks; the failed-back disk and points are proven with e2fsck,
    /// mount and sqlite3. Needs root, FUSE and loop devices.
    #[arg(long, conflicts_with_all = ["trace", "format"])]
    pub live: bool,
    /// With --live: the file tree untarred onto the filesystem (default /usr/share/zoneinfo,
    /// else /usr/share/doc, else /etc).
    #[arg(long, requires = "live")]
    pub tree: Option<PathBuf>,
    /// Two VMs of one replication group fail back together: the process server cuts the
    /// group every second and the demo bookmarks it on demand; the latest and an earlier
    /// group point are exported whole and every disk of each is checked.
    #[arg(long, conflicts_with_all = ["trace", "format", "live"])]
    pub group: bool,
}

/// Runs the demo; returns the exit code.
pub fn run(args: DemoArgs) -> i32 {
    if let Err(e) = validate(&args) {
        eprintln!("failback demo: error: {e}");
        return 2;
    }
    let tmp;
    let dir = match &args.keep {
        Some(d) => d.clone(),
        None => match tempfile::Builder::new().prefix("failback-demo-").tempdir() {
            Ok(t) => {
                tmp = t;
                tmp.path().to_path_buf()
            }
            Err(e) => {
                eprintln!("failback demo: error: temporary directory: {e}");
                return 1;
            }
        },
    };
    // Interrupted, the demo stops what it started and unmounts what it mounted.
    failback::cleanup::on_interrupt("failback demo", args.keep.is_none().then(|| dir.clone()));
    let result = if args.live {
        let missing = failback::live::missing_tools();
        if !missing.is_empty() {
            eprintln!(
                "failback demo --live: error: this machine lacks: {}",
                missing.join("; ")
            );
            return 2;
        }
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        crate::demo_live::demo(&args, &dir)
    } else if args.group {
        crate::demo_group::demo(&args, &dir)
    } else {
        demo(&args, &dir)
    };
    failback::cleanup::wait_if_interrupted();
    match result {
        Ok(summary) => {
            print_summary(&summary);
            if args.json {
                println!("{summary}");
            }
            i32::from(!summary["verified"].as_bool().unwrap_or(false))
        }
        Err(e) => {
            eprintln!("failback demo: FAILED: {e}");
            if args.keep.is_none() {
                eprintln!("(run with --keep DIR to keep the disks and logs for inspection)");
            }
            1
        }
    }
}

/// The largest demo disk: a sparse file, but the demo hashes it whole several times.
const MAX_DEMO_DISK_BYTES: u64 = 1 << 40;

/// Checks every option against its range before anything is made.
fn validate(args: &DemoArgs) -> std::result::Result<(), String> {
    let range = |flag: &str, v: f64, lo: f64, hi: f64| {
        if !(lo..=hi).contains(&v) {
            return Err(format!(
                "invalid --{flag}: {v} is outside the range {lo} to {hi}"
            ));
        }
        Ok(())
    };
    range("compressibility", args.compressibility, 0.0, 1.0)?;
    range("differ-percent", args.differ_percent, 0.0, 100.0)?;
    let size = runtime::units::parse_bytes(&args.disk_size)
        .map_err(|e| format!("invalid --disk-size: {e}"))?;
    if !(BLOCK..=MAX_DEMO_DISK_BYTES).contains(&size) || !size.is_multiple_of(512) {
        return Err(format!(
            "invalid --disk-size: {} is outside the range 64 KiB to 1 TiB, or not a multiple of 512 bytes",
            args.disk_size
        ));
    }
    if let Some(l) = &args.link {
        let bps = runtime::units::parse_rate(l).map_err(|e| format!("invalid --link: {e}"))?;
        if bps < 1_000 {
            return Err(format!(
                "invalid --link: {l} is below the smallest link the demo takes, 8kbit"
            ));
        }
    }
    if let Some(k) = &args.keep {
        if k.exists() && !k.is_dir() {
            return Err(format!(
                "--keep {}: not a directory; the demo keeps its disks in a new or empty directory",
                k.display()
            ));
        }
        let used = std::fs::read_dir(k).map(|mut d| d.next().is_some());
        if used.unwrap_or(false) {
            return Err(format!(
                "--keep {}: the directory is not empty; the demo keeps its disks in a new or empty directory",
                k.display()
            ));
        }
    }
    Ok(())
}

pub(crate) fn step(n: u32, text: &str) {
    eprintln!("[{n}/6] {text}");
}

pub(crate) fn fail(msg: impl Into<String>) -> Error {
    Error::Failed(msg.into())
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// The demo's files.
struct Layout {
    dir: PathBuf,
    source: PathBuf,
    vm_folder: PathBuf,
    onprem_desc: PathBuf,
}

/// What was watched while replicating.
#[derive(Default)]
struct Watched {
    rpo_samples: Vec<u64>,
    last: DiskStatus,
}

impl Watched {
    fn saw(&mut self, s: DiskStatus) {
        self.rpo_samples.push(s.rpo_ms);
        self.last = s;
    }

    /// The `q` quantile of the RPO samples, in ms.
    fn rpo_ms(&mut self, q: f64) -> u64 {
        self.rpo_samples.sort_unstable();
        self.rpo_samples
            .get(((self.rpo_samples.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    }
}

/// What the failback's checks found.
struct Verified {
    problems: Vec<String>,
    src_hash: blake3::Hash,
    dst_hash: blake3::Hash,
    points: Vec<serde_json::Value>,
    latest_app: String,
    earlier_checked: Option<String>,
}

fn demo(args: &DemoArgs, dir: &Path) -> Result<serde_json::Value> {
    let disk_bytes = runtime::units::parse_bytes(&args.disk_size).map_err(fail)?;
    let (mut c, l) = setup(args, dir, disk_bytes)?;
    let (trace_path, format) = trace_of(args, &l.dir)?;
    step(
        4,
        &format!(
            "differential resync, then replaying {} with app-consistent bookmarks{}",
            trace_path.display(),
            args.link
                .as_deref()
                .map(|l| format!(" through a {l} link"))
                .unwrap_or_default()
        ),
    );
    let started = Instant::now();
    let child = start_agent(&c, args, &l, &trace_path, &format)?;

    step(5, "replicating (live: backlog, RPO, throughput)");
    let bar = indicatif::ProgressBar::new_spinner();
    let mut watched = Watched::default();
    let report = watch_agent(&c, child, &l, started, &bar, &mut watched)?;
    let last_lsn = report["last_lsn"]
        .as_u64()
        .ok_or_else(|| fail("no last_lsn in the agent's report"))?;

    // The planned failback: the writer has stopped (the VM is shut down); drain.
    let failback_started = Instant::now();
    c.wait_durable(DISK_ID, last_lsn, Duration::from_secs(600), |s| {
        bar.set_message(format!(
            "draining: {} of {last_lsn} on-premises, backlog {}",
            s.durable_lsn,
            human(s.backlog_bytes)
        ));
        bar.tick();
        watched.saw(s.clone());
    })?;
    bar.finish_and_clear();
    let replicate_secs = started.elapsed().as_secs_f64();
    step(
        6,
        "failing back: final point taken, disk drained and detached; verifying",
    );
    c.detach(DISK_ID)?;
    let v = verify(&c, &l)?;
    let failback_secs = failback_started.elapsed().as_secs_f64();
    c.stop();
    for p in &v.problems {
        eprintln!("MISMATCH: {p}");
    }
    let secs = (replicate_secs, failback_secs);
    Ok(summary(
        args,
        disk_bytes,
        &trace_path,
        &report,
        &mut watched,
        &v,
        secs,
    ))
}

/// Steps 1 to 3: certificates, the two services, the source disk and a stale on-premises
/// copy of it.
fn setup(args: &DemoArgs, dir: &Path, disk_bytes: u64) -> Result<(Cluster, Layout)> {
    let bin = std::env::current_exe().map_err(io("find own binary"))?;
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;

    step(1, "making a CA and server/client certificates");
    let dir = std::path::absolute(dir).map_err(io(format!("resolve {}", dir.display())))?;
    let mut c = Cluster::new(&dir, &bin)?;
    if let Some(l) = &args.link {
        runtime::units::parse_rate(l).map_err(fail)?;
        c.ps_extra.push(format!("--max-bandwidth={l}"));
    }

    step(
        2,
        "starting master-target and process-server as separate processes on loopback",
    );
    c.start_mt()?;
    c.start_ps()?;
    c.wait_linked(Duration::from_secs(30))?;

    step(3, &format!("making the source disk ({}) and an on-premises VMDK that differs in {:.1}% of its blocks", args.disk_size, args.differ_percent));
    let vm_folder = dir.join("onprem").join("vm1");
    let l = Layout {
        source: dir.join("source").join("vm1-disk1.img"),
        onprem_desc: vm_folder.join("vm1-disk1.vmdk"),
        vm_folder,
        dir,
    };
    make_disks(
        &l.source,
        (&l.vm_folder, "vm1-disk1"),
        disk_bytes,
        args.differ_percent,
        args.compressibility,
    )?;

    Ok((c, l))
}

/// The demo's JSON summary.
fn summary(
    args: &DemoArgs,
    disk_bytes: u64,
    trace_path: &Path,
    report: &serde_json::Value,
    watched: &mut Watched,
    v: &Verified,
    (replicate_secs, failback_secs): (f64, f64),
) -> serde_json::Value {
    let last = watched.last.clone();
    let compared = report["resync_compared_bytes"].as_u64().unwrap_or(0);
    let sent = report["resync_sent_bytes"].as_u64().unwrap_or(0);
    json!({
        "verified": v.problems.is_empty(),
        "disk_bytes": disk_bytes,
        "trace": trace_path.display().to_string(),
        "writes": report["writes"],
        "logical_bytes": last.logical_bytes,
        "wire_bytes": last.wire_bytes,
        "compression_ratio": if last.wire_bytes > 0 { last.logical_bytes as f64 / last.wire_bytes as f64 } else { 0.0 },
        "coalesced_bytes": last.coalesced_bytes,
        "seconds": replicate_secs,
        "throughput_mb_s": last.logical_bytes as f64 / replicate_secs / 1e6,
        "rpo_p50_ms": watched.rpo_ms(0.5),
        "rpo_p99_ms": watched.rpo_ms(0.99),
        "rpo_max_ms": watched.rpo_ms(1.0),
        "recovery_points": v.points.len(),
        "app_consistent_points": v.points.iter().filter(|p| p["kind"] == "app-consistent").count(),
        "resync_compared_bytes": compared,
        "resync_sent_bytes": sent,
        "resync_saved_bytes": compared.saturating_sub(sent),
        "failback_seconds": failback_secs,
        "latest_app_point": v.latest_app,
        "earlier_point_checked": v.earlier_checked,
        "source_blake3": v.src_hash.to_hex().to_string(),
        "onprem_blake3": v.dst_hash.to_hex().to_string(),
        "kept_in": args.keep.as_ref().map(|d| d.display().to_string()),
    })
}

/// The trace to replay: the user's, or the built-in sample written beside the disks.
fn trace_of(args: &DemoArgs, dir: &Path) -> Result<(PathBuf, String)> {
    match (&args.trace, &args.format) {
        (Some(t), Some(f)) => Ok((t.clone(), f.clone())),
        _ => {
            let p = dir.join("tpcc-small.disksim");
            std::fs::write(&p, DEFAULT_TRACE).map_err(io(format!("write {}", p.display())))?;
            Ok((p, "disksim-ns".to_string()))
        }
    }
}

/// Starts the agent: a differential resync against the stale on-premises disk, then the
/// trace with periodic app-consistent bookmarks and a final one.
fn start_agent(
    c: &Cluster,
    args: &DemoArgs,
    l: &Layout,
    trace: &Path,
    format: &str,
) -> Result<std::process::Child> {
    let mut agent = c.agent("replay", DISK_ID, &l.source, &args.disk_size);
    let log = std::fs::File::create(l.dir.join("logs/agent.log")).map_err(io("agent log"))?;
    agent
        .arg(format!("--trace={}", trace.display()))
        .arg(format!("--format={format}"))
        .arg("--device=all")
        .arg(format!("--compressibility={}", args.compressibility))
        .arg("--location=original")
        .arg(format!("--target={}", l.onprem_desc.display()))
        .arg("--resync=differential")
        .arg(format!(
            "--bookmark-every-s={}",
            if args.trace.is_some() { 10.0 } else { 0.02 }
        ))
        .arg("--final-bookmark=failback-final")
        .stdout(Stdio::piped())
        .stderr(log);
    agent.spawn().map_err(io("start the agent"))
}

/// Shows progress until the agent ends; returns its JSON report (an error if it failed).
fn watch_agent(
    c: &Cluster,
    mut child: std::process::Child,
    l: &Layout,
    started: Instant,
    bar: &indicatif::ProgressBar,
    watched: &mut Watched,
) -> Result<serde_json::Value> {
    let status = loop {
        if let Some(st) = child.try_wait().map_err(io("agent"))? {
            break st;
        }
        if let Some(s) = c
            .ps_status()
            .ok()
            .and_then(|v| v.into_iter().find(|s| s.disk_id == DISK_ID))
        {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            bar.set_message(format!(
                "lsn {} cached / {} on-premises | backlog {} | RPO {:.1} s | logical {:.1} MB/s, wire {:.1} MB/s",
                s.cached_lsn, s.durable_lsn, human(s.backlog_bytes), s.rpo_ms as f64 / 1000.0, s.logical_bytes as f64 / secs / 1e6, s.wire_bytes as f64 / secs / 1e6
            ));
            bar.tick();
            watched.saw(s);
        }
        if started.elapsed() > Duration::from_secs(1800) {
            let _ = child.kill();
            return Err(fail("the agent did not finish in 30 minutes"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().expect("piped"), &mut out)
        .map_err(io("agent output"))?;
    if !status.success() {
        return Err(fail(format!(
            "the agent failed ({status}); see {}",
            l.dir.join("logs/agent.log").display()
        )));
    }
    out.lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| fail("the agent printed no report"))
}

/// The failback's proof: the on-premises disk equals the source, and the latest and an
/// earlier app-consistent point export to the digests the agent recorded.
fn verify(c: &Cluster, l: &Layout) -> Result<Verified> {
    let onprem_flat = l.vm_folder.join("vm1-disk1-flat.vmdk");
    let (src_hash, dst_hash) = (file_blake3(&l.source)?, file_blake3(&onprem_flat)?);
    let mut problems = Vec::new();
    if src_hash != dst_hash {
        let block = first_difference(&l.source, &onprem_flat, BLOCK as usize)?;
        problems.push(format!("the on-premises disk differs from the source: first differing 64 KiB block {block:?} (offset {:?})", block.map(|b| b * BLOCK)));
    }
    let bookmarks =
        agent::engine::read_bookmarks(&c.agent_state(DISK_ID)).map_err(|e| fail(e.to_string()))?;
    let points = c.points(DISK_ID)?;
    let app = bookmarks
        .last()
        .ok_or_else(|| fail("no bookmark was taken"))?;
    let export = l.vm_folder.join("vm1-disk1-latest-app.vmdk");
    c.export(DISK_ID, "latest-app", &export, "vmdk")?;
    let exported = digest_of(&l.vm_folder.join("vm1-disk1-latest-app-flat.vmdk"))?;
    if exported != app.disk_digest {
        problems.push(format!("the latest app-consistent point ({}) exports to digest {exported}, but the agent recorded {}", app.tag, app.disk_digest));
    }
    // An earlier app-consistent point too, when there is one.
    let mut earlier_checked = None;
    if bookmarks.len() >= 2 {
        let b = &bookmarks[bookmarks.len() / 2];
        if let Some(p) = points.iter().find(|p| p["tag"] == b.tag.as_str()) {
            let out = l.vm_folder.join("earlier.img");
            c.export(DISK_ID, &p["id"].to_string(), &out, "raw")?;
            let d = digest_of(&out)?;
            if d != b.disk_digest {
                problems.push(format!(
                    "point {} ({}) exports to digest {d}, but the agent recorded {}",
                    p["id"], b.tag, b.disk_digest
                ));
            }
            let _ = std::fs::remove_file(&out);
            earlier_checked = Some(b.tag.clone());
        }
    }
    Ok(Verified {
        problems,
        src_hash,
        dst_hash,
        latest_app: app.tag.clone(),
        points,
        earlier_checked,
    })
}

/// An image's disk digest (the agent's definition), hex.
pub(crate) fn digest_of(image: &Path) -> Result<String> {
    Ok(agent::source::hex(
        &agent::source::image_digest(image).map_err(|e| fail(e.to_string()))?,
    ))
}

/// Writes the source disk (deterministic data) and an on-premises flat VMDK equal to it
/// except in `differ_percent` of its 64 KiB blocks.
pub(crate) fn make_disks(
    source: &Path,
    (onprem_dir, name): (&Path, &str),
    size: u64,
    differ_percent: f64,
    compressibility: f64,
) -> Result<()> {
    let ioe = |c: String| {
        move |e: std::io::Error| Error::Io {
            context: c,
            source: e,
        }
    };
    let src = std::fs::File::create(source).map_err(ioe(format!("create {}", source.display())))?;
    src.set_len(size).map_err(ioe("size source".into()))?;
    let named = blake3::hash(name.as_bytes());
    let uuid: [u8; 16] = named.as_bytes()[..16].try_into().expect("16");
    let seed = u64::from_le_bytes(named.as_bytes()[16..24].try_into().expect("8"));
    std::fs::create_dir_all(onprem_dir).map_err(ioe(format!("create {}", onprem_dir.display())))?;
    let img = master_target::vmdk::create(onprem_dir, name, size, &uuid)
        .map_err(|e| fail(e.to_string()))?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .open(&img.data_path)
        .map_err(ioe(format!("open {}", img.data_path.display())))?;
    let chunk = 4u64 << 20;
    let every = if differ_percent > 0.0 {
        (100.0 / differ_percent).round().max(1.0) as u64
    } else {
        u64::MAX
    };
    let mut buf = vec![0u8; chunk as usize];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        // Seeded by the disk's name: each VM's disk holds its own data.
        agent::datagen::fill(seed, off / chunk, compressibility, &mut buf[..n]);
        src.write_all_at(&buf[..n], off)
            .map_err(ioe("write source".into()))?;
        // The on-premises copy went stale while the VM ran in Azure: some blocks differ.
        for (i, block) in buf[..n].chunks_mut(BLOCK as usize).enumerate() {
            if ((off / BLOCK) + i as u64) % every == every / 2 {
                block[..8].copy_from_slice(b"OLD-DATA");
            }
        }
        dst.write_all_at(&buf[..n], off)
            .map_err(ioe("write on-premises disk".into()))?;
        off += n as u64;
    }
    src.sync_all().map_err(ioe("fsync source".into()))?;
    dst.sync_all()
        .map_err(ioe("fsync on-premises disk".into()))?;
    Ok(())
}

pub(crate) fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn print_summary(s: &serde_json::Value) {
    let mut o = std::io::stderr().lock();
    let _ = writeln!(o, "\n  failback demo summary");
    let _ = writeln!(
        o,
        "  ---------------------------------------------------------------"
    );
    let rows = if s["mode"] == "live" {
        live_rows(s)
    } else if s["mode"] == "group" {
        crate::demo_group::rows(s)
    } else {
        data_rows(s).into_iter().chain(time_rows(s)).collect()
    };
    for (k, v) in rows {
        let _ = writeln!(o, "  {k:<22} {v}");
    }
    if let Some(k) = s["kept_in"].as_str() {
        let _ = writeln!(
            o,
            "  {:<22} {k} (source/, onprem/, logs/, data/)",
            "kept in"
        );
    }
}

/// The live demo's rows.
fn live_rows(s: &serde_json::Value) -> Vec<(&'static str, String)> {
    let u = |k: &str| s[k].as_u64().unwrap_or(0);
    let points = s["points_checked"].as_array().map_or(0, Vec::len);
    vec![
        (
            "verified",
            if s["verified"].as_bool() == Some(true) {
                "yes: on-premises disk == source (blake3); every point fscks clean, mounts, and holds its committed rows".into()
            } else {
                "NO".into()
            },
        ),
        (
            "writes captured",
            format!(
                "{} ({}), {} flushes",
                u("writes"),
                human(u("bytes")),
                u("syncs")
            ),
        ),
        ("rows committed", u("rows_committed").to_string()),
        ("frozen bookmarks", u("bookmarks").to_string()),
        (
            "points proven",
            format!("{points}, {} failures", u("app_recovery_failures")),
        ),
        (
            "time",
            format!("{:.1} s", s["seconds"].as_f64().unwrap_or(0.0)),
        ),
    ]
}

/// The summary's rows about what was verified and carried.
fn data_rows(s: &serde_json::Value) -> Vec<(&'static str, String)> {
    let u = |k: &str| s[k].as_u64().unwrap_or(0);
    let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
    vec![
        (
            "verified",
            if s["verified"].as_bool() == Some(true) {
                "yes: on-premises disk == source (blake3), points export exactly".into()
            } else {
                "NO".into()
            },
        ),
        ("writes replayed", u("writes").to_string()),
        (
            "logical bytes",
            format!("{} ({})", u("logical_bytes"), human(u("logical_bytes"))),
        ),
        (
            "bytes on the wire",
            format!("{} ({})", u("wire_bytes"), human(u("wire_bytes"))),
        ),
        (
            "compression ratio",
            format!("{:.2}:1", f("compression_ratio")),
        ),
        (
            "throughput (logical)",
            format!(
                "{:.1} MB/s over {:.1} s",
                f("throughput_mb_s"),
                f("seconds")
            ),
        ),
    ]
}

/// The summary's rows about time: RPO, points, resync, failback.
fn time_rows(s: &serde_json::Value) -> Vec<(&'static str, String)> {
    let u = |k: &str| s[k].as_u64().unwrap_or(0);
    let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
    vec![
        (
            "RPO p50 / p99 / max",
            format!(
                "{} / {} / {} ms",
                u("rpo_p50_ms"),
                u("rpo_p99_ms"),
                u("rpo_max_ms")
            ),
        ),
        (
            "recovery points kept",
            format!(
                "{} ({} app-consistent)",
                u("recovery_points"),
                u("app_consistent_points")
            ),
        ),
        (
            "resync",
            format!(
                "compared {}, sent {}, saved {}",
                human(u("resync_compared_bytes")),
                human(u("resync_sent_bytes")),
                human(u("resync_saved_bytes"))
            ),
        ),
        (
            "time to fail back",
            format!(
                "{:.2} s (drain, detach, verify, export)",
                f("failback_seconds")
            ),
        ),
    ]
}
