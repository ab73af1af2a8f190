//! A simulated file system for the deterministic simulator: in memory, seeded, and as
//! hostile as POSIX allows.
//!
//! # What a crash keeps
//! Each file has its durable bytes and the operations made since its last successful
//! fsync. At a crash ([`SimFs::crash`]) every unsynced write or truncation survives or not
//! on its own (the kernel writes pages back in any order), and a surviving write may be
//! torn: only a prefix of it reaches the platter. Names (new, renamed and removed files)
//! survive only if their directory was fsynced after the change. Directories themselves
//! are durable at once (a simplification: the services create theirs at attach, long
//! before any data depends on them).
//!
//! # Other faults
//! - **EIO**: any operation may fail with a probability from [`SimFaults`]. A failed fsync
//!   behaves as Linux does ("fsyncgate"): the unsynced writes are dropped from the durable
//!   future but stay readable, so retrying the fsync succeeds without making them durable.
//! - **ENOSPC**: a write or extension past the volume's capacity fails, changing nothing.
//! - **Crash at a failpoint**: [`SimFs::arm_crash`] makes the n-th next operation the last
//!   one the process does: it is applied (unsynced) and fails, and so does every later
//!   operation of the dead process's handles until [`SimFs::crash`] reboots the machine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{parent_dir, FileHandle, FileSystem, OpenMode};

/// Fault rates of a [`SimFs`].
#[derive(Debug, Clone, Copy)]
pub struct SimFaults {
    /// Chance, per million operations, that an operation fails with EIO.
    pub eio_per_million: u32,
    /// Bytes the volume holds (the sum of its files' lengths); past it, ENOSPC.
    pub capacity_bytes: u64,
    /// Chance, per million surviving unsynced writes at a crash, that one is torn.
    pub tear_per_million: u32,
}

impl SimFaults {
    /// No faults and no size limit.
    pub const NONE: SimFaults = SimFaults {
        eio_per_million: 0,
        capacity_bytes: u64::MAX,
        tear_per_million: 0,
    };
}

/// What a [`SimFs`] did, for the simulator's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Operations made.
    pub ops: u64,
    /// Operations failed with EIO on purpose.
    pub eio: u64,
    /// Writes refused for lack of space.
    pub enospc: u64,
    /// Crashes.
    pub crashes: u64,
    /// Unsynced writes lost at crashes.
    pub writes_lost: u64,
    /// Unsynced writes torn at crashes.
    pub writes_torn: u64,
}

#[derive(Debug, Clone)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
}

#[derive(Debug)]
struct State {
    rng: fastrand::Rng,
    faults: SimFaults,
    inodes: HashMap<u64, Inode>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
    next_ino: u64,
    /// Handles of an earlier boot fail.
    boot: u64,
    /// Operations left before the armed crash (`Some(0)`: crashed, waiting for a reboot).
    crash_in: Option<u64>,
    /// One-shot failures asked for by a test ([`SimFs::fail_next`]).
    rules: Vec<Rule>,
    stats: SimStats,
}

/// Fail the `skip`-th next (0: the next) operation `what` on a path containing `path`.
#[derive(Debug)]
struct Rule {
    what: &'static str,
    path: String,
    skip: u32,
}

/// A simulated volume. Cloning shares it.
#[derive(Debug, Clone)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

fn err(kind: io::ErrorKind, what: &str) -> io::Error {
    io::Error::new(kind, what.to_string())
}

/// EIO, as the kernel reports it (raw errno 5), so callers classify it as they would.
fn eio() -> io::Error {
    io::Error::from_raw_os_error(5)
}

/// The error of every operation of a crashed process.
fn dead() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "simulated crash: the process is dead",
    )
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

fn apply(buf: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*offset as usize..end].copy_from_slice(data);
        }
        Pending::SetLen(n) => buf.resize(*n as usize, 0),
    }
}

impl State {
    /// Counts an operation and decides its fate: `Err` if the process is dead or the
    /// operation fails with EIO; `Ok(true)` if this is the armed crash's operation (applied,
    /// then reported failed).
    fn step(&mut self, what: &str, path: &Path) -> io::Result<bool> {
        self.stats.ops += 1;
        let hit = self
            .rules
            .iter()
            .position(|r| r.what == what && path.to_string_lossy().contains(&r.path));
        if let Some(i) = hit {
            if self.rules[i].skip == 0 {
                self.rules.remove(i);
                self.stats.eio += 1;
                return Err(eio());
            }
            self.rules[i].skip -= 1;
        }
        match self.crash_in {
            Some(0) => return Err(dead()),
            Some(1) => {
                self.crash_in = Some(0);
                return Ok(true);
            }
            Some(n) => self.crash_in = Some(n - 1),
            None => {}
        }
        if self.faults.eio_per_million > 0
            && self.rng.u32(..1_000_000) < self.faults.eio_per_million
        {
            self.stats.eio += 1;
            let _ = what;
            return Err(eio());
        }
        Ok(false)
    }

    fn used_bytes(&self) -> u64 {
        let live: BTreeSet<u64> = self.names.values().copied().collect();
        live.iter()
            .map(|i| self.inodes.get(i).map_or(0, |n| n.data.len() as u64))
            .sum()
    }

    fn inode(&mut self, ino: u64) -> io::Result<&mut Inode> {
        self.inodes
            .get_mut(&ino)
            .ok_or_else(|| err(io::ErrorKind::NotFound, "simulated file vanished"))
    }

    fn check_dir(&self, path: &Path) -> io::Result<()> {
        if self.dirs.contains(&parent_dir(path)) {
            Ok(())
        } else {
            Err(err(io::ErrorKind::NotFound, "no such directory"))
        }
    }
}

impl SimFs {
    /// An empty volume whose random choices all come from `seed`.
    pub fn new(seed: u64) -> SimFs {
        let mut dirs = BTreeSet::new();
        dirs.insert(PathBuf::from("/"));
        dirs.insert(PathBuf::from("."));
        SimFs {
            state: Arc::new(Mutex::new(State {
                rng: fastrand::Rng::with_seed(seed),
                faults: SimFaults::NONE,
                inodes: HashMap::new(),
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                dirs,
                next_ino: 1,
                boot: 0,
                crash_in: None,
                rules: Vec::new(),
                stats: SimStats::default(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("simulated fs poisoned")
    }

    /// Sets the fault rates and the capacity.
    pub fn set_faults(&self, faults: SimFaults) {
        self.lock().faults = faults;
    }

    /// The fault rates.
    pub fn faults(&self) -> SimFaults {
        self.lock().faults
    }

    /// Makes the `ops`-th next operation (1: the next one) the last of this boot.
    pub fn arm_crash(&self, ops: u64) {
        self.lock().crash_in = Some(ops.max(1));
    }

    /// Makes one operation fail with EIO: the `skip`-th next (0: the next) operation
    /// `what` on a path that contains `path`. Operations: "open", "read", "write", "stat",
    /// "truncate", "fsync", "fadvise", "list", "unlink", "rename", "mkdir", "fsync dir".
    pub fn fail_next(&self, what: &'static str, path: &str, skip: u32) {
        self.lock().rules.push(Rule {
            what,
            path: path.to_string(),
            skip,
        });
    }

    /// Operations left before the armed crash, if one is armed and has not happened.
    pub fn armed(&self) -> Option<u64> {
        self.lock().crash_in.filter(|&n| n > 0)
    }

    /// Cancels an armed crash that has not happened.
    pub fn disarm_crash(&self) {
        let mut s = self.lock();
        if s.crash_in != Some(0) {
            s.crash_in = None;
        }
    }

    /// Whether the armed crash has happened (the process must be treated as dead).
    pub fn crashed(&self) -> bool {
        self.lock().crash_in == Some(0)
    }

    /// Counters so far.
    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    /// Power loss and reboot: every file keeps its durable bytes plus whichever unsynced
    /// operations survive (some torn), names keep their last synced state, and every
    /// handle of the old boot fails from now on.
    pub fn crash(&self) {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.stats.crashes += 1;
        s.boot += 1;
        s.crash_in = None;
        s.names = s.durable_names.clone();
        let live: BTreeSet<u64> = s.names.values().copied().collect();
        s.inodes.retain(|ino, _| live.contains(ino));
        let tear = s.faults.tear_per_million;
        for node in s.inodes.values_mut() {
            let mut out = std::mem::take(&mut node.durable);
            for p in node.pending.drain(..) {
                if s.rng.bool() {
                    s.stats.writes_lost += 1;
                    continue;
                }
                match p {
                    Pending::Write { offset, data }
                        if data.len() > 1 && s.rng.u32(..1_000_000) < tear =>
                    {
                        s.stats.writes_torn += 1;
                        let keep = s.rng.usize(..data.len());
                        apply(
                            &mut out,
                            &Pending::Write {
                                offset,
                                data: data[..keep].to_vec(),
                            },
                        );
                    }
                    p => apply(&mut out, &p),
                }
            }
            node.data = out.clone();
            node.durable = out;
        }
    }

    /// Writes a durable file (set-up outside the simulated process).
    pub fn put(&self, path: &Path, data: &[u8]) {
        let mut s = self.lock();
        let ino = s.next_ino;
        s.next_ino += 1;
        s.inodes.insert(
            ino,
            Inode {
                data: data.to_vec(),
                durable: data.to_vec(),
                pending: Vec::new(),
            },
        );
        s.names.insert(path.to_path_buf(), ino);
        s.durable_names.insert(path.to_path_buf(), ino);
        let mut d = parent_dir(path);
        loop {
            s.dirs.insert(d.clone());
            match d.parent() {
                Some(p) if !p.as_os_str().is_empty() => d = p.to_path_buf(),
                _ => break,
            }
        }
    }

    /// What a file holds now (what a reader sees), without counting an operation.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.lock();
        let ino = s.names.get(path)?;
        s.inodes.get(ino).map(|n| n.data.clone())
    }

    /// Every file with its length now and its durable length (for traces; not an
    /// operation).
    pub fn files(&self) -> Vec<(PathBuf, u64, u64)> {
        let s = self.lock();
        s.names
            .iter()
            .map(|(p, i)| {
                let n = &s.inodes[i];
                (p.clone(), n.data.len() as u64, n.durable.len() as u64)
            })
            .collect()
    }

    /// Bytes the volume's files hold now.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes()
    }
}

/// An open file of a [`SimFs`].
#[derive(Debug)]
struct SimHandle {
    fs: SimFs,
    path: PathBuf,
    ino: u64,
    boot: u64,
    writable: bool,
}

impl SimHandle {
    /// Runs `f` on the file's inode as one operation.
    fn op<T>(&self, what: &str, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let mut guard = self.fs.lock();
        let s = &mut *guard;
        if s.boot != self.boot {
            return Err(dead());
        }
        let last = s.step(what, &self.path)?;
        let r = f(s, self.ino);
        if last {
            return Err(dead());
        }
        r
    }

    fn change(&self, what: &str, p: Pending) -> io::Result<()> {
        if !self.writable {
            return Err(err(io::ErrorKind::PermissionDenied, "opened read-only"));
        }
        self.op(what, |s, ino| {
            let cur = s.inode(ino)?.data.len() as u64;
            let new_len = match &p {
                Pending::Write { offset, data } => cur.max(offset + data.len() as u64),
                Pending::SetLen(n) => *n,
            };
            if new_len > cur && s.used_bytes() + (new_len - cur) > s.faults.capacity_bytes {
                s.stats.enospc += 1;
                return Err(enospc());
            }
            let node = s.inode(ino)?;
            apply(&mut node.data, &p);
            node.pending.push(p);
            Ok(())
        })
    }

    fn sync(&self) -> io::Result<()> {
        let mut guard = self.fs.lock();
        let s = &mut *guard;
        if s.boot != self.boot {
            return Err(dead());
        }
        match s.step("fsync", &self.path) {
            Ok(false) => {
                let node = s.inode(self.ino)?;
                let pending = std::mem::take(&mut node.pending);
                for p in &pending {
                    apply(&mut node.durable, p);
                }
                Ok(())
            }
            // The crash happens before the sync reaches the platter.
            Ok(true) => Err(dead()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(e),
            Err(e) => {
                // fsyncgate: the pages are marked clean; what they held never gets written.
                s.inode(self.ino)?.pending.clear();
                Err(e)
            }
        }
    }
}

impl FileHandle for SimHandle {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.op("read", |s, ino| {
            let data = &s.inode(ino)?.data;
            let end = offset as usize + buf.len();
            if end > data.len() {
                return Err(err(io::ErrorKind::UnexpectedEof, "read past the end"));
            }
            buf.copy_from_slice(&data[offset as usize..end]);
            Ok(())
        })
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.change(
            "write",
            Pending::Write {
                offset,
                data: data.to_vec(),
            },
        )
    }
    fn len(&self) -> io::Result<u64> {
        self.op("stat", |s, ino| Ok(s.inode(ino)?.data.len() as u64))
    }
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.change("truncate", Pending::SetLen(len_bytes))
    }
    fn sync_data(&self) -> io::Result<()> {
        self.sync()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.sync()
    }
    fn drop_cache(&self) -> io::Result<()> {
        self.op("fadvise", |s, ino| {
            let node = s.inode(ino)?;
            let mut data = node.durable.clone();
            for p in &node.pending {
                apply(&mut data, p);
            }
            node.data = data;
            Ok(())
        })
    }
}

impl SimFs {
    /// Runs a namespace operation as one counted operation.
    fn ns<T>(
        &self,
        what: &str,
        path: &Path,
        f: impl FnOnce(&mut State) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let last = s.step(what, path)?;
        let r = f(s);
        if last {
            return Err(dead());
        }
        r
    }
}

impl FileSystem for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FileHandle>> {
        let (ino, boot) = self.ns("open", path, |s| {
            s.check_dir(path)?;
            let ino = match (s.names.get(path).copied(), mode) {
                (Some(_), OpenMode::CreateNew) => {
                    return Err(err(io::ErrorKind::AlreadyExists, "file exists"))
                }
                (Some(ino), _) => ino,
                (None, OpenMode::Read | OpenMode::ReadWrite) => {
                    return Err(err(io::ErrorKind::NotFound, "no such file"))
                }
                (None, _) => {
                    let ino = s.next_ino;
                    s.next_ino += 1;
                    s.inodes.insert(ino, Inode::default());
                    s.names.insert(path.to_path_buf(), ino);
                    ino
                }
            };
            Ok((ino, s.boot))
        })?;
        Ok(Box::new(SimHandle {
            fs: self.clone(),
            path: path.to_path_buf(),
            ino,
            boot,
            writable: mode != OpenMode::Read,
        }))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.ns("list", dir, |s| {
            if !s.dirs.contains(dir) {
                return Err(err(io::ErrorKind::NotFound, "no such directory"));
            }
            let child = |p: &PathBuf| {
                (parent_dir(p) == dir)
                    .then(|| p.file_name()?.to_str().map(str::to_string))
                    .flatten()
            };
            Ok(s.names
                .keys()
                .chain(s.dirs.iter())
                .filter_map(child)
                .collect())
        })
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.ns("unlink", path, |s| {
            s.names
                .remove(path)
                .map(|_| ())
                .ok_or_else(|| err(io::ErrorKind::NotFound, "no such file"))
        })
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.ns("rename", from, |s| {
            if s.dirs.contains(from) {
                // Directories move at once and durably (see the module doc).
                let moved = |m: &BTreeMap<PathBuf, u64>| -> BTreeMap<PathBuf, u64> {
                    m.iter()
                        .map(|(p, i)| match p.strip_prefix(from) {
                            Ok(rest) => (to.join(rest), *i),
                            Err(_) => (p.clone(), *i),
                        })
                        .collect()
                };
                s.names = moved(&s.names);
                s.durable_names = moved(&s.durable_names);
                s.dirs = s
                    .dirs
                    .iter()
                    .map(|d| match d.strip_prefix(from) {
                        Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
                        Ok(rest) => to.join(rest),
                        Err(_) => d.clone(),
                    })
                    .collect();
                return Ok(());
            }
            s.check_dir(to)?;
            let ino = s
                .names
                .remove(from)
                .ok_or_else(|| err(io::ErrorKind::NotFound, "no such file"))?;
            s.names.insert(to.to_path_buf(), ino);
            Ok(())
        })
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.ns("mkdir", dir, |s| {
            let mut d = dir.to_path_buf();
            loop {
                s.dirs.insert(d.clone());
                match d.parent() {
                    Some(p) if !p.as_os_str().is_empty() => d = p.to_path_buf(),
                    _ => return Ok(()),
                }
            }
        })
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.ns("fsync dir", dir, |s| {
            let under = |p: &PathBuf| parent_dir(p) == dir;
            s.durable_names.retain(|p, _| !under(p));
            let now: Vec<(PathBuf, u64)> = s
                .names
                .iter()
                .filter(|(p, _)| under(p))
                .map(|(p, i)| (p.clone(), *i))
                .collect();
            s.durable_names.extend(now);
            Ok(())
        })
    }

    fn exists(&self, path: &Path) -> bool {
        let s = self.lock();
        s.names.contains_key(path) || s.dirs.contains(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(fs: &SimFs, p: &str) -> Box<dyn FileHandle> {
        fs.create_dir_all(Path::new("/v")).unwrap();
        fs.open(Path::new(p), OpenMode::CreateOrOpen).unwrap()
    }

    #[test]
    fn synced_data_and_names_survive_a_crash_unsynced_ones_may_not() {
        let fs = SimFs::new(7);
        let f = file(&fs, "/v/a");
        f.write_all_at(b"durable", 0).unwrap();
        f.sync_all().unwrap();
        fs.sync_dir(Path::new("/v")).unwrap();
        let g = file(&fs, "/v/b");
        g.write_all_at(b"never synced dir", 0).unwrap();
        g.sync_all().unwrap();
        fs.crash();
        assert_eq!(fs.contents(Path::new("/v/a")).unwrap(), b"durable");
        assert!(
            fs.contents(Path::new("/v/b")).is_none(),
            "its directory was never synced"
        );
        assert!(f.len().is_err(), "handles of the old boot are dead");
    }

    #[test]
    fn an_armed_crash_stops_the_process_at_that_operation() {
        let fs = SimFs::new(1);
        let f = file(&fs, "/v/a");
        fs.arm_crash(2);
        f.write_all_at(b"x", 0).unwrap();
        assert!(
            f.write_all_at(b"y", 1).is_err(),
            "the second operation is the last"
        );
        assert!(fs.crashed());
        assert!(f.sync_data().is_err(), "the dead process does nothing more");
        assert_eq!(
            fs.contents(Path::new("/v/a")).unwrap(),
            b"xy",
            "the last write was made"
        );
    }

    #[test]
    fn a_failed_fsync_loses_its_writes_for_good() {
        let fs = SimFs::new(3);
        let f = file(&fs, "/v/a");
        fs.sync_dir(Path::new("/v")).unwrap();
        f.write_all_at(b"lost", 0).unwrap();
        fs.set_faults(SimFaults {
            eio_per_million: 1_000_000,
            ..SimFaults::NONE
        });
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(5));
        fs.set_faults(SimFaults::NONE);
        f.sync_data().unwrap();
        assert_eq!(
            fs.contents(Path::new("/v/a")).unwrap(),
            b"lost",
            "still readable"
        );
        f.drop_cache().unwrap();
        assert_eq!(
            fs.contents(Path::new("/v/a")).unwrap(),
            b"",
            "but not from the device"
        );
        fs.crash();
        assert_eq!(
            fs.contents(Path::new("/v/a")).unwrap(),
            b"",
            "never durable"
        );
    }

    #[test]
    fn a_full_volume_refuses_growth_and_changes_nothing() {
        let fs = SimFs::new(5);
        fs.set_faults(SimFaults {
            capacity_bytes: 10,
            ..SimFaults::NONE
        });
        let f = file(&fs, "/v/a");
        f.write_all_at(b"0123456789", 0).unwrap();
        assert_eq!(
            f.write_all_at(b"x", 10).unwrap_err().raw_os_error(),
            Some(28)
        );
        f.write_all_at(b"ab", 0).unwrap();
        assert_eq!(fs.contents(Path::new("/v/a")).unwrap(), b"ab23456789");
    }

    #[test]
    fn the_same_seed_makes_the_same_crash() {
        let run = |seed| {
            let fs = SimFs::new(seed);
            fs.set_faults(SimFaults {
                tear_per_million: 500_000,
                ..SimFaults::NONE
            });
            let f = file(&fs, "/v/a");
            fs.sync_dir(Path::new("/v")).unwrap();
            for i in 0..50u64 {
                f.write_all_at(&[i as u8; 100], i * 100).unwrap();
            }
            fs.crash();
            fs.contents(Path::new("/v/a")).unwrap()
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }
}
