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

/// Environment variable naming a point at which the coordinator aborts itself, as `kill -9`
/// would (crash tests of the real binary): `after-commit-round-N` aborts right after round N
/// is committed (its model and ledger row durable), before the model is handed to anyone.
pub const FAILPOINT_ENV: &str = "FEDFLOW_FAILPOINT";

/// Aborts the process when [`FAILPOINT_ENV`] names `name`.
pub(crate) fn failpoint(name: &str) {
    if std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == name) {
        eprintln!("{FAILPOINT_ENV}={name}: aborting");
        std::process::abort();
    }
}
