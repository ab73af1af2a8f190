//! Resident memory of the process server with a 10 GiB backlog: the master target is down
//! while an agent writes 10 GiB (1 MiB sequential writes, data that compresses about 2:1),
//! then it comes back and the backlog drains. Prints the process server's peak RSS (VmHWM)
//! after the ingest and after the drain.
//!
//! Run: `cargo bench --bench backlog_memory` (needs about 40 GiB of free disk).

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use failback::harness::Cluster;

const BACKLOG_MIB: u64 = 10 * 1024;

fn rss_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn ps_pid(c: &Cluster) -> u32 {
    // The process server is the child whose command line names our cache directory.
    let cache = c.dir.join("data/process-server");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("process-server") && cmd.contains(cache.to_str().unwrap()) {
            return pid;
        }
    }
    panic!("process server not found");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut c = Cluster::new(dir.path(), Path::new(env!("CARGO_BIN_EXE_failback"))).unwrap();
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    // A trace of sequential 1 MiB writes (MSR CSV).
    let trace = c.dir.join("seq.msr.csv");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&trace).unwrap());
    for i in 0..BACKLOG_MIB {
        writeln!(
            f,
            "{},bench,0,Write,{},1048576,0",
            128166372000000000u64 + i,
            i << 20
        )
        .unwrap();
    }
    drop(f);
    let src = c.dir.join("source/disk1.img");
    let run = |c: &Cluster, max: u64| {
        let out = c
            .agent("replay", 1, &src, "16GiB")
            .arg(format!("--trace={}", trace.display()))
            .arg("--format=msr")
            .arg(format!("--max-writes={max}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&c, 1); // attach while the master target is up
    c.kill_mt();
    let pid = ps_pid(&c);
    let t = Instant::now();
    run(&c, BACKLOG_MIB);
    let backlog: u64 = c.ps_status().unwrap().iter().map(|s| s.backlog_bytes).sum();
    println!("backlog_memory: {:.2} GiB cached in {:.0} s; process server VmRSS {} MiB, peak (VmHWM) {} MiB", backlog as f64 / (1u64 << 30) as f64, t.elapsed().as_secs_f64(), rss_kib(pid, "VmRSS:") / 1024, rss_kib(pid, "VmHWM:") / 1024);
    c.start_mt().unwrap();
    let t = Instant::now();
    let last = c.ps_status().unwrap()[0].cached_lsn;
    c.wait_durable(1, last, Duration::from_secs(1800), |_| {})
        .unwrap();
    println!(
        "backlog_memory: drained in {:.0} s; process server peak (VmHWM) {} MiB",
        t.elapsed().as_secs_f64(),
        rss_kib(pid, "VmHWM:") / 1024
    );
    c.stop();
}
