//! The emulated link: two network namespaces joined by a veth pair shaped by `tbf`, and
//! what runs across it besides failback (iperf3, a `zstd | socat` TLS pipe, rsync).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use failback::relay::DelayRelay;

use crate::{CONTENT_BYTES, IP_MT, IP_PS, NS_PREFIX};

/// Why links cannot be shaped here, if they cannot.
pub(crate) fn can_shape() -> Result<(), String> {
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

/// Two namespaces joined by a veth pair shaped by tbf; removed on drop.
pub(crate) struct Net {
    pub(crate) a: String,
    pub(crate) b: String,
    /// One end of the veth pair: left in this namespace if setup failed before moving it.
    veth: String,
}

impl Net {
    pub(crate) fn new(rate: &str) -> Net {
        remove_stale();
        let id = std::process::id();
        let (va, vb) = (format!("fbw{id}a"), format!("fbw{id}b"));
        let net = Net {
            a: format!("{NS_PREFIX}{id}-a"),
            b: format!("{NS_PREFIX}{id}-b"),
            veth: va.clone(),
        };
        let burst = if rate.starts_with('1') && rate.contains("gbit") {
            "256kb"
        } else {
            "64kb"
        };
        let (a, b) = (&net.a, &net.b);
        // Names and addresses hold no spaces: each step is one line of `ip` arguments.
        let ip = |args: String| run("ip", &args.split(' ').map(String::from).collect::<Vec<_>>());
        ip(format!("netns add {a}"));
        ip(format!("netns add {b}"));
        ip(format!("link add {va} type veth peer name {vb}"));
        ip(format!("link set {va} netns {a}"));
        ip(format!("link set {vb} netns {b}"));
        ip(format!("-n {a} addr add {IP_PS}/24 dev {va}"));
        ip(format!("-n {b} addr add {IP_MT}/24 dev {vb}"));
        for (ns, dev) in [(a, &va), (b, &vb)] {
            ip(format!("-n {ns} link set lo up"));
            ip(format!("-n {ns} link set {dev} up"));
            ip(format!(
                "netns exec {ns} tc qdisc add dev {dev} root tbf rate {rate} burst {burst} latency 20ms"
            ));
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        // Gone with its namespace when setup got that far; otherwise still here.
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Removes namespaces a killed run left (their processes are gone with the run).
fn remove_stale() {
    remove_namespaces(NS_PREFIX);
}

/// SIGKILLs every process descended from this one (`/proc`'s parent links): on loopback the
/// services run beside the bench, in no namespace of its own, and outlive its exit.
pub(crate) fn kill_descendants() {
    let me = std::process::id() as i32;
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut ours = vec![me];
    let mut i = 0;
    while i < ours.len() {
        let parent = ours[i];
        ours.extend(parents.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    for &pid in &ours[1..] {
        // SAFETY: kill has no memory preconditions; the pid is a descendant found above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Kills what runs in every namespace named `prefix*` and removes those namespaces (with
/// them the veth pair).
pub(crate) fn remove_namespaces(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let ns = l.split_whitespace().next().unwrap_or("");
        if !ns.starts_with(prefix) {
            continue;
        }
        let pids = Command::new("ip").args(["netns", "pids", ns]).output();
        for pid in pids.iter().flat_map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .into_owned()
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .collect::<Vec<_>>()
        }) {
            // SAFETY: kill has no memory preconditions; the pid is one `ip` listed.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
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

/// iperf3 from the process server's namespace to the master target's, 5 s, one stream.
pub(crate) fn iperf3(net: &Net) -> Option<f64> {
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

/// The same bytes through `zstd -1 | socat` TLS on the same link (and relay), as an
/// operator's hand-made pipe would carry them: MB/s of the image and the compression ratio,
/// if zstd and socat exist.
pub(crate) fn pipe(
    content: &Path,
    tls: &Path,
    mt_netns: Option<&str>,
    one_way_ms: u64,
) -> Option<(f64, f64)> {
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
    let argv = ["sh".to_string(), "-c".into(), listen];
    let (mut rx, _relay, target) = far_end(&argv, &format!("{host}:{port}"), mt_netns, one_way_ms)?;
    let t = Instant::now();
    // The compressed stream's length is counted on its way (the pipe's ratio).
    let counted = tls.join("pipe-wire-bytes");
    let send = format!(
        "zstd -1 -q -c '{}' | tee >(wc -c > '{}') | socat -u - OPENSSL:{target},verify=0",
        content.display(),
        counted.display()
    );
    let sent = Command::new("bash")
        .args(["-c", &send])
        .status()
        .is_ok_and(|s| s.success());
    if !sent {
        // The listener would wait for ever for a sender that never came.
        let _ = rx.kill();
    }
    let received = rx.wait().is_ok_and(|s| s.success());
    let secs = t.elapsed().as_secs_f64();
    let wire: f64 = std::fs::read_to_string(&counted)
        .ok()
        .and_then(|w| w.trim().parse().ok())
        .unwrap_or(0.0);
    (sent && received).then(|| {
        (
            CONTENT_BYTES as f64 / secs / 1e6,
            CONTENT_BYTES as f64 / wire.max(1.0),
        )
    })
}

/// `rsync --inplace --no-whole-file` of `dir/rsync-source.img` onto `dir/rsync-target.img`
/// (the same two images as failback's differential resync) across the same link and relay:
/// an rsync daemon where the master target runs, the client where the process server runs.
/// Seconds, bytes each way (rsync's own count), and whether the target then equals the
/// source. The daemon's protocol is plain TCP: rsync carries no TLS here, failback does.
pub(crate) fn rsync(dir: &Path, mt_netns: Option<&str>, one_way_ms: u64) -> serde_json::Value {
    let have = Command::new("rsync")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("wan: no rsync: the differential comparison is not measured");
        return serde_json::Value::Null;
    }
    let Ok(port) = failback::harness::free_port() else {
        return serde_json::Value::Null;
    };
    let host = if mt_netns.is_some() {
        IP_MT
    } else {
        "127.0.0.1"
    };
    let conf = dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = root\ngid = root\n[t]\npath = {}\nread only = no\n",
            dir.display()
        ),
    )
    .unwrap();
    let daemon = [
        "rsync".to_string(),
        "--daemon".into(),
        "--no-detach".into(),
        format!("--config={}", conf.display()),
        format!("--address={host}"),
        format!("--port={port}"),
    ];
    let Some((mut rx, _relay, target)) =
        far_end(&daemon, &format!("{host}:{port}"), mt_netns, one_way_ms)
    else {
        return serde_json::Value::Null;
    };
    let t = Instant::now();
    let out = Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "--stats"])
        .arg(dir.join("rsync-source.img"))
        .arg(format!("rsync://{target}/t/rsync-target.img"))
        .output();
    let secs = t.elapsed().as_secs_f64();
    let _ = rx.kill();
    let _ = rx.wait();
    let out = match out {
        Ok(o) if o.status.success() => o,
        other => {
            let why = other.map_or_else(
                |e| e.to_string(),
                |o| String::from_utf8_lossy(&o.stderr).into_owned(),
            );
            eprintln!("wan: rsync failed ({why}): the differential comparison is not measured");
            return serde_json::Value::Null;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    // "Total bytes sent: 15,418,046" (thousands separators in rsync 3.1+).
    let count = |what: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(what))
            .map(|n| n.trim().replace(',', "").parse::<f64>().unwrap_or(0.0))
            .unwrap_or(0.0)
    };
    let (sent, received) = (count("Total bytes sent:"), count("Total bytes received:"));
    let equal = failback::harness::file_blake3(&dir.join("rsync-source.img")).ok()
        == failback::harness::file_blake3(&dir.join("rsync-target.img")).ok();
    serde_json::json!({
        "seconds": secs,
        "sent_bytes": sent,
        "received_bytes": received,
        "both_ways_bytes": sent + received,
        "target_equals_source": equal,
    })
}

/// Starts `argv` where the master target runs (in `mt_netns`, if any) listening on
/// `upstream`, and, for a shaped link, a relay here adding `one_way_ms` each way in front of
/// it. The listener, the relay (kept while in use), and the address to send to.
fn far_end(
    argv: &[String],
    upstream: &str,
    mt_netns: Option<&str>,
    one_way_ms: u64,
) -> Option<(std::process::Child, Option<DelayRelay>, String)> {
    let rx = match mt_netns {
        Some(ns) => Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .spawn(),
        None => Command::new(&argv[0]).args(&argv[1..]).spawn(),
    }
    .ok()?;
    std::thread::sleep(Duration::from_millis(500));
    let relay = mt_netns.and_then(|_| {
        DelayRelay::start("127.0.0.1:0", upstream, Duration::from_millis(one_way_ms)).ok()
    });
    let target = relay
        .as_ref()
        .map_or(upstream.to_owned(), |r| r.addr.clone());
    Some((rx, relay, target))
}
