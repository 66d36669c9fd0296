//! The distributed discrete Gaussian mechanism (Kairouz, Liu, Steinke, "The Distributed
//! Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML 2021,
//! arXiv:2102.06387; *KLS21* below): each of `n` sites adds discrete Gaussian noise
//! `N_Z(0, σ²)` to its update, encoded on the integer grid, and secure aggregation
//! releases only the sum, which then carries the noise of all `n` shares.
//!
//! The sum of discrete Gaussians is not itself a discrete Gaussian; KLS21 bound how far it
//! is. Per round, with `Δ₂` and `Δ₁` the L2 and L1 sensitivities on the grid (one site's
//! encoded update, after rounding), `d` the dimension and
//! `τ = 10 · Σ_{k=1}^{n-1} exp(-2π²σ² · k/(k+1))` (KLS21, Theorem 1), the sum satisfies
//! RDP at every order `α > 1` with (KLS21, Proposition 14)
//!
//! ```text
//! ε(α) = min( α/2 · Δ₂²/(nσ²) + τd,
//!             α/2 · (Δ₂²/(nσ²) + 2τ·Δ₁/(√n·σ) + τ²d),
//!             α/2 · (Δ₂/(√n·σ) + τ√d)² ).
//! ```
//!
//! Rounding inflates the sensitivity: a vector of L2 norm `c` on the grid, rounded at
//! random coordinate by coordinate, has norm at most `c + √d`; conditioned (by re-drawing)
//! on norm at most `√(c² + d/4 + √(2 ln(1/β)) · (c + √d/2))`, which holds with probability
//! at least `1 - β`, it has that smaller bound (KLS21, §4.1, conditional randomized
//! rounding); [`rounded_l2_bound`]. On the grid `Δ₁ <= Δ₂ · min(√d, Δ₂)`.
//!
//! Rounds whose sites are Poisson-sampled with rate `q < 1` are amplified with the general
//! upper bound of Zhu and Wang ("Poisson Subsampled Rényi Differential Privacy", ICML 2019,
//! Theorem 5), at integer orders. Reducing the sum modulo `2^b` (secure aggregation's
//! ring) is post-processing of the noisy sum and costs nothing; it only risks wrapping,
//! which the encoding's scale keeps rare.
//!
//! These are the formulas of the paper's reference implementation
//! (google-research/federated, `distributed_dp/accounting_utils.py`: `ddgauss_epsilon`,
//! `compute_rdp_dgaussian`, `_compute_rdp_subsampled`); `common/tests/ddg_reference.rs`
//! checks fedflow's figures against an independent Python computation of them
//! (`common/tests/privacy/make_ddg_fixtures.py`, ε through `dp_accounting`).

mod encode;
mod sample;

pub use encode::Encoding;
pub use sample::MAX_SIGMA2;

use rand::{CryptoRng, Rng};
use serde::{Deserialize, Serialize};

use crate::privacy::rdp::{compute_epsilon, default_orders};
use crate::{Error, Result};

/// One site's discrete Gaussian noise share, `N_Z(0, σ²)` on the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscreteGaussian {
    sigma2: u64,
}

impl DiscreteGaussian {
    /// The share with integer variance parameter `sigma2` (1 to [`MAX_SIGMA2`]).
    pub fn new(sigma2: u64) -> Result<DiscreteGaussian> {
        if !(1..=MAX_SIGMA2).contains(&sigma2) {
            return Err(Error::Privacy(format!(
                "discrete Gaussian σ² {sigma2} must be between 1 and 2^40"
            )));
        }
        Ok(DiscreteGaussian { sigma2 })
    }

    /// The share whose `σ` is at least `sigma` (`σ² = ⌈sigma²⌉`: rounding only ever adds
    /// noise, and the accounting uses the rounded value).
    pub fn at_least(sigma: f64) -> Result<DiscreteGaussian> {
        if !(sigma.is_finite() && sigma > 0.0) {
            return Err(Error::Privacy(format!(
                "discrete Gaussian σ {sigma} must be positive and finite"
            )));
        }
        let s2 = (sigma * sigma).ceil();
        if s2 > MAX_SIGMA2 as f64 {
            return Err(Error::Privacy(format!(
                "discrete Gaussian σ {sigma} is above 2^20 grid steps; use a coarser grid"
            )));
        }
        DiscreteGaussian::new(s2 as u64)
    }

    /// The variance parameter `σ²`.
    pub fn sigma2(&self) -> u64 {
        self.sigma2
    }

    /// `σ`.
    pub fn sigma(&self) -> f64 {
        (self.sigma2 as f64).sqrt()
    }

    /// One draw.
    pub fn sample<R: Rng + CryptoRng + ?Sized>(&self, rng: &mut R) -> i64 {
        sample::discrete_gaussian(rng, self.sigma2)
    }
}

/// The L2 norm bound of a grid vector of norm at most `l2` and dimension `dim` after
/// randomized rounding, conditioned with `beta` in `[0, 1)` (0: unconditioned,
/// `l2 + √d`); KLS21 §4.1.
pub fn rounded_l2_bound(l2: f64, beta: f64, dim: usize) -> Result<f64> {
    let usable = l2.is_finite() && l2 >= 0.0 && (0.0..1.0).contains(&beta) && dim > 0;
    if !usable {
        return Err(Error::Privacy(format!(
            "rounding bound: norm {l2} must be finite and non-negative, beta {beta} in [0, 1), \
             dimension {dim} positive"
        )));
    }
    let d = dim as f64;
    let plain = l2 + d.sqrt();
    if beta == 0.0 {
        return Ok(plain);
    }
    let conditioned =
        (l2 * l2 + 0.25 * d + (2.0 * (1.0 / beta).ln()).sqrt() * (l2 + 0.5 * d.sqrt())).sqrt();
    Ok(plain.min(conditioned))
}

/// The L1 bound of an integer vector of L2 norm at most `l2` in dimension `dim`.
pub fn rounded_l1_bound(l2: f64, dim: usize) -> f64 {
    l2 * (dim as f64).sqrt().min(l2)
}

/// KLS21's `τ` for `sites` shares of `N_Z(0, σ²)` (Theorem 1).
pub fn tau(sigma: f64, sites: usize) -> f64 {
    let s2 = sigma * sigma;
    10.0 * (1..sites)
        .map(|k| {
            let k = k as f64;
            (-2.0 * std::f64::consts::PI.powi(2) * s2 * k / (k + 1.0)).exp()
        })
        .sum::<f64>()
}

/// One release of the distributed discrete Gaussian's sum, on the grid.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DdgRelease {
    /// L2 sensitivity: the bound on one site's rounded, encoded update.
    pub l2_sensitivity: f64,
    /// L1 sensitivity (at most `l2 · min(√d, l2)` on the grid).
    pub l1_sensitivity: f64,
    /// Each share's `σ`.
    pub sigma: f64,
    /// Shares in the sum (the sites whose noise protects the one in question).
    pub sites: usize,
    /// Dimension of the released vector.
    pub dimension: usize,
    /// Poisson sampling rate of the round's sites (1 when every site is in every round).
    pub sampling_rate: f64,
}

impl DdgRelease {
    /// Checks the parameters; the message names the field.
    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Privacy(what));
        if !(self.l2_sensitivity.is_finite() && self.l2_sensitivity > 0.0) {
            return bad(format!(
                "l2_sensitivity {} must be positive",
                self.l2_sensitivity
            ));
        }
        if !(self.l1_sensitivity.is_finite() && self.l1_sensitivity > 0.0) {
            return bad(format!(
                "l1_sensitivity {} must be positive",
                self.l1_sensitivity
            ));
        }
        if !(self.sigma.is_finite() && self.sigma > 0.0) {
            return bad(format!("sigma {} must be positive", self.sigma));
        }
        if self.sites == 0 || self.dimension == 0 {
            return bad(format!(
                "sites {} and dimension {} must be positive",
                self.sites, self.dimension
            ));
        }
        if !(self.sampling_rate > 0.0 && self.sampling_rate <= 1.0) {
            return bad(format!(
                "sampling_rate {} must be in (0, 1]",
                self.sampling_rate
            ));
        }
        Ok(())
    }

    /// KLS21 Proposition 14 at order `alpha`, without sampling.
    pub fn rdp_unsampled(&self, alpha: f64) -> f64 {
        let n = self.sites as f64;
        let d = self.dimension as f64;
        let tau = tau(self.sigma, self.sites);
        let l2 = self.l2_sensitivity / (n.sqrt() * self.sigma);
        let l1 = self.l1_sensitivity / (n.sqrt() * self.sigma);
        let first = alpha / 2.0 * l2 * l2 + tau * d;
        let second = alpha / 2.0 * (l2 * l2 + 2.0 * l1 * tau + tau * tau * d);
        let third = alpha / 2.0 * (l2 + d.sqrt() * tau).powi(2);
        first.min(second).min(third)
    }

    /// The orders this release is accounted at: the RDP accountant's defaults, only the
    /// integer ones when sampled (Zhu and Wang's bound is for integer orders).
    pub fn orders(&self) -> Vec<f64> {
        let orders = default_orders();
        if self.sampling_rate < 1.0 {
            orders.into_iter().filter(|a| a.fract() == 0.0).collect()
        } else {
            orders
        }
    }

    /// RDP of one release at each of [`orders`](Self::orders).
    pub fn rdp(&self) -> Result<Vec<f64>> {
        self.validate()?;
        let q = self.sampling_rate;
        Ok(self
            .orders()
            .iter()
            .map(|&alpha| {
                let plain = self.rdp_unsampled(alpha);
                if q == 1.0 {
                    plain
                } else {
                    subsampled(alpha as u64, q, |l| self.rdp_unsampled(l as f64)).min(plain)
                }
            })
            .collect())
    }

    /// ε at `delta` after `rounds` releases.
    pub fn epsilon(&self, rounds: u64, delta: f64) -> Result<(f64, f64)> {
        let rdp: Vec<f64> = self.rdp()?.iter().map(|r| r * rounds as f64).collect();
        compute_epsilon(&self.orders(), &rdp, delta)
    }
}

/// Zhu and Wang (ICML 2019), Theorem 5: RDP at integer order `alpha >= 2` of a mechanism
/// with RDP `eps` run on a Poisson sample of rate `q` in (0, 1):
/// `1/(α-1) · log((1-q)^{α-1}(αq - q + 1) + C(α,2) q² (1-q)^{α-2} e^{ε(2)}
/// + 3 Σ_{l=3}^{α} C(α,l) q^l (1-q)^{α-l} e^{(l-1)ε(l)})`.
fn subsampled(alpha: u64, q: f64, eps: impl Fn(u64) -> f64) -> f64 {
    let a = alpha as f64;
    let lq = q.ln();
    let l1q = (-q).ln_1p();
    let log_comb =
        |n: f64, k: f64| libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0);
    let mut terms = vec![
        (a - 1.0) * l1q + (a * q - q + 1.0).ln(),
        log_comb(a, 2.0) + 2.0 * lq + (a - 2.0) * l1q + eps(2),
    ];
    for l in 3..=alpha {
        let lf = l as f64;
        terms.push(3f64.ln() + (lf - 1.0) * eps(l) + log_comb(a, lf) + (a - lf) * l1q + lf * lq);
    }
    let top = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = terms.iter().map(|t| (t - top).exp()).sum();
    (top + sum.ln()) / (a - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With one share τ is 0 and the release is the discrete Gaussian mechanism, whose RDP
    /// is at most the continuous one's, `α Δ² / (2σ²)` (CKS20, Proposition 5).
    #[test]
    fn one_share_is_the_discrete_gaussian() {
        let r = DdgRelease {
            l2_sensitivity: 10.0,
            l1_sensitivity: 100.0,
            sigma: 20.0,
            sites: 1,
            dimension: 1000,
            sampling_rate: 1.0,
        };
        assert_eq!(tau(20.0, 1), 0.0);
        for alpha in [1.5, 2.0, 10.0, 64.0] {
            let want = alpha * 100.0 / (2.0 * 400.0);
            assert!((r.rdp_unsampled(alpha) - want).abs() < 1e-12);
        }
    }

    /// More shares of the same σ protect more; τ vanishes for a wide σ; sampling helps;
    /// more rounds cost more.
    #[test]
    fn the_accounting_moves_the_right_way() {
        let base = DdgRelease {
            l2_sensitivity: 100.0,
            l1_sensitivity: 100.0 * 30.0,
            sigma: 60.0,
            sites: 10,
            dimension: 900,
            sampling_rate: 1.0,
        };
        let e = |r: DdgRelease, rounds| r.epsilon(rounds, 1e-5).unwrap().0;
        assert!(e(DdgRelease { sites: 20, ..base }, 10) < e(base, 10));
        assert!(
            e(
                DdgRelease {
                    sampling_rate: 0.1,
                    ..base
                },
                10
            ) < e(base, 10)
        );
        assert!(e(base, 100) > e(base, 10));
        assert!(tau(3.0, 1000) < 1e-30);
        assert!(tau(0.3, 1000) > 1.0);
    }

    /// The conditioned rounding bound is below the plain one for a large dimension, and
    /// never above it.
    #[test]
    fn conditioned_rounding_tightens_the_bound() {
        let plain = rounded_l2_bound(100.0, 0.0, 10_000).unwrap();
        assert_eq!(plain, 200.0);
        let cond = rounded_l2_bound(100.0, (-0.5f64).exp(), 10_000).unwrap();
        assert!(cond < plain && cond > 100.0, "{cond}");
        assert!(rounded_l2_bound(1.0, 0.5, 1).unwrap() <= 2.0);
        assert!(rounded_l2_bound(1.0, 1.0, 1).is_err());
        assert!(DiscreteGaussian::at_least(0.0).is_err());
        assert_eq!(DiscreteGaussian::at_least(2.5).unwrap().sigma2(), 7);
    }
}
