//! Differential resync of a 2 GiB disk with 1% of its 64 KiB blocks different, through the
//! real services on loopback, beside the time to blake3-hash both disks and beside
//! `rsync --inplace --no-whole-file` on the same files.
//!
//! Run: `cargo bench --bench resync` (rsync must be installed for the comparison).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use failback::harness::{file_blake3, Cluster};

const SIZE: u64 = 2 << 30;
const BLOCK: usize = 64 << 10;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut c = Cluster::new(dir.path(), Path::new(env!("CARGO_BIN_EXE_failback"))).unwrap();
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();

    // Source: 2 GiB of data that compresses about 2:1. On-premises: the same, 1% of blocks changed.
    let src = c.dir.join("source/disk1.img");
    let img = master_target::vmdk::create(&c.dir.join("onprem/vm1"), "vm1-disk1", SIZE, &[3; 16])
        .unwrap();
    let mut chunk = vec![0u8; 64 << 20];
    let (mut s, mut d) = (
        std::fs::File::create(&src).unwrap(),
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img.data_path)
            .unwrap(),
    );
    let mut differing = Vec::new();
    for i in 0..SIZE / chunk.len() as u64 {
        agent::datagen::fill(1, i, 0.5, &mut chunk);
        std::io::Write::write_all(&mut s, &chunk).unwrap();
        let per_chunk = chunk.len() / BLOCK;
        for (b, block) in chunk.chunks_mut(BLOCK).enumerate() {
            let global = i as usize * per_chunk + b;
            if global % 100 == 37 {
                differing.push(block.to_vec());
                block[0] ^= 0xff;
            }
        }
        std::io::Write::write_all(&mut d, &chunk).unwrap();
    }
    drop((s, d));
    let rsync_dst = c.dir.join("rsync-target.img");
    std::fs::copy(&img.data_path, &rsync_dst).unwrap();
    // Warm both files into the page cache as the resync would find them.
    let _ = (
        file_blake3(&src).unwrap(),
        file_blake3(&img.data_path).unwrap(),
    );

    let t = Instant::now();
    let (a, b) = (
        file_blake3(&src).unwrap(),
        file_blake3(&img.data_path).unwrap(),
    );
    let hash_both_s = t.elapsed().as_secs_f64();
    assert_ne!(a, b);
    let t = Instant::now();
    for p in [&src, &img.data_path] {
        let mut h = blake3::Hasher::new();
        h.update_mmap(p).unwrap();
    }
    let hash_both_1core_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let out = c
        .agent("resync", 1, &src, "2GiB")
        .arg("--mode=differential")
        .arg("--location=original")
        .arg(format!("--target={}", img.descriptor.display()))
        .arg("--disk-uuid=03030303030303030303030303030303")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent_s = t.elapsed().as_secs_f64();
    let st = c.ps_status().unwrap().remove(0);
    c.wait_durable(1, st.cached_lsn, Duration::from_secs(600), |_| {})
        .unwrap();
    let resync_s = t.elapsed().as_secs_f64();
    let st = c.ps_status().unwrap().remove(0);
    c.detach(1).unwrap();
    assert_eq!(
        file_blake3(&src).unwrap(),
        file_blake3(&img.data_path).unwrap(),
        "resync is exact"
    );

    let digest_list_bytes = (SIZE as usize / BLOCK) * 32;
    let compressed: usize = differing
        .iter()
        .map(|b| zstd::bulk::compress(b, 3).unwrap().len())
        .sum();
    let ideal = compressed + digest_list_bytes;
    let sent = st.wire_bytes as usize + digest_list_bytes;
    println!("resync: {} of {} blocks differ; sent {} bytes on the link + {} bytes of digests = {:.3} x (compressed differing blocks + digest list = {ideal})", differing.len(), SIZE as usize / BLOCK, st.wire_bytes, digest_list_bytes, sent as f64 / ideal as f64);
    println!("resync: the agent process took {agent_s:.2} s (hashing its source, comparing, sending, until the process server held everything)");
    println!("resync: {resync_s:.2} s end to end (agent start to durable); blake3 of both disks: {hash_both_s:.2} s on all cores ({:.2} x), {hash_both_1core_s:.2} s on one core ({:.2} x)", resync_s / hash_both_s, resync_s / hash_both_1core_s);

    let t = Instant::now();
    match Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "--stats"])
        .arg(&src)
        .arg(&rsync_dst)
        .output()
    {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let sent = text
                .lines()
                .find(|l| l.starts_with("Total bytes sent"))
                .unwrap_or("?");
            println!(
                "rsync --inplace --no-whole-file: {:.2} s, {sent}",
                t.elapsed().as_secs_f64()
            );
        }
        _ => println!("rsync not installed: no comparison"),
    }
    c.stop();
}
