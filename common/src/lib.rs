//! `fedflow-common`: the shared core of fedflow.
//!
//! - [`data`]: partner-site feedback data (formats, vocabulary, validation, split).
//! - [`model`]: the attention-flow model (embedding → LSTM/GRU/Transformer → head).
//! - [`train`]: local training, early stopping, evaluation and metrics.
//! - [`device`]: choosing where training runs (CPU, CUDA, Metal).
//! - [`error`]: the crate's one error type.

pub mod data;
pub mod device;
pub mod error;
pub mod model;
pub mod train;

pub use error::{Error, Result};
