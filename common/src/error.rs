//! The one error type of `fedflow-common`.

use std::path::PathBuf;

/// Everything that can go wrong in the shared core.
///
/// Messages are lowercase, carry the offending file/line/name where there is one, and say what
/// to do where that is not obvious.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- Files and formats ---
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A row of a partner-site data file is invalid.
    #[error("{path}:{line}: {reason}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// 1-based line number of the offending row.
        line: u64,
        /// What is wrong with the row.
        reason: String,
    },
    /// A partner-site data file is unusable as a whole (unknown extension, missing header,
    /// no sessions), or records to be written are invalid.
    #[error("{path}: {reason}")]
    DataFile {
        /// The data file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The event vocabulary file is invalid.
    #[error("vocabulary {path}: {reason}")]
    Vocab {
        /// The vocabulary file (or `<memory>`).
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("invalid config: {0}")]
    Config(String),
    /// JSON (de)serialisation failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),

    // --- Tensors and parameters ---
    /// A named parameter set does not match the model it is meant for.
    #[error("parameter mismatch: {0}")]
    ParamMismatch(String),
    /// A tensor holds NaN or infinite values.
    #[error("tensor `{name}` holds {count} non-finite value(s) (NaN or Inf)")]
    NonFinite {
        /// Name of the offending tensor.
        name: String,
        /// How many values are not finite.
        count: usize,
    },
    /// An aggregation input was rejected (bad weight, empty round, ...).
    #[error("aggregation: {0}")]
    Aggregation(String),
    /// Safetensors bytes could not be parsed.
    #[error("safetensors: {0}")]
    Safetensors(String),
    /// An error raised by candle (shapes, devices, kernels).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    // --- Training ---
    /// Training cannot proceed (empty data, loss diverged, ...).
    #[error("training: {0}")]
    Training(String),
    /// A privacy computation got parameters outside its domain, or a budget would be exceeded.
    #[error("privacy: {0}")]
    Privacy(String),
    /// A report could not be rendered.
    #[error("report: {0}")]
    Report(String),
    /// The requested compute device is not available in this build or on this machine.
    #[error("device: {0}")]
    Device(String),
    /// A secure aggregation step was refused (by a site or by the coordinator).
    #[error("secure aggregation: {0}")]
    SecureAggregation(#[from] crate::secagg::Fault),
}

/// Result alias for `fedflow-common`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
