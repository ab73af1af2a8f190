//! The process server in the simulation: its durable cache on a simulated volume, fed by
//! the agent's frames and drained to the master target, with the rules of its ingest and
//! uplink (resume points, group commit, attach, trim) replayed step by step.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use process_server::cache::DiskCache;
use store::{FileSystem, SimFaults, SimFs};
use wire_protocol::{Compression, Message, MessageCodec};

use crate::model::span;
use crate::mt::injected;

fn cache_dir() -> PathBuf {
    PathBuf::from("/cache/disk-7")
}

/// The Azure-side machine.
pub struct Ps {
    pub fs: SimFs,
    pub faults: SimFaults,
    pub cache: Option<DiskCache>,
    /// The disk was added once (its starting position is recorded then).
    added: bool,
    codec: MessageCodec,
}

/// What ingest did with one frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Ingest {
    /// Appended (durable at the next sync).
    Appended,
    /// A resend of what the cache holds.
    Held,
    /// Not the next LSN: the agent must send from here.
    Gap(u64),
    /// The cache does not know where the stream stands: wait for the master target.
    NotReady,
    /// The volume is full: the agent is held back until the uplink makes room.
    Full,
    /// An injected error: not acknowledged (the agent hears an error).
    Failed,
}

impl Ps {
    pub fn new(seed: u64, rng: &mut fastrand::Rng) -> Ps {
        let fs = SimFs::new(seed ^ 0x7073);
        fs.create_dir_all(Path::new("/cache")).unwrap();
        Ps {
            fs,
            faults: SimFaults {
                eio_per_million: [0, 0, 2_000, 10_000][rng.usize(..4)],
                capacity_bytes: rng.u64(64 << 10..4 << 20),
                tear_per_million: 300_000,
            },
            cache: None,
            added: false,
            // Frames as the agent sends them: raw, or zstd (`--compression-level`); the
            // cache keeps them as received either way.
            codec: MessageCodec::new(match rng.u32(..3) {
                0 => Compression::None,
                l => Compression::Zstd(l as i32),
            }),
        }
    }

    /// Opens the cache (the service's start). `Ok(false)`: an injected fault stopped it.
    pub fn start(&mut self) -> Result<bool, String> {
        let opened = DiskCache::open_in(Arc::new(self.fs.clone()), &cache_dir(), 0);
        let mut cache = match opened {
            Ok(c) if !self.fs.crashed() => c,
            Ok(_) => return Ok(false),
            Err(e) if self.fs.crashed() || injected(&e.to_string()) => return Ok(false),
            Err(e) => return Err(format!("process server cache recovery failed: {e}")),
        };
        if !self.added {
            // A new disk records its starting position (state.rs add_disk).
            match cache.confirm_position() {
                Ok(()) if !self.fs.crashed() => self.added = true,
                Ok(()) => return Ok(false),
                Err(e) if self.fs.crashed() || injected(&e.to_string()) => return Ok(false),
                Err(e) => return Err(format!("confirm_position: {e}")),
            }
        }
        self.cache = Some(cache);
        Ok(true)
    }

    /// The LSN an agent that (re)connects is told the cache holds durably (the agent
    /// drops what it holds up to there: an ack).
    pub fn resume_lsn(&self) -> Option<u64> {
        let c = self.cache.as_ref()?;
        c.position_known().then(|| c.durable_lsn())
    }

    /// Takes one frame from the agent (ingest's append rules).
    pub fn ingest(&mut self, msg: &Message) -> Ingest {
        let frame = self.codec.encode_to_bytes(msg).expect("encodes");
        let cache = self.cache.as_mut().expect("running");
        let (first, last, ts) = span(msg);
        let next = cache.last_lsn() + 1;
        if !cache.position_known() {
            return Ingest::NotReady;
        }
        if last < next {
            return Ingest::Held;
        }
        if first != next {
            return Ingest::Gap(next);
        }
        match cache.append(first, last, ts, &frame) {
            Ok(()) => Ingest::Appended,
            Err(e) if e.is_out_of_space() => Ingest::Full,
            Err(_) => Ingest::Failed,
        }
    }

    /// Group commit: `Some(lsn)` is acknowledged to the agent as durable.
    pub fn sync(&mut self) -> Option<u64> {
        let cache = self.cache.as_mut().expect("running");
        cache.sync().ok().map(|()| cache.last_lsn())
    }

    /// The master target holds the disk up to `lsn` (attach): what the uplink's
    /// `attached` does. Any range the cache must call lost is a failure here: the
    /// simulator damages nothing at rest, so a lost range is lost data.
    pub fn attached(&mut self, lsn: u64) -> Result<bool, String> {
        let cache = self.cache.as_mut().expect("running");
        if let Some((a, b)) = cache.remote_behind(lsn) {
            return Err(format!(
                "the master target holds lsn {lsn}, behind what the cache let go of: {a}..={b} lost"
            ));
        }
        match cache.adopt_remote(lsn) {
            Ok(Some((a, b))) => Err(format!(
                "the master target is ahead of the cache at {lsn}: {a}..={b} would be lost"
            )),
            Ok(None) => Ok(cache.trim(lsn).is_ok()),
            Err(_) => Ok(false),
        }
    }

    /// The master target acknowledged `lsn`: trim.
    pub fn durable(&mut self, lsn: u64) -> bool {
        self.cache.as_mut().expect("running").trim(lsn).is_ok()
    }

    /// Up to `max` messages to ship from `from` on, read back from the cache, with their
    /// cached size. `Err` for a record that does not read back (nothing at rest is damaged
    /// here: a bug).
    pub fn read_from(&mut self, from: u64, max: usize) -> Result<Vec<(Message, u64)>, String> {
        let cache = self.cache.as_ref().expect("running");
        let mut out = Vec::new();
        // As the uplink: only what the cache holds durably leaves.
        let durable = cache.durable_lsn();
        for e in cache
            .entries_from(from, max)
            .into_iter()
            .filter(|e| e.last_lsn <= durable)
        {
            if e.lost {
                return Err(format!(
                    "cache entry {}..={} marked lost",
                    e.first_lsn, e.last_lsn
                ));
            }
            match cache.read(&e) {
                Ok(f) => out.push((
                    self.codec.decode_frame(f).map_err(|e| e.to_string())?,
                    u64::from(e.frame_len),
                )),
                Err(err) if injected(&format!("{err:?} {err}")) => break,
                Err(err) => return Err(format!("cache record does not read back: {err}")),
            }
        }
        Ok(out)
    }
}
