//! Attach rules: the 61st disk, duplicate UUIDs, snapshots, locks, sizes, alternate location.

use std::path::Path;

use master_target::config::Settings;
use master_target::service::{Disks, MAX_DISKS};
use master_target::Error;
use wire_protocol::{DiskAttach, LocationKind};

/// The process server identity the tests attach for.
const PS: &str = "process-server";

fn disks(root: &Path) -> std::sync::Arc<Disks> {
    let s = Settings {
        data_dir: Some(root.join("data")),
        retention_dir: Some(root.join("retention")),
        datastore_dirs: Some(vec![root.join("ds")]),
        allow_shared_retention_volume: Some(true),
        ..Settings::default()
    };
    Disks::open(s.resolve().unwrap()).unwrap()
}

fn req(id: u64, location: LocationKind, target: &Path, size: u64) -> DiskAttach {
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&id.to_be_bytes());
    DiskAttach {
        request_id: 0,
        os_type: String::new(),
        disk_id: id,
        vm_id: format!("vm{id}"),
        group_id: String::new(),
        disk_uuid: uuid,
        size_bytes: size,
        sector_size: 512,
        location,
        target: target.display().to_string(),
    }
}

#[test]
fn at_most_sixty_disks_then_a_clear_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let d = disks(dir.path());
    for id in 1..=MAX_DISKS as u64 {
        d.attach(
            PS,
            &req(id, LocationKind::Alternate, &dir.path().join("ds"), 1 << 20),
        )
        .unwrap();
    }
    let e = d
        .attach(
            PS,
            &req(61, LocationKind::Alternate, &dir.path().join("ds"), 1 << 20),
        )
        .unwrap_err();
    assert!(matches!(e, Error::DiskLimit { .. }));
    assert!(
        e.to_string().contains("deploy another master target"),
        "{e}"
    );
    // Re-attaching an attached disk is fine (a process server reconnecting).
    d.attach(
        PS,
        &req(5, LocationKind::Alternate, &dir.path().join("ds"), 1 << 20),
    )
    .unwrap();
}

#[test]
fn duplicate_uuid_snapshot_size_and_lock_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = disks(dir.path());
    d.attach(
        PS,
        &req(1, LocationKind::Alternate, &dir.path().join("ds"), 1 << 20),
    )
    .unwrap();
    let mut dup = req(2, LocationKind::Alternate, &dir.path().join("ds"), 1 << 20);
    dup.disk_uuid = req(1, LocationKind::Alternate, Path::new(""), 0).disk_uuid;
    let e = d.attach(PS, &dup).unwrap_err();
    assert!(
        matches!(e, Error::DuplicateUuid { .. }) && e.to_string().contains("template"),
        "{e}"
    );

    // A snapshot (delta) disk.
    let vm = dir.path().join("ds/vm3");
    std::fs::create_dir_all(&vm).unwrap();
    std::fs::write(vm.join("d-flat.vmdk"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(
        vm.join("d.vmdk"),
        "createType=\"vmfsSparse\"\nparentCID=12345678\nRW 2048 VMFSSPARSE \"d-flat.vmdk\"\n",
    )
    .unwrap();
    let e = d
        .attach(
            PS,
            &req(3, LocationKind::Original, &vm.join("d.vmdk"), 1 << 20),
        )
        .unwrap_err();
    assert!(matches!(e, Error::UnsupportedDisk { .. }), "{e}");

    // Size mismatch.
    std::fs::write(
        vm.join("d.vmdk"),
        "createType=\"vmfs\"\nparentCID=ffffffff\nRW 2048 VMFS \"d-flat.vmdk\"\n",
    )
    .unwrap();
    let e = d
        .attach(
            PS,
            &req(3, LocationKind::Original, &vm.join("d.vmdk"), 2 << 20),
        )
        .unwrap_err();
    assert!(matches!(e, Error::SizeMismatch { .. }), "{e}");

    // Locked by another process (here: another open file description holding the lock).
    let held = std::fs::File::open(vm.join("d-flat.vmdk")).unwrap();
    held.lock().unwrap();
    let e = d
        .attach(
            PS,
            &req(3, LocationKind::Original, &vm.join("d.vmdk"), 1 << 20),
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::DiskLocked { .. }) && e.to_string().contains("power off"),
        "{e}"
    );
    drop(held);
    assert_eq!(
        d.attach(
            PS,
            &req(3, LocationKind::Original, &vm.join("d.vmdk"), 1 << 20)
        )
        .unwrap(),
        0
    );

    // Detach releases the lock.
    d.detach(3).unwrap();
    let f = std::fs::File::open(vm.join("d-flat.vmdk")).unwrap();
    f.try_lock().expect("the lock is released on detach");
}

#[test]
fn alternate_location_vmdk_passes_qemu_img_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = disks(dir.path());
    d.attach(
        PS,
        &req(1, LocationKind::Alternate, &dir.path().join("ds"), 8 << 20),
    )
    .unwrap();
    let desc = dir.path().join("ds/vm1/vm1-disk1.vmdk");
    let out = std::process::Command::new("qemu-img")
        .arg("info")
        .arg(&desc)
        .output()
        .expect("qemu-img is installed (.ci/run installs qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("8 MiB"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn retention_volume_on_the_disks_filesystem_is_refused_without_the_demo_setting() {
    let dir = tempfile::tempdir().unwrap();
    let e = master_target::retention::check(
        &dir.path().join("ret"),
        &[("the data directory", dir.path())],
        false,
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::RetentionVolume { .. }) && e.to_string().contains("volume of its own"),
        "{e}"
    );
    // A data directory that does not exist yet counts by the filesystem it will be made on.
    let e = master_target::retention::check(
        &dir.path().join("ret"),
        &[("the data directory", &dir.path().join("not/yet/made"))],
        false,
    )
    .unwrap_err();
    assert!(matches!(e, Error::RetentionVolume { .. }), "{e}");
    let info = master_target::retention::check(
        &dir.path().join("ret"),
        &[("the data directory", dir.path())],
        true,
    )
    .unwrap();
    assert!(info.free_bytes > 0);
}

#[test]
fn a_detached_disk_stays_detached_and_another_process_server_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    let d = disks(dir.path());
    d.attach(PS, &req(1, LocationKind::Alternate, &ds, 1 << 20))
        .unwrap();
    let e = d
        .attach("other-ps", &req(1, LocationKind::Alternate, &ds, 1 << 20))
        .unwrap_err();
    assert!(matches!(e, Error::Forbidden(_)), "{e}");
    d.detach(1).unwrap();
    // A reconnecting process server does not re-attach it, nor does a restart.
    let e = d
        .attach(PS, &req(1, LocationKind::Alternate, &ds, 1 << 20))
        .unwrap_err();
    assert!(matches!(e, Error::Detached { .. }), "{e}");
    drop(d);
    let d = disks(dir.path());
    let e = d
        .attach(PS, &req(1, LocationKind::Alternate, &ds, 1 << 20))
        .unwrap_err();
    assert!(matches!(e, Error::Detached { .. }), "{e}");
    let f = std::fs::File::open(ds.join("vm1/vm1-disk1-flat.vmdk")).unwrap();
    // A closed lock can outlive `close` briefly: an io_uring ring's teardown runs in kernel
    // workers (`LOCK_RELEASE_WAIT_MS`, which the service waits too), and a sibling test's
    // `qemu-img` child holds copies of this process's descriptors until its exec. So the
    // lock is tried for as long as the service would wait, then must be free.
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_millis(2 * master_target::disk::LOCK_RELEASE_WAIT_MS);
    let locked = loop {
        match f.try_lock() {
            Ok(()) => break Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => break Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    };
    locked.expect("a detached disk is not locked after a restart");
}

#[test]
fn targets_outside_the_datastores_are_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = disks(dir.path());
    let outside = dir.path().join("etc");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("shadow"), b"secret").unwrap();
    for target in [
        outside.join("shadow"),
        dir.path().join("ds/../etc/shadow"),
        dir.path().join("ds/x/../../etc/shadow"),
    ] {
        let e = d
            .attach(PS, &req(7, LocationKind::Original, &target, 1 << 20))
            .unwrap_err();
        assert!(matches!(e, Error::TargetRefused { .. }), "{e}");
        assert!(
            !e.wire_message(7).contains("secret"),
            "no content is revealed: {e}"
        );
    }
    // An alternate location outside, or a VM id that is a path.
    let e = d
        .attach(PS, &req(8, LocationKind::Alternate, &outside, 1 << 20))
        .unwrap_err();
    assert!(matches!(e, Error::TargetRefused { .. }), "{e}");
    let mut bad = req(9, LocationKind::Alternate, Path::new(""), 1 << 20);
    bad.vm_id = "../../etc/vm".into();
    assert!(matches!(
        d.attach(PS, &bad).unwrap_err(),
        Error::InvalidParameter { .. }
    ));
    assert_eq!(std::fs::read(outside.join("shadow")).unwrap(), b"secret");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
}
