//! failback through emulated WAN links, on real content, beside iperf3 on the same link.
//!
//! Each shaped link is two network namespaces joined by a veth pair with `tbf` on both ends
//! (the rate) and a delaying relay (`failback::relay`, half the RTT each way: this kernel has
//! no netem). The process server and the agent run in one namespace, the master target in
//! the other. The written data is drawn from an ext4 image of a real OS tree (`mkfs.ext4 -d
//! /usr/share`), so compression ratios are a real disk's.
//!
//! Cases measured here: **bulk**, agent start to everything durable on-premises: a full
//! resync of the 1 GiB real-content image (the first replication of a real disk); and
//! **drain**, the same image held in the process server's cache (the link held down by the
//! relay), then released: link back to all durable. Per link: logical and wire throughput, link
//! utilization (wire bits over the link's rate), compression ratio, CPU seconds per logical
//! GB and peak RSS of each service; iperf3 on the same link when it is installed.
//!
//! The bandwidth limit (`--max-bandwidth` 512 kbit/s and 10 Mbit/s) is measured through the
//! 100 Mbit/s link: the bytes the process server sends, timed as they reach the relay.
//!
//! **diff** is a differential resync of the same image to an on-premises disk that differs
//! in 1% of its blocks, beside `rsync --inplace --no-whole-file` of the same two images on
//! the same link (an rsync daemon where the master target runs).
//!
//! **The process server alone** (`WAN_LINKS=sink`): bulk, drain and churn on loopback
//! toward a master target that acknowledges what it decodes and keeps nothing
//! (`sink.rs`), the churn asking 400 MB/s of writes: what one process server carries on
//! these two cores when no master target's apply shares them.
//!
//! Run: `cargo bench --bench wan` (`WAN_CASES=limit` or `bulk,drain,churn,diff` for a part,
//! `WAN_LINKS=100mbit`, `1gbit`, `loopback` or `sink` for some links,
//! `WAN_PS_ARGS="--compression-level=6"` to give the process server flags of its own;
//! root for the shaped links; without root, or without
//! `ip`/`tc`, it says so and measures loopback only). Namespaces are named `fbwan-*`; they
//! are removed when the bench ends or fails, on Ctrl-C or SIGTERM (with what runs in them
//! and the content image), and any left by a SIGKILLed run are removed first.

mod case;
mod net;
mod plot;
mod sink;

use net::{can_shape, iperf3, Net};

use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// The links: name, tbf rate (none: loopback), round-trip time.
const LINKS: [(&str, Option<&str>, u64); 3] = [
    ("100 Mbit/s, 10 ms RTT", Some("100mbit"), 10),
    ("1 Gbit/s, 2 ms RTT", Some("1gbit"), 2),
    ("loopback", None, 0),
];
/// The process server alone: on loopback, toward a master target that acknowledges what it
/// decodes and keeps nothing (`sink.rs`), so no master target's apply shares the cores.
/// `WAN_LINKS=sink` runs it alone.
const SINK: &str = "sink";
const SINK_NAME: &str = "loopback, sink master target";
/// The real-content image: its size, and the tree it holds.
const CONTENT_BYTES: u64 = 1 << 30;
const CONTENT_TREE: &str = "/usr/share";
/// The process server's `--max-bandwidth` settings measured through the 100 Mbit/s link.
const BANDWIDTH_LIMITS: [&str; 2] = ["512kbit", "10mbit"];
/// The namespaces' prefix (a killed run's are found by it).
const NS_PREFIX: &str = "fbwan-";
/// The veth pair's addresses.
const IP_PS: &str = "10.79.0.1";
const IP_MT: &str = "10.79.0.2";

/// Set by the Ctrl-C handler: a case that fails now failed because its processes were
/// killed, and waits for the handler's exit instead of reporting it.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ctrl-C or SIGTERM: the services it started (in its namespaces or beside it) are killed,
/// the namespaces and the working directory (a 1 GiB image, every case's disks and keys)
/// removed, and the bench exits 130.
fn on_interrupt(dir: &Path) {
    // A case that fails because the handler killed what it waits on holds its report
    // until the handler has cleaned up and exited.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_secs(30));
        }
        report(info);
    }));
    let dir = dir.to_owned();
    let ours = format!("{NS_PREFIX}{}-", std::process::id());
    let set = ctrlc::set_handler(move || {
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        eprintln!("wan: interrupted: stopping its services, removing its namespaces");
        net::kill_descendants();
        net::remove_namespaces(&ours);
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "wan: interrupted; its namespaces and {} removed",
            dir.display()
        );
        std::process::exit(130);
    });
    if let Err(e) = set {
        eprintln!(
            "wan: no Ctrl-C handler ({e}): an interrupted run's namespaces go at the next run"
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // cargo's bench listing
    }
    if let Some(i) = args.iter().position(|a| a == "--inner") {
        // Inside the process server's namespace: one case, a JSON line out.
        let a = &args[i + 1..];
        let v = cases(
            Path::new(&a[0]),
            (
                a.get(1).map(String::as_str),
                a.get(2).map_or(0, |d| d.parse().unwrap()),
            ),
            a.get(3).map(String::as_str),
            false,
        );
        println!("{v}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    on_interrupt(dir.path());
    let content = dir.path().join("content.img");
    make_content(&content);
    let shaped = can_shape();
    if let Err(why) = &shaped {
        eprintln!("wan: shaped links skipped ({why}); loopback only");
    }
    let mut rows = Vec::new();
    for (name, rate, rtt_ms) in LINKS {
        if !link_wanted(rate) {
            continue;
        }
        let v = match (rate, &shaped) {
            (None, _) => cases(&content, (None, 0), None, false),
            (Some(r), Ok(())) => shaped_case(&content, r, rtt_ms),
            (Some(_), Err(_)) => continue,
        };
        eprintln!("{name}: {v}");
        rows.push((name, v));
    }
    if link_wanted(Some(SINK)) {
        let v = cases(&content, (None, 0), None, true);
        eprintln!("{SINK_NAME}: {v}");
        rows.push((SINK_NAME, v));
    }
    if let Ok(extra) = std::env::var("WAN_PS_ARGS") {
        println!("process server run with WAN_PS_ARGS: {extra}");
    }
    if ran(&rows, "bulk") {
        println!("bulk (agent start -> all durable on-premises): full resync of a 1 GiB ext4 image of {CONTENT_TREE}");
        println!("| link | logical MB/s | wire MB/s | link used | ratio | zstd-1+TLS pipe MB/s at its ratio (ours ÷ pipe) | iperf3 Mbit/s | CPU s/GB PS, MT, agent | peak RSS MiB PS, MT |");
        println!("|---|---|---|---|---|---|---|---|---|");
    }
    for (name, v) in &rows {
        let b = &v["bulk"];
        if b.is_null() {
            continue;
        }
        let f = |k: &str| b[k].as_f64().unwrap_or(0.0);
        println!(
            "| {name} | {:.1} | {:.1} | {} | {:.2}:1 | {} | {} | {:.1}, {:.1}, {:.1} | {:.0}, {:.0} |",
            f("logical_mb_s"),
            f("wire_mb_s"),
            used(b),
            f("ratio"),
            b["pipe_mb_s"].as_f64().map_or("-".into(), |p| format!(
                "{p:.1} at {:.2}:1 ({:.2}x)",
                f("pipe_ratio"),
                f("vs_pipe")
            )),
            v["iperf3_mbit_s"].as_f64().map_or("-".into(), |m| format!("{m:.0}")),
            f("ps_cpu_s_per_gb"),
            f("mt_cpu_s_per_gb"),
            f("agent_cpu_s_per_gb"),
            f("ps_peak_rss_mib"),
            f("mt_peak_rss_mib"),
        );
    }
    if ran(&rows, "drain") {
        println!("drain of the same image held in the process server's cache, then released (release to all durable, the reconnect included)");
        println!("| link | logical MB/s | wire MB/s | link used | wire ÷ iperf3 | from the first byte on the wire (the reconnect left out): s, link used, wire ÷ iperf3 | CPU s/GB PS, MT | peak RSS MiB PS, MT |");
        println!("|---|---|---|---|---|---|---|---|");
    }
    for (name, v) in &rows {
        let d = &v["drain"];
        if d.is_null() {
            continue;
        }
        let f = |k: &str| d[k].as_f64().unwrap_or(0.0);
        let of_iperf3 = |wire_mb_s: f64| {
            v["iperf3_mbit_s"]
                .as_f64()
                .map_or("-".into(), |m| format!("{:.2}", wire_mb_s * 8.0 / m))
        };
        println!(
            "| {name} | {:.1} | {:.1} | {} | {} | {} s, {}, {} | {:.1}, {:.1} | {:.0}, {:.0} |",
            f("logical_mb_s"),
            f("wire_mb_s"),
            used(d),
            of_iperf3(f("wire_mb_s")),
            d["linked_seconds"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.1}")),
            d["link_used_linked"]
                .as_f64()
                .map_or("-".into(), |u| format!("{u:.2}")),
            d["wire_mb_s_linked"].as_f64().map_or("-".into(), of_iperf3),
            f("ps_cpu_s_per_gb"),
            f("mt_cpu_s_per_gb"),
            f("ps_peak_rss_mib"),
            f("mt_peak_rss_mib"),
        );
    }
    if ran(&rows, "churn") {
        println!("churn: the Tencent CBS trace with the image's bytes, looped and sped up to put half the link's rate on the wire (at the bulk ratio; run again at the churn's own ratio when that put under 45% of the link on the wire and the writes asked were carried)");
        println!("| link | speed | logical MB/s | wire MB/s | link used | RPO p50 / p99 / max ms (samples) |");
        println!("|---|---|---|---|---|---|");
    }
    for (name, v) in &rows {
        let ch = &v["churn"];
        if ch.is_null() {
            continue;
        }
        let u = |k: &str| ch[k].as_u64().unwrap_or(0);
        let f = |k: &str| ch[k].as_f64().unwrap_or(0.0);
        println!(
            "| {name} | {:.1}x | {:.1} | {:.1} | {} | {} / {} / {} ({}) |",
            f("speed_factor"),
            f("logical_mb_s"),
            f("wire_mb_s"),
            used(ch),
            u("rpo_p50_ms"),
            u("rpo_p99_ms"),
            u("rpo_max_ms"),
            u("rpo_samples"),
        );
    }
    print_alone(&rows);
    print_diff(&rows);
    print_limits(&rows);
    let plots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/wan");
    match plot::write(&plots, &rows) {
        Ok(()) => eprintln!("wan: plots in {}", plots.display()),
        Err(e) => eprintln!("wan: no plots: {e}"),
    }
    println!(
        "{}",
        serde_json::json!(rows
            .iter()
            .map(|(n, v)| serde_json::json!({"link": n, "cases": v}))
            .collect::<Vec<_>>())
    );
}

/// Whether any link ran `case` (a partial run prints no empty tables).
fn ran(rows: &[(&str, serde_json::Value)], case: &str) -> bool {
    rows.iter().any(|(_, v)| !v[case].is_null())
}

/// The process server alone (toward the sink master target): what it carried, and its CPU
/// per logical GB beside the agent's and the sink's, which share its two cores here.
fn print_alone(rows: &[(&str, serde_json::Value)]) {
    let Some((_, v)) = rows.iter().find(|r| r.0 == SINK_NAME) else {
        return;
    };
    if ["bulk", "drain", "churn"].iter().all(|c| v[c].is_null()) {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!("the process server alone: loopback, toward a master target that acknowledges what it decodes and keeps nothing (the agent, the sink and, in the drain, the relay still share the {cores} cores)");
    println!("| case | logical MB/s | ratio | CPU s/GB PS, agent, sink | {cores} cores ÷ the PS's CPU per GB, MB/s | peak RSS MiB PS |");
    println!("|---|---|---|---|---|---|");
    for case in ["bulk", "drain", "churn"] {
        let c = &v[case];
        if c.is_null() {
            continue;
        }
        let f = |k: &str| c[k].as_f64().unwrap_or(0.0);
        // A drain is timed from the release: the agent was done before it.
        let agent = if case == "drain" {
            "-".into()
        } else {
            format!("{:.1}", f("agent_cpu_s_per_gb"))
        };
        println!(
            "| {case} | {:.1} | {:.2}:1 | {:.1}, {agent}, {:.1} | {:.0} | {:.0} |",
            f("logical_mb_s"),
            f("ratio"),
            f("ps_cpu_s_per_gb"),
            f("sink_cpu_s_per_gb"),
            cores as f64 / f("ps_cpu_s_per_gb").max(1e-9) * 1e3,
            f("ps_peak_rss_mib"),
        );
    }
}

/// The differential resync's table: failback beside rsync on the same images and link.
fn print_diff(rows: &[(&str, serde_json::Value)]) {
    if !ran(rows, "diff") {
        return;
    }
    println!("differential resync to the original location: the 1 GiB image with 1% of its 64 KiB blocks replaced by other blocks of it; failback agent start -> all durable and verified, beside rsync --inplace --no-whole-file (daemon, plain TCP) of the same images on the same link");
    println!("| link | failback s | failback MB on the link (both ways) | rsync s | rsync MB (both ways) | failback ÷ rsync time |");
    println!("|---|---|---|---|---|---|");
    for (name, v) in rows {
        let d = &v["diff"];
        if d.is_null() {
            continue;
        }
        let r = &d["rsync"];
        let secs = d["seconds"].as_f64().unwrap_or(0.0);
        let mb =
            |x: &serde_json::Value| x.as_f64().map_or("-".into(), |b| format!("{:.1}", b / 1e6));
        println!(
            "| {name} | {secs:.2} | {} | {} | {} | {} |",
            mb(&d["both_ways_bytes"]),
            r["seconds"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.2}")),
            mb(&r["both_ways_bytes"]),
            r["seconds"]
                .as_f64()
                .map_or("-".into(), |s| format!("{:.2}", secs / s)),
        );
    }
}

/// The bandwidth limits' table (the links they were measured through).
fn print_limits(rows: &[(&str, serde_json::Value)]) {
    if rows
        .iter()
        .all(|(_, v)| v["limits"].as_array().is_none_or(Vec::is_empty))
    {
        return;
    }
    println!("bandwidth limit (--max-bandwidth) with a 1 GiB resync to carry: bytes leaving the process server for the master target, timed at the relay, over 10 s after 2 s");
    println!("| link | limit | measured | ÷ limit | longest burst beyond the steady rate |");
    println!("|---|---|---|---|---|");
    for (name, v) in rows {
        for l in v["limits"].as_array().into_iter().flatten() {
            let f = |k: &str| l[k].as_f64().unwrap_or(0.0);
            println!(
                "| {name} | {} | {:.1} kbit/s | {:.3} | {:.0} ms |",
                l["limit"].as_str().unwrap_or("-"),
                f("measured_bytes_s") * 8.0 / 1e3,
                f("of_limit"),
                f("longest_burst_ms"),
            );
        }
    }
}

/// Whether `case` is to run: `WAN_CASES` (e.g. `limit` or `bulk,drain`) names the cases of
/// a partial run; all run by default.
fn wanted(case: &str) -> bool {
    std::env::var("WAN_CASES").map_or(true, |l| l.split(',').any(|c| c.trim() == case))
}

/// Whether the link of tbf `rate` is to run: `WAN_LINKS` (e.g. `1gbit` or
/// `100mbit,loopback`) names the links of a partial run; all run by default.
fn link_wanted(rate: Option<&str>) -> bool {
    let name = rate.unwrap_or("loopback");
    std::env::var("WAN_LINKS").map_or(true, |l| l.split(',').any(|c| c.trim() == name))
}

fn used(v: &serde_json::Value) -> String {
    v["link_used"]
        .as_f64()
        .map_or("-".into(), |u| format!("{u:.2}"))
}

/// The cases on one link (toward the sink master target with `sink`: no diff, no limits).
/// A churn that put less than this share of the link on the wire runs again at its own
/// compression ratio (the aim is measured at half the link).
const CHURN_RERUN_BELOW: f64 = 0.45;
/// ... if it carried at least this share of the writes it asked for.
const CHURN_CARRIED_SHARE: f64 = 0.9;

fn cases(
    content: &Path,
    mt: (Option<&str>, u64),
    rate: Option<&str>,
    sink: bool,
) -> serde_json::Value {
    use case::{run, Case};
    let bulk = wanted("bulk").then(|| run(Case::Bulk, content, mt, rate, sink));
    let ratio = bulk
        .as_ref()
        .and_then(|b| b["ratio"].as_f64())
        .unwrap_or(1.0);
    // The bandwidth limits are measured through the 100 Mbit/s link (they are below it).
    let limits: Vec<_> = if rate == Some("100mbit") && wanted("limit") {
        BANDWIDTH_LIMITS
            .iter()
            .map(|l| run(Case::Limit(l), content, mt, rate, false))
            .collect()
    } else {
        Vec::new()
    };
    let churn = ((rate.is_some() || sink) && wanted("churn")).then(|| {
        let first = run(Case::Churn(ratio), content, mt, rate, sink);
        // The trace's small writes compress better than the bulk image (7:1 against 5:1
        // at 100 Mbit/s), so at the bulk ratio the wire carries about a third of the link:
        // once more at the ratio the churn itself measured, unless the first run did not
        // carry what it asked (bound by the cores, as at 1 Gbit/s here).
        let f = |k: &str| first[k].as_f64().unwrap_or(0.0);
        let asked_bytes_s = f("speed_factor") * case::CHURN_TRACE_BYTES_PER_S;
        let carried = f("logical_mb_s") * 1e6 >= CHURN_CARRIED_SHARE * asked_bytes_s;
        if rate.is_some() && f("link_used") < CHURN_RERUN_BELOW && carried && f("ratio") > 0.0 {
            let mut second = run(Case::Churn(f("ratio")), content, mt, rate, sink);
            second["first_run_link_used"] = first["link_used"].clone();
            second
        } else {
            first
        }
    });
    let diff = (!sink && wanted("diff")).then(|| run(Case::Diff, content, mt, rate, false));
    serde_json::json!({
        "diff": diff,
        "limits": limits,
        "drain": wanted("drain").then(|| run(Case::Drain, content, mt, rate, sink)),
        "churn": churn,
        "bulk": bulk,
    })
}

/// An ext4 image of a real OS tree (the content the agent writes).
fn make_content(img: &Path) {
    let t = Instant::now();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d", CONTENT_TREE])
        .arg(img)
        .arg(format!("{}k", CONTENT_BYTES >> 10))
        .output()
        .expect("mkfs.ext4 is installed");
    assert!(
        out.status.success(),
        "mkfs.ext4 -d {CONTENT_TREE}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "wan: content image of {CONTENT_TREE} made in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// The bulk case on a shaped link: this bench again inside the process server's namespace,
/// and iperf3 on the same link.
fn shaped_case(content: &Path, rate: &str, rtt_ms: u64) -> serde_json::Value {
    let net = Net::new(rate);
    let me = std::env::current_exe().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &net.a])
        .arg(&me)
        .arg("--inner")
        .arg(content)
        .arg(&net.b)
        .arg((rtt_ms / 2).to_string())
        .arg(rate)
        .output()
        .unwrap();
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        // The handler exits the bench within moments.
        std::thread::sleep(std::time::Duration::from_secs(30));
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: serde_json::Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON line from the inner run");
    v["iperf3_mbit_s"] = iperf3(&net).map_or(serde_json::Value::Null, Into::into);
    v
}
