//! The one error type of `fedflow-client`.

use std::path::PathBuf;

/// Everything that can go wrong in the client library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from the shared core (data, model, training, parameters).
    #[error(transparent)]
    Common(#[from] fedflow_common::Error),
    /// A configuration file could not be read or parsed.
    #[error("config {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The request itself is inconsistent (e.g. no data files).
    #[error("{0}")]
    Usage(String),
}

/// Result alias for `fedflow-client`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
