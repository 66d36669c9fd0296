//! The one error type of `fedflow-coordinator`, typed from where a failure happens to the
//! one place that turns it into a gRPC status (`service::status`).

use std::path::PathBuf;

use crate::round::rejection::Rejection;

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
    /// The configuration given to resume a run differs from the one it was created with;
    /// the message names the differing fields.
    #[error("{0}")]
    ConfigMismatch(String),
    /// The strategy could not act (e.g. nothing to aggregate).
    #[error("strategy: {0}")]
    Strategy(String),
    /// The durable store refused an operation (unknown run, round out of order, ...) or
    /// found its files inconsistent; the message names the run, round or file.
    #[error("store: {0}")]
    Store(String),
    /// The store's SQLite database failed.
    #[error("store database: {0}")]
    Database(#[from] rusqlite::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A value could not be turned into JSON or read back from it.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A certificate, key, TLS setting or the security audit log is unusable; the message
    /// names the file and says what to do.
    #[error("security: {0}")]
    Security(String),
    /// The caller presented no usable identity (no client certificate, an expired or
    /// unreadable one).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's identity or role may not do this (another role, a revoked certificate,
    /// another site's name).
    #[error("{0}")]
    Forbidden(String),
    /// The caller went past a limit that waiting does not lift (the size of an update).
    #[error("{0}")]
    Limited(String),
    /// The caller calls too fast or too often at once; it may call again after
    /// `retry_after` (sent to it as a pushback).
    #[error("{reason}; retry in {} ms", retry_after.as_millis().max(1))]
    SlowDown {
        /// Which limit, in words.
        reason: String,
        /// When the same call would be admitted.
        retry_after: std::time::Duration,
    },
    /// A request carries a malformed value; the message names the field.
    #[error("{0}")]
    BadRequest(String),
    /// A requested offset lies past the end of what is served.
    #[error("{0}")]
    OutOfRange(String),
    /// What the request names does not exist (a run, a model hash).
    #[error("{0}")]
    NotFound(String),
    /// The request cannot be served as the run stands (an operator action on a stopped
    /// run, a site whose data uses another vocabulary).
    #[error("{0}")]
    Refused(String),
    /// The caller took longer than allowed (an upload past its time limit).
    #[error("{0}")]
    TimedOut(String),
    /// The coordinator is shutting down: its round engine no longer answers.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// A site's update, evaluation or decline was refused by the round engine.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// An upload was refused while it arrived, or its stream failed.
    #[error(transparent)]
    Receive(#[from] fedflow_proto::transfer::ReceiveError),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias for `fedflow-coordinator`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
