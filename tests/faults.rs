//! The fault suite (issue #11), over real processes: crashes (SIGKILL of any component at
//! random instants), link faults through a relay the tests own, bytes flipped at rest in
//! the cache and the journal, full volumes (small loop-mounted filesystems), and hostile
//! input from a peer with a valid certificate. Each ends with the disks compared to their
//! sources (blake3 over the whole image) and every point exported and checked.
//!
//! `FAULT_CYCLES` sets how many faults of each kind (default 3: CI-sized; 100+ by hand),
//! `FAULT_SEED` the seed of their timing (printed, so a failure can be replayed).

mod common;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;
use failback::harness::{file_blake3, Cluster};

fn cycles() -> u64 {
    std::env::var("FAULT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn rng(test: &str) -> fastrand::Rng {
    let seed = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{test}: FAULT_SEED={seed} FAULT_CYCLES={}", cycles());
    fastrand::Rng::with_seed(seed)
}

/// A replay of the Tencent trace for disk 1 with `extra` flags.
fn tencent(c: &Cluster, extra: &[&str]) -> Child {
    replay(c, 1, "tencent-cbs-50k.msr.csv", "msr", extra)
}

/// A paced replay of `writes` writes of the Tencent trace for disk 1 (a fresh stream each
/// time it starts).
fn agent(c: &Cluster, writes: u64, extra: &[&str]) -> Child {
    let max = format!("--max-writes={writes}");
    let mut args = vec![max.as_str(), "--pace=4x", "--bookmark-every-s=2"];
    args.extend_from_slice(extra);
    tencent(c, &args)
}

fn lines_with(path: &Path, word: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(word))
        .count()
}

#[test]
fn crash_loop_loses_nothing_acknowledged() {
    let mut r = rng("crash_loop");
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path());
    let mut a = agent(&c, 4000, &[]);
    wait_streaming(&c, 1);
    let mut kills = [0u32; 3];
    for _ in 0..cycles() * 3 {
        std::thread::sleep(Duration::from_millis(r.u64(300..2000)));
        match r.u8(0..3) {
            0 => {
                let _ = a.kill();
                let _ = a.wait();
                kills[0] += 1;
                // A restarted agent finds it crashed after capturing writes: it resyncs.
                a = agent(&c, 4000, &["--seed=7"]);
            }
            1 => {
                c.kill_ps();
                kills[1] += 1;
                c.start_ps().unwrap();
            }
            _ => {
                c.kill_mt();
                kills[2] += 1;
                c.start_mt().unwrap();
            }
        }
    }
    let rep = finish(&c, 1, a);
    eprintln!("kills (agent, process server, master target): {kills:?}");
    verify_points(&c, 1, rep["last_lsn"].as_u64().unwrap(), true);
}

#[test]
fn link_faults_cut_reset_truncate_flip_duplicate_and_stall_lose_nothing() {
    let mut r = rng("link_faults");
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), Path::new(BIN)).unwrap();
    let relay = FaultRelay::new(c.mt_addr.clone());
    c.ps_upstream = Some(relay.addr.clone());
    // A short link timeout, so a stall is found dead in seconds.
    c.ps_extra.push("--link-timeout-s=3".into());
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    // Writes flow through every fault: the replay lasts longer the more cycles there are
    // (a cycle takes about 8.5 s; 8000 writes of the trace are 60 s of trace time).
    let pace = format!("--pace={:.3}x", (7.0 / cycles() as f64).min(4.0));
    let a = tencent(&c, &["--max-writes=8000", &pace, "--bookmark-every-s=2"]);
    wait_streaming(&c, 1);
    for cycle in 0..cycles() {
        for f in Fault::ALL {
            std::thread::sleep(Duration::from_millis(r.u64(200..900)));
            relay.inject(f);
            if f == Fault::Stall {
                // Past the heartbeat: the process server declares the link dead.
                std::thread::sleep(Duration::from_secs(5));
            }
            let _ = cycle;
        }
    }
    let rep = finish(&c, 1, a);
    verify(&c, 1, rep["last_lsn"].as_u64().unwrap());
    let injected = relay.injected.load(std::sync::atomic::Ordering::SeqCst);
    let ups = lines_with(
        &c.dir.join("logs/process-server.log"),
        "link to the master target up",
    );
    eprintln!("faults injected {injected}, links up {ups}");
    assert!(
        injected >= cycles() * 4,
        "the faults were injected: {injected}"
    );
    assert!(ups > 1, "the link came back after faults");
    assert!(
        lines_with(&c.dir.join("logs/process-server.log"), "link-timeout-s") >= 1,
        "a stall is found dead by the heartbeat"
    );
    // The master target closed the stalled connections when the process server came back
    // on new ones, rather than keep them until the per-identity limit refused it.
    assert!(
        lines_with(&c.dir.join("logs/master-target.log"), "superseded") >= 1,
        "the master target closes a process server's dead connection"
    );
}

/// Attaches disk 1 (one write, durable on the master target), then stops the master
/// target: what the agent sends next lands in the process server's cache only.
fn attach_then_stop_mt(c: &mut Cluster) {
    let r = finish(
        c,
        1,
        replay(
            c,
            1,
            "tpcc-small.disksim",
            "disksim-ns",
            &["--max-writes=1"],
        ),
    );
    c.wait_durable(
        1,
        r["last_lsn"].as_u64().unwrap(),
        Duration::from_secs(60),
        |_| {},
    )
    .unwrap();
    c.kill_mt();
}

/// Runs the agent for disk 1 to its end, with the master target down: everything lands in
/// the process server's cache, acknowledged.
fn cache_while_mt_down(c: &mut Cluster, writes: u64, seed: u64) {
    attach_then_stop_mt(c);
    let max = format!("--max-writes={writes}");
    let seed = format!("--seed={seed}");
    finish(c, 1, tencent(c, &[&max, &seed]));
}

fn segments(dir: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

/// The byte positions of the records whose 4-byte magic is `magic` in a cache segment, and
/// which are longer than `longer_than` bytes in all.
fn cache_records(seg: &Path, magic: &[u8; 4], longer_than: usize) -> Vec<usize> {
    let b = std::fs::read(seg).unwrap();
    let mut out = Vec::new();
    let mut p = 0;
    while p + 36 <= b.len() {
        let len = u32::from_be_bytes(b[p + 28..p + 32].try_into().unwrap()) as usize;
        if &b[p..p + 4] == magic && 36 + len > longer_than {
            out.push(p);
        }
        p += 36 + len;
    }
    out
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x08;
    std::fs::write(path, b).unwrap();
}

#[test]
fn a_flipped_byte_in_any_cache_record_never_loses_an_acknowledged_write() {
    // (segment, which record, where in it): a frame's header or body, first or last of its
    // segment; a sync mark. The oldest segment is sealed (64 MiB), the newest active.
    let cases: [(bool, &str, usize); 8] = [
        (false, "first frame", 10),
        (false, "first frame", 40),
        (false, "last frame", 10),
        (false, "last frame", 200),
        (false, "last sync mark", 12),
        (true, "last frame", 10),
        (true, "last frame", 200),
        (true, "last sync mark", 12),
    ];
    let mut r = rng("cache_at_rest");
    for (n, (newest, which, off)) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cluster(dir.path());
        // Past one 64 MiB segment (the trace's writes average 12 KiB).
        cache_while_mt_down(&mut c, 6500 + r.u64(0..1000), n as u64 + 3);
        c.kill_ps();
        let cache = c.dir.join("data/process-server/disk-1");
        let segs = segments(&cache, "fbc");
        assert!(segs.len() >= 2, "several cache segments ({})", segs.len());
        let seg = if *newest { segs.last() } else { segs.first() }.unwrap();
        let at = match *which {
            "first frame" => cache_records(seg, b"FBC1", *off)[1],
            "last frame" => *cache_records(seg, b"FBC1", *off).last().unwrap(),
            _ => *cache_records(seg, b"FBS1", *off).last().unwrap(),
        } + off;
        flip(seg, at);
        c.start_ps().unwrap();
        c.start_mt().unwrap();
        // The agent comes back: told to resync what was lost, it does (a sync mark's twin
        // leaves nothing lost).
        let what = format!(
            "{which} +{off}, {} segment",
            if *newest { "newest" } else { "oldest" }
        );
        let mut rep = finish(
            &c,
            1,
            tencent(
                &c,
                &["--max-writes=300", "--seed=11", "--bookmark-every-s=2"],
            ),
        );
        let last = rep["last_lsn"].as_u64().unwrap();
        c.wait_durable(1, last, Duration::from_secs(300), |_| {})
            .unwrap();
        // The loss may be found after the agent left (the uplink reads the damaged record
        // late): the process server says so, and the operator resyncs, as OPERATIONS.md says.
        if c.ps_status().unwrap()[0].state == "resync-required" {
            assert!(!which.contains("sync mark"), "{what}: nothing lost");
            let out = c
                .agent("resync", 1, &source(&c, 1), "256MiB")
                .arg("--mode=differential")
                .output()
                .unwrap();
            assert!(out.status.success(), "{what}: {out:?}");
            rep = finish(&c, 1, tencent(&c, &["--max-writes=50", "--seed=12"]));
        }
        verify_points(&c, 1, rep["last_lsn"].as_u64().unwrap(), true);
        let status = c.ps_status().unwrap();
        assert_ne!(status[0].state, "resync-required", "{what}: resynced");
        eprintln!("{what}: ok");
    }
}

/// The process server's record of how far the master target acknowledged a drained disk
/// (`acked-lsn`, all that is left once its segments are deleted) damaged: an agent that
/// comes back while the master target is away must not be told where to resume (it would
/// be acknowledged under LSNs the master target already holds, and they would be dropped
/// there as duplicates). It waits until the master target says; nothing is lost.
#[test]
fn a_damaged_cache_position_waits_for_the_master_target_and_loses_nothing() {
    for (n, how) in [
        "a flipped digit",
        "an old value without its checksum",
        "no file",
    ]
    .iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cluster(dir.path());
        let seed = format!("--seed={}", 21 + n);
        let rep = finish(&c, 1, tencent(&c, &["--max-writes=400", &seed]));
        let last = rep["last_lsn"].as_u64().unwrap();
        c.wait_durable(1, last, Duration::from_secs(120), |_| {})
            .unwrap();
        c.kill_ps();
        c.kill_mt();
        let cache = c.dir.join("data/process-server/disk-1");
        let acked = cache.join("acked-lsn");
        assert!(
            acked.exists(),
            "{how}: the drained cache keeps its position"
        );
        // All acknowledged: the process server deletes the last segment too once it holds
        // 1 MiB (IDLE_ROTATE_BYTES); do it now, so acked-lsn is all that says where the disk is.
        for seg in segments(&cache, "fbc") {
            std::fs::remove_file(seg).unwrap();
        }
        match n {
            0 => flip(&acked, 0),
            1 => std::fs::write(&acked, "100\n").unwrap(),
            _ => std::fs::remove_file(&acked).unwrap(),
        }
        // The agent returns before the link does: it is held back, not acknowledged.
        c.start_ps().unwrap();
        let seed = format!("--seed={}", 31 + n);
        let mut a = tencent(&c, &["--max-writes=300", &seed]);
        std::thread::sleep(Duration::from_secs(3));
        assert!(a.try_wait().unwrap().is_none(), "{how}: the agent waits");
        assert_eq!(
            c.ps_status().unwrap()[0].cached_lsn,
            0,
            "{how}: nothing taken"
        );
        assert_eq!(
            lines_with(
                &c.dir.join("logs/process-server.log"),
                "until the master target says"
            ),
            1,
            "{how}: one ERROR says why"
        );
        c.start_mt().unwrap();
        let more = finish(&c, 1, a);
        assert!(
            more["last_lsn"].as_u64().unwrap() > last,
            "{how}: the stream goes on after the master target's position"
        );
        verify(&c, 1, more["last_lsn"].as_u64().unwrap());
        eprintln!("{how}: ok");
    }
}

#[test]
fn a_flipped_byte_in_a_committed_journal_record_is_refused_then_recovered() {
    // Every kind of record, in the oldest and the newest segment, in its header (the body
    // length), its body's first byte (an undo's LSN) and an undo's data. Undo records of
    // zeros (kind 4) are what a write over a fresh region of the disk leaves.
    let mut cases = Vec::new();
    for (kind_name, kind) in [
        ("undo", 1u8),
        ("undo of zeros", 4),
        ("commit", 2),
        ("point", 3),
    ] {
        for newest in [false, true] {
            for (part, off) in [("header", 10usize), ("body", 16), ("data", 16 + 24 + 9)] {
                if part != "data" || kind == 1 {
                    cases.push((kind_name, kind, newest, part, off));
                }
            }
        }
    }
    for (kind_name, kind, newest, part, off) in cases {
        // Commits are written twice: one damaged copy is harmless. An undo's data in a
        // closed segment is read (and checked) only by the exports that need it.
        let expect = match (kind, part, newest) {
            (2, _, _) => Expect::Harmless,
            (1, "data", false) => Expect::OlderExportsFail,
            _ => Expect::Refused,
        };
        let which = format!(
            "{kind_name} record {part}, {} segment",
            if newest { "newest" } else { "oldest" }
        );
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster::new(dir.path(), Path::new(BIN)).unwrap();
        // The smallest quota: 4 MiB segments, so the disk's journal has several.
        c.mt_extra.push("--journal-quota=32MiB".into());
        c.start_mt().unwrap();
        c.start_ps().unwrap();
        c.wait_linked(Duration::from_secs(30)).unwrap();
        let jdir = c.dir.join("data/retention/disk-1");
        let mut rep = serde_json::Value::Null;
        // A segment may have just begun (only its checkpoint): write on until the newest
        // holds a record of the kind. Each replay starts at the trace's beginning, so only
        // writes past the first 3000 reach blocks never written, which an undo of zeros
        // needs (zeros themselves are no longer written: neither journaled nor applied).
        let rounds = if kind == 4 {
            [3000, 3100, 3200, 3300]
        } else {
            [3000, 100, 100, 100]
        };
        for (round, writes) in rounds.into_iter().enumerate() {
            let max = format!("--max-writes={writes}");
            let seed = format!("--seed={}", round + 1);
            rep = finish(&c, 1, tencent(&c, &[&max, &seed, "--bookmark-every-s=1"]));
            c.wait_durable(
                1,
                rep["last_lsn"].as_u64().unwrap(),
                Duration::from_secs(120),
                |_| {},
            )
            .unwrap();
            let segs = segments(&jdir, "fbj");
            let last = segs.len() - 1;
            if journal_records(&segs)
                .iter()
                .any(|r| r.seg == last && r.kind == kind)
            {
                break;
            }
        }
        c.kill_mt();
        // One byte of a committed record flips at rest: the last of its kind in the
        // newest segment, the first in the oldest (an undo's data: the first undo of a
        // closed segment that a point precedes, so some exports need it).
        let segs = segments(&jdir, "fbj");
        assert!(
            segs.len() >= 2,
            "{which}: several segments ({})",
            segs.len()
        );
        let records = journal_records(&segs);
        let first_point = records.iter().find(|r| r.kind == 3).map(|r| r.first_u64);
        let target = records
            .iter()
            .filter(|r| r.kind == kind)
            .filter(|r| match (newest, part) {
                (true, _) => r.seg + 1 == segs.len(),
                (false, "data") => r.seg + 1 < segs.len() && Some(r.first_u64) > first_point,
                (false, _) => r.seg == 0,
            })
            .fold(None, |found, r| {
                if newest || found.is_none() {
                    Some(r)
                } else {
                    found
                }
            })
            .unwrap_or_else(|| panic!("{which}: no such record"));
        let undo_lsn = target.first_u64;
        flip(&segs[target.seg], target.pos + off);
        c.start_mt().unwrap();
        if expect != Expect::Refused {
            let more = finish(
                &c,
                1,
                tencent(
                    &c,
                    &["--max-writes=300", "--seed=5", "--bookmark-every-s=0.5"],
                ),
            );
            let log = c.dir.join("logs/master-target.log");
            assert_eq!(lines_with(&log, "recover-journal"), 0, "{which}: served");
            if expect == Expect::Harmless {
                verify_points(&c, 1, more["last_lsn"].as_u64().unwrap(), true);
            } else {
                points_around_damage(&c, more["last_lsn"].as_u64().unwrap(), undo_lsn);
            }
            eprintln!("{which}: ok");
            continue;
        }
        // The disk is refused, alone, saying what to do; nothing is rolled back.
        let log = c.dir.join("logs/master-target.log");
        let deadline = Instant::now() + Duration::from_secs(30);
        while lines_with(&log, "recover-journal") == 0 {
            assert!(Instant::now() < deadline, "{which}: the damage is reported");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut args = vec!["recover-journal".to_string(), "--disk=1".into()];
        args.extend(c.mt_dirs());
        let said = c.mt_cmd(&args).unwrap();
        assert!(
            said.contains(&format!("lsn {}", rep["last_lsn"])),
            "{which}: {said}"
        );
        // The process server asks again within seconds; replication carries on, exact.
        let more = finish(
            &c,
            1,
            tencent(
                &c,
                &["--max-writes=500", "--seed=5", "--bookmark-every-s=2"],
            ),
        );
        // The points from before the damage are gone with it; the new ones export exactly.
        verify_points(&c, 1, more["last_lsn"].as_u64().unwrap(), true);
        eprintln!("{which}: ok");
    }
}

/// A record of a journal segment (the layout is in master-target's journal.rs).
struct JournalRecord {
    seg: usize,
    pos: usize,
    kind: u8,
    /// The first 8 bytes of the body: an undo's or a commit's LSN, a point's id; a
    /// point's LSN for points.
    first_u64: u64,
}

fn journal_records(segs: &[std::path::PathBuf]) -> Vec<JournalRecord> {
    let mut out = Vec::new();
    for (seg, path) in segs.iter().enumerate() {
        let b = std::fs::read(path).unwrap();
        let mut pos = 0;
        // Every record is at least 32 bytes (a commit).
        while pos + 32 <= b.len() {
            let len = u32::from_be_bytes(b[pos + 8..pos + 12].try_into().unwrap()) as usize;
            let at = if b[pos + 4] == 3 { pos + 24 } else { pos + 16 };
            out.push(JournalRecord {
                seg,
                pos,
                kind: b[pos + 4],
                first_u64: u64::from_be_bytes(b[at..at + 8].try_into().unwrap()),
            });
            pos += 16 + len;
        }
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
enum Expect {
    /// The disk is served, every point exact.
    Harmless,
    /// The disk is refused until `recover-journal`.
    Refused,
    /// The disk is served; a point older than the damaged record fails its export loudly,
    /// every later one is exact.
    OlderExportsFail,
}

/// With disk 1 replicated to `last_lsn` and the undo record of write `damaged_lsn` damaged:
/// the disk equals its source, points at or after `damaged_lsn` export exactly, and every
/// older one fails its export, naming the damage (never a wrong image with exit 0).
fn points_around_damage(c: &Cluster, last_lsn: u64, damaged_lsn: u64) {
    c.wait_durable(1, last_lsn, Duration::from_secs(300), |_| {})
        .unwrap();
    c.detach(1).unwrap();
    assert_eq!(
        file_blake3(&source(c, 1)).unwrap(),
        file_blake3(&onprem(c, 1)).unwrap(),
        "the on-premises disk equals the source"
    );
    let bookmarks = agent::engine::read_bookmarks(&c.agent_state(1)).unwrap();
    let points = c.points(1).unwrap();
    let (older, newer): (Vec<_>, Vec<_>) = points
        .iter()
        .partition(|p| p["lsn"].as_u64().unwrap() < damaged_lsn);
    let (mut exact, mut refused) = (0, 0);
    // The older points nearest the damage (each export copies the disk: a few suffice).
    for p in older.iter().rev().take(3) {
        let out = c.dir.join(format!("point-{}.img", p["id"]));
        let e = c
            .export(1, &p["id"].to_string(), &out, "raw")
            .expect_err("an export that needs the damaged record fails");
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        assert!(!out.exists(), "a failed export leaves no image behind");
        refused += 1;
    }
    for p in newer {
        let Some(b) = bookmarks.iter().find(|b| p["lsn"] == b.lsn) else {
            continue;
        };
        let out = c.dir.join(format!("point-{}.img", p["id"]));
        c.export(1, &p["id"].to_string(), &out, "raw").unwrap();
        let d = agent::source::hex(&agent::source::image_digest(&out).unwrap());
        assert_eq!(d, b.disk_digest, "point {} exports exactly", p["id"]);
        std::fs::remove_file(&out).unwrap();
        exact += 1;
    }
    assert!(
        exact > 0 && refused > 0,
        "points on both sides: {exact} exact, {refused} refused"
    );
}

/// A linked cluster whose `data/{data_subdir}` is a small volume of `mib` MiB, with
/// `configure` applied before the services start; `None` (and why) without root.
fn on_small_volume(
    data_subdir: &str,
    mib: u64,
    configure: impl FnOnce(&mut Cluster),
) -> Option<(tempfile::TempDir, SmallVolume, Cluster)> {
    // In that order: on a failed test the cluster (declared last) stops first, so the
    // volume is no longer busy when it is unmounted.
    if !root() {
        eprintln!("full volumes need root (mount -o loop): run the fault suite as root (CI does)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), Path::new(BIN)).unwrap();
    let vol = SmallVolume::new(
        &c.dir.join(format!("{data_subdir}.img")),
        &c.dir.join("data").join(data_subdir),
        mib,
    );
    configure(&mut c);
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    Some((dir, vol, c))
}

#[test]
fn a_full_cache_volume_holds_agents_back_and_loses_nothing() {
    // The limit above the volume: the volume fills first.
    let Some((_dir, vol, mut c)) = on_small_volume("process-server", 96, |c| {
        c.ps_extra.push("--cache-limit=1GiB".into())
    }) else {
        return;
    };
    attach_then_stop_mt(&mut c);
    // 245 MB of writes into a 96 MiB volume, the master target away.
    let a = tencent(&c, &["--device=all", "--bookmark-every-s=4"]);
    let log = c.dir.join("logs/process-server.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while lines_with(&log, "volume is full") == 0 {
        assert!(Instant::now() < deadline, "the volume fills");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let errors = lines_with(&log, "ERROR");
    assert!(
        errors < 5,
        "a full volume holds agents back, no error loop: {errors} ERRORs"
    );
    c.start_mt().unwrap();
    let rep = finish(&c, 1, a);
    verify(&c, 1, rep["last_lsn"].as_u64().unwrap());
    c.stop();
    drop(vol);
}

#[test]
fn a_full_retention_volume_prunes_or_holds_and_a_smaller_quota_starts() {
    // A quota the volume cannot hold.
    let Some((_dir, vol, mut c)) = on_small_volume("retention", 48, |c| {
        c.mt_extra.push("--journal-quota=1GiB".into())
    }) else {
        return;
    };
    let rep = finish(
        &c,
        1,
        tencent(&c, &["--device=all", "--bookmark-every-s=4"]),
    );
    c.wait_durable(
        1,
        rep["last_lsn"].as_u64().unwrap(),
        Duration::from_secs(300),
        |_| {},
    )
    .unwrap();
    let log = c.dir.join("logs/master-target.log");
    assert!(
        lines_with(&log, "volume is full") + lines_with(&log, "oldest journal segment") > 0,
        "the volume filled"
    );
    // A restart with a smaller quota starts and prunes.
    c.kill_mt();
    c.mt_extra = vec!["--journal-quota=32MiB".into()];
    c.start_mt().unwrap();
    let more = finish(
        &c,
        1,
        replay(
            &c,
            1,
            "tpcc-small.disksim",
            "disksim-ns",
            &["--max-writes=300", "--bookmark-every-s=0.02"],
        ),
    );
    // The smaller quota pruned the oldest points: the points left export exactly.
    verify_points(&c, 1, more["last_lsn"].as_u64().unwrap(), true);
    c.stop();
    drop(vol);
}

#[test]
fn hostile_input_with_a_valid_certificate_is_refused_and_loses_nothing() {
    use runtime::net::{connect, ClientSpec};
    use runtime::tls::{PeerRole, TlsFiles};
    use wire_protocol::{
        DigestRequest, DiskAttach, ErrorCode, LocationKind, Message, MessageCodec, Role, Write,
        WriteBatch,
    };
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let first = replicate_and_verify_keep(&c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files = TlsFiles::of_role(&c.agent_tls("vm1"), PeerRole::Agent);
    rt.block_on(async {
        let spec = ClientSpec {
            addr: c.ps_addr.clone(),
            server_name: "127.0.0.1".into(),
            config: runtime::tls::client_config(&files).unwrap(),
            expect: PeerRole::ProcessServer,
            role: Role::Agent,
            node_id: "hostile".into(),
        };
        let mut l = connect(&spec, MessageCodec::default())
            .await
            .unwrap()
            .framed;
        let a = ask(
            &mut l,
            Message::DiskAttach(DiskAttach {
                request_id: 0,
                os_type: String::new(),
                disk_id: 9,
                vm_id: "vm1".into(),
                group_id: String::new(),
                disk_uuid: [9; 16],
                size_bytes: 1 << 20,
                sector_size: 512,
                location: LocationKind::Alternate,
                target: String::new(),
            }),
        )
        .await;
        let Message::Ack(ack) = a else {
            panic!("{a:?}")
        };
        let next = ack.entries[0].durable_lsn + 1;
        let write = |offset: u64, len: usize, good: bool| {
            let data = bytes::Bytes::from(vec![7u8; len]);
            let mut digest = wire_protocol::digest(&data);
            if !good {
                digest[0] ^= 1;
            }
            Write {
                timestamp_us: 1,
                offset,
                digest,
                data,
            }
        };
        let batch = |lsn, w: Write| {
            Message::WriteBatch(WriteBatch {
                disk_id: 9,
                first_lsn: lsn,
                writes: vec![w],
            })
        };
        // A bad digest: asked to resend, not acknowledged.
        let r = ask(&mut l, batch(next, write(0, 4096, false))).await;
        assert!(
            matches!(&r, Message::Nack(n) if n.code == ErrorCode::DigestMismatch),
            "{r:?}"
        );
        // A write past the end: refused, not acknowledged.
        let r = ask(&mut l, batch(next, write((1 << 20) - 512, 4096, true))).await;
        assert!(
            matches!(&r, Message::Error(e) if e.code == ErrorCode::OutOfRange),
            "{r:?}"
        );
        // A wrong LSN: told the right one (its own disk).
        let r = ask(&mut l, batch(next + 100, write(0, 4096, true))).await;
        assert!(
            matches!(&r, Message::Nack(n) if n.code == ErrorCode::LsnGap && n.from_lsn == next),
            "{r:?}"
        );
        // A digest request over the limit.
        let r = ask(
            &mut l,
            Message::DigestRequest(DigestRequest {
                request_id: 0,
                disk_id: 9,
                block_size: 1 << 20,
                first_block: 0,
                block_count: 1 << 18,
            }),
        )
        .await;
        assert!(matches!(&r, Message::Error(_)), "{r:?}");
        // An unknown disk.
        let r = ask(
            &mut l,
            Message::WriteBatch(WriteBatch {
                disk_id: 4242,
                first_lsn: 1,
                writes: vec![write(0, 512, true)],
            }),
        )
        .await;
        assert!(
            matches!(&r, Message::Error(e) if e.code == ErrorCode::Forbidden),
            "{r:?}"
        );
        // And a good write is taken after all that.
        let r = ask(&mut l, batch(next, write(0, 4096, true))).await;
        assert!(matches!(&r, Message::Ack(_)), "{r:?}");
    });
    // Disk 1 is untouched by it all.
    assert_eq!(file_blake3(&onprem(&c, 1)).unwrap(), first);
}

/// Sends `m` and returns the first answer (bounded), past durability notes.
async fn ask(
    l: &mut tokio_util::codec::Framed<runtime::net::ClientStream, wire_protocol::MessageCodec>,
    m: wire_protocol::Message,
) -> wire_protocol::Message {
    use futures::{SinkExt, StreamExt};
    l.send(m).await.unwrap();
    for _ in 0..1000 {
        let got = tokio::time::timeout(Duration::from_secs(30), l.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if !matches!(got, wire_protocol::Message::RemoteDurable { .. }) {
            return got;
        }
    }
    panic!("no answer among 1000 messages")
}

/// Replicates and verifies disk 1; returns the blake3 of its on-premises image.
fn replicate_and_verify_keep(c: &Cluster) -> blake3::Hash {
    replicate_and_verify(c, 1, 300);
    file_blake3(&onprem(c, 1)).unwrap()
}
