//! `fedflow-common`: the shared core of fedflow.
//!
//! - [`baseline`]: bag-of-events logistic regression, the order-blind baseline.
//! - [`data`]: partner-site feedback data (formats, vocabulary, validation, split).
//! - [`error`]: the crate's one error type.
//! - [`synth`]: synthetic partner-site data with an exact, order-dependent label function.

pub mod baseline;
pub mod data;
pub mod error;
pub mod synth;

pub use error::{Error, Result};
