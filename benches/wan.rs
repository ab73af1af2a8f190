//! failback through emulated WAN links, on real content, beside iperf3 on the same link.
//!
//! Each shaped link is two network namespaces joined by a veth pair with `tbf` on both ends
//! (the rate) and a delaying relay (`failback::relay`, half the RTT each way: this kernel has
//! no netem). The process server and the agent run in one namespace, the master target in
//! the other. The written data is drawn from an ext4 image of a real OS tree (`mkfs.ext4 -d
//! /usr/share`), so compression ratios are a real disk's.
//!
//! Case measured here: **bulk**, agent start to everything durable on-premises: a full
//! resync of the 1 GiB real-content image (the first replication of a real disk). Per link: logical and wire throughput, link
//! utilization (wire bits over the link's rate), compression ratio, CPU seconds per logical
//! GB and peak RSS of each service; iperf3 on the same link when it is installed.
//!
//! Run: `cargo bench --bench wan` (root for the shaped links; without root, or without
//! `ip`/`tc`, it says so and measures loopback only). Namespaces are named `fbwan-*`; they
//! are removed when the bench ends or fails, and any left by a killed run are removed first.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use failback::harness::Cluster;
use failback::relay::DelayRelay;

/// The links: name, tbf rate (none: loopback), round-trip time.
const LINKS: [(&str, Option<&str>, u64); 3] = [
    ("100 Mbit/s, 10 ms RTT", Some("100mbit"), 10),
    ("1 Gbit/s, 2 ms RTT", Some("1gbit"), 2),
    ("loopback", None, 0),
];
/// The real-content image: its size, and the tree it holds.
const CONTENT_BYTES: u64 = 1 << 30;
const CONTENT_TREE: &str = "/usr/share";
/// The namespaces' prefix (a killed run's are found by it).
const NS_PREFIX: &str = "fbwan-";
/// The veth pair's addresses.
const IP_PS: &str = "10.79.0.1";
const IP_MT: &str = "10.79.0.2";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // cargo's bench listing
    }
    if let Some(i) = args.iter().position(|a| a == "--inner") {
        // Inside the process server's namespace: one case, a JSON line out.
        let a = &args[i + 1..];
        let v = bulk(
            Path::new(&a[0]),
            a.get(1).map(String::as_str),
            a.get(2).map_or(0, |d| d.parse().unwrap()),
            a.get(3).map(String::as_str),
        );
        println!("{v}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content.img");
    make_content(&content);
    let shaped = can_shape();
    if let Err(why) = &shaped {
        eprintln!("wan: shaped links skipped ({why}); loopback only");
    }
    let mut rows = Vec::new();
    for (name, rate, rtt_ms) in LINKS {
        let v = match (rate, &shaped) {
            (None, _) => bulk(&content, None, 0, None),
            (Some(r), Ok(())) => shaped_case(&content, r, rtt_ms),
            (Some(_), Err(_)) => continue,
        };
        eprintln!("{name}: {v}");
        rows.push((name, v));
    }
    println!("bulk (agent start -> all durable on-premises): full resync of a 1 GiB ext4 image of {CONTENT_TREE}");
    println!("| link | logical MB/s | wire MB/s | link used | ratio | zstd-1+TLS pipe MB/s (ours ÷ pipe) | iperf3 Mbit/s | CPU s/GB PS, MT, agent | peak RSS MiB PS, MT |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, v) in &rows {
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        println!(
            "| {name} | {:.1} | {:.1} | {} | {:.2}:1 | {} | {} | {:.1}, {:.1}, {:.1} | {:.0}, {:.0} |",
            f("logical_mb_s"),
            f("wire_mb_s"),
            v["link_used"]
                .as_f64()
                .map_or("-".into(), |u| format!("{u:.2}")),
            f("ratio"),
            v["pipe_mb_s"].as_f64().map_or("-".into(), |p| format!("{p:.1} ({:.2}x)", f("vs_pipe"))),
            v["iperf3_mbit_s"]
                .as_f64()
                .map_or("-".into(), |m| format!("{m:.0}")),
            f("ps_cpu_s_per_gb"),
            f("mt_cpu_s_per_gb"),
            f("agent_cpu_s_per_gb"),
            f("ps_peak_rss_mib"),
            f("mt_peak_rss_mib"),
        );
    }
    println!(
        "{}",
        serde_json::json!(rows
            .iter()
            .map(|(n, v)| serde_json::json!({"link": n, "bulk": v}))
            .collect::<Vec<_>>())
    );
}

/// Why links cannot be shaped here, if they cannot.
fn can_shape() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    for tool in ["ip", "tc"] {
        let ok = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err(format!("no {tool}"));
        }
    }
    Ok(())
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

/// Two namespaces joined by a veth pair shaped by tbf; removed on drop.
struct Net {
    a: String,
    b: String,
}

impl Net {
    fn new(rate: &str) -> Net {
        remove_stale();
        let id = std::process::id();
        let net = Net {
            a: format!("{NS_PREFIX}{id}-a"),
            b: format!("{NS_PREFIX}{id}-b"),
        };
        let (va, vb) = (format!("fbw{id}a"), format!("fbw{id}b"));
        let burst = if rate.starts_with('1') && rate.contains("gbit") {
            "256kb"
        } else {
            "64kb"
        };
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), net.a.clone()],
            vec!["netns".into(), "add".into(), net.b.clone()],
            vec![
                "link".into(),
                "add".into(),
                va.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                vb.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                va.clone(),
                "netns".into(),
                net.a.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                vb.clone(),
                "netns".into(),
                net.b.clone(),
            ],
            vec![
                "-n".into(),
                net.a.clone(),
                "addr".into(),
                "add".into(),
                format!("{IP_PS}/24"),
                "dev".into(),
                va.clone(),
            ],
            vec![
                "-n".into(),
                net.b.clone(),
                "addr".into(),
                "add".into(),
                format!("{IP_MT}/24"),
                "dev".into(),
                vb.clone(),
            ],
            vec![
                "-n".into(),
                net.a.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                net.b.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                net.a.clone(),
                "link".into(),
                "set".into(),
                va.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                net.b.clone(),
                "link".into(),
                "set".into(),
                vb.clone(),
                "up".into(),
            ],
        ];
        for s in steps {
            run("ip", &s);
        }
        for (ns, dev) in [(&net.a, &va), (&net.b, &vb)] {
            run(
                "ip",
                &[
                    "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                    rate, "burst", burst, "latency", "20ms",
                ]
                .map(String::from),
            );
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Removes namespaces a killed run left (their processes are gone with the run).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let ns = l.split_whitespace().next().unwrap_or("");
        if ns.starts_with(NS_PREFIX) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn run(cmd: &str, args: &[String]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
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

/// iperf3 from the process server's namespace to the master target's, 5 s, one stream.
fn iperf3(net: &Net) -> Option<f64> {
    let mut server = Command::new("ip")
        .args(["netns", "exec", &net.b, "iperf3", "-s", "-1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new("ip")
        .args([
            "netns", "exec", &net.a, "iperf3", "-c", IP_MT, "-t", "5", "-J",
        ])
        .output()
        .ok();
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out?.stdout).ok()?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e6)
}

/// Agent start to all durable, a full resync of `content` as the source disk; the
/// master target in namespace `mt_netns` (if any) behind a relay adding `one_way_ms`.
fn bulk(
    content: &Path,
    mt_netns: Option<&str>,
    one_way_ms: u64,
    rate: Option<&str>,
) -> serde_json::Value {
    let bin = Path::new(env!("CARGO_BIN_EXE_failback"));
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    runtime::tls::make_test_pki(
        &tls,
        &["localhost".into(), "127.0.0.1".into(), IP_MT.into()],
        &[],
    )
    .unwrap();
    let mut c = Cluster::new(dir.path(), bin).unwrap();
    let _relay = mt_netns.map(|ns| {
        c.mt_netns = Some(ns.into());
        let port = |a: &str| a.rsplit(':').next().unwrap().to_owned();
        c.mt_addr = format!("{IP_MT}:{}", port(&c.mt_addr));
        c.mt_admin = format!("{IP_MT}:{}", port(&c.mt_admin));
        let r = DelayRelay::start("127.0.0.1:0", &c.mt_addr, Duration::from_millis(one_way_ms))
            .unwrap();
        c.ps_upstream = Some(r.addr.clone());
        r
    });
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(60)).unwrap();
    // The source is the real-content image: a full resync ships all of it (agent start to
    // durable, as the first replication of a real disk).
    let src = c.dir.join("source/bench.img");
    std::fs::copy(content, &src).unwrap();
    let started = Instant::now();
    let agent = c
        .agent("resync", 1, &src, &format!("{}k", CONTENT_BYTES >> 10))
        .arg("--mode=full")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(c.dir.join("logs/agent.log")).unwrap())
        .spawn()
        .unwrap();
    // The agent is the only child reaped in between: the children's usage grows by its.
    let before = children_cpu_s();
    let out = agent.wait_with_output().unwrap();
    let agent_cpu = children_cpu_s() - before;
    assert!(
        out.status.success(),
        "agent: {}",
        std::fs::read_to_string(c.dir.join("logs/agent.log")).unwrap_or_default()
    );
    let lsn = c
        .ps_status()
        .unwrap()
        .into_iter()
        .find(|s| s.disk_id == 1)
        .map_or(0, |s| s.cached_lsn);
    let mut last = None;
    c.wait_durable(1, lsn, Duration::from_secs(1800), |s| {
        last = Some(s.clone())
    })
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    let s = last
        .or_else(|| c.ps_status().ok()?.into_iter().find(|s| s.disk_id == 1))
        .unwrap_or_default();
    let (mt_pid, ps_pid) = c.pids();
    let logical_gb = s.logical_bytes as f64 / 1e9;
    let usage = |pid: Option<u32>| pid.map_or((0.0, 0.0), proc_usage);
    let ((ps_cpu, ps_rss), (mt_cpu, mt_rss)) = (usage(ps_pid), usage(mt_pid));
    c.stop();
    let pipe_mb_s = pipe(content, &tls, mt_netns, one_way_ms);
    let rate_bps = rate
        .and_then(|r| runtime::units::parse_rate(r).ok())
        .map(|b| b as f64);
    serde_json::json!({
        "seconds": secs,
        "logical_bytes": s.logical_bytes,
        "wire_bytes": s.wire_bytes,
        "logical_mb_s": s.logical_bytes as f64 / secs / 1e6,
        "wire_mb_s": s.wire_bytes as f64 / secs / 1e6,
        "ratio": s.logical_bytes as f64 / s.wire_bytes.max(1) as f64,
        "pipe_mb_s": pipe_mb_s,
        "vs_pipe": pipe_mb_s.map(|p| s.logical_bytes as f64 / secs / 1e6 / p),
        // parse_rate gives bytes per second.
        "link_used": rate_bps.map(|r| s.wire_bytes as f64 / secs / r),
        "ps_cpu_s_per_gb": ps_cpu / logical_gb.max(1e-9),
        "mt_cpu_s_per_gb": mt_cpu / logical_gb.max(1e-9),
        "agent_cpu_s_per_gb": agent_cpu / logical_gb.max(1e-9),
        "ps_peak_rss_mib": ps_rss,
        "mt_peak_rss_mib": mt_rss,
    })
}

/// The same bytes through `zstd -1 | socat` TLS on the same link (and relay), as an
/// operator's hand-made pipe would carry them: MB/s of the image, if zstd and socat exist.
fn pipe(content: &Path, tls: &Path, mt_netns: Option<&str>, one_way_ms: u64) -> Option<f64> {
    let have = |t: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("socat") || !have("zstd") {
        eprintln!("wan: no socat or zstd: the pipe is not measured");
        return None;
    }
    let port = failback::harness::free_port().ok()?;
    let host = if mt_netns.is_some() {
        IP_MT
    } else {
        "127.0.0.1"
    };
    let listen = format!(
        "socat -u OPENSSL-LISTEN:{port},reuseaddr,cert={},key={},verify=0 - | zstd -d -q -c > /dev/null",
        tls.join("master-target.pem").display(),
        tls.join("master-target.key").display()
    );
    let mut rx = match mt_netns {
        Some(ns) => Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", &listen])
            .spawn(),
        None => Command::new("sh").args(["-c", &listen]).spawn(),
    }
    .ok()?;
    std::thread::sleep(Duration::from_millis(500));
    let upstream = format!("{host}:{port}");
    let relay = mt_netns
        .map(|_| DelayRelay::start("127.0.0.1:0", &upstream, Duration::from_millis(one_way_ms)));
    let target = match &relay {
        Some(Ok(r)) => r.addr.clone(),
        _ => upstream,
    };
    let t = Instant::now();
    let send = format!(
        "zstd -1 -q -c '{}' | socat -u - OPENSSL:{target},verify=0",
        content.display()
    );
    let sent = Command::new("sh")
        .args(["-c", &send])
        .status()
        .is_ok_and(|s| s.success());
    let received = rx.wait().is_ok_and(|s| s.success());
    let secs = t.elapsed().as_secs_f64();
    (sent && received).then(|| CONTENT_BYTES as f64 / secs / 1e6)
}

/// A process's CPU seconds (user + system) and peak RSS (MiB), from /proc.
fn proc_usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kib / 1024.0)
}

/// CPU seconds of the children reaped so far.
fn children_cpu_s() -> f64 {
    // SAFETY: an all-zero rusage is valid, and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
