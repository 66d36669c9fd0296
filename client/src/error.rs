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
    /// A federated task this site refuses to run: it does not fit the site's vocabulary or
    /// data (the message says why and what to do).
    #[error("task refused: {0}")]
    Task(String),
    /// The site's feedback store cannot be read or written (nothing is acknowledged then).
    #[error("feedback store {0}")]
    Store(String),
    /// The site's published-model folder cannot be read or written.
    #[error("{0}")]
    Published(String),
    /// The site's privacy ledger could not be read or written (nothing is released then).
    #[error("privacy ledger {path}: {reason}")]
    Ledger {
        /// The ledger's database file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The site's privacy policy forbids the task (e.g. it would release metrics on the
    /// site's data, or train without DP at a site that requires it).
    #[error("privacy policy: {0}")]
    Policy(String),
    /// A task would take the site's record-level privacy spend past a limit.
    #[error("privacy budget: {0}")]
    Budget(String),
    // What the coordinator answered (its gRPC status, mapped in `wire::status_error`).
    /// The coordinator refused this site: it is not authenticated, or its identity may not do
    /// what it asked (its certificate, revocation or site id).
    #[error("coordinator refused this site: {message} ({code})")]
    Refused {
        /// The gRPC status code's name (e.g. `PermissionDenied`).
        code: String,
        /// The coordinator's message.
        message: String,
    },
    /// The coordinator rejected the request as invalid (a malformed, stale or out-of-order
    /// request, or an update it will not take).
    #[error("coordinator rejected the request: {message} ({code})")]
    Rejected {
        /// The gRPC status code's name (e.g. `InvalidArgument`).
        code: String,
        /// The coordinator's message.
        message: String,
    },
    /// The coordinator failed, or could not be reached, while answering (an internal error,
    /// unavailable, a deadline passed, an RPC it does not implement).
    #[error("coordinator failed: {message} ({code})")]
    Coordinator {
        /// The gRPC status code's name (e.g. `Internal`).
        code: String,
        /// The coordinator's (or the transport's) message.
        message: String,
    },
    // Local checks.
    /// Received bytes do not hash to the SHA-256 they were announced with.
    #[error(
        "{what} hash mismatch: the bytes hash to {actual} but {expected} was expected; \
         the transfer is corrupt or the task is stale, fetch it again"
    )]
    HashMismatch {
        /// What was hashed (e.g. `global model`).
        what: &'static str,
        /// The announced SHA-256 (hex).
        expected: String,
        /// The SHA-256 (hex) of the bytes received.
        actual: String,
    },
}

/// Result alias for `fedflow-client`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
