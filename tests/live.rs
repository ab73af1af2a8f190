//! `agent protect`: a live ext4 filesystem on the captured disk, a real application on it
//! (sqlite3 transactions with a running checksum, a real file tree untarred), frozen
//! bookmarks, and the failed-back points proven with e2fsck, mount and sqlite3. Needs root,
//! FUSE and loop devices (CI has them); elsewhere each test says what is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use failback::harness::{file_blake3, Cluster};
use failback::live::{self, Committed, Loop, Mounted};

/// The protected disk's size: room for ext4, the database and the tree.
const DISK: &str = "256MiB";
/// The application's directory on the filesystem.
const APP_DIR: &str = "db";

/// The real file tree untarred onto the filesystem: this repository's agent sources.
fn tree() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("agent")
}

struct Live {
    agent: Option<Child>,
    mount_dir: PathBuf,
    lo: Option<Loop>,
    app: Option<Mounted>,
    /// A crash leaves the dead mount for the next agent to clear.
    keep_mount: bool,
}

impl Live {
    fn start(c: &Cluster, mkfs: bool) -> Live {
        let mount_dir = c.dir.join("capture");
        let log = c.dir.join("logs/agent-1.log");
        let agent =
            live::start_protect(c, 1, &source(c, 1), DISK, (&mount_dir, &[]), &log).unwrap();
        let lo = Loop::attach(&mount_dir.join("disk.img"), false).unwrap();
        if mkfs {
            live::run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&lo.dev)).unwrap();
        }
        let app = Mounted::mount(&lo.dev, &c.dir.join("app"), false).unwrap();
        std::fs::create_dir_all(app.dir.join(APP_DIR)).unwrap();
        Live {
            agent: Some(agent),
            mount_dir,
            lo: Some(lo),
            app: Some(app),
            keep_mount: false,
        }
    }

    fn app_dir(&self) -> PathBuf {
        self.app.as_ref().unwrap().dir.clone()
    }

    /// A frozen bookmark of the application's filesystem, durable on the master target.
    fn bookmark(&self, c: &Cluster, tag: &str) {
        let out = Command::new(BIN)
            .args(["agent", "bookmark", "--tag", tag, "--state-dir"])
            .arg(c.agent_state(1))
            .arg("--freeze")
            .arg(self.app_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bookmark {tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Unmounts the filesystem, detaches the loop device, and unmounts the disk: the agent
    /// drains and ends clean. Returns its report.
    fn unmount(mut self, c: &Cluster) -> serde_json::Value {
        self.app.take().unwrap().unmount().unwrap();
        self.lo.take().unwrap().detach().unwrap();
        live::run(Command::new("umount").arg(&self.mount_dir)).unwrap();
        finish(c, 1, self.agent.take().unwrap())
    }

    /// SIGTERM while the filesystem is still in use: the agent keeps capturing until the
    /// disk is closed (the filesystem unmounted, the loop device detached), then drains and
    /// ends clean. Returns its report.
    fn terminate(mut self, c: &Cluster) -> serde_json::Value {
        let mut agent = self.agent.take().unwrap();
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            agent.try_wait().unwrap().is_none(),
            "the agent waits for the disk to be closed"
        );
        // SAFETY: as above.
        unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(300));
        let log = std::fs::read_to_string(c.dir.join("logs/agent-1.log")).unwrap();
        let dev = &self.lo.as_ref().unwrap().dev;
        assert!(
            log.contains("still stopping") && log.contains(dev.as_str()),
            "a second SIGTERM says what holds the disk: {log}"
        );
        let late = self.app_dir().join("written-after-sigterm");
        std::fs::write(&late, b"still captured").unwrap();
        live::run(Command::new("sync").arg("-f").arg(&late)).unwrap();
        self.app.take().unwrap().unmount().unwrap();
        self.lo.take().unwrap().detach().unwrap();
        finish(c, 1, agent)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        drop(self.app.take());
        drop(self.lo.take());
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        if self.keep_mount {
            return;
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_dir)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Exports `point` and checks it: fsck clean, mounts, the database intact with exactly
/// `expected` committed, the tree equal where `tree` is given.
fn check(c: &Cluster, point: &str, expected: Committed, tree: Option<&Path>) {
    let out = c.dir.join(format!("point-{point}.img"));
    c.export(1, point, &out, "raw").unwrap();
    let scratch = c.dir.join(format!("check-{point}"));
    let got = live::check_point(&out, APP_DIR, tree, &scratch).unwrap();
    assert!(
        got.ok(expected),
        "point {point}: {got:?}, expected {expected:?}"
    );
    std::fs::remove_file(&out).unwrap();
}

/// Waits until everything the agent reported is durable on the master target, detaches
/// the disk, and checks it equals the source byte for byte.
fn failed_back(c: &Cluster, report: &serde_json::Value) {
    let lsn = report["last_lsn"].as_u64().unwrap();
    c.wait_durable(1, lsn, Duration::from_secs(300), |_| {})
        .unwrap();
    c.detach(1).unwrap();
    assert_eq!(
        file_blake3(&source(c, 1)).unwrap(),
        file_blake3(&onprem(c, 1)).unwrap(),
        "the on-premises disk equals the captured source"
    );
}

/// The id of the point with `tag`.
fn point_of(c: &Cluster, tag: &str) -> String {
    let points = c.points(1).unwrap();
    let p = points.iter().find(|p| p["tag"] == tag);
    p.unwrap_or_else(|| panic!("no point {tag}: {points:?}"))["id"].to_string()
}

#[test]
fn a_live_filesystem_fails_back_with_its_database_and_files_intact() {
    if !live_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let l = Live::start(&c, true);
    // One agent per source image: a second one (another disk, state and mount directory)
    // would write it behind the first one's back.
    let other = c.dir.join("capture-2");
    std::fs::create_dir_all(&other).unwrap();
    let out = c
        .agent("protect", 2, &source(&c, 1), DISK)
        .arg(format!("--mount-dir={}", other.display()))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("in use by another agent"),
        "{e}"
    );
    // Its mode and owner are the agent's: a chmod or chown is refused, not dropped.
    let disk = l.mount_dir.join("disk.img");
    let perm = |m| std::os::unix::fs::PermissionsExt::from_mode(m);
    let e = std::fs::set_permissions(&disk, perm(0o644)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let e = std::os::unix::fs::chown(&disk, Some(1), None).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&disk).unwrap());
    assert_eq!(mode & 0o7777, 0o600);
    std::fs::set_permissions(&disk, perm(0o600)).unwrap(); // no change: fine
    let db = l.app_dir().join(APP_DIR);
    let first = live::commit(&db, Committed::default(), 40, 3000).unwrap();
    live::untar(&tree(), &l.app_dir()).unwrap();
    l.bookmark(&c, "first");
    let second = live::commit(&db, first, 120, 3000).unwrap();
    l.bookmark(&c, "second");
    let last = live::commit(&db, second, 25, 3000).unwrap();
    let report = l.unmount(&c);
    assert!(report["writes"].as_u64().unwrap() > 100, "{report}");
    failed_back(&c, &report);
    check(&c, &point_of(&c, "first"), first, Some(&tree()));
    check(&c, &point_of(&c, "second"), second, Some(&tree()));
    check(&c, "latest", last, Some(&tree()));
}

impl Live {
    /// SIGKILLs the agent mid-workload: the disk under the filesystem dies. The filesystem
    /// and its loop device are let go, as an operator would; the dead FUSE mount is left
    /// for the next `agent protect` to clear.
    fn crash(mut self) {
        let mut agent = self.agent.take().unwrap();
        agent.kill().unwrap();
        agent.wait().unwrap();
        drop(self.app.take());
        drop(self.lo.take());
        self.keep_mount = true;
    }
}

/// Clears the FUSE mount of a test's agents whatever happens (a failed test must not leave
/// a dead mount behind).
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// What the database in `db` holds, read as the application reads it after a restart (a
/// hot journal rolled back), checked intact.
fn committed_now(db: &Path) -> Committed {
    let (integrity, chain, c) = live::inspect_db(&db.join(live::DB_NAME)).unwrap();
    assert!(integrity && chain, "the live database is intact: {c:?}");
    c
}

#[test]
fn a_live_filesystem_survives_kills_of_the_agent_the_services_and_the_application() {
    if !live_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path());
    let _guard = MountGuard(c.dir.join("capture"));
    let l = Live::start(&c, true);
    let db = l.app_dir().join(APP_DIR);
    let before = live::commit(&db, Committed::default(), 30, 3000).unwrap();
    l.bookmark(&c, "before");

    // Both services die and come back while the application commits.
    let (writer, after_services) = live::spawn_commits(&db, before, 300, 3000).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    c.kill_ps();
    std::thread::sleep(Duration::from_millis(300));
    c.start_ps().unwrap();
    c.kill_mt();
    c.start_mt().unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    l.bookmark(&c, "after-services");

    // The application itself is killed mid-transaction.
    let (mut writer, _) = live::spawn_commits(&db, after_services, 2000, 3000).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    writer.kill().unwrap();
    writer.wait().unwrap();
    let after_app = committed_now(&db);
    assert!(after_app.rows >= after_services.rows, "{after_app:?}");
    l.bookmark(&c, "after-app-kill");

    // The agent is killed mid-workload while the process server is down, so writes it
    // captured never reached it; a restart resyncs them, the filesystem recovers.
    c.kill_ps();
    let (mut writer, _) = live::spawn_commits(&db, after_app, 2000, 3000).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    l.crash();
    let _ = writer.kill();
    writer.wait().unwrap();
    c.start_ps().unwrap();
    let l = Live::start(&c, false);
    let recovered = committed_now(&db);
    assert!(recovered.rows >= after_app.rows, "{recovered:?}");
    let after_agent = live::commit(&db, recovered, 20, 3000).unwrap();
    l.bookmark(&c, "after-agent-kill");
    let report = l.terminate(&c);
    // The restart compared the whole disk with the target and sent what the kill cut off.
    assert_eq!(
        report["resync_compared_bytes"].as_u64().unwrap(),
        256 << 20,
        "{report}"
    );
    assert!(
        report["resync_sent_bytes"].as_u64().unwrap() > 0,
        "{report}"
    );
    failed_back(&c, &report);
    for (tag, expected) in [
        ("before", before),
        ("after-services", after_services),
        ("after-app-kill", after_app),
        ("after-agent-kill", after_agent),
    ] {
        check(&c, &point_of(&c, tag), expected, None);
    }
    check(&c, "latest", after_agent, None);
}

/// `agent protect` with its directory wrong, before anything is registered or created.
fn protect_fails(dir: &Path, mount_dir: &Path, extra: &[&str], words: &[&str]) {
    let src = dir.join("src.img");
    let out = Command::new(BIN)
        .args(["agent", "protect", "--create-source", "--disk-size=16MiB"])
        .arg(format!("--source={}", src.display()))
        .arg(format!("--mount-dir={}", mount_dir.display()))
        .arg(format!("--state-dir={}", dir.join("state").display()))
        .arg(format!("--tls-dir={}", dir.join("no-tls").display()))
        .args(extra)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it succeeded: {e}");
    for w in words {
        assert!(e.contains(w), "{w:?} not in: {e}");
    }
    assert!(!src.exists(), "nothing is created before the checks pass");
}

#[test]
fn protect_refuses_a_mount_dir_that_would_hide_files_or_is_not_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let full = d.join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("ibdata1"), b"a database's file").unwrap();
    protect_fails(d, &full, &[], &["mount-dir", "not empty", "hide"]);
    let file = d.join("file");
    std::fs::write(&file, b"x").unwrap();
    protect_fails(d, &file, &[], &["not a directory"]);
    protect_fails(d, &d.join("missing"), &[], &["create the directory first"]);
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    protect_fails(d, &empty, &["--name=../escape"], &["not a file name"]);
    // The source (or the state directory) under the mount would be hidden by it.
    let out = Command::new(BIN)
        .args(["agent", "protect", "--create-source", "--disk-size=16MiB"])
        .arg(format!("--source={}", empty.join("disk.img").display()))
        .arg(format!("--mount-dir={}", empty.display()))
        .arg(format!("--state-dir={}", d.join("state").display()))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("inside --mount-dir"),
        "{e}"
    );
    assert!(!empty.join("disk.img").exists(), "nothing is created");
    if root() {
        // Someone else's file system mounted there is named, never mounted over.
        live::run(
            Command::new("mount")
                .args(["-t", "tmpfs", "tmpfs"])
                .arg(&empty),
        )
        .unwrap();
        let m = Mounted { dir: empty.clone() };
        protect_fails(d, &empty, &[], &["already has a tmpfs file system"]);
        m.unmount().unwrap();
    }
}

/// Mount points under `dir` (from /proc/mounts).
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&prefix))
        .map(String::from)
        .collect()
}

/// Processes whose command line names `dir` (the demo's services and agent do).
fn processes_naming(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let zombie = stat.rsplit_once(')')?.1.trim_start().starts_with('Z');
            (cmd.contains(&needle) && !zombie).then(|| format!("{pid}: {cmd}"))
        })
        .collect()
}

#[test]
fn the_live_demo_proves_every_point_and_keeps_the_trace_demos_layout() {
    if !live_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("kept");
    let out = Command::new(env!("CARGO_BIN_EXE_failback"))
        .args(["demo", "--live", "--json", "--keep"])
        .arg(&keep)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo --live failed: {stderr}");
    let v: serde_json::Value = stdout_of(&out)
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON summary");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["app_recovery_failures"], 0, "{v}");
    let points = v["points_checked"].as_array().unwrap();
    // The on-premises disk, the latest app-consistent point and an earlier one.
    assert!(points.len() >= 3, "{v}");
    for p in points {
        let c = &p["check"];
        assert_eq!(p["ok"], true, "{p}");
        assert_eq!(c["fsck_clean"], true, "{p}");
        assert_eq!(c["integrity_ok"], true, "{p}");
        assert_eq!(c["tree_equal"], true, "{p}");
        assert_eq!(c["committed"]["rows"], p["rows_expected"], "{p}");
    }
    // The same layout as the trace demo, checked with our own hash and qemu-img.
    let source = keep.join("source/vm1-disk1.img");
    let flat = keep.join("onprem/vm1/vm1-disk1-flat.vmdk");
    assert_eq!(
        file_blake3(&source).unwrap(),
        file_blake3(&flat).unwrap(),
        "the failed-back disk equals the source"
    );
    let vmdk = keep.join("onprem/vm1/vm1-disk1.vmdk");
    qemu_img(&["check", &vmdk.display().to_string()]);
    assert!(mounts_under(&keep).is_empty(), "{:?}", mounts_under(&keep));
    assert!(
        processes_naming(&keep).is_empty(),
        "{:?}",
        processes_naming(&keep)
    );
}

/// Ctrl-C at a terminal signals the demo's whole process group.
#[test]
fn an_interrupted_live_demo_stops_its_processes_and_unmounts_everything() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    if !live_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("kept");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_failback"))
        .args(["demo", "--live", "--keep"])
        .arg(&keep)
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupted while the workload runs on the mounted filesystem.
    let (tx, rx) = std::sync::mpsc::channel();
    let err = demo.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if line.starts_with("[3/6]") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the demo reaches its workload");
    assert!(!mounts_under(&keep).is_empty(), "mounted while it runs");
    // SAFETY: killpg(2) has no memory preconditions; the group is the demo's own.
    unsafe { libc::killpg(demo.id() as i32, libc::SIGINT) };
    let status = wait_bounded(&mut demo, Duration::from_secs(60));
    let said = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{said}");
    assert!(said.contains("interrupted; cleaned up"), "{said}");
    assert!(mounts_under(&keep).is_empty(), "{:?}", mounts_under(&keep));
    assert!(
        processes_naming(&keep).is_empty(),
        "{:?}",
        processes_naming(&keep)
    );
    // --keep: what it made stays for inspection.
    assert!(keep.join("source/vm1-disk1.img").is_file());
}

fn wait_bounded(child: &mut Child, max: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + max;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not end within {max:?} of the interrupt");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A frozen bookmark of a captured disk whose agent is stalled: the flush before the
/// freeze cannot end (the disk takes no writes), so nothing is frozen and the command ends
/// within its window, saying why. (FIFREEZE itself flushes and cannot be timed: it held
/// such a command in the kernel, and SIGKILL then left the filesystem frozen.)
#[test]
fn a_frozen_bookmark_of_a_stalled_agents_disk_freezes_nothing_and_ends_in_its_window() {
    if !live_can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let l = Live::start(&c, true);
    // Dirty pages the flush must push through the agent.
    std::fs::write(l.app_dir().join("dirty"), vec![7u8; 8 << 20]).unwrap();
    let pid = l.agent.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t = std::time::Instant::now();
    let out = Command::new(BIN)
        .args(["agent", "bookmark", "--tag", "stalled", "--state-dir"])
        .arg(c.agent_state(1))
        .arg("--freeze")
        .arg(l.app_dir())
        .arg("--freeze-timeout-s=2")
        .output()
        .unwrap();
    let took = t.elapsed();
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("could not be flushed") && e.contains("nothing was frozen"),
        "{e}"
    );
    assert!(took < Duration::from_secs(15), "ended after {took:?}");
    // The agent runs again: the filesystem takes writes and a frozen bookmark works.
    l.bookmark(&c, "after");
    let report = l.unmount(&c);
    failed_back(&c, &report);
}
