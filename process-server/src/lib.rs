//! The process server: the Azure end of failback.
//!
//! # Layout
//! - [`cache`]: the durable, segmented, checksummed per-disk cache log.
//! - [`ingest`]: agent connections (mutual TLS): cache, group-commit fsync, ack, relay.
//! - [`uplink`]: the link to the master target: resume, parallel compression, window, trim.
//! - [`coalesce`]: dropping overwritten data inside a batch (no I/O).
//! - [`pace`]: the bandwidth limit as a token bucket on the caller's clock (no I/O).
//! - [`shipper`]: per-disk cursor, in-flight window, rewinds and refusals (no I/O).
//! - [`requests`]: which relayed request each answer of the master target belongs to (no I/O).
//! - [`commands`]: the operator's commands against a running process server.
//! - [`state`], [`config`], [`metrics`], [`cli`].
//!
//! # Design constraints
//! - An agent's batch is acknowledged only once fsynced in the cache.
//! - A cached record leaves the cache only once the master target has acknowledged it.
//! - Memory is bounded whatever the backlog: records live on disk; memory holds an index
//!   entry per record, at most `window` bytes in flight, and a bounded number of jobs.
//! - A full cache makes agents wait; nothing is dropped.

pub mod adaptive;
pub mod cache;
pub mod cli;
pub mod coalesce;
pub mod commands;
pub mod config;
pub mod cuts;
pub mod error;
pub mod groups;
pub mod ingest;
pub mod merge;
pub mod metrics;
pub mod pace;
pub mod requests;
pub mod shipper;
pub mod state;
pub mod uplink;

pub use error::{Error, Result};
