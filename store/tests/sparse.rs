//! `read_exact_at_sparse` on the machine's file system: holes read as zeros without a
//! read, and everything else exactly as `read_exact_at` reads it, including data written
//! a moment ago and not yet allocated (delayed allocation) or synced.

use std::fs::OpenOptions;

use store::FileHandle;

const MIB: u64 = 1 << 20;

/// A new file of `len_bytes` in `dir`, all hole.
fn thin(dir: &std::path::Path, len_bytes: u64) -> std::fs::File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join("thin.img"))
        .unwrap();
    f.set_len(len_bytes).unwrap();
    f
}

/// What both reads give for `len` bytes at `offset`.
fn both(f: &std::fs::File, offset: u64, len: usize) -> (Vec<u8>, Vec<u8>) {
    let (mut plain, mut sparse) = (vec![0xAA; len], vec![0x55; len]);
    // The sparse read first: the plain one fills the page cache.
    f.read_exact_at_sparse(&mut sparse, offset).unwrap();
    FileHandle::read_exact_at(f, &mut plain, offset).unwrap();
    (plain, sparse)
}

#[test]
fn holes_read_as_zeros_and_data_as_written_even_unsynced() {
    let dir = tempfile::tempdir().unwrap();
    let f = thin(dir.path(), 16 * MIB);
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8 + 1).collect();
    // Written, never synced: the filesystem may not have allocated it yet.
    FileHandle::write_all_at(&f, &data, 4 * MIB).unwrap();
    FileHandle::write_all_at(&f, &data[..1], 15 * MIB + 7).unwrap();
    for (offset, len) in [
        (0, MIB as usize),                         // a hole
        (4 * MIB, data.len()),                     // data
        (4 * MIB - 4096, 8192),                    // a hole, then data
        (4 * MIB + data.len() as u64 - 100, 4096), // data, then a hole
        (8 * MIB, 4 * MIB as usize),               // a hole in the middle
        (15 * MIB, MIB as usize),                  // one byte amid a hole, to the end
        (16 * MIB - 4096, 4096),                   // the trailing hole
    ] {
        let (plain, sparse) = both(&f, offset, len);
        assert_eq!(plain, sparse, "{len} bytes at {offset}");
    }
    let (_, at_data) = both(&f, 4 * MIB, data.len());
    assert_eq!(at_data, data, "the unsynced data itself");
    let (_, hole) = both(&f, 8 * MIB, 4096);
    assert!(hole.iter().all(|&b| b == 0));
}

#[test]
fn data_written_into_a_preallocated_range_and_not_synced_is_read() {
    use std::os::unix::io::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let f = thin(dir.path(), 16 * MIB);
    // Unwritten extents (the case filesystems have got wrong): allocated, reading as
    // zeros, with a write into them still in the page cache only.
    // SAFETY: a plain syscall on a descriptor the File owns; no memory is passed.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 8 << 20, 2 << 20) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let data = vec![0x42u8; 4096];
    FileHandle::write_all_at(&f, &data, 9 * MIB).unwrap();
    for (offset, len) in [
        (8 * MIB, 2 * MIB as usize),
        (9 * MIB, 4096),
        (9 * MIB - 512, 1024),
    ] {
        let (plain, sparse) = both(&f, offset, len);
        assert_eq!(plain, sparse, "{len} bytes at {offset}");
    }
    let (_, at_data) = both(&f, 9 * MIB, 4096);
    assert_eq!(at_data, data);
}

#[test]
fn a_read_past_the_end_still_fails_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let f = thin(dir.path(), MIB);
    let mut buf = vec![0u8; 8192];
    for offset in [MIB - 4096, MIB, 2 * MIB] {
        let e = f.read_exact_at_sparse(&mut buf, offset).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "at {offset}");
    }
}
