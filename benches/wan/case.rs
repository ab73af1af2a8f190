//! The cases, run where the process server is (inside its namespace for a shaped link):
//! a cluster whose master target is behind the link, the agent, and what they measured.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use failback::harness::{Cluster, DiskStatus};
use failback::relay::DelayRelay;

use crate::{CONTENT_BYTES, IP_MT};

/// The trace replayed under churn (245 MB of writes over 147 s at its own speed).
const CHURN_TRACE: &str = "tests/data/traces/tencent-cbs-50k.msr.csv";
/// Its writes per second of trace time, in bytes: the churn's speed factor comes from it.
pub(crate) const CHURN_TRACE_BYTES_PER_S: f64 = 244_600_832.0 / CHURN_TRACE_SECONDS;
/// The churn's load: this share of the link's rate, on the wire.
const CHURN_LOAD: f64 = 0.5;
/// The churn trace's own length in seconds.
const CHURN_TRACE_SECONDS: f64 = 147.0;
/// How long a churn lasts (the trace is looped to fill it).
const CHURN_SECONDS: f64 = 20.0;

/// Which case.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Case {
    /// Agent start to all durable: a full resync of the image.
    Bulk,
    /// The same image held in the process server's cache, then released.
    Drain,
    /// The trace replayed to fill half the link, at this compression ratio: RPO.
    Churn(f64),
    /// A differential resync to the original location: the on-premises disk holds the image
    /// with one block in [`DIFF_EVERY`] different; then rsync between the same two images.
    Diff,
    /// The process server limited to this rate (`--max-bandwidth`), with more to send than
    /// it lets through: the rate it holds and its longest burst.
    Limit(&'static str),
}

/// One 64 KiB block in this many differs between the source and the on-premises disk in
/// the differential case (1%, as in `benches/resync.rs`).
const DIFF_EVERY: u64 = 100;
/// The differential case's block: the agent's digest block.
const DIFF_BLOCK_BYTES: u64 = 64 << 10;

/// How long the limit case measures (after [`LIMIT_WARMUP`]).
const LIMIT_WINDOW: Duration = Duration::from_secs(10);
/// Skipped first: the attach and the first frames queued before the bucket ran.
const LIMIT_WARMUP: Duration = Duration::from_secs(2);

/// What the writes asked of the process server per second in the churn case with the sink
/// master target: above the aim of 300 MB/s, so the process server (or the agent sharing
/// its cores) sets the pace, not the trace.
const SINK_CHURN_BYTES_S: f64 = 400e6;

/// One case's cluster: the master target in `mt_netns` (if any) behind a relay adding
/// `one_way_ms`, the process server here. With `sink`, the master target is
/// [`crate::sink`], in this process.
struct Setup {
    _dir: tempfile::TempDir,
    c: Cluster,
    relay: Option<DelayRelay>,
    tls: PathBuf,
    sink: Option<crate::sink::Sink>,
}

fn setup(
    content_dir: &Path,
    mt_netns: Option<&str>,
    one_way_ms: u64,
    relay: bool,
    ps_extra: &[String],
    sink: bool,
) -> Setup {
    let bin = Path::new(env!("CARGO_BIN_EXE_failback"));
    // Inside the run's own directory (where the content image is), which the Ctrl-C handler
    // removes: an interrupt exits without running destructors, and an inner run (a shaped
    // link) is SIGKILLed with its namespace.
    let dir = tempfile::tempdir_in(content_dir).unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let names = ["localhost".into(), "127.0.0.1".into(), IP_MT.into()];
    runtime::tls::make_test_pki(&tls, &names, &[]).unwrap();
    let mut c = Cluster::new(dir.path(), bin).unwrap();
    if let Some(ns) = mt_netns {
        c.mt_netns = Some(ns.into());
        let port = |a: &str| a.rsplit(':').next().unwrap().to_owned();
        c.mt_addr = format!("{IP_MT}:{}", port(&c.mt_addr));
        c.mt_admin = format!("{IP_MT}:{}", port(&c.mt_admin));
    }
    let relay = (mt_netns.is_some() || relay).then(|| {
        let r = DelayRelay::start("127.0.0.1:0", &c.mt_addr, Duration::from_millis(one_way_ms))
            .unwrap();
        c.ps_upstream = Some(r.addr.clone());
        r
    });
    c.ps_extra.extend(ps_extra.iter().cloned());
    let sink = sink.then(|| crate::sink::start(&c.tls, &c.mt_addr));
    if sink.is_none() {
        c.start_mt().unwrap();
    }
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(60)).unwrap();
    Setup {
        _dir: dir,
        c,
        relay,
        tls,
        sink,
    }
}

/// Runs `case` with `content` on a link of `rate` (none: loopback), toward the sink master
/// target with `sink`.
pub(crate) fn run(
    case: Case,
    content: &Path,
    (mt_netns, one_way_ms): (Option<&str>, u64),
    rate: Option<&str>,
    sink: bool,
) -> serde_json::Value {
    // Loopback has no relay, except to be held down for a drain or tapped for a limit.
    let mut ps_args = match case {
        Case::Limit(l) => vec![format!("--max-bandwidth={l}")],
        _ => Vec::new(),
    };
    // `WAN_PS_ARGS` (e.g. `--compression-level=6`): the process server's own flags, split
    // at white space (no quoting), to measure a setting against the default on the same
    // link. Recorded in the case's results, so that such a run is never taken for one of
    // the defaults.
    let extra = std::env::var("WAN_PS_ARGS").unwrap_or_default();
    ps_args.extend(extra.split_whitespace().map(str::to_owned));
    let relay = matches!(case, Case::Drain | Case::Limit(_));
    let content_dir = content
        .parent()
        .expect("the content image is in the run's directory");
    let mut s = setup(content_dir, mt_netns, one_way_ms, relay, &ps_args, sink);
    let rate_bps = rate
        .and_then(|r| runtime::units::parse_rate(r).ok())
        .map(|b| b as f64);
    let mut v = match case {
        Case::Limit(l) => {
            let mut v = limited(&s, content, l);
            v["ps_args"] = extra.into();
            s.c.stop();
            return v;
        }
        Case::Churn(ratio) => {
            let asked = match rate_bps {
                Some(r) => CHURN_LOAD * r * ratio.max(1.0),
                None => SINK_CHURN_BYTES_S,
            };
            churn(&s, content, asked)
        }
        Case::Diff => {
            let mut v = differential(&s, content);
            v["rsync"] = crate::net::rsync(&s.c.dir, mt_netns, one_way_ms);
            v
        }
        _ => resync(&s, content, case == Case::Drain),
    };
    v["ps_args"] = extra.into();
    let secs = v["seconds"].as_f64().unwrap_or(1.0);
    let wire = v["wire_bytes"].as_f64().unwrap_or(0.0);
    // parse_rate gives bytes per second.
    v["link_used"] = rate_bps.map(|r| wire / secs / r).into();
    let linked = v["linked_seconds"].as_f64();
    v["link_used_linked"] = rate_bps.zip(linked).map(|(r, l)| wire / l / r).into();
    s.c.stop();
    drop(s.relay.take());
    drop(s.sink.take());
    if case == Case::Bulk && !sink {
        let pipe = crate::net::pipe(content, &s.tls, mt_netns, one_way_ms);
        v["pipe_mb_s"] = pipe.map(|p| p.0).into();
        v["pipe_ratio"] = pipe.map(|p| p.1).into();
        v["vs_pipe"] = pipe
            .map(|p| v["logical_mb_s"].as_f64().unwrap_or(0.0) / p.0)
            .into();
    }
    v
}

/// Bulk or drain: a full resync of the image; with `drain`, the link held down once the
/// stream flows until the agent is done, and the drain measured from its release.
fn resync(s: &Setup, content: &Path, drain: bool) -> serde_json::Value {
    let c = &s.c;
    let src = c.dir.join("source/bench.img");
    std::fs::copy(content, &src).unwrap();
    let (started, sink_cpu) = (Instant::now(), crate::sink::cpu_s());
    let before = children_cpu_s();
    let agent = agent(
        c.agent("resync", 1, &src, &format!("{}k", CONTENT_BYTES >> 10))
            .arg("--mode=full"),
        c,
    );
    if let (true, Some(r)) = (drain, &s.relay) {
        wait_streaming(c);
        r.hold();
    }
    let agent_cpu = reap(agent, c, before);
    let mut from = Mark {
        at: started,
        status: DiskStatus::default(),
        cpu: (0.0, 0.0),
        sink_cpu,
        streamed: 0.0,
    };
    if let (true, Some(r)) = (drain, &s.relay) {
        // Timed from the release: the process server's reconnect is part of a drain.
        from = mark(c);
        r.release();
    }
    let mut v = durable(c, &from, agent_cpu);
    v["case"] = (if drain { "drain" } else { "bulk" }).into();
    v
}

/// The differential case: the on-premises disk is the image as it was, the source the image
/// with one block in [`DIFF_EVERY`] replaced by another block of the image (real content),
/// and `agent resync --mode=differential --location=original` from agent start to all
/// durable; the disk then equals the source (blake3). Leaves `rsync-source.img` and
/// `rsync-target.img` in the cluster's directory for the rsync run.
fn differential(s: &Setup, content: &Path) -> serde_json::Value {
    let c = &s.c;
    let uuid = [3u8; 16];
    let img =
        master_target::vmdk::create(&c.dir.join("onprem/vm1"), "vm1-disk1", CONTENT_BYTES, &uuid)
            .unwrap();
    std::fs::copy(content, &img.data_path).unwrap();
    std::fs::copy(content, c.dir.join("rsync-target.img")).unwrap();
    let src = c.dir.join("source/bench.img");
    std::fs::copy(content, &src).unwrap();
    let blocks = CONTENT_BYTES / DIFF_BLOCK_BYTES;
    let (from, to) = (
        std::fs::File::open(content).unwrap(),
        std::fs::OpenOptions::new().write(true).open(&src).unwrap(),
    );
    let mut buf = vec![0u8; DIFF_BLOCK_BYTES as usize];
    let mut changed = 0u64;
    for b in (DIFF_EVERY / 3..blocks).step_by(DIFF_EVERY as usize) {
        // Another block of the image, far away: changed, and compressible as real data is.
        let other = (b * 7919 + blocks / 2) % blocks;
        std::os::unix::fs::FileExt::read_exact_at(&from, &mut buf, other * DIFF_BLOCK_BYTES)
            .unwrap();
        buf[0] ^= 0x5a; // never equal to the block it replaces
        std::os::unix::fs::FileExt::write_all_at(&to, &buf, b * DIFF_BLOCK_BYTES).unwrap();
        changed += 1;
    }
    drop((from, to));
    std::fs::copy(&src, c.dir.join("rsync-source.img")).unwrap();
    let (started, sink_cpu) = (Instant::now(), crate::sink::cpu_s());
    let before = children_cpu_s();
    let agent = agent(
        c.agent("resync", 1, &src, &format!("{}k", CONTENT_BYTES >> 10))
            .arg("--mode=differential")
            .arg("--location=original")
            .arg(format!("--target={}", img.descriptor.display()))
            .arg(format!(
                "--disk-uuid={}",
                uuid.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )),
        c,
    );
    let (agent_cpu, said) = reap_said(agent, c, before);
    let agent_exit_s = started.elapsed().as_secs_f64();
    let from = Mark {
        at: started,
        status: DiskStatus::default(),
        cpu: (0.0, 0.0),
        sink_cpu,
        streamed: 0.0,
    };
    let mut v = durable(c, &from, agent_cpu);
    v["agent_exit_seconds"] = agent_exit_s.into();
    v["agent_said"] = said.trim().into();
    c.detach(1).unwrap();
    assert_eq!(
        failback::harness::file_blake3(&src).unwrap(),
        failback::harness::file_blake3(&img.data_path).unwrap(),
        "the differential resync left the on-premises disk equal to the source"
    );
    // The master target's digest list crosses the link the other way (32 bytes a block);
    // the status counts only what the process server sends.
    let digests = (blocks * 32) as f64;
    v["case"] = "diff".into();
    v["blocks_changed"] = changed.into();
    v["digest_bytes"] = digests.into();
    v["both_ways_bytes"] = (v["wire_bytes"].as_f64().unwrap_or(0.0) + digests).into();
    v
}

/// A limited process server with a full resync to carry: the bytes it sends the master
/// target, timed as they reach the relay, over [`LIMIT_WINDOW`]. Its rate, and its longest
/// burst: the most bytes sent over any stretch beyond that steady rate, in milliseconds of
/// it. (Against the steady rate, not the limit: the relay sees TLS records, about 1.5% more
/// than the frames the limit paces at 512 kbit/s, and that drift over 10 s would count as a
/// 150 ms "burst"; the rate's own error is the `of_limit` figure.)
fn limited(s: &Setup, content: &Path, limit: &str) -> serde_json::Value {
    let c = &s.c;
    let relay = s.relay.as_ref().expect("a limit is measured at the relay");
    let src = c.dir.join("source/bench.img");
    std::fs::copy(content, &src).unwrap();
    let mut agent = agent(
        c.agent("resync", 1, &src, &format!("{}k", CONTENT_BYTES >> 10))
            .arg("--mode=full"),
        c,
    );
    wait_streaming(c);
    std::thread::sleep(LIMIT_WARMUP);
    relay.tap_start();
    std::thread::sleep(LIMIT_WINDOW);
    let tap = relay.tap_take();
    let _ = agent.kill();
    let _ = agent.wait();
    let rate_bytes_s = runtime::units::parse_rate(limit).unwrap() as f64;
    let secs = LIMIT_WINDOW.as_secs_f64();
    let bytes: f64 = tap.iter().map(|c| c.1 as f64).sum();
    let steady = (bytes / secs).max(1.0);
    let (_, burst_bytes) = bytes_and_burst(&tap, steady);
    serde_json::json!({
        "case": "limit",
        "limit": limit,
        "limit_bytes_s": rate_bytes_s,
        "measured_bytes_s": bytes / secs,
        "of_limit": bytes / secs / rate_bytes_s,
        "longest_burst_ms": burst_bytes / steady * 1000.0,
        "chunks": tap.len(),
    })
}

/// Bytes in `tap`, and the most bytes that arrived over any stretch of it beyond what
/// `rate` (bytes per second) allows in that stretch's time: max over i <= j of
/// (bytes of chunks i..=j) - rate * (t_j - t_i), in one pass.
fn bytes_and_burst(tap: &[(Instant, usize)], rate: f64) -> (f64, f64) {
    let Some(&(t0, _)) = tap.first() else {
        return (0.0, 0.0);
    };
    let (mut sum, mut best, mut min_before) = (0.0f64, 0.0f64, f64::MAX);
    for &(t, n) in tap {
        let at = t.duration_since(t0).as_secs_f64() * rate;
        // Chunk i's stretch starts before its bytes: S_{i-1} - rate * t_i.
        min_before = min_before.min(sum - at);
        sum += n as f64;
        best = best.max(sum - at - min_before);
    }
    (sum, best)
}

/// Churn: the trace with the image's bytes, sped up to ask `asked_bytes_s` of writes (on a
/// shaped link: half the link's rate on the wire at the bulk case's compression ratio),
/// looped to last [`CHURN_SECONDS`]; RPO sampled every 50 ms while it runs.
fn churn(s: &Setup, content: &Path, asked_bytes_s: f64) -> serde_json::Value {
    let c = &s.c;
    let factor = asked_bytes_s / CHURN_TRACE_BYTES_PER_S;
    let reps = (CHURN_SECONDS * factor / CHURN_TRACE_SECONDS)
        .ceil()
        .max(1.0) as u32;
    let trace = looped_trace(&c.dir, reps);
    let (started, sink_cpu) = (Instant::now(), crate::sink::cpu_s());
    let mut cmd = c.agent("replay", 1, &c.dir.join("source/churn.img"), "1GiB");
    cmd.arg(format!("--trace={}", trace.display()))
        .arg("--format=msr")
        .arg(format!("--content={}", content.display()))
        .arg(format!("--pace={factor:.3}x"));
    let before = children_cpu_s();
    let mut agent = agent(&mut cmd, c);
    let mut rpo = Vec::new();
    let mut series = Vec::new();
    let deadline = started + Duration::from_secs(600);
    while agent.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the churn ran over 600 s");
        let st = status(c);
        rpo.push(st.rpo_ms);
        series.push(serde_json::json!([
            started.elapsed().as_millis() as u64,
            st.rpo_ms,
            st.logical_bytes,
            st.wire_bytes
        ]));
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent_cpu = reap(agent, c, before);
    let from = Mark {
        at: started,
        status: DiskStatus::default(),
        cpu: (0.0, 0.0),
        sink_cpu,
        streamed: 0.0,
    };
    let mut v = durable(c, &from, agent_cpu);
    rpo.sort_unstable();
    let q = |f: f64| {
        rpo.get(((rpo.len().max(1) - 1) as f64 * f).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    v["case"] = "churn".into();
    v["speed_factor"] = factor.into();
    v["trace_loops"] = reps.into();
    v["rpo_samples"] = rpo.len().into();
    v["rpo_p50_ms"] = q(0.5).into();
    v["rpo_p99_ms"] = q(0.99).into();
    v["rpo_max_ms"] = q(1.0).into();
    v["series_ms_rpo_logical_wire"] = series.into();
    v
}

/// The churn trace written `reps` times over, each copy after the last in time (MSR:
/// the first field is the time in 100 ns units).
fn looped_trace(dir: &Path, reps: u32) -> PathBuf {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(CHURN_TRACE)).unwrap();
    let time = |l: &str| l.split(',').next().and_then(|t| t.parse::<u64>().ok());
    let first = text.lines().find_map(time).unwrap_or(0);
    let span = text.lines().filter_map(time).max().unwrap_or(first) - first + 10_000_000;
    let mut out = String::with_capacity(text.len() * reps as usize);
    for r in 0..u64::from(reps) {
        for l in text.lines() {
            if let (Some(t), Some((_, rest))) = (time(l), l.split_once(',')) {
                out.push_str(&format!("{},{rest}\n", t + r * span));
            }
        }
    }
    let path = dir.join("churn.msr.csv");
    std::fs::write(&path, out).unwrap();
    path
}

fn agent(cmd: &mut std::process::Command, c: &Cluster) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(std::fs::File::create(c.dir.join("logs/agent.log")).unwrap())
        .spawn()
        .unwrap()
}

/// Waits for the agent; its CPU seconds (it is the only child reaped since `before` was
/// read, so the children's usage grows by its).
fn reap(agent: Child, c: &Cluster, before: f64) -> f64 {
    reap_said(agent, c, before).0
}

/// [`reap`], and what the agent printed.
fn reap_said(agent: Child, c: &Cluster, before: f64) -> (f64, String) {
    let out = agent.wait_with_output().unwrap();
    let cpu = children_cpu_s() - before;
    assert!(
        out.status.success(),
        "agent: {}",
        std::fs::read_to_string(c.dir.join("logs/agent.log")).unwrap_or_default()
    );
    (cpu, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where a measurement starts: when, the counters, the services' CPU seconds (PS, MT),
/// and the sink master target's (when there is one).
struct Mark {
    at: Instant,
    status: DiskStatus,
    cpu: (f64, f64),
    sink_cpu: f64,
    streamed: f64,
}

/// The sum of the process server's samples named `name` (all labels).
fn ps_metric(c: &Cluster, name: &str) -> f64 {
    failback::harness::http_get(&c.ps_admin, "/metrics").map_or(0.0, |(_, body)| {
        body.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    })
}

const STREAM_BYTES: &str = "failback_ps_link_stream_bytes_total";

fn mark(c: &Cluster) -> Mark {
    assert!(
        c.ps_status().is_ok(),
        "the process server's status is readable"
    );
    let (mt_pid, ps_pid) = c.pids();
    Mark {
        at: Instant::now(),
        status: status(c),
        cpu: (usage(ps_pid).0, usage(mt_pid).0),
        sink_cpu: crate::sink::cpu_s(),
        streamed: ps_metric(c, STREAM_BYTES),
    }
}

/// Waits until all the process server holds is durable; what was carried since `from`.
fn durable(c: &Cluster, from: &Mark, agent_cpu: f64) -> serde_json::Value {
    let lsn = status(c).cached_lsn;
    let mut last = None;
    // When the first byte of this measurement went on the wire: a drain's reconnect is
    // before it (the link used "while linked" is counted from it). Known only if a poll
    // saw none first: a bulk's polls start once the agent is done, long after it.
    let (mut idle_seen, mut first_wire) = (false, None);
    c.wait_durable(1, lsn, Duration::from_secs(1800), |s| {
        if s.wire_bytes <= from.status.wire_bytes {
            idle_seen = true;
        } else if first_wire.is_none() && idle_seen {
            first_wire = Some(Instant::now());
        }
        last = Some(s.clone())
    })
    .unwrap();
    let secs = from.at.elapsed().as_secs_f64();
    let linked_secs = first_wire.map(|t| t.elapsed().as_secs_f64().max(1e-3));
    let s = last.unwrap_or_else(|| status(c));
    let logical = s.logical_bytes.saturating_sub(from.status.logical_bytes) as f64;
    let wire = s.wire_bytes.saturating_sub(from.status.wire_bytes) as f64;
    let (mt_pid, ps_pid) = c.pids();
    let ((ps_cpu, ps_rss), (mt_cpu, mt_rss)) = (usage(ps_pid), usage(mt_pid));
    let gb = (logical / 1e9).max(1e-9);
    serde_json::json!({
        "seconds": secs,
        "logical_bytes": logical,
        "wire_bytes": wire,
        "logical_mb_s": logical / secs / 1e6,
        "wire_mb_s": wire / secs / 1e6,
        "linked_seconds": linked_secs,
        "wire_mb_s_linked": linked_secs.map(|l| wire / l / 1e6),
        "ratio": logical / wire.max(1.0),
        "ps_cpu_s_per_gb": (ps_cpu - from.cpu.0) / gb,
        "mt_cpu_s_per_gb": (mt_cpu - from.cpu.1) / gb,
        "sink_cpu_s_per_gb": (crate::sink::cpu_s() - from.sink_cpu) / gb,
        "agent_cpu_s_per_gb": agent_cpu / gb,
        "ps_peak_rss_mib": ps_rss,
        "mt_peak_rss_mib": mt_rss,
        // Of the bytes sent, the share that went as chunks of the link's zstd stream, and
        // the level the process server ended at.
        "streamed_share": (ps_metric(c, STREAM_BYTES) - from.streamed) / logical.max(1.0),
        "level_at_end": ps_metric(c, "failback_ps_compression_level"),
    })
}

/// The process server's status of disk 1.
fn status(c: &Cluster) -> DiskStatus {
    c.ps_status()
        .ok()
        .and_then(|v| v.into_iter().find(|s| s.disk_id == 1))
        .unwrap_or_default()
}

/// Waits (bounded) until disk 1's stream reaches the process server.
fn wait_streaming(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while status(c).cached_lsn < 10 {
        assert!(
            Instant::now() < deadline,
            "disk 1 is not streaming after 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn usage(pid: Option<u32>) -> (f64, f64) {
    pid.map_or((0.0, 0.0), proc_usage)
}

/// A process's CPU seconds (user + system) and peak RSS (MiB), from /proc.
fn proc_usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kib / 1024.0)
}

/// CPU seconds of the children reaped so far.
fn children_cpu_s() -> f64 {
    // SAFETY: an all-zero rusage is valid, and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
