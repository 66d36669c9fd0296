//! The one error type of `fedflow-coordinator`.

use std::path::PathBuf;

/// Everything that can go wrong in the coordinator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from the shared core (parameters, aggregation, files).
    #[error(transparent)]
    Common(#[from] fedflow_common::Error),
    /// The run configuration is invalid; the message names the field.
    #[error("run config {path}: {reason}")]
    Config {
        /// The configuration file (or `<memory>`).
        path: PathBuf,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// The strategy could not act (e.g. nothing to aggregate).
    #[error("strategy: {0}")]
    Strategy(String),
    /// The durable store refused an operation (unknown run, round out of order, ...) or
    /// found its files inconsistent; the message names the run, round or file.
    #[error("store: {0}")]
    Store(String),
    /// A certificate, key, TLS setting or the security audit log is unusable; the message
    /// names the file and says what to do.
    #[error("security: {0}")]
    Security(String),
    /// The store's SQLite database failed.
    #[error("store database: {0}")]
    Database(#[from] rusqlite::Error),
}

/// Result alias for `fedflow-coordinator`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
