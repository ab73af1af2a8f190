//! The soak (issue #11, run by hand): many disks replicating for a long time, with the
//! services' memory, file descriptors, RPO and backlog sampled every second; at the end,
//! every disk compared to its source and the newest point of a few exported and checked.
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/examples/soak --disks 128 --vms 32 --minutes 30 --dir /var/tmp/soak
//! ```
//! Master targets take at most 60 disks each, so it starts as many as the disks need
//! (`--mts`); their memory and descriptors are summed. Writes `samples.csv` in the directory and prints a verdict: the peak of each measure in
//! the last third of the run against the middle third (a leak grows; a bounded measure
//! levels off). Exits non-zero if a disk differs, a point exports wrong, an agent fails,
//! or a measure grows past its allowance.
//!
//! Each disk is one agent process (a VM with four disks runs four, all with the VM's
//! certificate) replaying the Tencent CBS trace at `--pace` (default 0.04x: about 64 KiB/s
//! a disk, 8 MiB/s for 128) with a bookmark every second of trace time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use failback::harness::{file_blake3, Cluster};

#[derive(Parser)]
struct Args {
    /// Disks replicating.
    #[arg(long, default_value_t = 128)]
    disks: u64,
    /// VMs they belong to (one certificate each; disks are dealt round the VMs).
    #[arg(long, default_value_t = 32)]
    vms: u64,
    /// How long the load runs.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Replay speed of each agent.
    #[arg(long, default_value = "0.04x")]
    pace: String,
    /// Size of each disk.
    #[arg(long, default_value = "64MiB")]
    disk_size: String,
    /// Master targets (each takes at most 60 disks; default: as many as the disks need).
    #[arg(long)]
    mts: Option<usize>,
    /// Working directory (kept, with the logs and samples.csv).
    #[arg(long, default_value = "soak")]
    dir: PathBuf,
    /// The failback binary (default: beside this example's directory).
    #[arg(long)]
    bin: Option<PathBuf>,
}

/// One sample of the measures.
#[derive(Clone, Copy, Default)]
struct Sample {
    t_s: f64,
    mt_rss_kib: u64,
    mt_fds: u64,
    ps_rss_kib: u64,
    ps_fds: u64,
    agents_rss_kib: u64,
    max_rpo_ms: u64,
    backlog_bytes: u64,
    durable_lsns: u64,
}

fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn proc_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

fn source(c: &Cluster, disk: u64) -> PathBuf {
    c.dir.join("source").join(format!("disk{disk}.img"))
}

fn vm_of(disk: u64, vms: u64) -> String {
    format!("vm{}", (disk - 1) % vms + 1)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .ok_or("no directory above this example")?
            .join("failback"),
    };
    std::fs::create_dir_all(&args.dir)?;
    let mut c = Cluster::new(&args.dir, &bin)?;
    c.ps_extra.push("--log-format=json".into());
    c.start_mt()?;
    let mts = args
        .mts
        .unwrap_or((args.disks as usize).div_ceil(60))
        .max(1);
    for _ in 1..mts {
        c.start_extra_mt()?;
    }
    c.start_ps()?;
    c.wait_linked(Duration::from_secs(60))?;
    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    let started = Instant::now();
    let failures = Arc::new(AtomicU64::new(0));
    // (disk, agent, whether its exit was seen)
    let children: Arc<Mutex<Vec<(u64, Child, bool)>>> = Arc::default();
    for disk in 1..=args.disks {
        let mut cmd = c.agent_in_vm(
            "replay",
            &vm_of(disk, args.vms),
            disk,
            &source(&c, disk),
            &args.disk_size,
        );
        let trace =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/traces/tencent-cbs-50k.msr.csv");
        let log = std::fs::File::create(c.dir.join("logs").join(format!("agent-{disk}.log")))?;
        cmd.arg(format!("--trace={}", trace.display()))
            .arg("--format=msr")
            .arg(format!("--pace={}", args.pace))
            .arg(format!("--seed={disk}"))
            .arg("--buffer=16MiB")
            .arg("--bookmark-every-s=1")
            .arg("--final-bookmark=final")
            .stdout(Stdio::null())
            .stderr(log);
        children.lock().unwrap().push((disk, cmd.spawn()?, false));
    }
    eprintln!(
        "soak: {} disks on {} VMs for {:.1} min in {}",
        args.disks,
        args.vms,
        args.minutes,
        args.dir.display()
    );

    // The sampler: once a second, bounded by the run.
    let csv_path = c.dir.join("samples.csv");
    let mut csv = std::io::BufWriter::new(std::fs::File::create(&csv_path)?);
    writeln!(csv, "t_s,mt_rss_kib,mt_fds,ps_rss_kib,ps_fds,agents_rss_kib,max_rpo_ms,backlog_bytes,durable_lsns")?;
    let mut samples = Vec::new();
    let mt_pids = c.mt_pids();
    let ps_pid = c.pids().1.ok_or("no process server")?;
    while started.elapsed() < run_for {
        std::thread::sleep(Duration::from_secs(1));
        let status = c.ps_status().unwrap_or_default();
        let mut s = Sample {
            t_s: started.elapsed().as_secs_f64(),
            mt_rss_kib: mt_pids.iter().map(|&p| proc_rss_kib(p)).sum(),
            mt_fds: mt_pids.iter().map(|&p| proc_fds(p)).sum(),
            ps_rss_kib: proc_rss_kib(ps_pid),
            ps_fds: proc_fds(ps_pid),
            max_rpo_ms: status.iter().map(|d| d.rpo_ms).max().unwrap_or(0),
            backlog_bytes: status.iter().map(|d| d.backlog_bytes).sum(),
            durable_lsns: status.iter().map(|d| d.durable_lsn).sum(),
            ..Sample::default()
        };
        let mut kids = children.lock().unwrap();
        for (disk, child, seen) in kids.iter_mut().filter(|k| !k.2) {
            s.agents_rss_kib += proc_rss_kib(child.id());
            if let Ok(Some(st)) = child.try_wait() {
                *seen = true;
                if !st.success() {
                    eprintln!("soak: the agent of disk {disk} exited early: {st}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        drop(kids);
        writeln!(
            csv,
            "{:.1},{},{},{},{},{},{},{},{}",
            s.t_s,
            s.mt_rss_kib,
            s.mt_fds,
            s.ps_rss_kib,
            s.ps_fds,
            s.agents_rss_kib,
            s.max_rpo_ms,
            s.backlog_bytes,
            s.durable_lsns
        )?;
        csv.flush()?;
        samples.push(s);
    }

    // Clean stops: each agent drains what it captured and exits 0.
    let mut kids = std::mem::take(&mut *children.lock().unwrap());
    for (_, child, _) in kids.iter().filter(|k| !k.2) {
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
    }
    for (disk, child, _) in kids.iter_mut().filter(|k| !k.2) {
        let st = child.wait()?;
        if !st.success() {
            eprintln!("soak: the agent of disk {disk} did not stop cleanly: {st}");
            failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Everything acknowledged reaches the master target; every disk equals its source.
    let status = c.ps_status()?;
    for d in &status {
        c.wait_durable(d.disk_id, d.cached_lsn, Duration::from_secs(900), |_| {})?;
    }
    let mut differ = 0;
    // Which master target holds each disk: the one whose datastore has its extent.
    let mut holder = vec![0; args.disks as usize + 1];
    for disk in 1..=args.disks {
        let vm = vm_of(disk, args.vms);
        let flat = |n| {
            c.onprem_of(n)
                .join(&vm)
                .join(format!("{vm}-disk{disk}-flat.vmdk"))
        };
        let Some(n) = (1..=mts).find(|&n| flat(n).exists()) else {
            eprintln!("soak: disk {disk} is on no master target");
            differ += 1;
            continue;
        };
        holder[disk as usize] = n;
        c.detach_on(n, disk)?;
        if file_blake3(&source(&c, disk))? != file_blake3(&flat(n))? {
            eprintln!("soak: disk {disk} differs from its source");
            differ += 1;
        }
    }
    // The newest point of a few disks exports exactly.
    let mut points_checked = 0;
    for disk in (1..=args.disks).step_by((args.disks as usize / 4).max(1)) {
        let bookmarks = agent::engine::read_bookmarks(&c.agent_state(disk))?;
        let n = holder[disk as usize];
        if n == 0 {
            continue;
        }
        let points = c.points_on(n, disk)?;
        let Some((p, b)) = points.iter().rev().find_map(|p| {
            bookmarks
                .iter()
                .find(|b| p["lsn"] == b.lsn)
                .map(|b| (p.clone(), b.clone()))
        }) else {
            eprintln!("soak: disk {disk} has no point for a bookmark");
            differ += 1;
            continue;
        };
        let out = c.dir.join(format!("point-{disk}.img"));
        c.export_on(n, disk, &p["id"].to_string(), &out, "raw")?;
        let d = agent::source::hex(&agent::source::image_digest(&out)?);
        std::fs::remove_file(&out)?;
        if d != b.disk_digest {
            eprintln!("soak: disk {disk} point {} exports wrong", p["id"]);
            differ += 1;
        }
        points_checked += 1;
    }
    c.stop();

    let verdict = verdict(&samples);
    let failed = failures.load(Ordering::Relaxed);
    println!(
        "soak: {} disks, {} VMs, {:.1} min, {} samples in {}",
        args.disks,
        args.vms,
        args.minutes,
        samples.len(),
        csv_path.display()
    );
    println!("{}", verdict.0);
    println!(
        "disks differing: {differ}; points checked: {points_checked}; agent failures: {failed}"
    );
    if differ > 0 || failed > 0 || !verdict.1 {
        return Err("the soak failed".into());
    }
    Ok(())
}

/// The peak of each measure in the middle and the last third, and whether the growth is
/// within its allowance.
fn verdict(samples: &[Sample]) -> (String, bool) {
    let n = samples.len();
    if n < 9 {
        return ("too few samples for a verdict".into(), false);
    }
    let (mid, last) = (&samples[n / 3..2 * n / 3], &samples[2 * n / 3..]);
    let peak = |w: &[Sample], f: fn(&Sample) -> u64| w.iter().map(f).max().unwrap_or(0);
    let mut ok = true;
    let mut out = String::from("measure           middle-third peak   last-third peak   verdict\n");
    // (name, measure, growth ratio allowed, absolute slack allowed): memory settles within
    // allocator slack; descriptors only come and go with connections; RPO and backlog
    // follow the load's bursts but must not climb (a climb is falling behind).
    type Measure = (&'static str, fn(&Sample) -> u64, f64, u64);
    let measures: [Measure; 7] = [
        ("mt_rss_kib", |s| s.mt_rss_kib, 1.25, 4096),
        ("ps_rss_kib", |s| s.ps_rss_kib, 1.25, 4096),
        ("agents_rss_kib", |s| s.agents_rss_kib, 1.25, 4096),
        ("mt_fds", |s| s.mt_fds, 1.0, 8),
        ("ps_fds", |s| s.ps_fds, 1.0, 8),
        ("max_rpo_ms", |s| s.max_rpo_ms, 1.5, 2000),
        ("backlog_bytes", |s| s.backlog_bytes, 1.5, 16 << 20),
    ];
    for (name, f, ratio, slack) in measures {
        let (a, b) = (peak(mid, f), peak(last, f));
        let fine = (b as f64) <= (a as f64) * ratio || b <= a + slack;
        ok &= fine;
        out.push_str(&format!(
            "{name:<17} {a:>18}   {b:>15}   {}\n",
            if fine { "level" } else { "GROWS" }
        ));
    }
    (out, ok)
}
