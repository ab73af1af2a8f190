//! Replication groups end to end, as real processes: two VMs' agents replay traces while
//! the process server cuts the group (every second, and once on demand with a tag); every
//! group point the master target lists is exported whole and each disk equals, byte for
//! byte, its source at that cut (the digest its agent recorded while holding writes). The
//! group's rules refuse the wrong members with the reason.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use failback::harness::{file_blake3, Cluster};

const GROUP: &str = "erp";

fn group_cluster(dir: &Path) -> Cluster {
    start_group_cluster(Cluster::new(dir, Path::new(BIN)).unwrap())
}

/// Runs a failback command; returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn group_points_are_cut_together_and_export_every_disk_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let c = group_cluster(dir.path());
    let group = format!("--group={GROUP}");
    // About 5 s of trace each at 30x, so interval cuts land mid-stream.
    let a = replay(
        &c,
        1,
        "tencent-cbs-50k.msr.csv",
        "msr",
        &[&group, "--pace=30x"],
    );
    let b = replay(
        &c,
        2,
        "tencent-cbs-50k.msr.csv",
        "msr",
        &[&group, "--pace=30x", "--compressibility=0.3"],
    );
    wait_streaming(&c, 1);
    wait_streaming(&c, 2);
    // An on-demand, tagged (app-consistent) group bookmark mid-stream, durable on return.
    let (ok, out, err) = run(&[
        "process-server",
        "group-bookmark",
        &format!("--admin={}", c.ps_admin),
        "--group=erp",
        "--tag=before-upgrade",
        "--json",
    ]);
    assert!(ok, "group bookmark: {out}{err}\n{}", c.log_tails(30));
    let taken: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(taken["durable"], true, "{out}");
    // `status` shows the group's RPO below its disks.
    let (ok, out, err) = run(&[
        "process-server",
        "status",
        &format!("--admin={}", c.ps_admin),
    ]);
    assert!(
        ok && out.contains("GROUP") && out.lines().any(|l| l.starts_with("erp ")),
        "{out}{err}"
    );
    let ra = finish(&c, 1, a);
    let rb = finish(&c, 2, b);
    let st = groups_status(&c);
    assert!(
        st["cuts_made"].as_u64().unwrap() >= 3,
        "interval cuts were made: {st}"
    );
    assert!(st["pause_max_us"].as_u64().unwrap() > 0, "{st}");
    // The agents are gone: the next cuts are abandoned, and say why.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !groups_status(&c)["last_abandoned"]
        .as_str()
        .unwrap()
        .contains("not connected")
    {
        assert!(
            Instant::now() < deadline,
            "no cut abandoned for the agents' absence: {}",
            groups_status(&c)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    drain_and_detach(&c, &[(1, &ra), (2, &rb)]);
    let (points, listed) = group_points(&c, "erp");
    assert!(points.len() >= 3, "group points: {listed}");
    let tagged = points
        .iter()
        .find(|p| p["id"] == taken["cut_id"])
        .unwrap_or_else(|| panic!("the tagged group point is listed: {listed}"));
    assert_eq!(tagged["tag"], "before-upgrade");
    assert_eq!(tagged["kind"], "app-consistent");
    // A group is exported whole or not at all: one output in the way, nothing written.
    let blocked = c.dir.join("blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    std::fs::write(blocked.join("vm2-disk-2.img"), b"keep me").unwrap();
    assert!(export_group(&c, "erp", "latest", &blocked).is_err());
    assert!(!blocked.join("vm1-disk-1.img").exists(), "nothing written");
    assert_eq!(
        std::fs::read(blocked.join("vm2-disk-2.img")).unwrap(),
        b"keep me"
    );
    // Every group point, exported whole, is each disk exactly as its agent held it.
    let records: Vec<_> = [1, 2]
        .iter()
        .map(|d| agent::engine::read_bookmarks(&c.agent_state(*d)).unwrap())
        .collect();
    for p in &points {
        let out = c.dir.join(format!("group-{}", p["id"]));
        export_group(&c, "erp", &p["id"].to_string(), &out).unwrap();
        let members = p["members"].as_array().unwrap();
        assert_eq!(members.len(), 2, "{p}");
        for m in members {
            let disk = m["disk"].as_u64().unwrap();
            let rec = records[disk as usize - 1]
                .iter()
                .find(|r| r.group_marker == p["id"].as_u64().unwrap())
                .unwrap_or_else(|| panic!("disk {disk} recorded cut {}", p["id"]));
            assert_eq!(m["point"]["lsn"].as_u64().unwrap(), rec.lsn, "{p}");
            let img = out.join(format!("vm{disk}-disk-{disk}.img"));
            let d = agent::source::hex(&agent::source::image_digest(&img).unwrap());
            assert_eq!(d, rec.disk_digest, "disk {disk} at group point {}", p["id"]);
        }
    }
    // By its tag, the tagged group point: the same images as by its id.
    let by_tag = c.dir.join("group-by-tag");
    export_group(&c, "erp", "tag:before-upgrade", &by_tag).unwrap();
    for disk in [1, 2] {
        let name = format!("vm{disk}-disk-{disk}.img");
        let by_id = c.dir.join(format!("group-{}", tagged["id"])).join(&name);
        assert_eq!(
            file_blake3(&by_tag.join(&name)).unwrap(),
            file_blake3(&by_id).unwrap(),
            "disk {disk} by the group point's tag"
        );
    }
    a_group_export_replaces_only_an_earlier_one_and_whole(&c, &points);
    if root() {
        a_failed_forced_group_export_leaves_the_earlier_one_whole(&c, &points);
    }
}

/// `--force` replaces an earlier group export whole (no disk of the earlier point stays
/// beside the new one), never a directory of other files; and a directory other users may
/// write is refused.
fn a_group_export_replaces_only_an_earlier_one_and_whole(
    c: &Cluster,
    points: &[serde_json::Value],
) {
    let (first, last) = (&points[0]["id"], &points[points.len() - 1]["id"]);
    let out = c.dir.join(format!("group-{first}"));
    let forced = |point: &serde_json::Value, out: &Path| {
        let mut args = vec![
            "export".to_owned(),
            "--group=erp".into(),
            format!("--point={point}"),
            format!("--out={}", out.display()),
            "--force".into(),
        ];
        args.extend(c.mt_dirs());
        c.mt_cmd(&args)
    };
    forced(last, &out).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("group-point.json")).unwrap())
            .unwrap();
    assert_eq!(&manifest["id"], last, "{manifest}");
    let mut names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["group-point.json", "vm1-disk-1.img", "vm2-disk-2.img"]
    );
    // A group export with a file someone added: never replaced, even with --force.
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    let err = forced(first, &out).unwrap_err().to_string();
    assert!(err.contains("did not write"), "{err}");
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine");
    std::fs::remove_file(out.join("notes.txt")).unwrap();
    // Not a group export: never replaced, even with --force.
    let other = c.dir.join("notes");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("todo.txt"), b"keep me").unwrap();
    let err = forced(last, &other).unwrap_err().to_string();
    assert!(err.contains("not a group export"), "{err}");
    assert_eq!(std::fs::read(other.join("todo.txt")).unwrap(), b"keep me");
    // Under a directory every user may write: refused before anything is written.
    let shared = c.dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let err = export_group(c, "erp", &last.to_string(), &shared.join("erp"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("can be changed by another user"), "{err}");
    if root() {
        // A directory of another user (uid 4242): refused, unless that user ran sudo.
        let alice = c.dir.join("alice");
        std::fs::create_dir_all(&alice).unwrap();
        std::os::unix::fs::chown(&alice, Some(4242), Some(4242)).unwrap();
        let err = export_group(c, "erp", &last.to_string(), &alice.join("erp"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("uid 4242"), "{err}");
        let mut args = vec![
            "master-target".to_owned(),
            "export".into(),
            "--group=erp".into(),
            format!("--point={last}"),
            format!("--out={}", alice.join("erp").display()),
        ];
        args.extend(c.mt_dirs());
        let out = Command::new(BIN)
            .args(&args)
            .env("SUDO_UID", "4242")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A forced re-export of the group that fails midway (its volume fills up while the second
/// disk is written) leaves the earlier export of the group exactly as it was.
fn a_failed_forced_group_export_leaves_the_earlier_one_whole(
    c: &Cluster,
    points: &[serde_json::Value],
) {
    // A volume of 3.5 dense images (ext4 keeps about 5%), filled below once the earlier
    // export is in it: exports are sparse.
    let image = c
        .dir
        .join(format!("group-{}", points[0]["id"]))
        .join("vm1-disk-1.img");
    let image_mib = std::fs::metadata(image).unwrap().len() >> 20;
    let mib = image_mib * 7 / 2 + 32;
    let vol = SmallVolume::new(&c.dir.join("small.ext4"), &c.dir.join("small"), mib);
    // The volume's own mount point: the staging beside it would be on another volume.
    let err = export_group(c, "erp", &points[0]["id"].to_string(), &vol.dir)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mount point"), "{err}");
    let out = vol.dir.join("erp");
    export_group(c, "erp", &points[0]["id"].to_string(), &out).unwrap();
    let digests = |dir: &Path| -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
            .iter()
            .map(|n| format!("{n} {}", blake3::hash(&std::fs::read(dir.join(n)).unwrap())))
            .collect()
    };
    let before = digests(&out);
    assert_eq!(before.len(), 3, "two disks and the manifest: {before:?}");
    // Exports are sparse, so the volume is filled up to room for the first disk of the new
    // export and half the second: the second's write fails.
    let allocated = |name: &str| {
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(out.join(name)).unwrap()) * 512
    };
    let (a1, a2) = (allocated("vm1-disk-1.img"), allocated("vm2-disk-2.img"));
    assert!(a2 >= 1 << 20, "the second disk holds data: {a2} bytes");
    fill_leaving(&vol.dir, a1 + a2 / 2);
    let mut args = vec![
        "export".to_owned(),
        "--group=erp".into(),
        format!("--point={}", points[points.len() - 1]["id"]),
        format!("--out={}", out.display()),
        "--force".into(),
    ];
    args.extend(c.mt_dirs());
    let err = c
        .mt_cmd(&args)
        .expect_err("the volume is too small for the new export");
    assert!(
        err.to_string().contains("No space left") || err.to_string().contains("os error 28"),
        "{err}"
    );
    assert_eq!(
        digests(&out),
        before,
        "the earlier export is untouched, no staging left"
    );
}

#[test]
fn a_group_refuses_members_that_break_its_rules() {
    let dir = tempfile::tempdir().unwrap();
    let c = group_cluster(dir.path());
    let one = |disk: u64, vm: &str, extra: &[&str]| -> String {
        let src = c.dir.join("source").join(format!("r{disk}.img"));
        let out = c
            .agent_in_vm("replay", vm, disk, &src, "16MiB")
            .arg(format!(
                "--trace={}",
                traces().join("tpcc-small.disksim").display()
            ))
            .arg("--format=disksim-ns")
            .arg("--max-writes=20")
            // Long enough for a loaded machine; a rule's refusal still ends the run then.
            .arg("--connect-timeout-s=10")
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            String::new()
        } else {
            text
        }
    };
    // A VM of the group, attached with --group: fine.
    let first = one(1, "vm1", &["--group=erp"]);
    assert_eq!(first, "", "{}", c.log_tails(30));
    // A VM that is not a member.
    let e = one(3, "vm3", &["--group=erp"]);
    assert!(e.contains("not a member of replication group erp"), "{e}");
    // A member attached without its group: a group is reprotected as a whole.
    let e = one(4, "vm2", &[]);
    assert!(e.contains("--group erp"), "{e}");
    // Another OS than the group's.
    let e = one(5, "vm2", &["--group=erp", "--os-type=windows"]);
    assert!(e.contains("same OS type"), "{e}");
    // A group that is not configured.
    let e = one(6, "vm2", &["--group=crm"]);
    assert!(e.contains("not configured"), "{e}");
    // vm2 never attached: no group point, cuts skipped (not begun, nothing held), and the
    // group's RPO grows, so its alarm fires.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let g = groups_status(&c);
        if g["rpo_ms"].as_u64().unwrap() >= 2000 && g["cuts_skipped"].as_u64().unwrap() > 0 {
            assert_eq!(g["cuts_made"], 0, "{g}");
            assert!(g["last_abandoned"].as_str().unwrap().contains("vm2"), "{g}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group's RPO does not grow: {g}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The disk stays in its group: attached again in another, it is refused.
    let e = one(1, "vm1", &[]);
    assert!(
        e.contains("stays in its group") || e.contains("--group erp"),
        "{e}"
    );
}

#[test]
fn a_cut_with_a_stalled_member_is_abandoned_in_bounded_time_and_never_half_made() {
    let dir = tempfile::tempdir().unwrap();
    let c = group_cluster(dir.path());
    let group = format!("--group={GROUP}");
    let a = replay(
        &c,
        1,
        "tpcc-small.disksim",
        "disksim-ns",
        &[&group, "--max-writes=200", "--stay"],
    );
    let b = replay(
        &c,
        2,
        "tpcc-small.disksim",
        "disksim-ns",
        &[&group, "--max-writes=200", "--stay"],
    );
    let bookmark = |tag: &str| {
        run(&[
            "process-server",
            "group-bookmark",
            &format!("--admin={}", c.ps_admin),
            "--group=erp",
            &format!("--tag={tag}"),
        ])
    };
    // Both agents up and answering.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !bookmark("ready").0 {
        assert!(
            Instant::now() < deadline,
            "no group bookmark while both agents run: {}",
            c.log_tails(20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // B stops answering (SIGSTOP: a hung VM): the cut is abandoned within the phase limit,
    // naming B, and A's writes were held no longer than that.
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(b.id() as i32, libc::SIGSTOP) };
    let started = Instant::now();
    let (ok, out, err) = bookmark("stalled");
    let took = started.elapsed();
    assert!(!ok, "{out}");
    assert!(
        err.contains("abandoned") && err.contains("disk(s) 2"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "the refusal took {took:?}");
    // SAFETY: as above.
    unsafe { libc::kill(b.id() as i32, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !bookmark("after").0 {
        assert!(
            Instant::now() < deadline,
            "no group bookmark after B resumed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (disk, child) in [(1, a), (2, b)] {
        // SAFETY: as above.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let r = finish(&c, disk, child);
        c.wait_durable(
            disk,
            r["last_lsn"].as_u64().unwrap(),
            Duration::from_secs(60),
            |_| {},
        )
        .unwrap();
    }
    let (points, listed) = group_points(&c, "erp");
    let tags: Vec<&str> = points.iter().map(|p| p["tag"].as_str().unwrap()).collect();
    assert!(tags.contains(&"after"), "{listed}");
    assert!(
        !tags.contains(&"stalled"),
        "an abandoned cut is no group point: {listed}"
    );
}

#[test]
fn the_group_demo_fails_back_both_vms_and_checks_two_group_points() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("kept");
    let (ok, out, err) = run(&[
        "demo",
        "--group",
        "--json",
        "--disk-size=64MiB",
        &format!("--keep={}", keep.display()),
    ]);
    assert!(ok, "{out}{err}");
    let s: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(s["verified"], true, "{s}");
    assert!(s["group_points"].as_u64().unwrap() >= 2, "{s}");
    assert!(
        s["latest_group_point"].as_u64().is_some()
            && s["earlier_group_point_checked"].as_u64().is_some(),
        "{s}"
    );
    let disks = s["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_ne!(
        disks[0]["source_blake3"], disks[1]["source_blake3"],
        "each VM has its own data"
    );
    // The trace demo's layout, for every disk of the group.
    for (vm, disk) in [("vm1", 1), ("vm2", 2)] {
        assert!(keep.join(format!("source/{vm}-disk{disk}.img")).is_file());
        let desc = keep.join(format!("onprem/{vm}/{vm}-disk{disk}.vmdk"));
        assert!(keep
            .join(format!("onprem/{vm}/{vm}-disk{disk}-flat.vmdk"))
            .is_file());
        qemu_img(&["check", desc.to_str().unwrap()]);
    }
}

#[test]
fn a_process_server_restarted_without_the_group_never_stops_its_agents() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = group_cluster(dir.path());
    let group = format!("--group={GROUP}");
    let mut agents: Vec<_> = [1, 2]
        .into_iter()
        .map(|d| {
            replay(
                &c,
                d,
                "tpcc-small.disksim",
                "disksim-ns",
                &[&group, "--max-writes=200", "--stay"],
            )
        })
        .collect();
    let bookmark = |c: &Cluster, tag: &str| {
        run(&[
            "process-server",
            "group-bookmark",
            &format!("--admin={}", c.ps_admin),
            "--group=erp",
            &format!("--tag={tag}"),
        ])
        .0
    };
    let until_made = |c: &Cluster, tag: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !bookmark(c, tag) {
            assert!(
                Instant::now() < deadline,
                "no group bookmark {tag}: {}",
                c.log_tails(20)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    until_made(&c, "first");
    // The operator restarts the process server with the group left out of its settings:
    // the agents are refused as "not ready" and keep running (a live disk keeps serving
    // its VM), however long it takes.
    c.kill_ps();
    c.ps_extra.clear();
    c.start_ps().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    for a in &mut agents {
        assert!(
            a.try_wait().unwrap().is_none(),
            "an agent stopped: {}",
            c.log_tails(20)
        );
    }
    let log = std::fs::read_to_string(c.dir.join("logs/agent-1.log")).unwrap();
    assert!(log.contains("not configured"), "the agent says why: {log}");
    // Put back, the idle agents attach again by themselves and the group is cut again.
    c.kill_ps();
    c.ps_extra = vec![
        format!("--group={GROUP}=vm1,vm2"),
        "--group-cut-interval-s=1".into(),
    ];
    c.start_ps().unwrap();
    until_made(&c, "after");
    for (disk, a) in [1, 2].into_iter().zip(agents) {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
        finish(&c, disk, a);
    }
}

/// Fills the volume at `dir` until only `room_bytes` (and less than a page more) can be
/// allocated: `room_bytes` held by a probe file, the rest taken by filler files in halving
/// sizes (the filesystem keeps reserves that statvfs does not show), then the probe freed.
fn fill_leaving(dir: &Path, room_bytes: u64) {
    let alloc = |name: String, bytes: u64| -> bool {
        let f = std::fs::File::create(dir.join(name)).unwrap();
        // SAFETY: a plain syscall on a descriptor `f` owns; no memory is passed.
        unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, bytes as i64) == 0 }
    };
    assert!(
        alloc("probe".into(), room_bytes),
        "room for {room_bytes} bytes"
    );
    let mut size = 1u64 << 40;
    for i in 0..256 {
        if size < 4096 {
            break;
        }
        if !alloc(format!("filler-{i}"), size) {
            std::fs::remove_file(dir.join(format!("filler-{i}"))).unwrap();
            size /= 2;
        }
    }
    std::fs::remove_file(dir.join("probe")).unwrap();
}
