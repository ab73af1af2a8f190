//! What every failback service shares at run time.
//!
//! # Layout
//! - [`tls`]: mutual TLS configurations, per-identity certificates (`failback://ROLE/NAME`)
//!   and issuing them from the deployment's CA.
//! - [`net`]: a guarded listener (bounded handshakes, identity and role checks, Hello,
//!   connection slots) and a client connect with the same steps; jittered backoff.
//! - [`admin`]: the admin HTTP endpoint (hyper) with timeouts and POST-only state changes.
//! - [`lock`]: one instance per directory.
//! - [`log`]: logging set-up (colour only on a terminal) and throttled warnings.
//! - [`units`]: sizes, rates and range checks as operators write them.
//! - [`config`]: the one TOML configuration loader.
//! - [`metrics`], [`cli`].
//!
//! # Design constraints
//! - Every wait has a named timeout and every queue or table a named bound.
//! - Errors say whether retrying can help ([`Error::retry`]), by type, never by text.

pub mod admin;
pub mod cli;
pub mod config;
pub mod error;
pub mod lock;
pub mod log;
pub mod metrics;
pub mod net;
pub mod tls;
pub mod units;

pub use error::{Error, IoContext, Result};
