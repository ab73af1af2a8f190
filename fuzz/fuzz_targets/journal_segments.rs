//! Arbitrary bytes as a disk's retention journal (the first byte says where the first
//! segment ends and the second begins): listing it, and opening it over a small disk (which
//! rolls back uncommitted writes), yield points or typed errors, never a panic, and never a
//! write past the disk's end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use master_target::disk::DiskFile;
use master_target::journal::{inspect, Journal};

const DISK_BYTES: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let cut = (usize::from(split) * rest.len() / 255).min(rest.len());
    let root = failback_fuzz::scratch();
    let dir = root.join("journal");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("seg-00000001.fbj"), &rest[..cut]).unwrap();
    if cut < rest.len() {
        std::fs::write(dir.join("seg-00000002.fbj"), &rest[cut..]).unwrap();
    }
    let _ = inspect(&dir);
    let disk_path = root.join("disk.img");
    let f = std::fs::File::create(&disk_path).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    drop(f);
    let disk = DiskFile::open(&disk_path).unwrap();
    if let Ok(j) = Journal::open(&dir, &disk) {
        let _ = j.points().len();
    }
    assert_eq!(std::fs::metadata(&disk_path).unwrap().len(), DISK_BYTES);
});
