//! `write_durable` and `remove_durable` under a power loss at every file operation: the
//! file holds the old contents or the new, never a mix; once the call returned, the new.

use std::path::Path;

use store::{FileSystem, SimFs};

#[test]
fn a_durable_write_is_old_or_new_after_a_crash_anywhere() {
    let path = Path::new("/state/marker");
    let mut saw_old = false;
    for seed in 0..50u64 {
        for ops in 1..12 {
            let fs = SimFs::new(seed);
            fs.create_dir_all(Path::new("/state")).unwrap();
            store::write_durable(&fs, path, b"old contents").unwrap();
            fs.arm_crash(ops);
            let done = store::write_durable(&fs, path, b"new!").is_ok() && !fs.crashed();
            fs.crash();
            let now = fs.contents(path);
            if done {
                assert_eq!(now.as_deref(), Some(&b"new!"[..]), "seed {seed} ops {ops}");
            } else {
                saw_old |= now.as_deref() == Some(&b"old contents"[..]);
                assert!(
                    matches!(now.as_deref(), Some(b"old contents") | Some(b"new!")),
                    "seed {seed} ops {ops}: {now:?}"
                );
            }
        }
    }
    assert!(saw_old, "some crash came before the rename");
}

#[test]
fn a_durable_removal_stays_removed() {
    let fs = SimFs::new(1);
    fs.create_dir_all(Path::new("/state")).unwrap();
    let path = Path::new("/state/marker");
    store::write_durable(&fs, path, b"x").unwrap();
    store::remove_durable(&fs, path).unwrap();
    store::remove_durable(&fs, path).unwrap(); // already gone: fine
    fs.crash();
    assert!(!fs.exists(path));
    assert!(store::read_all(&fs, path).is_err());
}
