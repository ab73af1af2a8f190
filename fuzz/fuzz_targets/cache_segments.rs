//! Arbitrary bytes as a process server's cache segments (the first byte says where the
//! first segment ends and the second begins): opening the cache indexes records, marks
//! lost ranges or refuses with a typed error, never panics; every record it would ship
//! reads back whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use process_server::cache::DiskCache;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let cut = (usize::from(split) * rest.len() / 255).min(rest.len());
    let dir = failback_fuzz::scratch().join("cache");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("seg-00000001.fbc"), &rest[..cut]).unwrap();
    if cut < rest.len() {
        std::fs::write(dir.join("seg-00000002.fbc"), &rest[cut..]).unwrap();
    }
    let Ok(cache) = DiskCache::open(&dir, 0) else { return };
    for e in cache.entries_from(0, 1024) {
        let _ = cache.read(&e);
    }
});
