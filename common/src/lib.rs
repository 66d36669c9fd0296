//! `fedflow-common`: the shared core of fedflow.
//!
//! - [`data`]: partner-site feedback data (formats, vocabulary, validation, split).
//! - [`synth`]: a generator of realistic partner-site data with a known Bayes ceiling.
//! - [`baseline`]: a bag-of-events logistic regression (and an order-aware oracle).
//! - [`model`]: the attention-flow model (embedding → LSTM/GRU/Transformer → head).
//! - [`train`]: local training, early stopping, evaluation and metrics.
//! - [`privacy`]: differential privacy: the RDP accountant, the planner, DP-SGD noise.
//! - [`params`]: named parameter sets: safetensors bytes, validation, delta arithmetic, clipping.
//! - [`compress`]: update compression (f16, bf16, blockwise int8, top-k) and its decoder.
//! - [`fedavg`]: streaming weighted FedAvg over parameter deltas, in f64.
//! - [`robust`]: robust aggregation for hostile sites (coordinate-wise median, trimmed mean).
//! - [`secagg`]: secure aggregation (SecAgg+): the coordinator learns only the sum.
//! - [`report`]: self-contained HTML reports: escaping and server-side SVG line charts.
//! - [`fsio`]: crash-safe file writes (temporary file, fsync, rename).
//! - [`clock`]: wall-clock milliseconds, the one time unit fedflow records.
//! - [`names`]: the one naming rule for runs, sites and operators.
//! - [`text`]: text from sites and operators: checked at the edge, escaped where shown.
//! - [`failpoint`]: named crash points for tests of the real binaries.
//! - [`hash`]: lowercase hex SHA-256, the one content-hash form.
//! - [`device`]: choosing where training runs (CPU, CUDA, Metal).
//! - [`error`]: the crate's one error type.

pub mod baseline;
pub mod clock;
pub mod compress;
pub mod data;
pub mod device;
pub mod error;
pub mod failpoint;
pub mod fedavg;
pub mod fsio;
pub mod hash;
pub mod model;
pub mod names;
pub mod params;
pub mod privacy;
pub mod report;
pub mod robust;
pub mod secagg;
pub mod synth;
pub mod text;
pub mod train;

pub use error::{Error, Result};
