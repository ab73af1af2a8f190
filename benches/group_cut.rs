//! How long a replication group's cut holds its members' writes (the pause), with real
//! processes on loopback: the process server, the master target, and one `agent replay`
//! per VM of the group, replaying the Tencent CBS trace (real block trace) at 10x while the
//! bench takes on-demand group bookmarks back to back. Cases:
//! - 2 VMs writing; 8 VMs writing (on 2 cores);
//! - 2 VMs idle (the trace done, streams open);
//! - 2 VMs writing, one of them 10 ms from the process server (a delay relay): the pause
//!   includes the round trips;
//! - 2 VMs, one stalled (SIGSTOP): every cut is abandoned; how long the operator waits.
//!
//! The pause is what each agent measured from the hold to its marker (the process server's
//! `/groups`, last 1024 holds); the round trip is the operator's request to its answer.
//! Run: `cargo bench --bench group_cut`. Prints a table and a JSON line.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use failback::harness::Cluster;

/// Cuts per case.
const CUTS: usize = 200;
/// The trace replayed by every VM, and its pace.
const TRACE: &str = "tests/data/traces/tencent-cbs-50k.msr.csv";
const PACE: &str = "10x";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo's bench listing
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_failback"));
    let mut rows = Vec::new();
    for (name, vms, idle, far, stall) in [
        ("2 VMs writing", 2, false, false, false),
        ("8 VMs writing", 8, false, false, false),
        ("2 VMs idle", 2, true, false, false),
        ("2 VMs writing, one 10 ms away", 2, false, true, false),
        ("2 VMs, one stalled (SIGSTOP)", 2, false, false, true),
    ] {
        let r = case(bin, name, vms, (idle, far, stall));
        println!(
            "{name:<32} made {:>3}/{:<3}  pause p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  round trip p50 {:>7.2} ms  p99 {:>7.2} ms",
            r["made"], r["cuts"], r["pause_p50_ms"].as_f64().unwrap(), r["pause_p99_ms"].as_f64().unwrap(),
            r["pause_max_ms"].as_f64().unwrap(), r["rtt_p50_ms"].as_f64().unwrap(), r["rtt_p99_ms"].as_f64().unwrap()
        );
        rows.push(r);
    }
    println!(
        "{}",
        serde_json::json!({ "bench": "group_cut", "cuts_per_case": CUTS, "cases": rows })
    );
}

fn agent(c: &Cluster, vm: &str, disk: u64, extra: &[&str]) -> Child {
    let src = c.dir.join("source").join(format!("{vm}.img"));
    let log = std::fs::File::create(c.dir.join(format!("logs/agent-{vm}.log"))).unwrap();
    c.agent_in_vm("replay", vm, disk, &src, "256MiB")
        .arg(format!(
            "--trace={}",
            Path::new(env!("CARGO_MANIFEST_DIR")).join(TRACE).display()
        ))
        .arg("--format=msr")
        .arg("--group=bench")
        .arg(format!("--seed={disk}"))
        .arg("--stay")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn case(
    bin: &Path,
    name: &str,
    vms: usize,
    (idle, far, stall): (bool, bool, bool),
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), bin).unwrap();
    let members: Vec<String> = (1..=vms).map(|i| format!("vm{i}")).collect();
    c.ps_extra = vec![
        format!("--group=bench={}", members.join(",")),
        // Only the bench's own cuts.
        "--group-cut-interval-s=86400".into(),
    ];
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    let relay = far.then(|| {
        failback::relay::DelayRelay::start("127.0.0.1:0", &c.ps_addr, Duration::from_millis(10))
            .unwrap()
    });
    let pace = format!("--pace={PACE}");
    let mut agents = Vec::new();
    for (i, vm) in members.iter().enumerate() {
        let near = c.ps_addr.clone();
        if let (Some(r), 1) = (&relay, i) {
            c.ps_addr = r.addr.clone();
        }
        let extra: Vec<&str> = if idle {
            vec!["--max-writes=100"]
        } else {
            vec![pace.as_str()]
        };
        agents.push(agent(&c, vm, i as u64 + 1, &extra));
        c.ps_addr = near;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let post = |tag: &str| {
        let body = serde_json::json!({"group": "bench", "tag": tag, "wait_s": 0}).to_string();
        let t = Instant::now();
        let (code, _) = rt
            .block_on(runtime::admin::admin_request(
                &c.ps_admin,
                runtime::admin::Method::Post,
                "/groups/bookmark",
                &body,
            ))
            .unwrap();
        (code == 200, t.elapsed().as_secs_f64() * 1000.0)
    };
    // Every member attached and answering (bounded).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !post("warm-up").0 {
        assert!(
            Instant::now() < deadline,
            "{name}: no cut made in 120 s: {}",
            c.log_tails(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if idle {
        std::thread::sleep(Duration::from_secs(3));
    }
    if stall {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(agents[1].id() as i32, libc::SIGSTOP) };
    }
    let cuts = if stall { 10 } else { CUTS };
    let mut rtts = Vec::new();
    let mut made = 0;
    for n in 0..cuts {
        let (ok, ms) = post(&format!("b{n}"));
        made += usize::from(ok);
        rtts.push(ms);
    }
    let (_, body) = failback::harness::http_get(&c.ps_admin, "/groups").unwrap();
    let g: serde_json::Value = serde_json::from_str::<serde_json::Value>(&body).unwrap()[0].clone();
    for a in &mut agents {
        // SAFETY: as above.
        unsafe { libc::kill(a.id() as i32, libc::SIGCONT) };
        let _ = a.kill();
        let _ = a.wait();
    }
    c.stop();
    let ms = |k: &str| g[k].as_f64().unwrap_or(0.0) / 1000.0;
    serde_json::json!({
        "case": name,
        "vms": vms,
        "made": made,
        "cuts": cuts,
        "pause_p50_ms": ms("pause_p50_us"),
        "pause_p99_ms": ms("pause_p99_us"),
        "pause_max_ms": ms("pause_max_us"),
        "rtt_p50_ms": percentile(&mut rtts.clone(), 50.0),
        "rtt_p99_ms": percentile(&mut rtts, 99.0),
        "last_abandoned": g["last_abandoned"],
    })
}
