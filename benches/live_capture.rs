//! Live capture (`agent protect`) against the plain image file it stands in for, with the
//! process server and master target running as real processes on loopback:
//! - sequential 1 MiB writes (O_DIRECT, then fsync): the plain image file, a loop device
//!   on it, and a loop device on the captured file;
//! - 4 KiB random O_DIRECT writes: latency p50/p99/max on both loop devices;
//! - the freeze-to-thaw pause of `agent bookmark --freeze` on ext4 on the captured device
//!   (a few sqlite3 transactions committed before each), beside a bare `fsfreeze -f`/`-u`
//!   of the same filesystem (the kernel's share: its freeze waits for RCU grace periods);
//!   then both again with `/sys/kernel/rcu_expedited` set (put back as it was after).
//!
//! Run: `cargo bench --bench live_capture` (root, /dev/fuse, loop devices, mkfs.ext4 and
//! sqlite3; without them it says what is missing and measures nothing). Prints a table and
//! a JSON line. `LIVE_CASES=freeze` (any of `seq,rand,freeze`) runs a part; a case left out
//! prints no figure.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use failback::harness::Cluster;
use failback::live::{self, Committed, Loop, Mounted};

/// Bytes written by each sequential run.
const SEQ_BYTES: u64 = 512 << 20;
/// The sequential runs' write size.
const SEQ_WRITE: usize = 1 << 20;
/// Sequential runs per target (the median is reported).
const SEQ_RUNS: usize = 3;
/// Random 4 KiB writes per target.
const RAND_WRITES: usize = 3000;
/// Frozen bookmarks measured, with the kernel's defaults and again with expedited RCU
/// (about 0.3 s each: enough for a p99 that is not the maximum of a few).
const FREEZES: usize = 100;
/// The disk (and plain image) size.
const DISK: &str = "1GiB";
const DISK_BYTES: u64 = 1 << 30;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo's bench listing
    }
    let missing = live::missing_tools();
    if !missing.is_empty() {
        eprintln!(
            "live_capture: measures nothing here; it needs {}",
            missing.join(", ")
        );
        return;
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_failback"));
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), bin).unwrap();
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    let mount_dir = c.dir.join("capture");
    let mut agent = live::start_protect(
        &c,
        1,
        &c.dir.join("source/disk.img"),
        DISK,
        (&mount_dir, &[]),
        &c.dir.join("logs/agent.log"),
    )
    .unwrap();
    let plain = c.dir.join("plain.img");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let cap_lo = Loop::attach(&mount_dir.join("disk.img"), false).unwrap();
    let plain_lo = Loop::attach(&plain, false).unwrap();

    let cases = std::env::var("LIVE_CASES").unwrap_or_else(|_| "seq,rand,freeze".into());
    let run = |case: &str| cases.split(',').any(|c| c.trim() == case);
    let (mut seq_file, mut seq_plain_loop, mut seq_capture, mut seq_capture_alone) =
        (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    if run("seq") {
        seq_file = median_seq(&plain.display().to_string());
        seq_plain_loop = median_seq(&plain_lo.dev);
        seq_capture = median_seq(&cap_lo.dev);
    }
    let (mut rand_plain, mut rand_capture) = (Vec::new(), Vec::new());
    if run("rand") {
        rand_plain = random_writes(&plain_lo.dev);
        rand_capture = random_writes(&cap_lo.dev);
    }
    if run("seq") {
        // Capture alone: with the process server down the agent holds writes in its buffer
        // (256 MiB), then tracks dirty regions, so the replication pipeline is out of the way.
        c.kill_ps();
        seq_capture_alone = median_seq(&cap_lo.dev);
        c.start_ps().unwrap();
        caught_up(&c);
    }
    let (mut freeze_bookmark, mut freeze_bare) = (Vec::new(), Vec::new());
    let (mut fast_bookmark, mut fast_bare) = (Vec::new(), Vec::new());
    if run("freeze") {
        let m = ext4(&c, &cap_lo);
        let mut db = Committed::default();
        (freeze_bookmark, freeze_bare) = freezes(&c, &m, &mut db, "b");
        match RcuExpedited::on() {
            Ok(_on) => (fast_bookmark, fast_bare) = freezes(&c, &m, &mut db, "e"),
            Err(e) => eprintln!("live_capture: the freeze with expedited RCU is not measured: {e}"),
        }
        m.unmount().unwrap();
    }
    drop(plain_lo);
    drop(cap_lo);
    let _ = Command::new("umount").arg(&mount_dir).status();
    let mut report = String::new();
    if let Some(out) = agent.stdout.as_mut() {
        let _ = std::io::Read::read_to_string(out, &mut report);
    }
    let _ = agent.wait();
    let report: serde_json::Value = report
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let avg_write =
        report["bytes"].as_u64().unwrap_or(0) / report["writes"].as_u64().unwrap_or(1).max(1);
    let mb = |s: f64| SEQ_BYTES as f64 / s / 1e6;
    println!("live capture on this machine ({} MiB sequential, median of {SEQ_RUNS}; {RAND_WRITES} random 4 KiB writes; {FREEZES} freezes; the kernel's writes to the captured file averaged {avg_write} bytes)", SEQ_BYTES >> 20);
    println!("  sequential 1 MiB O_DIRECT + fsync: plain file {:.0} MB/s, loop on plain file {:.0} MB/s, loop on captured file {:.0} MB/s ({:.2}x the plain file)", mb(seq_file), mb(seq_plain_loop), mb(seq_capture), seq_file / seq_capture);
    println!("  the same, capture alone (process server down: writes held in the agent's 256 MiB buffer, then tracked as dirty regions): {:.0} MB/s ({:.2}x the plain file)", mb(seq_capture_alone), seq_file / seq_capture_alone);
    println!("  4 KiB random O_DIRECT write latency p50/p99/max: loop on plain file {}, loop on captured file {}", q3(&rand_plain), q3(&rand_capture));
    println!("  freeze-to-thaw pause p50/p99/max on the captured ext4: agent bookmark --freeze {}, bare fsfreeze -f/-u {}", q3(&freeze_bookmark), q3(&freeze_bare));
    println!("  the same with /sys/kernel/rcu_expedited=1 (the kernel's freeze waits for RCU grace periods; expedited ones take microseconds): agent bookmark --freeze {}, bare fsfreeze -f/-u {}", q3(&fast_bookmark), q3(&fast_bare));
    println!(
        "{}",
        serde_json::json!({
            "agent_avg_write_bytes": avg_write,
            "seq_plain_file_mb_s": mb(seq_file),
            "seq_plain_loop_mb_s": mb(seq_plain_loop),
            "seq_capture_mb_s": mb(seq_capture),
            "seq_capture_vs_plain_file": seq_file / seq_capture,
            "seq_capture_alone_mb_s": mb(seq_capture_alone),
            "rand_plain_us": quantiles(&rand_plain),
            "rand_capture_us": quantiles(&rand_capture),
            "freeze_bookmark_us": quantiles(&freeze_bookmark),
            "freeze_bare_us": quantiles(&freeze_bare),
            "freeze_bookmark_rcu_expedited_us": quantiles(&fast_bookmark),
            "freeze_bare_rcu_expedited_us": quantiles(&fast_bare),
        })
    );
}

/// A page-aligned buffer for O_DIRECT (an anonymous mapping), filled with bytes that do
/// not compress.
fn aligned(len: usize) -> memmap2::MmapMut {
    let mut m = memmap2::MmapMut::map_anon(len).unwrap();
    fastrand::Rng::with_seed(7).fill(&mut m);
    m
}

/// Seconds for the median of [`SEQ_RUNS`] sequential runs on `target`.
fn median_seq(target: &str) -> f64 {
    let buf = aligned(SEQ_WRITE);
    let mut runs: Vec<f64> = (0..SEQ_RUNS)
        .map(|_| {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(target)
                .unwrap();
            let t = Instant::now();
            let mut off = 0;
            while off < SEQ_BYTES {
                f.write_all_at(&buf, off).unwrap();
                off += SEQ_WRITE as u64;
            }
            f.sync_all().unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[SEQ_RUNS / 2]
}

/// Latencies (µs) of [`RAND_WRITES`] 4 KiB O_DIRECT writes at random places of `dev`.
fn random_writes(dev: &str) -> Vec<u64> {
    let buf = aligned(4096);
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    (0..RAND_WRITES)
        .map(|_| {
            let off = rng.u64(0..DISK_BYTES / 4096) * 4096;
            let t = Instant::now();
            f.write_all_at(&buf, off).unwrap();
            t.elapsed().as_micros() as u64
        })
        .collect()
}

/// Waits (bounded) until the agent has resent what it held while the process server was
/// down: a bookmark is taken only then.
fn caught_up(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let out = Command::new(&c.bin)
            .args([
                "agent",
                "bookmark",
                "--tag",
                "caught-up",
                "--timeout-s=60",
                "--state-dir",
            ])
            .arg(c.agent_state(1))
            .output()
            .unwrap();
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not catch up in 300 s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The kernel's `rcu_expedited` switch, on while this lives; its earlier value is put back
/// on drop (also when the bench fails).
struct RcuExpedited {
    before: String,
}

const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

impl RcuExpedited {
    fn on() -> std::io::Result<RcuExpedited> {
        let before = std::fs::read_to_string(RCU_EXPEDITED)?;
        std::fs::write(RCU_EXPEDITED, "1")?;
        Ok(RcuExpedited { before })
    }
}

impl Drop for RcuExpedited {
    fn drop(&mut self) {
        let _ = std::fs::write(RCU_EXPEDITED, self.before.trim());
    }
}

/// A fresh ext4 on the captured device, mounted, its lazy inode-table initialisation done
/// (it writes in the background and would be timed with the first freezes).
fn ext4(c: &Cluster, cap: &Loop) -> Mounted {
    live::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&cap.dev),
    )
    .unwrap();
    Mounted::mount(&cap.dev, &c.dir.join("mnt"), false).unwrap()
}

/// Freeze pauses (µs) on ext4 on the captured device, a few transactions committed before
/// each: `agent bookmark --freeze` (freeze, bookmark, thaw) and, alternating with it, a
/// bare `fsfreeze -f` and `-u` of the same filesystem: the kernel's own share.
/// `committed` is what the database holds before, and after; the bookmarks are tagged
/// `{tag}{i}`.
fn freezes(c: &Cluster, m: &Mounted, committed: &mut Committed, tag: &str) -> (Vec<u64>, Vec<u64>) {
    let mut out = (Vec::new(), Vec::new());
    for i in 0..FREEZES {
        *committed = live::commit(&m.dir, *committed, 5, 4000).unwrap();
        let said = live::run(
            Command::new(&c.bin)
                .args([
                    "agent",
                    "bookmark",
                    "--tag",
                    &format!("{tag}{i}"),
                    "--state-dir",
                ])
                .arg(c.agent_state(1))
                .arg("--freeze")
                .arg(&m.dir),
        )
        .unwrap();
        let ms: u64 = said
            .split("frozen for ")
            .nth(1)
            .and_then(|s| s.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no pause in {said:?}"));
        out.0.push(ms * 1000);
        *committed = live::commit(&m.dir, *committed, 5, 4000).unwrap();
        let t = Instant::now();
        live::run(Command::new("fsfreeze").arg("-f").arg(&m.dir)).unwrap();
        live::run(Command::new("fsfreeze").arg("-u").arg(&m.dir)).unwrap();
        out.1.push(t.elapsed().as_micros() as u64);
    }
    out
}

fn quantiles(v: &[u64]) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null; // the case did not run
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let q = |f: f64| s[((s.len() - 1) as f64 * f).round() as usize];
    serde_json::json!({ "p50": q(0.5), "p99": q(0.99), "max": q(1.0) })
}

/// p50/p99/max, in ms.
fn q3(v: &[u64]) -> String {
    let q = quantiles(v);
    if q.is_null() {
        return "not run".into();
    }
    let ms = |k: &str| q[k].as_u64().unwrap_or(0) as f64 / 1000.0;
    format!("{:.2}/{:.2}/{:.2} ms", ms("p50"), ms("p99"), ms("max"))
}
