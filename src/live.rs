//! A live disk for the end-to-end proof of `agent protect`: the captured file under a loop
//! device with ext4 on it, a real application writing to it (sqlite3 transactions with a
//! running checksum, a real file tree untarred), and the checks an exported point must
//! pass with tools no one here wrote (`e2fsck`, `mount`, `sqlite3`, `diff`).
//!
//! # Design constraints
//! - Root, `/dev/fuse`, loop devices, `mkfs.ext4`, `sqlite3` and `tar`: [`missing_tools`]
//!   names what is absent, so callers can say so instead of failing half-way.
//! - Every wait is bounded; every loop device and mount is undone on drop, also when a
//!   check fails.
//! - The application's committed state is tracked outside the disk (row count and the
//!   running checksum after each commit), so a point is compared with what the application
//!   had committed when its bookmark was taken.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cleanup::Held;
use crate::harness::{Cluster, Error, Result};

/// The modulus of the running checksum (a prime, so the chain mixes every id in).
const CHECKSUM_MOD: u64 = 1_000_000_007;
/// The longest the captured file may take to appear after `agent protect` starts (the
/// agent first connects and attaches, retrying while the process server starts).
const APPEAR_MAX: Duration = Duration::from_secs(120);
/// The longest one external command may run (mkfs, fsck, a batch of transactions).
const COMMAND_MAX: Duration = Duration::from_secs(300);
/// The file name of the application's database in its directory.
pub const DB_NAME: &str = "app.db";

/// What this machine lacks for a live disk, if anything (empty: all present).
pub fn missing_tools() -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (FUSE mounts, loop devices and ext4 mounts need it)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse (modprobe fuse)".into());
    }
    for tool in [
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "sqlite3",
        "tar",
        "diff",
        "mount",
    ] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            missing.push(format!(
                "{tool} (apt-get install util-linux e2fsprogs sqlite3 tar diffutils)"
            ));
        }
    }
    missing
}

/// Runs `cmd` to completion within [`COMMAND_MAX`]; its stdout, or an error with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Io {
            context: what.clone(),
            source,
        })?;
    let out = wait_bounded(child, COMMAND_MAX, &what)?;
    if !out.status.success() {
        return Err(Error::Failed(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_bounded(mut child: Child, max: Duration, what: &str) -> Result<std::process::Output> {
    let deadline = Instant::now() + max;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Failed(format!(
                    "{what} did not end within {max:?}: killed"
                )));
            }
        }
    }
    child.wait_with_output().map_err(|source| Error::Io {
        context: what.into(),
        source,
    })
}

/// Starts `agent protect` for `disk_id` with the disk served in `mount_dir` (and `extra`
/// arguments), and waits until the file is there. Its log goes to `log`.
pub fn start_protect(
    c: &Cluster,
    disk_id: u64,
    source: &Path,
    size: &str,
    (mount_dir, extra): (&Path, &[&str]),
    log: &Path,
) -> Result<Child> {
    std::fs::create_dir_all(mount_dir).map_err(|source| Error::Io {
        context: format!("create {}", mount_dir.display()),
        source,
    })?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| Error::Io {
            context: format!("open {}", log.display()),
            source,
        })?;
    let mut child = c
        .agent("protect", disk_id, source, size)
        .arg(format!("--mount-dir={}", mount_dir.display()))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .map_err(|source| Error::Io {
            context: "start agent protect".into(),
            source,
        })?;
    // Cleared after the agent if the run is interrupted (a killed agent's mount is dead).
    crate::cleanup::hold(Held::Mount(mount_dir.to_owned()));
    let file = mount_dir.join("disk.img");
    let deadline = Instant::now() + APPEAR_MAX;
    while !std::fs::metadata(&file).is_ok_and(|m| m.is_file()) {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(Error::Failed(format!(
                "agent protect ended ({st}) before serving the disk: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(Error::Failed(format!(
                "{} did not appear within {APPEAR_MAX:?}",
                file.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// A loop device on an image, detached on drop.
#[derive(Debug)]
pub struct Loop {
    /// The device, e.g. /dev/loop3.
    pub dev: String,
}

impl Loop {
    /// Attaches `image` (read-only with `ro`: a point is checked without changing it).
    pub fn attach(image: &Path, ro: bool) -> Result<Loop> {
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if ro {
            cmd.arg("-r");
        }
        let dev = run(cmd.arg(image))?.trim().to_owned();
        crate::cleanup::hold(Held::Loop(dev.clone()));
        Ok(Loop { dev })
    }

    /// Detaches it now (an error if it is busy).
    pub fn detach(mut self) -> Result<()> {
        let dev = std::mem::take(&mut self.dev);
        run(Command::new("losetup").arg("-d").arg(&dev))?;
        crate::cleanup::release(&Held::Loop(dev));
        Ok(())
    }
}

/// Forgets `h` unless the command that was to undo it never ran to its end. An
/// interrupted demo's cleanup signals every child: an `umount` a destructor had just
/// started could be killed before it unmounted, and a mount forgotten then was left behind
/// for good (an interrupted live demo kept its ext4 mounted, once in a few runs). Kept, the
/// cleanup undoes it. A command that ran and failed (not mounted, no such device) is
/// forgotten all the same: undoing it later could hit a loop device someone else took since.
fn release_if_done(done: std::io::Result<std::process::ExitStatus>, h: Held) {
    use std::os::unix::process::ExitStatusExt;
    if done.is_ok_and(|s| s.signal().is_none()) {
        crate::cleanup::release(&h);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if !self.dev.is_empty() {
            let done = Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .stderr(Stdio::null())
                .status();
            release_if_done(done, Held::Loop(std::mem::take(&mut self.dev)));
        }
    }
}

/// A mounted filesystem, unmounted on drop.
#[derive(Debug)]
pub struct Mounted {
    /// Where.
    pub dir: PathBuf,
}

impl Mounted {
    /// Mounts `dev` on `dir` (made if missing), read-only with `ro`.
    pub fn mount(dev: &str, dir: &Path, ro: bool) -> Result<Mounted> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            context: format!("create {}", dir.display()),
            source,
        })?;
        let mut cmd = Command::new("mount");
        if ro {
            // noload: a read-only check must not replay a journal into the device.
            cmd.args(["-o", "ro,noload"]);
        }
        run(cmd.arg(dev).arg(dir))?;
        crate::cleanup::hold(Held::Mount(dir.into()));
        Ok(Mounted { dir: dir.into() })
    }

    /// Unmounts it now.
    pub fn unmount(mut self) -> Result<()> {
        let dir = std::mem::take(&mut self.dir);
        run(Command::new("umount").arg(&dir))?;
        crate::cleanup::release(&Held::Mount(dir));
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            // Lazy: a failed test must not leave a mount behind a dead device.
            let done = Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
            release_if_done(done, Held::Mount(std::mem::take(&mut self.dir)));
        }
    }
}

/// The application: a sqlite3 database of rows with a running checksum, written through
/// the sqlite3 command-line tool (its own fsyncs), and what it has committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Committed {
    /// Rows committed.
    pub rows: u64,
    /// The last row's running checksum.
    pub checksum: u64,
}

impl Committed {
    /// The checksum after row `id`: the previous one times 31 plus the id.
    fn next(self) -> Committed {
        let id = self.rows + 1;
        Committed {
            rows: id,
            checksum: (self.checksum * 31 + id) % CHECKSUM_MOD,
        }
    }
}

/// The SQL of `txns` transactions of one row each (with `payload_bytes` of random
/// payload) after `before`, and what is committed once all of them are.
fn commits_sql(before: Committed, txns: u32, payload_bytes: u32) -> (String, Committed) {
    let mut sql = String::from(
        "PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL;\n\
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, payload BLOB, sum INTEGER);\n",
    );
    let mut c = before;
    for _ in 0..txns {
        c = c.next();
        sql.push_str(&format!(
            "BEGIN; INSERT INTO t VALUES({}, randomblob({payload_bytes}), {}); COMMIT;\n",
            c.rows, c.checksum
        ));
    }
    (sql, c)
}

/// Starts sqlite3 committing `txns` transactions to the database in `dir` after `before`
/// (the SQL read from an unnamed file, so the process can be killed at any point);
/// returns it and what is committed once it ends well.
pub fn spawn_commits(
    dir: &Path,
    before: Committed,
    txns: u32,
    payload_bytes: u32,
) -> Result<(Child, Committed)> {
    let (sql, after) = commits_sql(before, txns, payload_bytes);
    // An unnamed file (O_TMPFILE): nobody can plant or swap it, and it goes with its last
    // handle. (A named script in the shared temporary directory let a local user point
    // root's write at any file, or add commands of their own to what sqlite3 ran.)
    let mut input = tempfile::tempfile().map_err(|source| Error::Io {
        context: "make the SQL script's file".into(),
        source,
    })?;
    std::io::Write::write_all(&mut input, sql.as_bytes())
        .and_then(|()| std::io::Seek::rewind(&mut input))
        .map_err(|source| Error::Io {
            context: "write the SQL script".into(),
            source,
        })?;
    let child = Command::new("sqlite3")
        .arg(dir.join(DB_NAME))
        .stdin(input)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Io {
            context: "run sqlite3".into(),
            source,
        })?;
    Ok((child, after))
}

/// Commits `txns` transactions (see [`spawn_commits`]) and returns what is committed.
pub fn commit(dir: &Path, before: Committed, txns: u32, payload_bytes: u32) -> Result<Committed> {
    let (child, after) = spawn_commits(dir, before, txns, payload_bytes)?;
    let out = wait_bounded(child, COMMAND_MAX, "sqlite3")?;
    if !out.status.success() || !out.stderr.is_empty() {
        return Err(Error::Failed(format!(
            "sqlite3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(after)
}

/// Copies the file tree at `tree` into `dir` with tar (as an untar of a real tree would).
pub fn untar(tree: &Path, dir: &Path) -> Result<()> {
    let parent = tree.parent().unwrap_or(Path::new("/"));
    let name = tree.file_name().unwrap_or_default();
    let script = format!(
        "tar -C '{}' --exclude=target --exclude=.git -cf - '{}' | tar -C '{}' -xf - && sync -f '{}'",
        parent.display(),
        name.to_string_lossy(),
        dir.display(),
        dir.display()
    );
    run(Command::new("sh").arg("-c").arg(script)).map(|_| ())
}

/// What an exported point showed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PointCheck {
    /// `e2fsck -fn` found nothing to fix.
    pub fsck_clean: bool,
    /// It mounted read-only.
    pub mounted: bool,
    /// `PRAGMA integrity_check` said ok (on a copy, after sqlite's own recovery).
    pub integrity_ok: bool,
    /// Every row's checksum follows from the previous row's.
    pub chain_ok: bool,
    /// What the database holds.
    pub committed: Committed,
    /// The untarred tree equals the original (when one was expected).
    pub tree_equal: Option<bool>,
}

impl PointCheck {
    /// Every check passed, and the database holds exactly `expected`.
    pub fn ok(&self, expected: Committed) -> bool {
        self.fsck_clean
            && self.mounted
            && self.integrity_ok
            && self.chain_ok
            && self.committed == expected
            && self.tree_equal != Some(false)
    }
}

/// Checks an exported image: attached read-only, `e2fsck -fn`, mounted read-only, the
/// database copied out and opened by sqlite3 (which recovers a hot journal as the
/// application would), and the tree compared with `tree` if given. `scratch` is a
/// directory for the mount and the copy.
pub fn check_point(
    image: &Path,
    app_dir: &str,
    tree: Option<&Path>,
    scratch: &Path,
) -> Result<PointCheck> {
    let lo = Loop::attach(image, true)?;
    let fsck_clean = run(Command::new("e2fsck").args(["-fn"]).arg(&lo.dev)).is_ok();
    let mnt = Mounted::mount(&lo.dev, &scratch.join("mnt"), true)?;
    let copy = scratch.join("db");
    std::fs::create_dir_all(&copy).map_err(|source| Error::Io {
        context: format!("create {}", copy.display()),
        source,
    })?;
    let db_dir = mnt.dir.join(app_dir);
    for name in [DB_NAME.to_owned(), format!("{DB_NAME}-journal")] {
        let from = db_dir.join(&name);
        if from.exists() {
            std::fs::copy(&from, copy.join(&name)).map_err(|source| Error::Io {
                context: format!("copy {}", from.display()),
                source,
            })?;
        }
    }
    let tree_equal = tree.map(|t| {
        let name = t.file_name().unwrap_or_default();
        run(Command::new("diff")
            .args([
                "-r",
                "--no-dereference",
                "-q",
                "--exclude=target",
                "--exclude=.git",
            ])
            .arg(t)
            .arg(mnt.dir.join(name)))
        .is_ok()
    });
    mnt.unmount()?;
    lo.detach()?;
    let (integrity_ok, chain_ok, committed) = inspect_db(&copy.join(DB_NAME))?;
    Ok(PointCheck {
        fsck_clean,
        mounted: true,
        integrity_ok,
        chain_ok,
        committed,
        tree_equal,
    })
}

/// Opens the database at `db` with sqlite3 (which rolls back a hot journal, as the
/// application would on its next start): (`integrity_check` ok, the checksum chain holds,
/// what it holds).
pub fn inspect_db(db: &Path) -> Result<(bool, bool, Committed)> {
    let integrity = run(Command::new("sqlite3")
        .arg(db)
        .arg("PRAGMA integrity_check;"))?;
    let stats = run(Command::new("sqlite3").arg(db).arg(
        "SELECT count(*), coalesce((SELECT sum FROM t ORDER BY id DESC LIMIT 1), 0), \
         (SELECT count(*) FROM t a JOIN t b ON b.id = a.id + 1 \
          WHERE b.sum != (a.sum * 31 + b.id) % 1000000007) \
         + (SELECT count(*) FROM t WHERE id = 1 AND sum != 1) \
         + (count(*) != coalesce(max(id), 0)) FROM t;",
    ))?;
    let nums: Vec<u64> = stats
        .trim()
        .split('|')
        .filter_map(|s| s.parse().ok())
        .collect();
    let [rows, checksum, broken] = nums[..] else {
        return Err(Error::Failed(format!("sqlite3 gave {stats:?}")));
    };
    Ok((
        integrity.trim() == "ok",
        broken == 0,
        Committed { rows, checksum },
    ))
}
