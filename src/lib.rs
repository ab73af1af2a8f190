//! The root package of failback: the demo and the harness that runs the real services as
//! separate processes on loopback (used by the demo and by the end-to-end tests).

pub mod cleanup;
pub mod harness;
pub mod live;
pub mod relay;
