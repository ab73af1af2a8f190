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
    cmd.stdout(std::process::Stdio::piped()).stderr(
        std::fs::File::create(c.dir.join("logs").join(format!("agent-{disk}.log"))).unwrap(),
    );
    cmd.spawn().unwrap()
}

/// Waits for an agent (bounded) and returns its JSON report.
pub fn finish(c: &Cluster, disk: u64, child: Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    let log = std::fs::read_to_string(c.dir.join("logs").join(format!("agent-{disk}.log")))
        .unwrap_or_default();
    assert!(out.status.success(), "agent {disk} failed: {log}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no report from agent {disk}: {text}"))
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
    c.wait_durable(disk, last_lsn, Duration::from_secs(300), |_| {})
        .unwrap();
    c.detach(disk).unwrap();
    assert_eq!(
        file_blake3(&source(c, disk)).unwrap(),
        file_blake3(&onprem(c, disk)).unwrap(),
        "disk {disk}: on-premises disk equals the source"
    );
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
