//! `fedflow-coordinator`: the organisation's side of a federation.
//!
//! Built so far: [`config`] (the run configuration file, `RunConfig`, validated before a run
//! starts) and [`strategy`] (how sites are chosen and updates combined, in the spirit of
//! Flower's `configure_train` / `aggregate_train`). The round state machine, persistence and
//! the gRPC server follow (issue 3).

pub mod config;
pub mod error;
pub mod strategy;

pub use error::{Error, Result};
