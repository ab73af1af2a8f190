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
const DEFAULT_TRACE: &[u8] = include_bytes!("../tests/data/traces/tpcc-small.disksim");
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
    match demo(&args, &dir) {
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

fn step(n: u32, text: &str) {
    eprintln!("[{n}/6] {text}");
}

fn fail(msg: impl Into<String>) -> Error {
    Error::Failed(msg.into())
}

fn demo(args: &DemoArgs, dir: &Path) -> Result<serde_json::Value> {
    let disk_bytes = runtime::units::parse_bytes(&args.disk_size).map_err(fail)?;
    let bin = std::env::current_exe().map_err(|e| Error::Io {
        context: "find own binary".into(),
        source: e,
    })?;
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        context: format!("create {}", dir.display()),
        source: e,
    })?;

    step(1, "making a CA and server/client certificates");
    let dir = &std::path::absolute(dir).map_err(|e| Error::Io {
        context: format!("resolve {}", dir.display()),
        source: e,
    })?;
    let mut c = Cluster::new(dir, &bin)?;
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
    let source = dir.join("source").join("vm1-disk1.img");
    let vm_folder = dir.join("onprem").join("vm1");
    let onprem_desc = vm_folder.join("vm1-disk1.vmdk");
    make_disks(
        &source,
        &vm_folder,
        disk_bytes,
        args.differ_percent,
        args.compressibility,
    )?;

    let (trace_path, format) = match (&args.trace, &args.format) {
        (Some(t), Some(f)) => (t.clone(), f.clone()),
        _ => {
            let p = dir.join("tpcc-small.disksim");
            std::fs::write(&p, DEFAULT_TRACE).map_err(|e| Error::Io {
                context: format!("write {}", p.display()),
                source: e,
            })?;
            (p, "disksim-ns".to_string())
        }
    };
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
    let mut agent = c.agent("replay", DISK_ID, &source, &args.disk_size);
    agent
        .arg(format!("--trace={}", trace_path.display()))
        .arg(format!("--format={format}"))
        .arg("--device=all")
        .arg(format!("--compressibility={}", args.compressibility))
        .arg("--location=original")
        .arg(format!("--target={}", onprem_desc.display()))
        .arg("--resync=differential")
        .arg(format!(
            "--bookmark-every-s={}",
            if args.trace.is_some() { 10.0 } else { 0.02 }
        ))
        .arg("--final-bookmark=failback-final")
        .stdout(Stdio::piped())
        .stderr(
            std::fs::File::create(dir.join("logs/agent.log")).map_err(|e| Error::Io {
                context: "agent log".into(),
                source: e,
            })?,
        );
    let mut child = agent.spawn().map_err(|e| Error::Io {
        context: "start the agent".into(),
        source: e,
    })?;

    step(5, "replicating (live: backlog, RPO, throughput)");
    let bar = indicatif::ProgressBar::new_spinner();
    let mut rpo_samples = Vec::new();
    let mut last = DiskStatus::default();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| Error::Io {
            context: "agent".into(),
            source: e,
        })? {
            break st;
        }
        if let Some(s) = c
            .ps_status()
            .ok()
            .and_then(|v| v.into_iter().find(|s| s.disk_id == DISK_ID))
        {
            rpo_samples.push(s.rpo_ms);
            let secs = started.elapsed().as_secs_f64().max(0.001);
            bar.set_message(format!(
                "lsn {} cached / {} on-premises | backlog {} | RPO {:.1} s | logical {:.1} MB/s, wire {:.1} MB/s",
                s.cached_lsn, s.durable_lsn, human(s.backlog_bytes), s.rpo_ms as f64 / 1000.0, s.logical_bytes as f64 / secs / 1e6, s.wire_bytes as f64 / secs / 1e6
            ));
            bar.tick();
            last = s;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            let _ = child.kill();
            return Err(fail("the agent did not finish in 30 minutes"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().expect("piped"), &mut out).map_err(
        |e| Error::Io {
            context: "agent output".into(),
            source: e,
        },
    )?;
    if !status.success() {
        return Err(fail(format!(
            "the agent failed ({status}); see {}",
            dir.join("logs/agent.log").display()
        )));
    }
    let report: serde_json::Value = out
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| fail("the agent printed no report"))?;
    let last_lsn = report["last_lsn"]
        .as_u64()
        .ok_or_else(|| fail("no last_lsn in the agent's report"))?;

    // The planned failback: the writer has stopped (the VM is shut down); drain.
    let failback_started = Instant::now();
    c.wait_durable(DISK_ID, last_lsn, Duration::from_secs(600), |s| {
        rpo_samples.push(s.rpo_ms);
        bar.set_message(format!(
            "draining: {} of {last_lsn} on-premises, backlog {}",
            s.durable_lsn,
            human(s.backlog_bytes)
        ));
        bar.tick();
        last = s.clone();
    })?;
    bar.finish_and_clear();
    let replicate_secs = started.elapsed().as_secs_f64();
    step(
        6,
        "failing back: final point taken, disk drained and detached; verifying",
    );
    c.detach(DISK_ID)?;
    let onprem_flat = vm_folder.join("vm1-disk1-flat.vmdk");
    let (src_hash, dst_hash) = (file_blake3(&source)?, file_blake3(&onprem_flat)?);
    let mut problems = Vec::new();
    if src_hash != dst_hash {
        let block = first_difference(&source, &onprem_flat, BLOCK as usize)?;
        problems.push(format!("the on-premises disk differs from the source: first differing 64 KiB block {block:?} (offset {:?})", block.map(|b| b * BLOCK)));
    }
    let bookmarks =
        agent::engine::read_bookmarks(&c.agent_state(DISK_ID)).map_err(|e| fail(e.to_string()))?;
    let points = c.points(DISK_ID)?;
    let app = bookmarks
        .last()
        .ok_or_else(|| fail("no bookmark was taken"))?;
    let export = vm_folder.join("vm1-disk1-latest-app.vmdk");
    c.export(DISK_ID, "latest-app", &export, "vmdk")?;
    let exported = agent::source::hex(
        &agent::source::image_digest(&vm_folder.join("vm1-disk1-latest-app-flat.vmdk"))
            .map_err(|e| fail(e.to_string()))?,
    );
    if exported != app.disk_digest {
        problems.push(format!("the latest app-consistent point ({}) exports to digest {exported}, but the agent recorded {}", app.tag, app.disk_digest));
    }
    // An earlier app-consistent point too, when there is one.
    let mut earlier_checked = None;
    if bookmarks.len() >= 2 {
        let b = &bookmarks[bookmarks.len() / 2];
        if let Some(p) = points.iter().find(|p| p["tag"] == b.tag.as_str()) {
            let out = vm_folder.join("earlier.img");
            c.export(DISK_ID, &p["id"].to_string(), &out, "raw")?;
            let d = agent::source::hex(
                &agent::source::image_digest(&out).map_err(|e| fail(e.to_string()))?,
            );
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
    let failback_secs = failback_started.elapsed().as_secs_f64();
    c.stop();
    for p in &problems {
        eprintln!("MISMATCH: {p}");
    }
    rpo_samples.sort_unstable();
    let pct = |q: f64| {
        rpo_samples
            .get(((rpo_samples.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let compared = report["resync_compared_bytes"].as_u64().unwrap_or(0);
    let sent = report["resync_sent_bytes"].as_u64().unwrap_or(0);
    Ok(json!({
        "verified": problems.is_empty(),
        "disk_bytes": disk_bytes,
        "trace": trace_path.display().to_string(),
        "writes": report["writes"],
        "logical_bytes": last.logical_bytes,
        "wire_bytes": last.wire_bytes,
        "compression_ratio": if last.wire_bytes > 0 { last.logical_bytes as f64 / last.wire_bytes as f64 } else { 0.0 },
        "coalesced_bytes": last.coalesced_bytes,
        "seconds": replicate_secs,
        "throughput_mb_s": last.logical_bytes as f64 / replicate_secs / 1e6,
        "rpo_p50_ms": pct(0.5),
        "rpo_p99_ms": pct(0.99),
        "rpo_max_ms": rpo_samples.last().copied().unwrap_or(0),
        "recovery_points": points.len(),
        "app_consistent_points": points.iter().filter(|p| p["kind"] == "app-consistent").count(),
        "resync_compared_bytes": compared,
        "resync_sent_bytes": sent,
        "resync_saved_bytes": compared.saturating_sub(sent),
        "failback_seconds": failback_secs,
        "latest_app_point": app.tag,
        "earlier_point_checked": earlier_checked,
        "source_blake3": src_hash.to_hex().to_string(),
        "onprem_blake3": dst_hash.to_hex().to_string(),
        "kept_in": args.keep.as_ref().map(|d| d.display().to_string()),
    }))
}

/// Writes the source disk (deterministic data) and an on-premises flat VMDK equal to it
/// except in `differ_percent` of its 64 KiB blocks.
fn make_disks(
    source: &Path,
    onprem_dir: &Path,
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
    let uuid: [u8; 16] = blake3::hash(b"vm1/1").as_bytes()[..16]
        .try_into()
        .expect("16");
    std::fs::create_dir_all(onprem_dir).map_err(ioe(format!("create {}", onprem_dir.display())))?;
    let img = master_target::vmdk::create(onprem_dir, "vm1-disk1", size, &uuid)
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
        agent::datagen::fill(0xd15c, off / chunk, compressibility, &mut buf[..n]);
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

fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn print_summary(s: &serde_json::Value) {
    let u = |k: &str| s[k].as_u64().unwrap_or(0);
    let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
    let mut o = std::io::stderr().lock();
    let _ = writeln!(o, "\n  failback demo summary");
    let _ = writeln!(
        o,
        "  ---------------------------------------------------------------"
    );
    let rows: Vec<(&str, String)> = vec![
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
    ];
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
