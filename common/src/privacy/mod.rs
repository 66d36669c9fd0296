//! Differential privacy: accounting and planning.
//!
//! - [`rdp`]: the Rényi-DP accountant of the Poisson-subsampled Gaussian mechanism (a faithful
//!   port of Google's `dp_accounting` `RdpAccountant`).
//! - [`dpfedavg`]: site-level DP-FedAvg: clipping and noise per trust mode (central,
//!   distributed, local), adaptive clipping, and the multipliers the accountant charges.
//! - [`planner`]: ε for given parameters, and the inverse searches (the noise multiplier or
//!   the number of rounds that meets a target ε).

pub mod dpfedavg;
pub mod planner;
pub mod rdp;

pub use rdp::{RdpAccountant, SampledGaussian};
