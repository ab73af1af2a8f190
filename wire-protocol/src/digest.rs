//! The disk digest: one definition shared by everyone who states what a disk holds.
//!
//! ```text
//! block_digest(i) = blake3(disk[i * BLOCK .. min((i + 1) * BLOCK, size)])   // the last block may be short
//! disk_digest     = blake3(block_digest(0) || block_digest(1) || ...)
//! ```
//! The agent records it at every bookmark, the master target prints it for every export, and
//! `agent digest IMAGE` computes it for any file: the three agree exactly when the disks do.
//! Resync compares the same block digests. Cheap at any disk size: blocks hash in parallel.

/// Bytes per digest block (and per resync block).
pub const DIGEST_BLOCK_BYTES: u64 = 64 << 10;

/// The digest of one block.
pub fn block_digest(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// The disk digest of a disk's block digests, in block order.
pub fn disk_digest(block_digests: &[[u8; 32]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for d in block_digests {
        h.update(d);
    }
    *h.finalize().as_bytes()
}

/// Lowercase hex of a digest.
pub fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_depends_on_every_block_and_their_order() {
        let a = block_digest(b"a");
        let b = block_digest(b"b");
        assert_ne!(disk_digest(&[a, b]), disk_digest(&[b, a]));
        assert_ne!(disk_digest(&[a]), disk_digest(&[a, a]));
        assert_eq!(hex(&[0xab; 32]).len(), 64);
    }
}
