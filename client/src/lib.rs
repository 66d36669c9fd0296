//! `fedflow-client`: what a partner site runs.
//!
//! Today: local data tools and local training ([`local`]) — generate realistic partner data,
//! validate a data file against the federation's vocabulary, train the attention-flow model on
//! one site's data or on several sites pooled (the centralised baseline), and evaluate a saved
//! model. The binary `fedflow-client` is a thin command-line layer over these functions.

pub mod error;
pub mod local;

pub use error::{Error, Result};
