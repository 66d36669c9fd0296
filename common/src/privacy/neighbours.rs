//! Guarantees under a neighbouring relation other than the accountant's add-or-remove-one:
//! replacing one unit by another (*substitution*, `REPLACE_ONE` in `dp_accounting`'s terms),
//! derived from add/remove RDP curves by the weak triangle inequality.
//!
//! Why it is needed: a site sends its exact number of training sessions with every update,
//! and the sampling rate, the number of steps and the denominator all follow from it, so two
//! datasets of different sizes are told apart by that number alone. What DP-SGD at a site
//! really hides is which units make up a dataset of the *known* size: replacing one unit by
//! another. Likewise, removing one session of a user from a user-level release changes that
//! user's unit (a substitution of it: the step's sum can move by up to 2C).
//!
//! `dp_accounting` 0.6.0 has no Poisson-subsampled Gaussian under `REPLACE_ONE` (its
//! `RdpAccountant` and `PLDAccountant` refuse `PoissonSampledDpEvent` with that relation), so
//! the bound here is derived, not ported: a substitution D → D' goes through D'' = D without
//! the replaced unit (a removal, then an addition), and for any three distributions P, Q, R
//! and α > 1 (Mironov 2017, "Rényi Differential Privacy", Proposition 11, with p = q = 2):
//!
//! ```text
//! D_α(P ‖ R) ≤ (2α − 1) / (2α − 2) · D_{2α}(P ‖ Q) + D_{2α−1}(Q ‖ R)
//! ```
//!
//! Each term on the right is an add/remove divergence of the same mechanism with the same
//! (public) parameters, bounded by the add/remove RDP curve at orders 2α and 2α − 1. The
//! inequality holds for each step given the history, so per-step bounds compose by RDP's
//! adaptive composition (Mironov 2017, Proposition 1) like any other curve. The bound is
//! sound but not tight (it is within a factor of about 1 of the exact replace-one RDP of
//! the unsubsampled Gaussian, whose sensitivity doubles, and looser under subsampling).
//! `common/tests/privacy/make_replace_one_fixtures.py` recomputes it from `dp_accounting`'s
//! own add/remove RDP values and conversion; the unit tests below compare.

use super::rdp::{MAX_ORDER, rdp_poisson_subsampled_gaussian};
use crate::Result;

/// The weak triangle inequality over two add/remove steps (see the module docs): for each
/// of `orders` α, `(2α − 1) / (2α − 2) · f(2α) + f(2α − 1)`, where `f` gives an add/remove
/// RDP curve at the orders it is asked for. Orders at 1 (where the factor is infinite), at
/// +∞ or with 2α above [`MAX_ORDER`] get +∞ (no bound), which the (ε, δ) conversion skips.
pub fn two_step_rdp(orders: &[f64], f: impl Fn(&[f64]) -> Result<Vec<f64>>) -> Result<Vec<f64>> {
    let usable = |a: f64| a > 1.0 && a.is_finite() && 2.0 * a <= MAX_ORDER;
    let inner: Vec<f64> = orders
        .iter()
        .filter(|&&a| usable(a))
        .flat_map(|&a| [2.0 * a, 2.0 * a - 1.0])
        .collect();
    let values = if inner.is_empty() {
        Vec::new()
    } else {
        f(&inner)?
    };
    let mut pairs = values.chunks_exact(2);
    Ok(orders
        .iter()
        .map(|&a| {
            if !usable(a) {
                return f64::INFINITY;
            }
            let pair = pairs.next().expect("two values per usable order");
            (2.0 * a - 1.0) / (2.0 * a - 2.0) * pair[0] + pair[1]
        })
        .collect())
}

/// RDP of one step of the Poisson-subsampled Gaussian mechanism (sampling rate `q`, noise
/// multiplier `z`) under replace-one, at each of `orders`: [`two_step_rdp`] over
/// [`rdp_poisson_subsampled_gaussian`].
pub fn rdp_replace_one_poisson_subsampled_gaussian(
    q: f64,
    z: f64,
    orders: &[f64],
) -> Result<Vec<f64>> {
    two_step_rdp(orders, |o| rdp_poisson_subsampled_gaussian(q, z, o))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::rdp::{RdpAccountant, compute_epsilon, default_orders};
    use serde_json::Value;

    const FIXTURES: &str = include_str!("../../tests/privacy/replace_one_fixtures.json");

    fn num(v: &Value) -> f64 {
        match v {
            Value::String(s) if s == "inf" => f64::INFINITY,
            v => v.as_f64().expect("a number"),
        }
    }

    fn close(ours: f64, theirs: f64) -> bool {
        if ours.is_infinite() || theirs.is_infinite() {
            return ours == theirs;
        }
        (ours - theirs).abs() <= 1e-6 * theirs.abs().max(1e-12)
    }

    #[test]
    fn replace_one_matches_the_reference_computation() {
        let fx: Value = serde_json::from_str(FIXTURES).unwrap();
        let orders = default_orders();
        let cases = fx["single"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for c in cases {
            let (q, z, steps) = (num(&c["q"]), num(&c["z"]), c["steps"].as_u64().unwrap());
            let one = rdp_replace_one_poisson_subsampled_gaussian(q, z, &orders).unwrap();
            let want: Vec<f64> = c["rdp_one_step"]
                .as_array()
                .unwrap()
                .iter()
                .map(num)
                .collect();
            for (i, (a, b)) in one.iter().zip(&want).enumerate() {
                assert!(close(*a, *b), "q {q} z {z} order {}: {a} vs {b}", orders[i]);
            }
            let total: Vec<f64> = one.iter().map(|r| r * steps as f64).collect();
            let acc = RdpAccountant::with_rdp(orders.clone(), total).unwrap();
            for e in c["epsilons"].as_array().unwrap() {
                let delta = num(&e["delta"]);
                let (eps, _) = acc.epsilon(delta).unwrap();
                assert!(
                    close(eps, num(&e["epsilon"])),
                    "q {q} z {z} steps {steps} delta {delta}: {eps} vs {}",
                    e["epsilon"]
                );
                // Never below the add/remove figure it is derived from.
                let mut add = RdpAccountant::default();
                add.compose(&crate::privacy::SampledGaussian { q, z, steps })
                    .unwrap();
                assert!(eps >= add.epsilon(delta).unwrap().0, "q {q} z {z}");
            }
        }
    }

    #[test]
    fn without_subsampling_it_is_close_to_the_gaussian_with_twice_the_sensitivity() {
        // q = 1: the exact replace-one RDP of the Gaussian is α · (2C)² / (2 (zC)²) = 2α / z²;
        // the two-step bound of α / (2z²) is (2α − 1)² / (2 (α − 1) z²), above it by a factor
        // 1 + 1 / (4α(α − 1)).
        let z = 3.0;
        let orders = [2.0, 10.0, 100.0];
        let ours = rdp_replace_one_poisson_subsampled_gaussian(1.0, z, &orders).unwrap();
        for (a, r) in orders.iter().zip(ours) {
            let exact = 2.0 * a / (z * z);
            let bound = (2.0 * a - 1.0).powi(2) / (2.0 * (a - 1.0) * z * z);
            assert!(
                (r - bound).abs() <= 1e-12 * bound,
                "order {a}: {r} vs {bound}"
            );
            assert!(r >= exact, "order {a}: {r} below the exact {exact}");
        }
        // No sampling, no spend; order 1 and +∞ bound nothing.
        let none = rdp_replace_one_poisson_subsampled_gaussian(0.0, 1.0, &[1.5]).unwrap();
        assert_eq!(none, vec![0.0]);
        let edge =
            rdp_replace_one_poisson_subsampled_gaussian(0.1, 1.0, &[1.0, f64::INFINITY]).unwrap();
        assert!(edge.iter().all(|r| r.is_infinite()));
        let (eps, _) = compute_epsilon(&[1.0], &[f64::INFINITY], 1e-5).unwrap();
        assert!(eps.is_infinite());
    }
}
