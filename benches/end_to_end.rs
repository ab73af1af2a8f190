//! End to end on loopback: agent → process server → master target as real processes over
//! mutual TLS, replaying the Tencent CBS trace (all 19,988 writes, as fast as possible, data
//! that compresses about 2:1). Reports logical and wire throughput, compression and RPO.
//!
//! Run: `cargo bench --bench end_to_end` (add `-- --link 100mbit` to limit the link).

use std::path::Path;
use std::time::{Duration, Instant};

use failback::harness::Cluster;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // cargo's bench listing
    }
    let link = args
        .iter()
        .position(|a| a == "--link")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let bin = Path::new(env!("CARGO_BIN_EXE_failback"));
    let trace =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/traces/tencent-cbs-50k.msr.csv");
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), bin).unwrap();
    if let Some(l) = &link {
        c.ps_extra.push(format!("--max-bandwidth={l}"));
    }
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    let src = c.dir.join("source/bench.img");
    let started = Instant::now();
    let out = c
        .agent("replay", 1, &src, "1GiB")
        .arg(format!("--trace={}", trace.display()))
        .arg("--format=msr")
        .arg("--compressibility=0.5")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap();
    let ingest_s = started.elapsed().as_secs_f64();
    let mut rpo = Vec::new();
    c.wait_durable(
        1,
        report["last_lsn"].as_u64().unwrap(),
        Duration::from_secs(1200),
        |s| rpo.push(s.rpo_ms),
    )
    .unwrap();
    let total_s = started.elapsed().as_secs_f64();
    let s = c.ps_status().unwrap().remove(0);
    rpo.sort_unstable();
    println!(
        "end_to_end: {} writes, {:.1} MB logical, {:.1} MB on the wire ({:.2}:1), link {}",
        report["writes"],
        s.logical_bytes as f64 / 1e6,
        s.wire_bytes as f64 / 1e6,
        s.logical_bytes as f64 / s.wire_bytes as f64,
        link.as_deref().unwrap_or("unlimited")
    );
    println!("end_to_end: agent done in {ingest_s:.2} s; durable on the master target in {total_s:.2} s: {:.1} MB/s logical, {:.1} MB/s wire", s.logical_bytes as f64 / 1e6 / total_s, s.wire_bytes as f64 / 1e6 / total_s);
    println!(
        "end_to_end: RPO while draining p50 {} ms, max {} ms",
        rpo.get(rpo.len() / 2).copied().unwrap_or(0),
        rpo.last().copied().unwrap_or(0)
    );
    let metrics = failback::harness::http_get(&c.ps_admin, "/metrics")
        .map(|r| r.1)
        .unwrap_or_default();
    let level = metrics
        .lines()
        .find(|l| l.starts_with("failback_ps_compression_level "))
        .unwrap_or("failback_ps_compression_level ?");
    println!("end_to_end: {level} at the end (auto mode adapts it to the bottleneck)");
    c.stop();
}
