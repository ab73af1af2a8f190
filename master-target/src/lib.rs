//! The master target: the on-premises end of failback.
//!
//! # Layout
//! - [`vmdk`]: descriptors (ESXi `vmfs` and qemu `monolithicFlat`), refusal of sparse and
//!   snapshot disks, creation of new disks (alternate location).
//! - [`datastore`]: the datastore directories, the only places a peer's paths can reach.
//! - [`disk`]: a disk's data file under an exclusive lock.
//! - [`journal`]: the retention journal (undo records, commits, recovery points) and its
//!   crash recovery.
//! - [`apply`]: validation and write-ahead apply of a disk's stream (no networking).
//! - [`core`]: one disk's apply decisions (check, apply, answer), free of threads and
//!   clocks: the worker and the simulator drive the same code.
//! - [`service`]: attach rules and one apply worker per disk (group commit).
//! - [`server`]: the mutual-TLS network shell.
//! - [`export`]: listing points and exporting a disk at a point.
//! - [`retention`]: the retention volume rules.
//! - [`uring`]: the apply path's disk I/O (io_uring, or syscalls).
//! - [`config`], [`cli`], [`metrics`].
//!
//! # Design constraints
//! - An ack means durable: a batch's LSN is acknowledged only after its commit record is
//!   fsynced, and the commit is written only after the disk is fsynced.
//! - Nothing half-applied is visible after a crash: the journal rolls back uncommitted writes.
//! - The disk is never written with data whose blake3 digest does not match.
//! - Bounded memory: per-disk queues of [`service::DISK_QUEUE_DEPTH`] batches, groups of at
//!   most [`service::MAX_GROUP_BYTES`], at most [`service::MAX_DISKS`] disks.

pub mod admin;
pub mod apply;
pub mod cli;
pub mod config;
pub mod core;
pub mod datastore;
pub mod disk;
pub mod error;
pub mod export;
pub mod extents;
pub mod group_export;
pub mod groups;
pub mod journal;
pub mod metrics;
pub mod registry;
pub mod retention;
pub mod server;
pub mod service;
pub mod uring;
pub mod vmdk;

pub use error::{Error, Result};
