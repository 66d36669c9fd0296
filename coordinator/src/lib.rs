//! `fedflow-coordinator`: the organisation's side of a federation.
//!
//! - [`config`]: the run configuration file ([`config::RunConfig`]), validated before a run
//!   starts; every error names its field.
//! - [`strategy`]: how sites are chosen and updates combined, in the spirit of Flower's
//!   `configure_train` / `aggregate_train` (FedAvg, FedAvgM).
//! - [`round`]: the round engine, the run's state machine driven by explicit events and
//!   times (no clock of its own), with site-level DP and operator actions.
//! - [`store`]: the durable state: runs, rounds, per-site outcomes, the privacy ledger,
//!   revocations and model checkpoints in SQLite plus safetensors files, so a crash resumes
//!   at the last committed round.
//! - [`service`]: the gRPC face (`Federation` for sites, `Admin` for operators) over the one
//!   thread that owns the engine; [`service::status`] is where errors become gRPC statuses.
//! - [`security`]: certificates, mutual TLS, identities, revocation, per-caller limits and
//!   the hash-chained audit log.
//! - [`audit`] and [`run_report`]: the privacy-audit report and the run report (HTML).
//! - [`handover`]: the package a new partner site receives (CA certificate, address,
//!   vocabulary, a `site.toml`, the run's terms in plain words).
//! - [`backup`]: a consistent backup of the data directory while the coordinator serves,
//!   and its restore.
//! - [`metrics`]: what sites report and its weighted summaries.
//! - [`memtrace`]: prints the process's memory at fixed points when `FEDFLOW_MEMTRACE` is
//!   set (for the overhead benchmark's breakdown).
//! - [`error`]: the crate's one error type.

pub mod audit;
pub mod backup;
pub mod config;
pub mod error;
pub mod handover;
pub mod memtrace;
pub mod metrics;
pub mod round;
pub mod run_report;
pub mod security;
pub mod service;
pub mod store;
pub mod strategy;
pub mod versions;

pub use error::{Error, Result};

pub use fedflow_common::failpoint::FAILPOINT_ENV;
pub(crate) use fedflow_common::failpoint::failpoint;
