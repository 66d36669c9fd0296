//! `fedflow-coordinator`: the organisation's side of a federation.
//!
//! Built so far: [`config`] (the run configuration file, `RunConfig`, validated before a run
//! starts), [`strategy`] (how sites are chosen and updates combined, in the spirit of
//! Flower's `configure_train` / `aggregate_train`) and [`store`] (the durable state: runs,
//! rounds, per-site outcomes and checkpoints in SQLite plus safetensors files, so a crash
//! resumes at the last committed round) and [`round`] (the round engine: the run's state
//! machine, driven by explicit events and times). The task that owns the engine and the gRPC
//! server follow (issue 3). [`memtrace`] prints the process's memory at fixed points when
//! `FEDFLOW_MEMTRACE` is set (for the overhead benchmark's breakdown).

pub mod audit;
pub mod config;
pub mod error;
pub mod memtrace;
pub mod metrics;
pub mod round;
pub mod run_report;
pub mod security;
pub mod service;
pub mod store;
pub mod strategy;

pub use error::{Error, Result};

pub use fedflow_common::failpoint::FAILPOINT_ENV;
pub(crate) use fedflow_common::failpoint::failpoint;
