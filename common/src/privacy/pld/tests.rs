//! PLD internals: the normal quantile, truncation, the exact Gaussian bound, edge cases.

use super::*;

#[test]
fn the_normal_quantile_and_cdf_are_accurate_in_the_tail() {
    // scipy.stats.norm.ppf(1e-10) and norm.logcdf(-30).
    assert!((normal_ppf_lower(1e-10) - -6.361340902404056).abs() < 1e-12);
    assert!((normal_log_cdf(-30.0) - -454.32124395634327).abs() < 1e-9);
    let p = 0.5 * LOG_MASS_TRUNCATION_BOUND.exp();
    assert!((normal_log_cdf(normal_ppf_lower(p)) - p.ln()).abs() < 1e-12);
}

#[test]
fn fast_lengths_are_smooth_and_truncation_keeps_every_bit_of_mass() {
    assert_eq!(next_fast_len(1), 1);
    assert_eq!(next_fast_len(97), 100);
    assert_eq!(next_fast_len(1025), 1080);
    let probs = vec![1e-17, 2e-16, 0.25, 0.5, 0.25 - 3e-16, 1e-16];
    let total: f64 = probs.iter().sum();
    let (cut, kept, right) = truncate_tails(probs, 1e-15);
    assert_eq!((cut, kept.len()), (2, 3));
    assert!((kept.iter().sum::<f64>() + right - total).abs() < 1e-18);
    assert!(right > 0.0, "the right tail goes to infinite loss");
    assert!(
        (log_a_times_exp_b_plus_c(0.5, 2.0, 0.5) - (0.5 * 2f64.exp() + 0.5).ln()).abs() < 1e-15
    );
    assert!(
        (log_a_times_exp_b_plus_c(2.0, 1.0, -1.0) - (2.0 * 1f64.exp() - 1.0).ln()).abs() < 1e-15
    );
}

/// The Gaussian mechanism's exact δ(ε) with sensitivity 1 and noise σ (Balle and Wang
/// 2018, "Improving the Gaussian Mechanism for Differential Privacy", Theorem 8).
fn exact_gaussian_delta(sigma: f64, eps: f64) -> f64 {
    normal_cdf(0.5 / sigma - eps * sigma) - eps.exp() * normal_cdf(-0.5 / sigma - eps * sigma)
}

#[test]
fn one_gaussian_step_is_bounded_from_above_and_tightly() {
    for sigma in [0.5, 1.0, 2.0, 5.0] {
        let pld = Pld::poisson_gaussian(1.0, sigma, DEFAULT_DISCRETIZATION).unwrap();
        for eps in [0.1, 0.5, 1.0, 2.0] {
            let exact = exact_gaussian_delta(sigma, eps);
            let ours = pld.delta(eps);
            // At a grid point connect-the-dots is exact: equal up to rounding.
            assert!(
                ours >= exact * (1.0 - 1e-12),
                "sigma {sigma} eps {eps}: {ours} < exact {exact}"
            );
            if exact > 1e-10 {
                assert!(
                    (ours - exact) / exact < 1e-3,
                    "sigma {sigma} eps {eps}: {ours} vs {exact}"
                );
            }
        }
        // k steps of noise sigma are one step of noise sigma / sqrt(k) (Dong, Roth, Su).
        let k = 16;
        let composed = pld.self_compose(k).unwrap();
        let one = exact_gaussian_delta(sigma / (k as f64).sqrt(), 1.0);
        let ours = composed.delta(1.0);
        assert!(
            ours >= one * (1.0 - 1e-9) && (ours - one) / one.max(1e-12) < 2e-3,
            "{ours} vs {one}"
        );
    }
}

#[test]
fn an_event_too_wide_to_discretise_gets_no_bound_instead_of_all_the_memory() {
    let mut a = PldAccountant::default();
    a.compose(&super::super::SampledGaussian {
        q: 0.5,
        z: 0.01,
        steps: 3,
    })
    .unwrap();
    assert_eq!(a.epsilon(1e-5), f64::INFINITY);
    assert_eq!(a.delta(1.0), 1.0);
}

#[test]
fn events_that_spend_nothing_or_everything_say_so() {
    let mut a = PldAccountant::default();
    a.compose(&super::super::SampledGaussian {
        q: 0.0,
        z: 0.0,
        steps: 10,
    })
    .unwrap();
    a.compose(&super::super::SampledGaussian {
        q: 0.5,
        z: 1.0,
        steps: 0,
    })
    .unwrap();
    assert_eq!(a.epsilon(1e-5), 0.0);
    a.compose(&super::super::SampledGaussian {
        q: 0.1,
        z: 0.0,
        steps: 1,
    })
    .unwrap();
    assert_eq!(a.epsilon(1e-5), f64::INFINITY);
    assert_eq!(a.delta(3.0), 1.0);
    assert!(
        a.compose(&super::super::SampledGaussian {
            q: 1.5,
            z: 1.0,
            steps: 1
        })
        .is_err()
    );
}
