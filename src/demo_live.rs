//! `failback demo --live`: the failback of a live filesystem, proven with tools no one
//! here wrote.
//!
//! 1. Certificates and the two services.
//! 2. `agent protect` serves the source disk through FUSE; a loop device and ext4 go on it.
//! 3. A real workload: sqlite3 transactions with a running checksum and a real file tree
//!    untarred, with frozen (app-consistent) bookmarks between rounds.
//! 4. The planned failback: the filesystem unmounted, the stream drained, the disk detached.
//! 5. Proof: the on-premises disk equals the source, and it, the latest app-consistent
//!    point and an earlier one each pass `e2fsck -fn`, mount read-only, and hold a database
//!    that passes `PRAGMA integrity_check` with exactly the rows committed at that point.
//! 6. A summary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use failback::harness::{file_blake3, Cluster, Error, Result};
use failback::live::{self, Committed, Loop, Mounted, PointCheck};
use serde_json::json;

use crate::demo::DemoArgs;

const DISK_ID: u64 = 1;
/// The application's directory on the protected filesystem.
const APP_DIR: &str = "db";
/// Workload rounds; a frozen bookmark follows each but the last, so the latest state
/// differs from the latest app-consistent point.
const ROUNDS: u32 = 4;
/// Transactions per round, and each one's payload.
const TXNS_PER_ROUND: u32 = 150;
const PAYLOAD_BYTES: u32 = 4000;
/// The largest file tree the demo untars (the disk must hold it twice over).
const MAX_TREE_BYTES: u64 = 256 << 20;

fn step(n: u32, text: &str) {
    eprintln!("[{n}/6] {text}");
}

fn fail(msg: impl Into<String>) -> Error {
    Error::Failed(msg.into())
}

/// The tree to untar: `--tree`, or the first of a few everywhere-present ones.
fn tree_of(args: &DemoArgs) -> Result<PathBuf> {
    if let Some(t) = &args.tree {
        // Said before anything runs: a typo must not look like a failed failback.
        if !t.is_dir() {
            return Err(fail(format!(
                "--tree {}: not a directory (give a directory of files to untar onto the protected filesystem)",
                t.display()
            )));
        }
        return Ok(t.clone());
    }
    ["/usr/share/zoneinfo", "/usr/share/doc", "/etc"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir() && tree_bytes(p) <= MAX_TREE_BYTES)
        .ok_or_else(|| fail("no file tree to untar: pass --tree DIR"))
}

fn tree_bytes(p: &Path) -> u64 {
    live::run(Command::new("du").args(["-sb"]).arg(p))
        .ok()
        .and_then(|o| o.split_whitespace().next()?.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The protected disk in use: the agent, its loop device and the mounted filesystem.
struct Protected {
    agent: std::process::Child,
    mount_dir: PathBuf,
    lo: Option<Loop>,
    app: Option<Mounted>,
}

impl Drop for Protected {
    fn drop(&mut self) {
        drop(self.app.take());
        drop(self.lo.take());
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_dir)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Runs the live demo in `dir`; returns its summary.
pub fn demo(args: &DemoArgs, dir: &Path) -> Result<serde_json::Value> {
    let tree = tree_of(args)?;
    let bin = std::env::current_exe().map_err(|source| Error::Io {
        context: "find own binary".into(),
        source,
    })?;
    step(
        1,
        "making certificates; starting master-target and process-server",
    );
    let mut c = Cluster::new(dir, &bin)?;
    if let Some(l) = &args.link {
        c.ps_extra.push(format!("--max-bandwidth={l}"));
    }
    c.start_mt()?;
    c.start_ps()?;
    c.wait_linked(Duration::from_secs(30))?;
    let source = dir.join("source").join("vm1-disk1.img");
    step(
        2,
        &format!(
            "agent protect: {} served through FUSE, a loop device and ext4 on it",
            source.display()
        ),
    );
    let mut p = protect(&c, &source, &args.disk_size)?;
    let started = Instant::now();
    step(
        3,
        &format!(
            "workload: sqlite3 transactions, untarring {}, frozen bookmarks",
            tree.display()
        ),
    );
    let at = workload(&c, &p, &tree)?;
    step(
        4,
        "failing back: filesystem unmounted, stream drained, disk detached",
    );
    let report = stop(&c, &mut p)?;
    let lsn = report["last_lsn"]
        .as_u64()
        .ok_or_else(|| fail("no last_lsn in the agent's report"))?;
    c.wait_durable(DISK_ID, lsn, Duration::from_secs(600), |_| {})?;
    let replicate_secs = started.elapsed().as_secs_f64();
    c.detach(DISK_ID)?;
    step(5, "proving every point with e2fsck, mount and sqlite3");
    let checks = prove(&c, dir, &source, &tree, &at)?;
    c.stop();
    let (src, dst) = (file_blake3(&source)?, file_blake3(&onprem_flat(dir))?);
    let failures = checks.iter().filter(|c| c["ok"] != true).count();
    Ok(json!({
        "verified": failures == 0 && src == dst,
        "mode": "live",
        "disk_bytes": runtime::units::parse_bytes(&args.disk_size).map_err(fail)?,
        "tree": tree.display().to_string(),
        "writes": report["writes"],
        "bytes": report["bytes"],
        "syncs": report["syncs"],
        "bookmarks": report["bookmarks"],
        "seconds": replicate_secs,
        "rows_committed": at.last().map_or(0, |(_, c)| c.rows),
        "points_checked": checks,
        "app_recovery_failures": failures,
        "source_blake3": src.to_hex().to_string(),
        "onprem_blake3": dst.to_hex().to_string(),
        "kept_in": args.keep.as_ref().map(|d| d.display().to_string()),
    }))
}

/// Starts `agent protect` and puts a loop device and a new ext4 filesystem on the disk.
fn protect(c: &Cluster, source: &Path, size: &str) -> Result<Protected> {
    let mount_dir = c.dir.join("capture");
    let log = c.dir.join("logs/agent.log");
    let agent = live::start_protect(c, DISK_ID, source, size, (&mount_dir, &[]), &log)?;
    let mut p = Protected {
        agent,
        mount_dir,
        lo: None,
        app: None,
    };
    let lo = Loop::attach(&p.mount_dir.join("disk.img"), false)?;
    live::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "failback-demo"])
            .arg(&lo.dev),
    )?;
    p.app = Some(Mounted::mount(&lo.dev, &c.dir.join("app"), false)?);
    p.lo = Some(lo);
    let db = p.app_dir().join(APP_DIR);
    std::fs::create_dir_all(&db).map_err(|source| Error::Io {
        context: format!("create {}", db.display()),
        source,
    })?;
    Ok(p)
}

impl Protected {
    fn app_dir(&self) -> PathBuf {
        self.app.as_ref().map(|m| m.dir.clone()).unwrap_or_default()
    }
}

/// The rounds of the workload; returns each bookmark's tag with what was committed at it,
/// and last ("latest") what was committed when the workload ended.
fn workload(c: &Cluster, p: &Protected, tree: &Path) -> Result<Vec<(String, Committed)>> {
    let db = p.app_dir().join(APP_DIR);
    let mut committed = Committed::default();
    let mut at = Vec::new();
    for round in 1..=ROUNDS {
        committed = live::commit(&db, committed, TXNS_PER_ROUND, PAYLOAD_BYTES)?;
        if round == 1 {
            live::untar(tree, &p.app_dir())?;
        }
        if round == ROUNDS {
            break;
        }
        let tag = format!("app-{round}");
        let out = live::run(
            Command::new(&c.bin)
                .args(["agent", "bookmark", "--tag", &tag, "--state-dir"])
                .arg(c.agent_state(DISK_ID))
                .arg("--freeze")
                .arg(p.app_dir()),
        )?;
        eprintln!("      {}", out.trim());
        at.push((tag, committed));
    }
    at.push(("latest".into(), committed));
    Ok(at)
}

/// Unmounts the filesystem, detaches the loop device and the disk: the agent drains and
/// ends; returns its report.
fn stop(c: &Cluster, p: &mut Protected) -> Result<serde_json::Value> {
    if let Some(m) = p.app.take() {
        m.unmount()?;
    }
    if let Some(l) = p.lo.take() {
        l.detach()?;
    }
    live::run(Command::new("umount").arg(&p.mount_dir))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while p.agent.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            return Err(fail("the agent did not drain within 10 minutes"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    if let Some(s) = p.agent.stdout.as_mut() {
        let _ = std::io::Read::read_to_string(s, &mut out);
    }
    let ok = p.agent.wait().is_ok_and(|s| s.success());
    if !ok {
        return Err(fail(format!(
            "the agent failed; see {}",
            c.dir.join("logs/agent.log").display()
        )));
    }
    out.lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| fail("the agent printed no report"))
}

fn onprem_flat(dir: &Path) -> PathBuf {
    dir.join("onprem/vm1/vm1-disk1-flat.vmdk")
}

/// Checks the on-premises disk (the latest state), the latest app-consistent point
/// (exported as a VMDK beside it) and the earliest one (exported raw), each against what
/// the application had committed then and the digest the agent recorded.
fn prove(
    c: &Cluster,
    dir: &Path,
    source: &Path,
    tree: &Path,
    at: &[(String, Committed)],
) -> Result<Vec<serde_json::Value>> {
    let bookmarks =
        agent::engine::read_bookmarks(&c.agent_state(DISK_ID)).map_err(|e| fail(e.to_string()))?;
    let digest = |tag: &str| {
        bookmarks
            .iter()
            .find(|b| b.tag == tag)
            .map(|b| b.disk_digest.clone())
    };
    let latest = at.last().expect("the workload ends with latest").1;
    let latest_app = &at[at.len() - 2];
    let earliest = &at[0];
    let folder = dir.join("onprem/vm1");
    c.export(
        DISK_ID,
        "latest-app",
        &folder.join("vm1-disk1-latest-app.vmdk"),
        "vmdk",
    )?;
    let points = c.points(DISK_ID)?;
    let id = points
        .iter()
        .find(|p| p["tag"] == earliest.0.as_str())
        .map(|p| p["id"].to_string())
        .ok_or_else(|| fail(format!("no point for bookmark {}", earliest.0)))?;
    let earlier = dir.join("earlier.img");
    c.export(DISK_ID, &id, &earlier, "raw")?;
    let cases = [
        (
            "on-premises disk",
            onprem_flat(dir),
            "latest",
            latest,
            Some(hex_digest(source)?),
        ),
        (
            "latest-app",
            folder.join("vm1-disk1-latest-app-flat.vmdk"),
            latest_app.0.as_str(),
            latest_app.1,
            digest(&latest_app.0),
        ),
        (
            "earlier",
            earlier.clone(),
            earliest.0.as_str(),
            earliest.1,
            digest(&earliest.0),
        ),
    ];
    let mut out = Vec::new();
    for (i, (what, image, tag, expected, want_digest)) in cases.into_iter().enumerate() {
        let check =
            live::check_point(&image, APP_DIR, Some(tree), &dir.join(format!("check-{i}")))?;
        let digest_ok = want_digest.is_some_and(|d| hex_digest(&image).is_ok_and(|h| h == d));
        out.push(point_json(what, tag, expected, &check, digest_ok));
    }
    let _ = std::fs::remove_file(&earlier);
    Ok(out)
}

fn point_json(
    what: &str,
    tag: &str,
    expected: Committed,
    check: &PointCheck,
    digest_ok: bool,
) -> serde_json::Value {
    let ok = check.ok(expected) && digest_ok;
    eprintln!(
        "      {what} ({tag}): {} — e2fsck {}, mounted, integrity_check {}, {} of {} rows, tree {}, digest {}",
        if ok { "OK" } else { "FAILED" },
        if check.fsck_clean { "clean" } else { "NOT clean" },
        if check.integrity_ok { "ok" } else { "FAILED" },
        check.committed.rows,
        expected.rows,
        match check.tree_equal { Some(true) => "equal", Some(false) => "DIFFERS", None => "-" },
        if digest_ok { "equal" } else { "DIFFERS" },
    );
    json!({
        "point": what,
        "tag": tag,
        "ok": ok,
        "rows_expected": expected.rows,
        "digest_equal": digest_ok,
        "check": check,
    })
}

fn hex_digest(image: &Path) -> Result<String> {
    Ok(agent::source::hex(
        &agent::source::image_digest(image).map_err(|e| fail(e.to_string()))?,
    ))
}
