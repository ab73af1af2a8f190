//! The source disk: the failed-over VM's disk, as a file the agent owns, with per-block
//! digests kept up to date as writes land (see the design constraints for when).
//!
//! The disk digest is blake3 over the concatenated per-block blake3 digests
//! ([`DIGEST_BLOCK_BYTES`] blocks, the last one possibly short). [`image_digest`] computes
//! the same over any image file, so a recovery point exported by the master target can be
//! checked against the digest the agent recorded at its bookmark, cheaply at any disk size.
//!
//! # Design constraints
//! - A write that covers a block whole is hashed from the write itself. A block a write
//!   covers in part has to be read back and hashed whole (64 KiB for a 4 KiB write), so
//!   it is only marked stale: up to [`MAX_STALE_BLOCKS`] stale blocks wait and are then
//!   hashed together, each once however many writes touched it meanwhile (the churn trace
//!   hashes a third as many blocks as it has partial writes), on the cores in parallel.
//! - Whoever reads the digests (a bookmark, a cut, a differential resync) brings them up
//!   to date first, so a digest never lags the disk. The bound keeps that catch-up short:
//!   a cut computes the disk digest while the filesystem is frozen.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};

pub use wire_protocol::digest::{hex, DIGEST_BLOCK_BYTES};

/// Blocks written in part whose digests may wait: 4 MiB to read back and hash when they
/// are brought up to date, about 2 ms on one core here, which bounds what a bookmark or a
/// frozen cut adds for them. (4 in unit tests: their small disks reach the bound, in the
/// middle of a write too.)
pub const MAX_STALE_BLOCKS: usize = if cfg!(test) { 4 } else { 64 };

/// The source disk.
#[derive(Debug)]
pub struct SourceDisk {
    file: File,
    path: PathBuf,
    size_bytes: u64,
    digests: Vec<[u8; 32]>,
    /// Blocks whose digest is out of date (each once), at most [`MAX_STALE_BLOCKS`].
    stale: Vec<u64>,
}

/// Per-block digests of `len` bytes of `file`, in parallel.
pub fn block_digests(file: &File, len: u64, block: u64) -> Result<Vec<[u8; 32]>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: read-only mapping of a file this process owns; nothing writes it while the
    // digests are computed (the source disk is hashed before replay starts writing).
    let map = unsafe { memmap2::Mmap::map(file) }.ctx(|| "map the disk for hashing".into())?;
    let n = len.div_ceil(block);
    Ok((0..n)
        .into_par_iter()
        .map(|i| {
            let start = (i * block) as usize;
            let end = ((i + 1) * block).min(len) as usize;
            wire_protocol::digest::block_digest(&map[start..end])
        })
        .collect())
}

/// The disk digest of per-block digests (see [`wire_protocol::digest`]).
pub fn digest_of(digests: &[[u8; 32]]) -> [u8; 32] {
    wire_protocol::digest::disk_digest(digests)
}

/// The disk digest of an image file (raw, or a VMDK's flat extent).
pub fn image_digest(path: &Path) -> Result<[u8; 32]> {
    let f = File::open(path).ctx(|| format!("open {}", path.display()))?;
    let len = f
        .metadata()
        .ctx(|| format!("stat {}", path.display()))?
        .len();
    Ok(digest_of(&block_digests(&f, len, DIGEST_BLOCK_BYTES)?))
}

impl SourceDisk {
    /// Opens `path` and hashes it; with `create`, a missing disk is made (zeroed, of
    /// `size_bytes`).
    pub fn open(path: &Path, size_bytes: u64, create: bool) -> Result<SourceDisk> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            // A disk's content is the VM's data: only its owner reads it.
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::NotFound {
                    " (pass --create-source to start from an empty disk)"
                } else {
                    ""
                };
                Error::Io {
                    context: format!("open source disk {}{hint}", path.display()),
                    source: e,
                }
            })?;
        // One agent per source image: a second one (another disk id, another state
        // directory) would write it behind the first one's back, and the first would never
        // stream those writes.
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::InvalidParameter {
                    param: "source",
                    reason: format!("{} is in use by another agent (it holds the image's lock): one agent per source disk; stop the other one first", path.display()),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::Io {
                    context: format!("lock {}", path.display()),
                    source: e,
                })
            }
        }
        let len = file
            .metadata()
            .ctx(|| format!("stat {}", path.display()))?
            .len();
        if len == 0 {
            file.set_len(size_bytes)
                .ctx(|| format!("size {}", path.display()))?;
        } else if len != size_bytes {
            return Err(Error::InvalidParameter {
                param: "disk-size",
                reason: format!("{} holds {len} bytes, not {size_bytes}", path.display()),
            });
        }
        let digests = block_digests(&file, size_bytes, DIGEST_BLOCK_BYTES)?;
        Ok(SourceDisk {
            file,
            path: path.into(),
            size_bytes,
            digests,
            stale: Vec::with_capacity(MAX_STALE_BLOCKS),
        })
    }

    /// Where the image is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Per-block digests, brought up to date.
    pub fn digests(&mut self) -> Result<&[[u8; 32]]> {
        self.refresh()?;
        Ok(&self.digests)
    }

    /// The disk digest now.
    pub fn disk_digest(&mut self) -> Result<[u8; 32]> {
        self.refresh()?;
        Ok(digest_of(&self.digests))
    }

    /// Writes `data` at `offset` and rehashes the blocks it touched.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_data(offset, data)?;
        self.rehash(offset, data)
    }

    /// Writes `data` at `offset`, leaving the digests of the blocks it touched stale until
    /// [`SourceDisk::rehash`] (live capture answers the kernel in between).
    pub fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        assert!(
            offset + data.len() as u64 <= self.size_bytes,
            "callers map writes into the disk"
        );
        self.file
            .write_all_at(data, offset)
            .ctx(|| format!("write {}", self.path.display()))
    }

    /// Upkeep of the digests of the blocks `data` (written at `offset`) touched: those it
    /// covers whole are hashed from it now, the others are marked stale (see the module's
    /// design constraints).
    pub fn rehash(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / DIGEST_BLOCK_BYTES;
        let last = (offset + data.len() as u64 - 1) / DIGEST_BLOCK_BYTES;
        for b in first..=last {
            let start = b * DIGEST_BLOCK_BYTES;
            let end = (start + DIGEST_BLOCK_BYTES).min(self.size_bytes);
            if start >= offset && end <= offset + data.len() as u64 {
                let block = &data[(start - offset) as usize..(end - offset) as usize];
                self.digests[b as usize] = wire_protocol::digest::block_digest(block);
                // A stale mark left on it only costs one more hash of the same bytes.
            } else if !self.stale.contains(&b) {
                if self.stale.len() == MAX_STALE_BLOCKS {
                    self.refresh()?;
                }
                self.stale.push(b);
            }
        }
        Ok(())
    }

    /// Reads back and hashes every stale block, on the cores in parallel.
    fn refresh(&mut self) -> Result<()> {
        if self.stale.is_empty() {
            return Ok(());
        }
        let fresh: Vec<(u64, [u8; 32])> = self
            .stale
            .par_iter()
            .map_init(
                || vec![0u8; DIGEST_BLOCK_BYTES as usize],
                |buf, &b| {
                    Ok((
                        b,
                        wire_protocol::digest::block_digest(self.read_block(b, buf)?),
                    ))
                },
            )
            .collect::<Result<_>>()?;
        for (b, d) in fresh {
            self.digests[b as usize] = d;
        }
        self.stale.clear();
        Ok(())
    }

    /// Reads block `b` into `buf`, returning the part that is on the disk.
    pub fn read_block<'a>(&self, b: u64, buf: &'a mut [u8]) -> Result<&'a [u8]> {
        let start = b * DIGEST_BLOCK_BYTES;
        let l = DIGEST_BLOCK_BYTES.min(self.size_bytes - start) as usize;
        self.file
            .read_exact_at(&mut buf[..l], start)
            .ctx(|| format!("read {}", self.path.display()))?;
        Ok(&buf[..l])
    }

    /// Another handle on the image, for reads from another thread (positioned reads share
    /// no file offset).
    pub fn reader(&self) -> Result<File> {
        self.file
            .try_clone()
            .ctx(|| format!("open {} again", self.path.display()))
    }

    /// Number of digest blocks.
    pub fn blocks(&self) -> u64 {
        self.digests.len() as u64
    }

    /// Makes the disk durable (the agent's own bookkeeping, not the replication's).
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .ctx(|| format!("fsync {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The digests kept up to date write by write (whole blocks hashed from the write, the
        /// edges marked stale and read back when the digests are read) equal a fresh hash of the image.
        #[test]
        fn kept_digests_equal_a_fresh_hash(
            writes in proptest::collection::vec((0u64..(1 << 20), 1usize..300_000, any::<u8>()), 1..12)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("d.img");
            // Not a whole number of blocks: the last block is short.
            let size = (1 << 20) + 4096;
            let mut d = SourceDisk::open(&path, size, true).unwrap();
            for (offset, len, byte) in writes {
                let len = len.min((size - offset) as usize);
                // Content that differs along the write: a block hashed from the wrong
                // part of it shows.
                let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8 ^ byte).collect();
                d.write(offset, &data).unwrap();
            }
            prop_assert_eq!(d.disk_digest().unwrap(), image_digest(&path).unwrap());
        }
    }

    /// Small writes over far more blocks than may wait stale: the digests read between
    /// them (as a bookmark reads them) and at the end equal a fresh hash of the image, and
    /// no more than the bound ever waits.
    #[test]
    fn stale_blocks_are_bounded_and_caught_up_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let blocks = 4 * MAX_STALE_BLOCKS as u64;
        let mut d = SourceDisk::open(&path, blocks * DIGEST_BLOCK_BYTES, true).unwrap();
        for i in 0..1000u64 {
            // A 4 KiB write in a block picked by a multiplicative hash: blocks repeat.
            let b = (i * 2_654_435_761) % blocks;
            let data = vec![(i % 251) as u8; 4096];
            d.write(b * DIGEST_BLOCK_BYTES + (i % 16) * 4096, &data)
                .unwrap();
            assert!(d.stale.len() <= MAX_STALE_BLOCKS);
            if i % 333 == 0 {
                assert_eq!(d.disk_digest().unwrap(), image_digest(&path).unwrap());
                assert!(d.stale.is_empty(), "read: up to date");
            }
        }
        assert_eq!(d.disk_digest().unwrap(), image_digest(&path).unwrap());
    }
}
