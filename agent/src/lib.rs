//! The agent: the source side of failback.
//!
//! # Layout
//! - [`trace`]: block trace readers (MSR CSV, DiskSim ms/ns, CloudPhysics vscsi, blkparse).
//! - [`datagen`]: deterministic write content of a chosen compressibility.
//! - [`source`]: the source disk with per-block digests kept current; disk digests.
//! - [`link`]: the mutual-TLS link to the process server, with a bounded resend buffer.
//! - [`stream`]: the pure core: batching with LSNs, the resend window, dirty regions.
//! - [`engine`]: the engine around it: capture, bookmarks, outages, resync.
//! - [`replay`]: a trace through the engine, with mapping and pacing.
//! - [`capture`], [`protect`]: a live disk served through FUSE, every write captured.
//! - [`control`]: the running agent's socket for `agent bookmark`.
//! - [`cli`].
//!
//! # Design constraints
//! - Every write is kept until the process server acknowledges it, in a buffer bounded by
//!   `--buffer`; past that, dirty regions are tracked and resent, so replication ends exact.
//! - Resync and dirty-region resends travel in the same LSN stream as live writes, so the
//!   newest content always lands last.

pub mod capture;
pub mod cli;
pub mod control;
pub mod datagen;
pub mod engine;
pub mod error;
pub mod freeze;
pub mod hold;
pub mod link;
pub mod protect;
pub mod replay;
pub mod source;
pub mod stream;
pub mod trace;

pub use error::{Error, Result};
