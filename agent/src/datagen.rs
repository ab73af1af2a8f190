//! Write content: deterministic and of a chosen compressibility, or drawn from a real file.
//!
//! Traces carry no data, so the replayer makes it: write `k` of a run with seed `s` is
//! always the same bytes, so any run can be reproduced and any image verified. Synthetic
//! content: each 4 KiB piece is pseudo-random (blake3's XOF keyed by seed and write) with
//! its last `compressibility` fraction zeroed: zstd then shrinks the data by about that
//! fraction (0.5 gives about 2:1). Real content (`--content FILE`): write `k` is the bytes
//! of FILE from a 4 KiB-aligned position the seed and `k` pick (wrapping at its end), so a
//! disk image or an OS tree's files give the compression ratios and speeds of real data,
//! and a run is still reproducible.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Granularity of the compressible pattern, and the alignment of content drawn from a file.
const PIECE_BYTES: usize = 4096;

/// Fills `buf` with the content of write `index` of a run with `seed`.
pub fn fill(seed: u64, index: u64, compressibility: f64, buf: &mut [u8]) {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&index.to_le_bytes());
    blake3::Hasher::new_keyed(&key).finalize_xof().fill(buf);
    let c = compressibility.clamp(0.0, 1.0);
    for piece in buf.chunks_mut(PIECE_BYTES) {
        let keep = ((piece.len() as f64) * (1.0 - c)).round() as usize;
        piece[keep..].fill(0);
    }
}

/// Where a replay's write content comes from.
#[derive(Debug)]
pub enum Content {
    /// [`fill`] with this seed and compressibility.
    Synthetic {
        /// The run's seed.
        seed: u64,
        /// 0.0 (random) to 1.0 (zeros).
        compressibility: f64,
    },
    /// Bytes of a real file.
    File {
        /// The file, open for reading.
        file: std::fs::File,
        /// Its path, for errors.
        path: PathBuf,
        /// Its length, at least [`PIECE_BYTES`].
        len_bytes: u64,
        /// The run's seed (which positions are drawn).
        seed: u64,
    },
}

impl Content {
    /// Content drawn from `path` (a disk image, an archive, any file of real data).
    pub fn from_file(path: &Path, seed: u64) -> Result<Content> {
        let file =
            std::fs::File::open(path).ctx(|| format!("open --content {}", path.display()))?;
        let len_bytes = file
            .metadata()
            .ctx(|| format!("stat --content {}", path.display()))?
            .len();
        if len_bytes < PIECE_BYTES as u64 {
            return Err(Error::InvalidParameter {
                param: "content",
                reason: format!(
                    "{} holds {len_bytes} bytes; content is drawn in 4 KiB pieces, so it needs at least 4096 (a disk image or an archive of real files serves best)",
                    path.display()
                ),
            });
        }
        Ok(Content::File {
            file,
            path: path.to_owned(),
            len_bytes,
            seed,
        })
    }

    /// Fills `buf` with the content of write `index`.
    pub fn fill(&self, index: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Content::Synthetic {
                seed,
                compressibility,
            } => {
                fill(*seed, index, *compressibility, buf);
                Ok(())
            }
            Content::File {
                file,
                path,
                len_bytes,
                seed,
            } => {
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&seed.to_le_bytes());
                key[8..16].copy_from_slice(&index.to_le_bytes());
                let h = blake3::keyed_hash(&key, b"content position");
                let pick = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
                let mut at = pick % (len_bytes / PIECE_BYTES as u64) * PIECE_BYTES as u64;
                let mut done = 0;
                while done < buf.len() {
                    let n = ((len_bytes - at) as usize).min(buf.len() - done);
                    file.read_exact_at(&mut buf[done..done + n], at)
                        .ctx(|| format!("read --content {}", path.display()))?;
                    done += n;
                    at = 0; // wraps at the file's end
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_compressible_as_asked() {
        let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        fill(7, 3, 0.5, &mut a);
        fill(7, 3, 0.5, &mut b);
        assert_eq!(a, b);
        fill(7, 4, 0.5, &mut b);
        assert_ne!(a, b);
        let ratio = a.len() as f64 / zstd::bulk::compress(&a, 1).unwrap().len() as f64;
        assert!((1.8..2.3).contains(&ratio), "ratio {ratio}");
        fill(7, 3, 0.0, &mut a);
        let ratio = a.len() as f64 / zstd::bulk::compress(&a, 1).unwrap().len() as f64;
        assert!(ratio < 1.05, "ratio {ratio}");
    }

    #[test]
    fn file_content_is_the_files_bytes_reproducibly_and_wraps() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("real");
        let data: Vec<u8> = (0..3 * PIECE_BYTES as u32).map(|i| (i / 7) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let c = Content::from_file(&p, 5).unwrap();
        let mut seen = std::collections::HashSet::new();
        for index in 0..64 {
            let mut buf = vec![0u8; 2 * PIECE_BYTES + 100];
            c.fill(index, &mut buf).unwrap();
            let mut again = vec![0u8; buf.len()];
            c.fill(index, &mut again).unwrap();
            assert_eq!(buf, again, "reproducible");
            // The file from a 4 KiB-aligned start, continuing from its beginning.
            let start = (0..3)
                .map(|k| k * PIECE_BYTES)
                .find(|&s| data[s..s + 64] == buf[..64])
                .expect("starts at a piece of the file");
            let wrapped: Vec<u8> = data
                .iter()
                .cycle()
                .skip(start)
                .take(buf.len())
                .copied()
                .collect();
            assert_eq!(buf, wrapped);
            seen.insert(start);
        }
        assert_eq!(seen.len(), 3, "every piece is drawn");
        std::fs::write(&p, b"tiny").unwrap();
        let e = Content::from_file(&p, 5).unwrap_err().to_string();
        assert!(e.contains("at least 4096"), "{e}");
    }
}
