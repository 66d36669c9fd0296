//! Differential privacy: accounting and planning.
//!
//! - [`rdp`]: the Rényi-DP accountant of the Poisson-subsampled Gaussian mechanism (a faithful
//!   port of Google's `dp_accounting` `RdpAccountant`).
//! - [`dpfedavg`]: site-level DP-FedAvg: clipping and noise per trust mode (central,
//!   distributed, local), adaptive clipping, and the multipliers the accountant charges.
//! - [`planner`]: ε for given parameters, and the inverse searches (the noise multiplier or
//!   the number of rounds that meets a target ε).
//! - [`audit`]: the empirical one-run audit (a lower bound on ε from canaries).
//! - [`neighbours`]: bounds under replace-one (substitution) from add/remove RDP curves.
//! - [`ddg`]: the distributed discrete Gaussian (an exact sampler, and the accounting of
//!   a sum of its shares released by secure aggregation).

pub mod audit;
pub mod ddg;
pub mod dpfedavg;
pub mod neighbours;
pub mod planner;
pub mod pld;
pub mod rdp;

pub use rdp::{RdpAccountant, SampledGaussian};

use rand::{CryptoRng, Rng};
use rand_distr::StandardNormal;
use serde::Serialize;

/// The δ at which privacy reports also state the cumulative ε.
pub const REPORT_DELTAS: [f64; 4] = [1e-3, 1e-5, 1e-7, 1e-9];

/// ε at one δ, as privacy reports state it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpsilonAt {
    /// δ.
    pub delta: f64,
    /// ε, or `None` (JSON null) when unbounded.
    pub epsilon: Option<f64>,
    /// The optimal RDP order.
    pub order: f64,
}

impl RdpAccountant {
    /// The composed ε at `delta`, for a report.
    pub fn epsilon_at(&self, delta: f64) -> crate::Result<EpsilonAt> {
        let (e, order) = self.epsilon(delta)?;
        Ok(EpsilonAt {
            delta,
            epsilon: e.is_finite().then_some(e),
            order,
        })
    }
}

/// Adds N(0, std²) to every value, drawing in order from `rng` (a CSPRNG seeded from the
/// operating system wherever the noise protects anyone; seeded in tests). The one noise
/// source of DP-SGD and DP-FedAvg (f32 values at the sites, the coordinator's f64 sums).
///
/// The noise is floating-point: `rand_distr`'s Ziggurat sampler in f64, rounded to the
/// value's precision. Every ε fedflow states is for ideal real-valued Gaussian noise; attacks
/// on floating-point samplers (Mironov 2012; Jin et al. 2022) are not shown to apply to this
/// one, nor ruled out, and the reports say so.
pub fn add_gaussian<T: NoiseTarget, R: Rng + CryptoRng>(values: &mut [T], std: f64, rng: &mut R) {
    if std == 0.0 {
        return;
    }
    for v in values {
        let n: f64 = rng.sample(StandardNormal);
        v.add_noise(n * std);
    }
}

/// A value [`add_gaussian`] can add noise to.
pub trait NoiseTarget {
    /// Adds `x` (rounded to the value's precision).
    fn add_noise(&mut self, x: f64);
}

impl NoiseTarget for f32 {
    fn add_noise(&mut self, x: f64) {
        *self += x as f32;
    }
}

impl NoiseTarget for f64 {
    fn add_noise(&mut self, x: f64) {
        *self += x;
    }
}
