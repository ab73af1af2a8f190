//! A causal workload across two live-captured VMs of one replication group, under the crash
//! loop: the writer puts record i on VM A's disk, and only once that write has completed (as
//! an application on A sees it complete) record i on VM B's disk. No group point may hold
//! B's record i without A's: at every exported group point, each slot of A holds a record
//! at least as new as the same slot of B. Meanwhile the process server cuts the group every
//! second and on demand, and the process server, the master target, the link and agent A
//! are each killed or cut and brought back. B's agent is 10 ms from the process server and
//! A's is not, so a cut whose holds did not overlap would be caught. Needs root, FUSE and loop devices (CI has them).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use failback::harness::Cluster;
use failback::live;

const DISK: &str = "16MiB";
const DISK_BYTES: u64 = 16 << 20;
/// One record per sector; the writer wraps around the disk.
const RECORD_BYTES: u64 = 512;
const SLOTS: u64 = DISK_BYTES / RECORD_BYTES;
/// The longest the writer retries a write while an agent restarts.
const WRITE_RETRY_MAX: Duration = Duration::from_secs(60);

/// Clears the test's FUSE mounts whatever happens.
struct MountGuard(Vec<PathBuf>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(m)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn mount_dir(c: &Cluster, disk: u64) -> PathBuf {
    c.dir.join(format!("capture-{disk}"))
}

fn protect(c: &Cluster, disk: u64) -> Child {
    let log = c.dir.join(format!("logs/agent-{disk}.log"));
    live::start_protect(
        c,
        disk,
        &source(c, disk),
        DISK,
        (&mount_dir(c, disk), &["--group=erp"]),
        &log,
    )
    .unwrap()
}

/// Record `i` (a sequence number from 1) in slot `i % SLOTS`.
fn record(i: u64) -> Vec<u8> {
    let mut r = vec![0u8; RECORD_BYTES as usize];
    r[..8].copy_from_slice(b"CAUSAL01");
    r[8..16].copy_from_slice(&i.to_be_bytes());
    r
}

/// The sequence number in each slot of an image (0: none).
fn slots(image: &Path) -> Vec<u64> {
    let data = std::fs::read(image).unwrap();
    data.chunks(RECORD_BYTES as usize)
        .map(|r| {
            if &r[..8] == b"CAUSAL01" {
                u64::from_be_bytes(r[8..16].try_into().unwrap())
            } else {
                0
            }
        })
        .collect()
}

/// Writes `rec` at `offset` of the disk served in `dir`, retrying (reopening) while its
/// agent is down, for a bounded time. Returns false if stopped meanwhile.
fn write_retrying(dir: &Path, offset: u64, rec: &[u8], stop: &AtomicBool) -> bool {
    let deadline = Instant::now() + WRITE_RETRY_MAX;
    loop {
        let done = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("disk.img"))
            .and_then(|f| f.write_all_at(rec, offset));
        if done.is_ok() {
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "the disk in {} did not come back: {done:?}",
            dir.display()
        );
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn no_group_point_holds_an_effect_without_its_cause_under_the_crash_loop() {
    if !live_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), Path::new(BIN)).unwrap();
    let relay = Relay::new(c.mt_addr.clone());
    c.ps_upstream = Some(relay.addr.clone());
    let mut c = start_group_cluster(c);
    let _guard = MountGuard(vec![mount_dir(&c, 1), mount_dir(&c, 2)]);
    let mut a = protect(&c, 1);
    // B's agent reaches the process server 10 ms away (each way), A's at once: a cut's hold
    // reaches B 10 ms after A, so unless every hold lasts until all members hold, the
    // application writes many record pairs between A's marker and B's.
    let far =
        failback::relay::DelayRelay::start("127.0.0.1:0", &c.ps_addr, Duration::from_millis(10))
            .unwrap();
    let near = std::mem::replace(&mut c.ps_addr, far.addr.clone());
    let b = protect(&c, 2);
    c.ps_addr = near;

    // The application: A's record, then (once it completed) B's.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (da, db) = (mount_dir(&c, 1), mount_dir(&c, 2));
        let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
        std::thread::spawn(move || {
            let mut i = 1;
            // Bounded: stops when told, and each write's retries are bounded.
            while !stop.load(Ordering::Relaxed) {
                let (off, rec) = ((i % SLOTS) * RECORD_BYTES, record(i));
                if !write_retrying(&da, off, &rec, &stop) || !write_retrying(&db, off, &rec, &stop)
                {
                    break;
                }
                written.store(i, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    // An operator's group bookmarks, on demand, beside the interval cuts.
    let bookmarks = {
        let (stop, admin) = (Arc::clone(&stop), c.ps_admin.clone());
        std::thread::spawn(move || {
            let mut made = 0;
            for n in 0..1000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let ok = Command::new(BIN)
                    .args([
                        "process-server",
                        "group-bookmark",
                        "--wait-s=0",
                        "--group=erp",
                    ])
                    .arg(format!("--admin={admin}"))
                    .arg(format!("--tag=op-{n}"))
                    .output()
                    .is_ok_and(|o| {
                        o.status.success()
                            || String::from_utf8_lossy(&o.stderr)
                                .contains("not every marker is durable")
                    });
                made += u32::from(ok);
                std::thread::sleep(Duration::from_millis(400));
            }
            made
        })
    };
    let pause = |ms| std::thread::sleep(Duration::from_millis(ms));
    pause(2000);
    c.kill_ps();
    pause(300);
    c.start_ps().unwrap();
    pause(1500);
    c.kill_mt();
    c.start_mt().unwrap();
    pause(1500);
    relay.cut();
    pause(1500);
    relay.restore();
    pause(1500);
    // Agent A crashes mid-workload; the application's writes to A wait and retry, B's wait
    // behind them. Its restart resyncs A differentially, then cuts resume.
    a.kill().unwrap();
    a.wait().unwrap();
    let _ = Command::new("umount")
        .arg("-l")
        .arg(mount_dir(&c, 1))
        .status();
    let a = protect(&c, 1);
    pause(3000);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let on_demand = bookmarks.join().unwrap();
    let n = written.load(Ordering::Relaxed);
    assert!(n > 1000, "the application wrote {n} record pairs");
    assert!(on_demand > 0, "some on-demand group bookmarks were made");

    // Clean stop: unmounting each disk ends its agent.
    let mut reports = Vec::new();
    for (disk, child) in [(1, a), (2, b)] {
        live::run(Command::new("umount").arg(mount_dir(&c, disk))).unwrap();
        reports.push(finish(&c, disk, child));
    }
    drain_and_detach(&c, &[(1, &reports[0]), (2, &reports[1])]);
    let (points, listed) = group_points(&c, "erp");
    assert!(
        points.len() >= 5,
        "group points made across the faults: {listed}"
    );
    let records: Vec<_> = [1, 2]
        .iter()
        .map(|d| agent::engine::read_bookmarks(&c.agent_state(*d)).unwrap())
        .collect();
    // Every group point (at most 24, spread evenly), exported whole.
    let step = points.len().div_ceil(24);
    let mut newest_b = 0;
    for p in points.iter().step_by(step).chain(points.last()) {
        let out = c.dir.join(format!("group-{}", p["id"]));
        if out.exists() {
            continue;
        }
        export_group(&c, "erp", &p["id"].to_string(), &out).unwrap();
        let (img_a, img_b) = (out.join("vm1-disk-1.img"), out.join("vm2-disk-2.img"));
        let (sa, sb) = (slots(&img_a), slots(&img_b));
        for (s, (ra, rb)) in sa.iter().zip(&sb).enumerate() {
            assert!(
                ra >= rb,
                "group point {}: slot {s} of B holds record {rb} but A only {ra}: an effect without its cause",
                p["id"]
            );
        }
        newest_b = newest_b.max(sb.iter().copied().max().unwrap_or(0));
        // Where the agent recorded its marker, the export is the source as it held it.
        for (disk, img) in [(1usize, &img_a), (2, &img_b)] {
            if let Some(r) = records[disk - 1]
                .iter()
                .find(|r| r.group_marker == p["id"].as_u64().unwrap())
            {
                let d = agent::source::hex(&agent::source::image_digest(img).unwrap());
                assert_eq!(d, r.disk_digest, "disk {disk} at group point {}", p["id"]);
            }
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
    assert!(
        newest_b > 1000,
        "the group points hold the application's records ({newest_b})"
    );
}

/// A file's content read from an ext4 image with debugfs (None: absent).
fn debugfs_cat(image: &Path, file: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{file}")])
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (!text.is_empty()).then_some(text)
}

#[test]
fn an_app_consistent_group_bookmark_freezes_every_vms_filesystem() {
    if !live_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), Path::new(BIN)).unwrap();
    c.ps_extra = vec![
        "--group=erp=vm1,vm2".into(),
        "--group-cut-interval-s=86400".into(),
    ];
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    let _guard = MountGuard(vec![mount_dir(&c, 1), mount_dir(&c, 2)]);
    let mut vms = Vec::new();
    for disk in [1u64, 2] {
        let app = c.dir.join(format!("app-{disk}"));
        let freeze = format!("--freeze-on-group-bookmark={}", app.display());
        let log = c.dir.join(format!("logs/agent-{disk}.log"));
        let agent = live::start_protect(
            &c,
            disk,
            &source(&c, disk),
            "64MiB",
            (&mount_dir(&c, disk), &["--group=erp", &freeze]),
            &log,
        )
        .unwrap();
        let lo = live::Loop::attach(&mount_dir(&c, disk).join("disk.img"), false).unwrap();
        live::run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&lo.dev)).unwrap();
        let fs = live::Mounted::mount(&lo.dev, &app, false).unwrap();
        // Written, never fsynced: only the freeze puts it on the disk before the cut.
        std::fs::write(
            app.join("before.txt"),
            format!("vm{disk} before the bookmark\n"),
        )
        .unwrap();
        vms.push((disk, agent, lo, fs));
    }
    let o = Command::new(BIN)
        .args([
            "process-server",
            "group-bookmark",
            "--group=erp",
            "--tag=frozen",
        ])
        .arg(format!("--admin={}", c.ps_admin))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        c.log_tails(30)
    );
    for (disk, _, _, fs) in &vms {
        std::fs::write(fs.dir.join("after.txt"), format!("vm{disk} after\n")).unwrap();
    }
    let mut ends = Vec::new();
    for (disk, agent, lo, fs) in vms {
        fs.unmount().unwrap();
        lo.detach().unwrap();
        live::run(Command::new("umount").arg(mount_dir(&c, disk))).unwrap();
        ends.push((disk, finish(&c, disk, agent)));
    }
    for (disk, r) in &ends {
        c.wait_durable(
            *disk,
            r["last_lsn"].as_u64().unwrap(),
            Duration::from_secs(120),
            |_| {},
        )
        .unwrap();
        c.detach(*disk).unwrap();
    }
    let (points, listed) = group_points(&c, "erp");
    let p = points
        .iter()
        .find(|p| p["tag"] == "frozen")
        .unwrap_or_else(|| panic!("the frozen group point is listed: {listed}"));
    assert_eq!(p["kind"], "app-consistent");
    let out = c.dir.join("frozen");
    export_group(&c, "erp", &p["id"].to_string(), &out).unwrap();
    for disk in [1u64, 2] {
        let img = out.join(format!("vm{disk}-disk-{disk}.img"));
        // Frozen at the cut: the journal was checkpointed and the filesystem is clean, with
        // the file written before the bookmark and not the one after.
        let sb = live::run(Command::new("dumpe2fs").arg("-h").arg(&img)).unwrap();
        assert!(
            !sb.contains("needs_recovery"),
            "vm{disk}: the filesystem was frozen at the cut: {sb}"
        );
        live::run(Command::new("e2fsck").arg("-fn").arg(&img)).unwrap();
        assert_eq!(
            debugfs_cat(&img, "before.txt").as_deref(),
            Some(format!("vm{disk} before the bookmark\n").as_str())
        );
        assert_eq!(debugfs_cat(&img, "after.txt"), None);
    }
}
