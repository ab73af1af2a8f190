//! What an operator (or a peer) does must never destroy or strand data, and every failure
//! says what to do (issue #9). Real processes, real certificates, loopback.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use failback::harness::{file_blake3, http_get, Cluster};

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A command that must fail: its stderr, checked to hold every one of `words`.
fn fails_saying(o: Output, words: &[&str]) -> String {
    assert!(
        !o.status.success(),
        "it succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let e = stderr(&o);
    for w in words {
        assert!(e.contains(w), "{w:?} not in: {e}");
    }
    e
}

fn export_args(c: &Cluster, disk: u64, out: &Path, format: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "master-target".to_string(),
        "export".into(),
        format!("--disk={disk}"),
        "--point=latest".into(),
        format!("--out={}", out.display()),
        format!("--format={format}"),
    ];
    a.extend(c.mt_dirs());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run_owned(args: &[String], cwd: Option<&Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().unwrap()
}

#[test]
fn export_never_writes_over_a_disk_and_replaces_files_only_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    replicate_and_verify(&c, 1, 400);
    let flat = onprem(&c, 1);
    let desc = flat.with_file_name("vm1-disk1.vmdk");
    let disk_before = file_blake3(&flat).unwrap();
    let folder = flat.parent().unwrap().to_path_buf();
    // Onto the disk itself: its descriptor (vmdk), its extent (raw), from the VM's folder
    // as the runbook's example did, through a symbolic and a hard link.
    std::os::unix::fs::symlink(&flat, c.dir.join("link-to-disk.img")).unwrap();
    std::fs::hard_link(&flat, c.dir.join("hard-link.img")).unwrap();
    let attempts: Vec<(Vec<String>, Option<&Path>)> = vec![
        (export_args(&c, 1, &desc, "vmdk", &[]), None),
        (export_args(&c, 1, &desc, "vmdk", &["--force"]), None),
        (export_args(&c, 1, &flat, "raw", &["--force"]), None),
        (
            export_args(&c, 1, Path::new("vm1-disk1.vmdk"), "vmdk", &["--force"]),
            Some(&folder),
        ),
        (
            export_args(&c, 1, &c.dir.join("link-to-disk.img"), "raw", &["--force"]),
            None,
        ),
        (
            export_args(&c, 1, &c.dir.join("hard-link.img"), "raw", &["--force"]),
            None,
        ),
    ];
    for (args, cwd) in &attempts {
        fails_saying(run_owned(args, *cwd), &["refused", "disk 1"]);
    }
    // A FIFO (as a device node would be) is never replaced by the image renamed over it.
    let fifo = c.dir.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    fails_saying(
        run_owned(&export_args(&c, 1, &fifo, "raw", &["--force"]), None),
        &["refused", "not a file"],
    );
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &std::fs::symlink_metadata(&fifo).unwrap().file_type()
    ));
    std::fs::remove_file(c.dir.join("hard-link.img")).unwrap();
    assert_eq!(
        file_blake3(&flat).unwrap(),
        disk_before,
        "the disk is untouched"
    );
    assert!(desc.exists());
    // An existing unrelated file: refused without --force, replaced with it.
    let other = c.dir.join("old-export.img");
    std::fs::write(&other, b"keep me").unwrap();
    fails_saying(
        run_owned(&export_args(&c, 1, &other, "raw", &[]), None),
        &["exists", "--force"],
    );
    assert_eq!(std::fs::read(&other).unwrap(), b"keep me");
    let out = run_owned(&export_args(&c, 1, &other, "raw", &["--force"]), None);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    let digest = agent::source::hex(&agent::source::image_digest(&other).unwrap());
    assert!(
        said.contains(&digest),
        "the export prints the image's digest: {said}"
    );
    assert_eq!(file_blake3(&other).unwrap(), disk_before);
    // A thin disk exports thin: never-written blocks stay holes in the export too.
    let allocated =
        |p: &Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512;
    let size = std::fs::metadata(&flat).unwrap().len();
    assert!(
        allocated(&other) <= allocated(&flat) + (1 << 20) && allocated(&other) < size / 2,
        "export allocates {} bytes, the disk {} of {size}",
        allocated(&other),
        allocated(&flat)
    );
    // Nothing half-made is left beside the outputs.
    for d in [c.dir.clone(), folder] {
        let partial: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(partial.is_empty(), "{partial:?}");
    }
}

#[test]
fn a_detach_stays_detached_across_restarts_and_link_drops_and_can_be_retired() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, relay) = cluster_via_relay(dir.path());
    replicate_and_verify(&c, 1, 400); // ends detached
    let disks_json = c.dir.join("data/master-target/disks.json");
    let attached = || -> bool {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&disks_json).unwrap()).unwrap();
        v[0]["attached"].as_bool().unwrap()
    };
    assert!(!attached());
    // A link drop, a restart of each service: still detached, and not locked.
    relay.cut();
    std::thread::sleep(Duration::from_millis(500));
    relay.restore();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    assert!(c.term_ps(), "the process server stops cleanly on SIGTERM");
    assert!(c.term_mt(), "the master target stops cleanly on SIGTERM");
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!attached(), "disks.json: still detached");
    std::fs::File::open(onprem(&c, 1))
        .unwrap()
        .try_lock()
        .expect("nobody locks a detached disk");
    let disks = run(&["process-server", "disks", "--admin", &c.ps_admin]);
    let table = String::from_utf8_lossy(&disks.stdout);
    assert!(table.contains("detached"), "{table}");
    // Its agent is refused at once, saying why.
    let t = Instant::now();
    let out = c
        .agent("replay", 1, &source(&c, 1), "256MiB")
        .arg(format!(
            "--trace={}",
            traces().join("tpcc-small.disksim").display()
        ))
        .arg("--format=disksim-ns")
        .output()
        .unwrap();
    fails_saying(out, &["detached"]);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // Retire: the cache goes, the state stays retired after a restart.
    let out = run(&[
        "process-server",
        "retire",
        "--admin",
        &c.ps_admin,
        "--disk",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cache = c.dir.join("data/process-server/disk-1");
    let segs = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("seg-")
        })
        .count();
    assert_eq!(segs, 0, "a retired disk's cache is removed");
    c.kill_ps();
    c.start_ps().unwrap();
    let disks = run(&["process-server", "disks", "--admin", &c.ps_admin, "--json"]);
    assert!(String::from_utf8_lossy(&disks.stdout).contains("\"state\":\"retired\""));
    // Retiring an attached disk is refused.
    let r = finish(
        &c,
        2,
        replay(
            &c,
            2,
            "tpcc-small.disksim",
            "disksim-ns",
            &["--max-writes=50"],
        ),
    );
    assert!(r["last_lsn"].as_u64().unwrap() > 0);
    fails_saying(
        run(&[
            "process-server",
            "retire",
            "--admin",
            &c.ps_admin,
            "--disk",
            "2",
        ]),
        &["still attached", "detach"],
    );
}

#[test]
fn bad_agent_input_leaves_nothing_behind_and_permanent_errors_end_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let mut trace_agent = |trace: &str, format: &str, extra: &[&str]| -> Output {
        c.agent("replay", 1, &source(&c, 1), "256MiB")
            .arg(format!("--trace={trace}"))
            .arg(format!("--format={format}"))
            .args(extra)
            .output()
            .unwrap()
    };
    let tpcc = traces().join("tpcc-small.disksim").display().to_string();
    fails_saying(
        trace_agent("/nonexistent/typo.csv", "msr", &[]),
        &["typo.csv"],
    );
    fails_saying(trace_agent(&tpcc, "msr", &[]), &["look like the disksim"]);
    fails_saying(
        trace_agent(&tpcc, "disksim-ns", &["--compressibility=2"]),
        &["compressibility", "range"],
    );
    fails_saying(
        trace_agent(&tpcc, "disksim-ns", &["--buffer=1KiB"]),
        &["buffer", "range"],
    );
    fails_saying(
        trace_agent(&tpcc, "disksim-ns", &["--content=/nonexistent/disk.img"]),
        &["--content", "disk.img"],
    );
    fails_saying(
        trace_agent(
            &tpcc,
            "disksim-ns",
            &["--content=/etc/hostname", "--compressibility=0.3"],
        ),
        &["--content", "--compressibility"],
    );
    let _ = &mut trace_agent;
    // Nothing was registered anywhere.
    let status = c.ps_status().unwrap();
    assert!(status.is_empty(), "{status:?}");
    assert!(!c.dir.join("onprem/vm1").exists(), "no VMDK was made");
    // Permanent errors: a missing TLS directory, another CA, a wrong server name. Each is an
    // ERROR and a non-zero exit within seconds, not a retry loop.
    let other = tempfile::tempdir().unwrap();
    runtime::tls::make_test_pki(other.path(), &["127.0.0.1".into()], &["vm1".into()]).unwrap();
    let own = c.agent_tls("vm1");
    let cases: Vec<(std::path::PathBuf, Vec<String>, &str)> = vec![
        ("/nonexistent/tls".into(), vec![], "/nonexistent/tls"),
        (
            other.path().join("agents/vm1"),
            vec![],
            "not signed by our CA",
        ),
        (
            own,
            vec!["--server-name=ps.elsewhere.example".into()],
            "does not carry the name",
        ),
    ];
    for (tls, args, says) in cases {
        let t = Instant::now();
        let out = c
            .agent_with_tls("replay", 1, &source(&c, 1), "256MiB", &tls)
            .arg(format!("--trace={tpcc}"))
            .arg("--format=disksim-ns")
            .args(&args)
            .output()
            .unwrap();
        fails_saying(out, &[says]);
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{args:?}: {:?}",
            t.elapsed()
        );
    }
    assert!(c.ps_status().unwrap().is_empty());
}

/// An MSR trace whose writes are just under, at and over the batch limit (8 MiB), after
/// partial batches, up to 64 MiB.
fn big_write_trace(path: &Path) {
    const MIB: u64 = 1 << 20;
    let sizes = [
        4096,
        8 * MIB - 4096, // fills the partial batch exactly to the limit
        4096,
        8 * MIB, // at the limit, after a partial batch
        4096,
        8 * MIB + 512, // over it
        64 * MIB,      // far over it
        1 << 20,
        8 * MIB - 512,
        512,
    ];
    let mut text = String::new();
    let mut offset = 0u64;
    for (i, s) in sizes.iter().enumerate() {
        // One write a second (100 ns ticks), so bookmarks fall between them.
        text.push_str(&format!(
            "{},host,0,Write,{offset},{s},100\n",
            10_000_000 * i as u64
        ));
        offset = (offset + s + 4096) % (192 * MIB);
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn writes_around_the_batch_limit_replicate_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let trace = c.dir.join("big.msr.csv");
    big_write_trace(&trace);
    let mut cmd = c.agent("replay", 1, &source(&c, 1), "256MiB");
    cmd.arg(format!("--trace={}", trace.display()))
        .arg("--format=msr")
        .arg("--final-bookmark=final")
        .arg("--bookmark-every-s=1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(c.dir.join("logs/agent-1.log")).unwrap());
    let r = finish(&c, 1, cmd.spawn().unwrap());
    assert_eq!(r["writes"], 10, "{r}");
    verify(&c, 1, r["last_lsn"].as_u64().unwrap());
}

#[test]
fn a_lifted_bandwidth_limit_takes_effect_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), Path::new(BIN)).unwrap();
    c.ps_extra.push("--max-bandwidth=8kbit".into());
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    c.wait_linked(Duration::from_secs(30)).unwrap();
    let child = replay(
        &c,
        1,
        "tpcc-small.disksim",
        "disksim-ns",
        &["--max-writes=3000", "--bookmark-every-s=0.05"],
    );
    let r = finish(&c, 1, child);
    let lsn = r["last_lsn"].as_u64().unwrap();
    // At 8 kbit/s the backlog would take hours; lifted, it drains in seconds.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        c.ps_status().unwrap()[0].durable_lsn < lsn,
        "the limit holds it back"
    );
    let out = run(&[
        "process-server",
        "set-bandwidth",
        "--admin",
        &c.ps_admin,
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_durable(1, lsn, Duration::from_secs(30), |_| {})
        .unwrap();
    verify(&c, 1, lsn);
}

#[test]
fn one_instance_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    // A second process server and master target on the same directories.
    let mut ps = vec![
        "process-server".to_string(),
        "serve".into(),
        "--listen=127.0.0.1:0".into(),
        "--admin-listen=127.0.0.1:0".into(),
        format!(
            "--cache-dir={}",
            c.dir.join("data/process-server").display()
        ),
        format!("--tls-ca={}", c.tls.join("ca.pem").display()),
        format!("--tls-cert={}", c.tls.join("process-server.pem").display()),
        format!("--tls-key={}", c.tls.join("process-server.key").display()),
    ];
    let e = fails_saying(
        run_owned(&ps, None),
        &["in use by process", "data/process-server"],
    );
    assert!(
        !e.contains('\u{1b}'),
        "no colour codes when stderr is not a terminal: {e:?}"
    );
    ps.truncate(2);
    let mut mt = vec![
        "master-target".to_string(),
        "serve".into(),
        "--listen=127.0.0.1:0".into(),
        "--admin-listen=127.0.0.1:0".into(),
    ];
    mt.extend(c.mt_dirs());
    mt.push(format!(
        "--datastore-dirs={}",
        c.dir.join("onprem").display()
    ));
    mt.push(format!("--tls-ca={}", c.tls.join("ca.pem").display()));
    mt.push(format!(
        "--tls-cert={}",
        c.tls.join("master-target.pem").display()
    ));
    mt.push(format!(
        "--tls-key={}",
        c.tls.join("master-target.key").display()
    ));
    fails_saying(
        run_owned(&mt, None),
        &["in use by process", "data/master-target"],
    );
    // A second agent on the same state directory, while the first runs.
    let first = replay(
        &c,
        1,
        "tencent-cbs-50k.msr.csv",
        "msr",
        // --stay too: a SIGTERM before the trace's end still stops it (it once waited for
        // a second one).
        &["--pace=realtime", "--max-writes=20000", "--stay"],
    );
    wait_streaming(&c, 1);
    // Another source image: the same one is refused by its own lock (tests/live.rs).
    let out = c
        .agent("replay", 1, &source(&c, 2), "256MiB")
        .arg(format!(
            "--trace={}",
            traces().join("tpcc-small.disksim").display()
        ))
        .arg("--format=disksim-ns")
        .output()
        .unwrap();
    fails_saying(out, &["in use by process", "disk-1"]);
    // SIGTERM stops the running agent cleanly: it drains and exits 0, within a minute.
    // SAFETY: kill(2) on our child's pid.
    unsafe {
        libc::kill(first.id() as i32, libc::SIGTERM);
    }
    let mut first = first;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while first.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "one SIGTERM did not stop a --stay agent mid-trace"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = finish(&c, 1, first);
    assert!(r["last_lsn"].as_u64().unwrap() > 0);
    assert!(!c.agent_state(1).join("running").exists(), "a clean end");
}

#[test]
fn agent_bookmark_reaches_the_running_agent_and_waits_until_durable() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let state = c.agent_state(1).display().to_string();
    // No agent: a clear error, non-zero.
    fails_saying(
        run(&[
            "agent",
            "bookmark",
            "--state-dir",
            &state,
            "--tag",
            "nobody-home",
        ]),
        &["no agent is running"],
    );
    // An agent whose writer stopped (the trace ended) but which is still up.
    let mut cmd = c.agent("replay", 1, &source(&c, 1), "256MiB");
    cmd.arg(format!(
        "--trace={}",
        traces().join("tpcc-small.disksim").display()
    ))
    .arg("--format=disksim-ns")
    .arg("--max-writes=500")
    .arg("--bookmark-every-s=0.02")
    .arg("--stay")
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(c.dir.join("logs/agent-1.log")).unwrap());
    let agent = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = run(&["agent", "bookmark", "--state-dir", &state, "--tag", "final"]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let lsn: u64 = said
        .split("at lsn ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no lsn in {said}"));
    // Durable on the master target already: its point is listed, while the service runs.
    let points = c.points(1).unwrap();
    assert!(
        points
            .iter()
            .any(|p| p["lsn"] == lsn && p["tag"] == "final" && p["kind"] == "app-consistent"),
        "{points:?}"
    );
    // SIGTERM ends the agent cleanly.
    // SAFETY: kill(2) on our child's pid.
    unsafe {
        libc::kill(agent.id() as i32, libc::SIGTERM);
    }
    let r = finish(&c, 1, agent);
    verify(&c, 1, r["last_lsn"].as_u64().unwrap());
    let log = std::fs::read_to_string(c.dir.join("logs/process-server.log")).unwrap();
    assert!(
        log.contains("agent disconnected"),
        "the process server logs disconnects"
    );
    assert!(!log.contains('\u{1b}'), "no colour codes in a log file");
}

#[test]
fn inputs_outside_their_range_are_refused_naming_the_flag() {
    let cases: [(&[&str], &[&str]); 6] = [
        (
            &["demo", "--compressibility", "2"],
            &["--compressibility", "0 to 1"],
        ),
        (
            &["demo", "--differ-percent", "150"],
            &["--differ-percent", "0 to 100"],
        ),
        (&["demo", "--link", "0mbit"], &["--link"]),
        (
            &["process-server", "serve", "--window", "10"],
            &["window", "range"],
        ),
        (
            &["process-server", "serve", "--cache-limit", "1KiB"],
            &["cache-limit", "1.0 MiB"],
        ),
        (
            &["master-target", "serve", "--journal-quota", "1MiB"],
            &["journal-quota", "32.0 MiB"],
        ),
    ];
    for (args, words) in cases {
        let e = fails_saying(run(args), words);
        assert!(
            !e.contains("master target:") || args[0] == "master-target",
            "{e}"
        );
        assert!(
            !e.contains("Some(") && !e.contains("Error {"),
            "no Debug text: {e}"
        );
    }
}

#[test]
fn status_shows_each_disks_state_in_human_units() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let r = finish(
        &c,
        1,
        replay(
            &c,
            1,
            "tpcc-small.disksim",
            "disksim-ns",
            &["--max-writes=300"],
        ),
    );
    c.wait_durable(
        1,
        r["last_lsn"].as_u64().unwrap(),
        Duration::from_secs(60),
        |_| {},
    )
    .unwrap();
    let out = run(&["process-server", "status", "--admin", &c.ps_admin]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.contains("state"), "{table}");
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("linked") && l.contains(" B")),
        "{table}"
    );
    assert_eq!(http_get(&c.mt_admin, "/health").unwrap().0, 200);
}

#[test]
fn services_tell_systemd_they_are_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::new(dir.path(), Path::new(BIN)).unwrap();
    let sock_path = c.dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut args = vec![
        "master-target".to_string(),
        "serve".into(),
        format!("--listen={}", c.mt_addr),
        format!("--admin-listen={}", c.mt_admin),
        format!("--datastore-dirs={}", c.dir.join("onprem").display()),
        format!("--tls-ca={}", c.tls.join("ca.pem").display()),
        format!("--tls-cert={}", c.tls.join("master-target.pem").display()),
        format!("--tls-key={}", c.tls.join("master-target.key").display()),
    ];
    args.extend(c.mt_dirs());
    let mut mt = Command::new(BIN)
        .args(&args)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(c.dir.join("logs/mt-notify.log")).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    assert_eq!(
        http_get(&c.mt_admin, "/health").unwrap().0,
        200,
        "ready means serving"
    );
    // SAFETY: kill(2) on our child's pid.
    unsafe {
        libc::kill(mt.id() as i32, libc::SIGTERM);
    }
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(mt.wait().unwrap().success());
    let log = std::fs::read_to_string(c.dir.join("logs/mt-notify.log")).unwrap();
    assert!(log.contains("shutting down"), "{log}");
}

/// A write into `dir` that must finish within 10 s. A filesystem left frozen blocks it
/// (uninterruptibly): it is then thawed here, so the test fails instead of hanging.
fn writable(dir: &Path, name: &str) -> bool {
    let mut w = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo x > {}/{name} && sync -f {}/{name}",
            dir.display(),
            dir.display()
        ))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(s) = w.try_wait().unwrap() {
            return s.success();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("fsfreeze").arg("-u").arg(dir).status();
    let _ = w.wait();
    false
}

/// Whether the filesystem mounted on `dir` is frozen: a file made there does not appear
/// within 300 ms (the writer waits for the thaw, then ends). Touching nothing else: a test
/// freeze of its own would collide with the command's.
fn is_frozen(dir: &Path, writers: &mut Vec<std::process::Child>) -> bool {
    let mut w = Command::new("touch")
        .arg(dir.join(format!("probe-{}", writers.len())))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        if w.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    writers.push(w);
    true
}

#[test]
fn a_frozen_bookmark_runs_its_hooks_and_always_thaws() {
    if !root() {
        eprintln!(
            "freezing a filesystem needs root (mount -o loop, FIFREEZE): run as root (CI does)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let vol = SmallVolume::new(&c.dir.join("app.img"), &c.dir.join("app"), 32);
    let mnt = vol.dir.display().to_string();
    let state = c.agent_state(1).display().to_string();
    // An agent whose writer stopped but which is still up.
    let mut cmd = c.agent("replay", 1, &source(&c, 1), "256MiB");
    cmd.arg(format!(
        "--trace={}",
        traces().join("tpcc-small.disksim").display()
    ))
    .arg("--format=disksim-ns")
    .arg("--max-writes=300")
    .arg("--bookmark-every-s=0.02")
    .arg("--stay")
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(c.dir.join("logs/agent-1.log")).unwrap());
    let agent = cmd.spawn().unwrap();
    let post = c.dir.join("post-ran");
    let bookmark = |extra: &[&str]| {
        let mut args = vec![
            "agent",
            "bookmark",
            "--state-dir",
            &state,
            "--tag",
            "frozen",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let pre = format!("--pre-hook=echo quiesced > {mnt}/pre");
    let post_hook = format!("--post-hook=touch {}", post.display());
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = bookmark(&["--freeze", &mnt, &pre, &post_hook]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("frozen for"), "{said}");
    assert!(
        vol.dir.join("pre").exists() && post.exists(),
        "both hooks ran"
    );
    assert!(writable(&vol.dir, "after-ok"), "thawed after a bookmark");
    let points = c.points(1).unwrap();
    assert!(
        points
            .iter()
            .any(|p| p["tag"] == "frozen" && p["kind"] == "app-consistent"),
        "{points:?}"
    );
    // Failures: each says why, and the filesystem is writable after every one.
    let nobody = c.dir.join("no-agent-here").display().to_string();
    let e = fails_saying(
        run(&[
            "agent",
            "bookmark",
            "--state-dir",
            &nobody,
            "--tag",
            "x",
            "--freeze",
            &mnt,
        ]),
        &["no agent is running"],
    );
    assert!(
        writable(&vol.dir, "after-no-agent"),
        "thawed after an error: {e}"
    );
    fails_saying(
        bookmark(&["--freeze", "/nonexistent/mnt"]),
        &["freeze", "/nonexistent/mnt"],
    );
    // A directory inside a filesystem would freeze all of it; one filesystem named twice
    // would be frozen twice: both refused before anything is frozen.
    std::fs::create_dir_all(vol.dir.join("sub")).unwrap();
    let sub = vol.dir.join("sub").display().to_string();
    fails_saying(bookmark(&["--freeze", &sub]), &["not a mountpoint"]);
    // An agent whose source image is on the filesystem writes it while the bookmark is
    // taken: freezing it would wait for ever. Refused before anything is frozen.
    let fake = c.dir.join("agent-with-source-on-vol");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(vol.dir.join("disk.img"), b"a source image").unwrap();
    std::fs::write(
        fake.join(agent::engine::SOURCE_PATH),
        vol.dir.join("disk.img").display().to_string(),
    )
    .unwrap();
    let fake = fake.display().to_string();
    fails_saying(
        run(&[
            "agent",
            "bookmark",
            "--state-dir",
            &fake,
            "--tag",
            "x",
            "--freeze",
            &mnt,
        ]),
        &["source disk", "on this filesystem"],
    );
    fails_saying(
        bookmark(&["--freeze", &mnt, "--freeze", &mnt]),
        &["listed twice"],
    );
    assert!(writable(&vol.dir, "after-refusals"));
    fails_saying(
        bookmark(&["--freeze", &mnt, "--pre-hook=exit 3", &post_hook]),
        &["pre hook", "exit status: 3"],
    );
    assert!(
        writable(&vol.dir, "after-failed-hook"),
        "a failed pre-hook freezes nothing"
    );
    // Frozen by someone else: refused, and left as that someone froze it.
    assert!(Command::new("fsfreeze")
        .args(["-f", &mnt])
        .status()
        .unwrap()
        .success());
    let busy = bookmark(&["--freeze", &mnt]);
    assert!(Command::new("fsfreeze")
        .args(["-u", &mnt])
        .status()
        .unwrap()
        .success());
    fails_saying(busy, &["frozen already"]);
    // Killed while frozen (SIGKILL: nothing of the command runs): its guard thaws. The
    // agent is stopped so the bookmark waits, frozen, for its whole window.
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(agent.id() as i32, libc::SIGSTOP) };
    let mut frozen = Command::new(&c.bin)
        .args([
            "agent",
            "bookmark",
            "--state-dir",
            &state,
            "--tag",
            "killed",
        ])
        .args(["--freeze", &mnt, "--freeze-timeout-s=30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut writers = Vec::new();
    while !is_frozen(&vol.dir, &mut writers) {
        assert!(Instant::now() < deadline, "the bookmark froze nothing");
        std::thread::sleep(Duration::from_millis(10));
    }
    frozen.kill().unwrap(); // SIGKILL
    frozen.wait().unwrap();
    assert!(
        writable(&vol.dir, "after-sigkill"),
        "thawed by the guard after SIGKILL"
    );
    for mut w in writers {
        assert!(
            w.wait().unwrap().success(),
            "a writer blocked by the freeze ended"
        );
    }
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(agent.id() as i32, libc::SIGCONT) };
    // SAFETY: kill(2) on our child's pid.
    unsafe {
        libc::kill(agent.id() as i32, libc::SIGTERM);
    }
    let r = finish(&c, 1, agent);
    verify(&c, 1, r["last_lsn"].as_u64().unwrap());
}

/// One VM's second disk started with the first one's `--disk-id` (its own source and state
/// directory): the process server refuses the second agent while the first one streams,
/// and the first one's disk arrives whole. Two streams under one LSN sequence made the
/// target neither disk and the agents ask each other's LSNs back for ever.
#[test]
fn a_second_agent_for_a_disk_that_streams_is_refused_and_the_first_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let first = replay(
        &c,
        1,
        "tencent-cbs-50k.msr.csv",
        "msr",
        &["--max-writes=3000", "--pace=1x", "--bookmark-every-s=2"],
    );
    wait_streaming(&c, 1);
    let other = c.dir.join("source/other-disk.img");
    let out = Command::new(&c.bin)
        .args(["agent", "replay", "--create-source", "--disk-size=256MiB"])
        .arg(format!("--source={}", other.display()))
        .args(["--disk-id=1", "--vm-id=vm1", "--connect-timeout-s=3"])
        .arg(format!("--process-server={}", c.ps_addr))
        .arg(format!("--tls-dir={}", c.agent_tls("vm1").display()))
        .arg(format!(
            "--state-dir={}",
            c.dir.join("agents/other").display()
        ))
        .arg(format!(
            "--trace={}",
            traces().join("tencent-cbs-50k.msr.csv").display()
        ))
        .args(["--format=msr", "--max-writes=500"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second agent was taken: {said}");
    assert!(
        said.contains("being streamed by another agent") && said.contains("--disk-id"),
        "{said}"
    );
    let report = finish(&c, 1, first);
    verify(&c, 1, report["last_lsn"].as_u64().unwrap());
}
