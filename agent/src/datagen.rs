//! Deterministic write content with a chosen compressibility.
//!
//! Traces carry no data, so the replayer makes it: write `k` of a run with seed `s` is
//! always the same bytes, so any run can be reproduced and any image verified. Each 4 KiB
//! piece is pseudo-random (blake3's XOF keyed by seed and write) with its last
//! `compressibility` fraction zeroed: zstd then shrinks the data by about that fraction
//! (0.5 gives about 2:1).

/// Granularity of the compressible pattern.
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
}
