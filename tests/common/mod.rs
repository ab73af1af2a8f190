//! What the end-to-end test files share: a cluster on loopback, agents replaying traces,
//! and the checks every test ends with.

#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use failback::harness::{file_blake3, Cluster};

pub const BIN: &str = env!("CARGO_BIN_EXE_failback");

pub fn traces() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/traces")
}

/// A cluster whose process server reaches the master target through a [`Relay`].
pub fn cluster_via_relay(dir: &Path) -> (Cluster, Relay) {
    let mut c = Cluster::new(dir, Path::new(BIN)).unwrap();
    let relay = Relay::new(c.mt_addr.clone());
    c.ps_upstream = Some(relay.addr.clone());
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    (c, relay)
}

/// Replays `writes` writes of the TPC-C trace for `disk` (bookmarks every 20 ms of trace
/// time), then drains, detaches and checks the disk and its points. Returns its last LSN.
pub fn replicate_and_verify(c: &Cluster, disk: u64, writes: u64) -> u64 {
    let max = format!("--max-writes={writes}");
    let r = finish(
        c,
        disk,
        replay(
            c,
            disk,
            "tpcc-small.disksim",
            "disksim-ns",
            &[&max, "--bookmark-every-s=0.02"],
        ),
    );
    let lsn = r["last_lsn"].as_u64().unwrap();
    verify(c, disk, lsn);
    lsn
}

pub fn cluster(dir: &Path) -> Cluster {
    let mut c = Cluster::new(dir, Path::new(BIN)).unwrap();
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    c
}

pub fn source(c: &Cluster, disk: u64) -> PathBuf {
    c.dir.join("source").join(format!("disk{disk}.img"))
}

/// The flat extent of `disk`'s on-premises VMDK (in its VM's folder of the datastore).
pub fn onprem(c: &Cluster, disk: u64) -> PathBuf {
    c.dir
        .join("onprem")
        .join(format!("vm{disk}"))
        .join(format!("vm{disk}-disk{disk}-flat.vmdk"))
}

/// Starts `agent replay` of a trace for `disk` (alternate location: a new VMDK).
pub fn replay(c: &Cluster, disk: u64, trace: &str, format: &str, extra: &[&str]) -> Child {
    let mut cmd = c.agent("replay", disk, &source(c, disk), "256MiB");
    cmd.arg(format!("--trace={}", traces().join(trace).display()))
        .arg(format!("--format={format}"))
        .arg("--final-bookmark=final")
        .args(extra);
    // Appended: an agent's log across its restarts.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(c.dir.join("logs").join(format!("agent-{disk}.log")))
        .unwrap();
    cmd.stdout(std::process::Stdio::piped()).stderr(log);
    cmd.spawn().unwrap()
}

/// The longest an agent of a test may run: a hang (a retry loop that never ends) fails the
/// test instead of stalling the suite.
pub const AGENT_MAX_RUN: Duration = Duration::from_secs(600);

/// Waits until agent `disk`'s process has exited, at most [`AGENT_MAX_RUN`] (then it is
/// killed and the test fails); its exit status.
fn exited_within_max_run(disk: u64, child: &mut Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + AGENT_MAX_RUN;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("agent {disk} still ran after {AGENT_MAX_RUN:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for an agent (bounded) and returns its JSON report.
pub fn finish(c: &Cluster, disk: u64, mut child: Child) -> serde_json::Value {
    exited_within_max_run(disk, &mut child);
    let out = child.wait_with_output().unwrap();
    let log = std::fs::read_to_string(c.dir.join("logs").join(format!("agent-{disk}.log")))
        .unwrap_or_default();
    assert!(out.status.success(), "agent {disk} failed: {log}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no report from agent {disk}: {text}"))
}

/// Waits (bounded) until `disk` is durable on the master target up to `lsn`, detaches it,
/// and checks its on-premises disk equals the source (blake3 over the whole image).
pub fn durable_and_equal(c: &Cluster, disk: u64, lsn: u64) {
    c.wait_durable(disk, lsn, Duration::from_secs(300), |_| {})
        .unwrap();
    c.detach(disk).unwrap();
    assert_eq!(
        file_blake3(&source(c, disk)).unwrap(),
        file_blake3(&onprem(c, disk)).unwrap(),
        "disk {disk}: on-premises disk equals the source"
    );
}

/// Waits for an agent that prints no JSON report (bounded by [`AGENT_MAX_RUN`]) and
/// checks it succeeded, showing its log if not.
pub fn wait_agent(c: &Cluster, disk: u64, mut child: Child) {
    let status = exited_within_max_run(disk, &mut child);
    let log = std::fs::read_to_string(c.dir.join("logs").join(format!("agent-{disk}.log")))
        .unwrap_or_default();
    assert!(status.success(), "agent {disk} failed: {log}");
}

/// Waits (bounded) until `disk` is attached and its writes are reaching the process server,
/// so a fault injected next lands mid-stream whatever the machine's load.
pub fn wait_streaming(c: &Cluster, disk: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !c
        .ps_status()
        .is_ok_and(|v| v.iter().any(|s| s.disk_id == disk && s.cached_lsn > 10))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "disk {disk} is not streaming after 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The stdout of a command that must have succeeded (its stderr shown if not).
pub fn stdout_of(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed (.ci/run installs qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Drains, detaches and checks the disk and every app-consistent point.
pub fn verify(c: &Cluster, disk: u64, last_lsn: u64) {
    verify_points(c, disk, last_lsn, false);
}

/// [`verify`], where `lossy` allows bookmarks that made no point (taken while the master
/// target was in a resync the agent did not know of); the last bookmark always needs one.
pub fn verify_points(c: &Cluster, disk: u64, last_lsn: u64, lossy: bool) {
    durable_and_equal(c, disk, last_lsn);
    // The VMDK as ESXi would open it: qemu-img checks it and finds it equal to the source.
    let desc = onprem(c, disk).with_file_name(format!("vm{disk}-disk{disk}.vmdk"));
    qemu_img(&["check", desc.to_str().unwrap()]);
    qemu_img(&[
        "compare",
        "-f",
        "vmdk",
        "-F",
        "raw",
        desc.to_str().unwrap(),
        source(c, disk).to_str().unwrap(),
    ]);
    let bookmarks = agent::engine::read_bookmarks(&c.agent_state(disk)).unwrap();
    let points = c.points(disk).unwrap();
    assert!(
        bookmarks.len() >= 2,
        "disk {disk}: bookmarks were taken ({})",
        bookmarks.len()
    );
    for (i, b) in bookmarks.iter().enumerate() {
        // A bookmark is an LSN in the stream: its point has the same LSN.
        let Some(p) = points.iter().find(|p| p["lsn"] == b.lsn) else {
            assert!(
                lossy && i + 1 < bookmarks.len(),
                "disk {disk}: no point for bookmark {} (lsn {})",
                b.tag,
                b.lsn
            );
            continue;
        };
        assert_eq!(p["kind"], "app-consistent");
        let out = c.dir.join(format!("point-{disk}-{}.img", p["id"]));
        c.export(disk, &p["id"].to_string(), &out, "raw").unwrap();
        let d = agent::source::hex(&agent::source::image_digest(&out).unwrap());
        assert_eq!(
            d, b.disk_digest,
            "disk {disk}: point {} ({}) exports exactly",
            p["id"], b.tag
        );
        std::fs::remove_file(&out).unwrap();
    }
}

/// A TCP relay that can cut every connection through it and refuse new ones for a while.
pub struct Relay {
    /// Where to connect instead of the target.
    pub addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    /// A relay to `target`.
    pub fn new(target: String) -> Relay {
        use std::sync::atomic::Ordering::SeqCst;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let r = Relay {
            addr: l.local_addr().unwrap().to_string(),
            cut: Default::default(),
            stop: Default::default(),
            conns: Default::default(),
        };
        let (cut, stop, conns) = (r.cut.clone(), r.stop.clone(), r.conns.clone());
        std::thread::spawn(move || {
            // Bounded: ends when the relay is dropped, or after 10 minutes.
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            while !stop.load(SeqCst) && std::time::Instant::now() < deadline {
                let Ok((down, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                if cut.load(SeqCst) {
                    continue; // dropped: the link is down
                }
                down.set_nonblocking(false).unwrap();
                let Ok(up) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                conns
                    .lock()
                    .unwrap()
                    .extend([down.try_clone().unwrap(), up.try_clone().unwrap()]);
                for (mut a, mut b) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        r
    }

    /// Cuts every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cut();
    }
}

/// A fault a [`FaultRelay`] injects once, into whichever direction moves data next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Nothing.
    None = 0,
    /// Close every connection through it (both ends see the connection go).
    Cut,
    /// Close every connection with a TCP reset.
    Reset,
    /// Forward the first part of the next chunk, then close.
    Truncate,
    /// Flip a bit in the next chunk.
    Flip,
    /// Send the next chunk twice.
    Duplicate,
    /// Forward nothing more on the connections open now, ever, and keep them open: a path
    /// gone dead without a reset. New connections flow.
    Stall,
}

impl Fault {
    /// Every kind, in turn.
    pub const ALL: [Fault; 6] = [
        Fault::Cut,
        Fault::Reset,
        Fault::Truncate,
        Fault::Flip,
        Fault::Duplicate,
        Fault::Stall,
    ];
}

/// A TCP relay between the process server and the master target that injects faults on
/// command (this kernel has no netem: faults come from user space).
pub struct FaultRelay {
    /// Where to connect instead of the target.
    pub addr: String,
    fault: std::sync::Arc<std::sync::atomic::AtomicU8>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Open connections: both sockets and the flag that stalls them.
    conns: std::sync::Arc<std::sync::Mutex<Vec<RelayedConn>>>,
    /// Faults injected so far.
    pub injected: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

type RelayedConn = (
    std::net::TcpStream,
    std::net::TcpStream,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
);

impl FaultRelay {
    /// A relay to `target`.
    pub fn new(target: String) -> FaultRelay {
        use std::sync::atomic::Ordering::SeqCst;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let r = FaultRelay {
            addr: l.local_addr().unwrap().to_string(),
            fault: Default::default(),
            stop: Default::default(),
            conns: Default::default(),
            injected: Default::default(),
        };
        let (fault, stop, conns, injected) = (
            r.fault.clone(),
            r.stop.clone(),
            r.conns.clone(),
            r.injected.clone(),
        );
        std::thread::spawn(move || {
            // Bounded: ends when the relay is dropped, or after 20 minutes.
            let deadline = std::time::Instant::now() + Duration::from_secs(1200);
            while !stop.load(SeqCst) && std::time::Instant::now() < deadline {
                let Ok((down, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                down.set_nonblocking(false).unwrap();
                let Ok(up) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                conns.lock().unwrap().push((
                    down.try_clone().unwrap(),
                    up.try_clone().unwrap(),
                    stalled.clone(),
                ));
                for (a, b) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let (fault, stalled, stop, injected) = (
                        fault.clone(),
                        stalled.clone(),
                        stop.clone(),
                        injected.clone(),
                    );
                    std::thread::spawn(move || pump(a, b, &fault, &stalled, &stop, &injected));
                }
            }
        });
        r
    }

    /// Injects `f` into the next chunk (or, for cuts and resets, at once).
    pub fn inject(&self, f: Fault) {
        use std::sync::atomic::Ordering::SeqCst;
        match f {
            Fault::Cut | Fault::Reset => {
                for (a, b, _) in self.conns.lock().unwrap().drain(..) {
                    for s in [a, b] {
                        if f == Fault::Reset {
                            let _ = socket_linger_zero(&s);
                        }
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                }
                self.injected.fetch_add(1, SeqCst);
            }
            Fault::Stall => {
                // Forgotten by later cuts: a dead path stays dead.
                for (_, _, stalled) in self.conns.lock().unwrap().drain(..) {
                    stalled.store(true, SeqCst);
                }
                self.injected.fetch_add(1, SeqCst);
            }
            f => self.fault.store(f as u8, SeqCst),
        }
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.inject(Fault::Cut);
    }
}

/// SO_LINGER 0: closing the socket sends a reset.
fn socket_linger_zero(s: &std::net::TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a valid socket with a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            size_of::<libc::linger>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    fault: &std::sync::atomic::AtomicU8,
    stalled: &std::sync::atomic::AtomicBool,
    stop: &std::sync::atomic::AtomicBool,
    injected: &std::sync::atomic::AtomicU64,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering::SeqCst;
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 << 10];
    // Bounded by the relay's life: every read times out within 50 ms to look at `stop`.
    while !stop.load(SeqCst) {
        if stalled.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        let chunk = &mut buf[..n];
        let f = fault.swap(Fault::None as u8, SeqCst);
        let ok = match f {
            x if x == Fault::Truncate as u8 => {
                injected.fetch_add(1, SeqCst);
                let _ = to.write_all(&chunk[..n / 2]);
                false
            }
            x if x == Fault::Flip as u8 => {
                injected.fetch_add(1, SeqCst);
                chunk[n / 2] ^= 0x10;
                to.write_all(chunk).is_ok()
            }
            x if x == Fault::Duplicate as u8 => {
                injected.fetch_add(1, SeqCst);
                to.write_all(chunk).is_ok() && to.write_all(chunk).is_ok()
            }
            _ => to.write_all(chunk).is_ok(),
        };
        if !ok {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// Whether the tests run as root (loop mounts and freezing need it; CI is).
pub fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A small ext4 filesystem of `mib` MiB mounted (loop) at `dir`, unmounted when dropped.
pub struct SmallVolume {
    /// Where it is mounted.
    pub dir: std::path::PathBuf,
}

impl SmallVolume {
    pub fn new(image: &Path, dir: &Path, mib: u64) -> SmallVolume {
        let run = |cmd: &mut std::process::Command| {
            let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(std::process::Command::new("truncate")
            .arg(format!("-s{mib}M"))
            .arg(image));
        run(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(image));
        std::fs::create_dir_all(dir).unwrap();
        run(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(dir));
        SmallVolume { dir: dir.into() }
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        // A filesystem left frozen (a failed freeze test) would block the unmount for ever.
        let _ = std::process::Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status();
        for _ in 0..50 {
            let ok = std::process::Command::new("umount")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Still busy after 5 s (a killed service's files not yet closed): detached lazily,
        // so that no mount of a removed directory outlives the test.
        eprintln!(
            "{} still busy after 5 s: detached lazily (a process of the test still uses it)",
            self.dir.display()
        );
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// Whether the live-capture tools are here (root, FUSE, loop devices, mkfs.ext4, sqlite3).
/// CI sets FAILBACK_REQUIRE_LIVE: there a skipped live test would hide a broken capture
/// path, so a missing tool fails the test instead.
pub fn live_can_run() -> bool {
    let missing = failback::live::missing_tools();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("FAILBACK_REQUIRE_LIVE").is_none(),
            "FAILBACK_REQUIRE_LIVE is set, but this machine lacks: {}",
            missing.join(", ")
        );
        eprintln!("live capture tests need: {}", missing.join(", "));
    }
    missing.is_empty()
}

/// Waits until each disk's reported last LSN is durable on the master target, then
/// detaches the disk (the failback).
pub fn drain_and_detach(c: &Cluster, reports: &[(u64, &serde_json::Value)]) {
    for (disk, r) in reports {
        c.wait_durable(
            *disk,
            r["last_lsn"].as_u64().unwrap(),
            Duration::from_secs(180),
            |_| {},
        )
        .unwrap();
        c.detach(*disk).unwrap();
    }
}

/// The group points of `group` (`master-target points --group G --json`), with the listing.
pub fn group_points(c: &Cluster, group: &str) -> (Vec<serde_json::Value>, String) {
    let mut args = vec![
        "points".to_owned(),
        format!("--group={group}"),
        "--json".into(),
    ];
    args.extend(c.mt_dirs());
    let listed = c.mt_cmd(&args).unwrap();
    let points = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (points, listed)
}

/// `master-target export --group G --point P --out OUT` (raw images, OUT created).
pub fn export_group(
    c: &Cluster,
    group: &str,
    point: &str,
    out: &Path,
) -> failback::harness::Result<String> {
    std::fs::create_dir_all(out).unwrap();
    let mut args = vec![
        "export".to_owned(),
        format!("--group={group}"),
        format!("--point={point}"),
        format!("--out={}", out.display()),
    ];
    args.extend(c.mt_dirs());
    c.mt_cmd(&args)
}

/// Starts `c`'s master target and a process server with group `erp` of VMs vm1 and vm2,
/// cut every second, and waits until they are linked.
pub fn start_group_cluster(mut c: Cluster) -> Cluster {
    c.ps_extra = vec![
        "--group=erp=vm1,vm2".into(),
        "--group-cut-interval-s=1".into(),
    ];
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    c
}

/// The first group's status from the process server's `/groups`.
pub fn groups_status(c: &Cluster) -> serde_json::Value {
    let (code, body) = failback::harness::http_get(&c.ps_admin, "/groups").unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()[0].clone()
}
