//! `fedflow-common`: the shared core of fedflow.
//!
//! - [`data`]: partner-site feedback data (formats, vocabulary, validation, split).
//! - [`error`]: the crate's one error type.

pub mod data;
pub mod error;

pub use error::{Error, Result};
