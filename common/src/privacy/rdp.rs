//! Rényi-DP accounting of the Poisson-subsampled Gaussian mechanism, reproducing Google's
//! `dp_accounting` `RdpAccountant` (PyPI `dp-accounting` 0.6.0,
//! `dp_accounting/rdp/rdp_privacy_accountant.py`) function by function:
//!
//! - the same default orders (`DEFAULT_RDP_ORDERS`: 1.1, 1.2, ..., 10.9, 11, ..., 63, 128,
//!   256, 512, 1024);
//! - `log A_α` for integer α by the binomial expansion (Mironov, Talwar, Zhang 2019,
//!   "Rényi Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530,
//!   Sec. 3.2) and for fractional α by the two-sided series of Sec. 3.3, with the reference's
//!   1000-term limit and stopping rule (a fractional order whose series has not converged
//!   is excluded, i.e. its RDP is +∞, exactly as the reference does);
//! - RDP → (ε, δ) by the improved conversion of Canonne, Kamath, Steinke 2020 ("The Discrete
//!   Gaussian for Differential Privacy", arXiv:2004.00010, Prop. 12; also Asoodeh et al.
//!   2020, arXiv:2001.05990, Eq. 20) combined with the KL bound δ ≤ √(1 − e^{−KL}), and the
//!   matching ε → δ conversion;
//! - the same edge cases: q = 0 gives 0 at every order (even with z = 0); z = 0 or α = ∞
//!   gives ∞; q = 1 gives α / (2z²); δ = 0 gives ε = 0 only when every RDP value is 0.
//!
//! One deliberate difference: the reference accepts any list of orders, this port refuses an
//! empty list (there is no order to minimise over) and finite orders above [`MAX_ORDER`]
//! (whose binomial expansion would take that many terms). Results for the orders it accepts
//! are unchanged.
//!
//! The neighbouring relation is add-or-remove-one record, the one Poisson subsampling is
//! analysed under. `common/tests/rdp_reference.rs` checks every figure against fixtures
//! written by the reference itself (`common/tests/privacy/make_rdp_fixtures.py`).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The reference's `DEFAULT_RDP_ORDERS`.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    orders.extend((11..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

/// `log(exp(x) + exp(y))` (the reference's `_log_add`).
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// log of the binomial coefficient through log-gamma (`_log_comb`; for fractional `n` this is
/// log |binom(n, k)|, as scipy's `gammaln` is log |Γ|).
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// log(erfc(x)), accurate far into the tail (`_log_erfc`, which goes through scipy's
/// `log_ndtr`). Below x = 26 erfc is a normal double and libm's erfc is accurate to about an
/// ulp; beyond, the asymptotic series erfc(x)·e^{x²}·x√π = Σ (−1)ⁿ (2n−1)!! / (2x²)ⁿ is exact
/// to double precision with eight terms.
pub(crate) fn log_erfc(x: f64) -> f64 {
    if x < 26.0 {
        return libm::erfc(x).ln();
    }
    let inv = 1.0 / (2.0 * x * x);
    let (mut term, mut sum) = (1.0, 1.0);
    for n in 1..=8 {
        term *= -((2 * n - 1) as f64) * inv;
        sum += term;
    }
    -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() + sum.ln()
}

/// log A_α for integer α and 0 < q < 1 (`_compute_log_a_int`).
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    let (log_q, two_s2) = (q.ln(), 2.0 * (sigma * sigma));
    let a = alpha as f64;
    for i in 0..=alpha {
        let i = i as f64;
        let log_coef = log_comb(a, i) + i * log_q + (a - i) * log1mq;
        log_a = log_add(log_a, log_coef + (i * i - i) / two_s2);
    }
    log_a
}

/// The reference's `_MAX_STEPS_LOG_A_FRAC`.
const MAX_STEPS_LOG_A_FRAC: usize = 1000;

/// log A_α for fractional α and 0 < q < 1 (`_compute_log_a_frac`; Mironov et al. 2019,
/// Sec. 3.3). +∞ when the series has not converged after 1000 terms, as in the reference.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (log_q, two_s2) = (q.ln(), 2.0 * (sigma * sigma));
    let root2sigma = std::f64::consts::SQRT_2 * sigma;
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let half = 0.5f64.ln();
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let i = i as f64;
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * log_q + j * log1mq;
        let log_t1 = log_coef + j * log_q + i * log1mq;
        let log_e0 = half + log_erfc((i - z0) / root2sigma);
        let log_e1 = half + log_erfc((z0 - j) / root2sigma);
        let log_s0 = log_t0 + (i * i - i) / two_s2 + log_e0;
        let log_s1 = log_t1 + (j * j - j) / two_s2 + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    tracing::debug!(
        q,
        sigma,
        alpha,
        "log A_alpha series did not converge in {MAX_STEPS_LOG_A_FRAC} terms: order excluded"
    );
    f64::INFINITY
}

/// RDP of one step of the Poisson-subsampled Gaussian mechanism with sampling rate `q` and
/// noise multiplier `z` (noise std / L2 sensitivity), at each of `orders`
/// (`_compute_rdp_poisson_subsampled_gaussian`).
pub fn rdp_poisson_subsampled_gaussian(q: f64, z: f64, orders: &[f64]) -> Result<Vec<f64>> {
    if !(0.0..=1.0).contains(&q) {
        return Err(Error::Privacy(format!(
            "sampling rate must be in [0, 1], got {q}"
        )));
    }
    if z.is_nan() || z < 0.0 {
        return Err(Error::Privacy(format!(
            "noise multiplier must be >= 0, got {z}"
        )));
    }
    check_order_values(orders)?;
    Ok(orders
        .iter()
        .map(|&alpha| {
            if q == 0.0 {
                0.0
            } else if alpha.is_infinite() || z == 0.0 {
                f64::INFINITY
            } else if q == 1.0 {
                alpha / (2.0 * (z * z))
            } else {
                let log_a = if alpha.fract() == 0.0 {
                    log_a_int(q, z, alpha as u64)
                } else {
                    log_a_frac(q, z, alpha)
                };
                log_a / (alpha - 1.0)
            }
        })
        .collect())
}

/// Largest finite Rényi divergence order accepted (+∞ is accepted too: its RDP is +∞).
///
/// Not a limit of the reference, which takes any order, but of its cost: `log A_α` for a
/// whole-number α sums α + 1 terms (Mironov et al. 2019, Sec. 3.2), so an order of 10^18
/// would never finish. The bound is generous: the reference's default orders stop at 1024
/// (`DEFAULT_RDP_ORDERS`), and the optimal order for any ε worth reporting is far below it.
pub const MAX_ORDER: f64 = 1e6;

/// Checks each order is in `[1, MAX_ORDER]` or +∞.
fn check_order_values(orders: &[f64]) -> Result<()> {
    if let Some(a) = orders.iter().find(|&&a| a.is_nan() || a < 1.0) {
        return Err(Error::Privacy(format!(
            "Rényi divergence order must be at least 1, found {a}"
        )));
    }
    if let Some(a) = orders.iter().find(|&&a| a.is_finite() && a > MAX_ORDER) {
        return Err(Error::Privacy(format!(
            "Rényi divergence order must be at most {MAX_ORDER} (or infinite), found {a}"
        )));
    }
    Ok(())
}

/// Checks `orders` is non-empty, matches `rdp` in length and holds valid orders.
fn check_orders(orders: &[f64], rdp: &[f64]) -> Result<()> {
    if orders.is_empty() {
        return Err(Error::Privacy(
            "the list of Rényi divergence orders is empty: give at least one order".to_string(),
        ));
    }
    if orders.len() != rdp.len() {
        return Err(Error::Privacy(format!(
            "{} orders but {} RDP values",
            orders.len(),
            rdp.len()
        )));
    }
    check_order_values(orders)
}

/// Index of the first minimum (numpy's `argmin`, with NaN never chosen over a number).
fn argmin(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v < values[best] || values[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best
}

/// The smallest ε for which the RDP curve implies (ε, δ)-DP, and the order that attains it
/// (`compute_epsilon`; Canonne, Kamath, Steinke 2020, Prop. 12, with the KL bound for tiny
/// divergences). Returns order 0 when δ = 0, as the reference does.
pub fn compute_epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(f64, f64)> {
    if delta.is_nan() || delta < 0.0 {
        return Err(Error::Privacy(format!(
            "delta cannot be negative, got {delta}"
        )));
    }
    if delta == 0.0 {
        return Ok(if rdp.iter().all(|&r| r == 0.0) {
            (0.0, 0.0)
        } else {
            (f64::INFINITY, 0.0)
        });
    }
    check_orders(orders, rdp)?;
    let eps: Vec<f64> = orders
        .iter()
        .zip(rdp)
        .map(|(&a, &r)| {
            if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
                0.0
            } else if a > 1.01 {
                r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
            } else {
                f64::INFINITY
            }
        })
        .collect();
    let i = argmin(&eps);
    Ok((eps[i].max(0.0), orders[i]))
}

/// The smallest δ for which the RDP curve implies (ε, δ)-DP, and the order that attains it
/// (`compute_delta`; the same bounds as [`compute_epsilon`], solved for δ).
pub fn compute_delta(orders: &[f64], rdp: &[f64], epsilon: f64) -> Result<(f64, f64)> {
    if epsilon.is_nan() || epsilon < 0.0 {
        return Err(Error::Privacy(format!(
            "epsilon cannot be negative, got {epsilon}"
        )));
    }
    check_orders(orders, rdp)?;
    let log_deltas: Vec<f64> = orders
        .iter()
        .zip(rdp)
        .map(|(&a, &r)| {
            let mut log_delta = if r <= 0.0 {
                f64::NEG_INFINITY
            } else {
                0.5 * (-(-r).exp()).ln_1p()
            };
            if r >= 0.0 && a > 1.01 {
                let bound = (a - 1.0) * (r - epsilon + (-1.0 / a).ln_1p()) - a.ln();
                log_delta = log_delta.min(bound);
            }
            log_delta
        })
        .collect();
    let i = argmin(&log_deltas);
    Ok((log_deltas[i].exp().min(1.0), orders[i]))
}

/// One privacy-relevant release: `steps` compositions of the Poisson-subsampled Gaussian
/// mechanism with sampling rate `q` and noise multiplier `z` (the reference's
/// `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps)`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampledGaussian {
    /// Poisson sampling rate: each record is in a step's batch with this probability.
    pub q: f64,
    /// Noise multiplier: noise standard deviation divided by the L2 sensitivity.
    pub z: f64,
    /// Number of steps.
    pub steps: u64,
}

/// An RDP accountant over a fixed set of orders: composes [`SampledGaussian`] events by adding
/// their RDP curves, and converts the total to (ε, δ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new(default_orders()).expect("default orders are valid")
    }
}

impl RdpAccountant {
    /// An accountant with nothing spent, over `orders`: at least one, each in
    /// `[1, MAX_ORDER]` or +∞ (see [`MAX_ORDER`]).
    pub fn new(orders: Vec<f64>) -> Result<Self> {
        let rdp = vec![0.0; orders.len()];
        check_orders(&orders, &rdp)?;
        Ok(RdpAccountant { orders, rdp })
    }

    /// An accountant holding an RDP curve computed elsewhere (for instance under another
    /// neighbouring relation, see [`super::neighbours`]): `rdp[i]` at `orders[i]`, each a
    /// number >= 0 or +∞.
    pub fn with_rdp(orders: Vec<f64>, rdp: Vec<f64>) -> Result<Self> {
        check_orders(&orders, &rdp)?;
        if let Some(r) = rdp.iter().find(|&&r| r.is_nan() || r < 0.0) {
            return Err(Error::Privacy(format!(
                "an RDP value must be >= 0 or infinite, found {r}"
            )));
        }
        Ok(RdpAccountant { orders, rdp })
    }

    /// Adds `event` to what has been spent.
    pub fn compose(&mut self, event: &SampledGaussian) -> Result<()> {
        let one = rdp_poisson_subsampled_gaussian(event.q, event.z, &self.orders)?;
        let steps = event.steps as f64;
        for (total, r) in self.rdp.iter_mut().zip(one) {
            // 0 · ∞ is NaN in IEEE arithmetic; numpy gives the same, but no steps spend nothing.
            if event.steps > 0 {
                *total += steps * r;
            }
        }
        Ok(())
    }

    /// The orders.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The total RDP at each order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// ε at `delta` and the optimal order.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64)> {
        compute_epsilon(&self.orders, &self.rdp, delta)
    }

    /// δ at `epsilon` and the optimal order.
    pub fn delta(&self, epsilon: f64) -> Result<(f64, f64)> {
        compute_delta(&self.orders, &self.rdp, epsilon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_order_lists_are_refused_instead_of_panicking() {
        let err = RdpAccountant::new(vec![]).unwrap_err().to_string();
        assert!(err.contains("orders is empty"), "{err}");
        let err = compute_epsilon(&[], &[], 1e-5).unwrap_err().to_string();
        assert!(err.contains("orders is empty"), "{err}");
        let err = compute_delta(&[], &[], 1.0).unwrap_err().to_string();
        assert!(err.contains("orders is empty"), "{err}");
    }

    #[test]
    fn huge_orders_are_refused_instead_of_looping() {
        for order in [1e18, MAX_ORDER * 2.0, f64::MAX] {
            let err = RdpAccountant::new(vec![2.0, order])
                .unwrap_err()
                .to_string();
            assert!(err.contains("must be at most"), "{order}: {err}");
            let err = rdp_poisson_subsampled_gaussian(0.01, 1.0, &[order])
                .unwrap_err()
                .to_string();
            assert!(err.contains("must be at most"), "{order}: {err}");
            let err = compute_epsilon(&[order], &[0.5], 1e-5)
                .unwrap_err()
                .to_string();
            assert!(err.contains("must be at most"), "{order}: {err}");
        }
        // The bound itself, +∞ and the default orders are still accepted.
        let mut acc = RdpAccountant::new(vec![2.0, MAX_ORDER, f64::INFINITY]).unwrap();
        acc.compose(&SampledGaussian {
            q: 0.01,
            z: 1.0,
            steps: 10,
        })
        .unwrap();
        assert!(acc.epsilon(1e-5).unwrap().0.is_finite());
        assert!(RdpAccountant::new(default_orders()).is_ok());
    }
}
