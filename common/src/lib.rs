//! `fedflow-common`: the shared core of fedflow.
//!
//! - [`data`]: partner-site feedback data (formats, vocabulary, validation, split).
//! - [`error`]: the crate's one error type.
//! - [`fedavg`]: streaming weighted FedAvg over parameter deltas, in f64.
//! - [`params`]: named parameter sets: safetensors bytes, validation, delta arithmetic, clipping.

pub mod data;
pub mod error;
pub mod fedavg;
pub mod params;

pub use error::{Error, Result};
