//! The distributed discrete Gaussian's accounting (`fedflow_common::privacy::ddg`) against
//! fixtures computed independently from KLS21's statements and Zhu and Wang's bound, with
//! ε from Google's `dp_accounting` 0.6.0 (`common/tests/privacy/make_ddg_fixtures.py`):
//! the rounding bound, τ, every RDP value and ε within 1e-6 relative, at the same orders.

use fedflow_common::privacy::ddg::{DdgRelease, rounded_l1_bound, rounded_l2_bound, tau};
use serde_json::Value;

const FIXTURES: &str = include_str!("privacy/ddg_fixtures.json");
const REL_TOL: f64 = 1e-6;

fn close(ours: f64, theirs: f64) -> bool {
    (ours - theirs).abs() <= REL_TOL * theirs.abs().max(1e-12)
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is a number"))
}

#[test]
fn the_distributed_discrete_gaussian_matches_the_reference() {
    let fixtures: Value = serde_json::from_str(FIXTURES).unwrap();
    let cases = fixtures["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let dim = case["dimension"].as_u64().unwrap() as usize;
        let sites = case["sites"].as_u64().unwrap() as usize;
        let sigma = f(case, "sigma");
        let ctx = format!("{case:.80}");
        let l2 = rounded_l2_bound(f(case, "clip"), f(case, "beta"), dim).unwrap();
        assert!(close(l2, f(case, "l2_sensitivity")), "{ctx}: L2 {l2}");
        let l1 = rounded_l1_bound(l2, dim);
        assert!(close(l1, f(case, "l1_sensitivity")), "{ctx}: L1 {l1}");
        let t = tau(sigma, sites);
        let want_tau = f(case, "tau");
        assert!(
            close(t, want_tau) || (t - want_tau).abs() < 1e-300,
            "{ctx}: tau {t} vs {want_tau}"
        );
        let release = DdgRelease {
            l2_sensitivity: l2,
            l1_sensitivity: l1,
            sigma,
            sites,
            dimension: dim,
            sampling_rate: f(case, "sampling_rate"),
        };
        let orders: Vec<f64> = case["orders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_f64().unwrap())
            .collect();
        assert_eq!(release.orders(), orders, "{ctx}: orders");
        for (i, (ours, theirs)) in release
            .rdp()
            .unwrap()
            .iter()
            .zip(case["rdp"].as_array().unwrap())
            .enumerate()
        {
            let theirs = theirs.as_f64().unwrap();
            assert!(
                close(*ours, theirs),
                "{ctx}: RDP at order {} {ours} vs {theirs}",
                orders[i]
            );
        }
        let rounds = case["rounds"].as_u64().unwrap();
        for (delta, want) in case["epsilon"].as_object().unwrap() {
            let delta: f64 = delta.parse().unwrap();
            let (eps, order) = release.epsilon(rounds, delta).unwrap();
            let want_eps = want[0].as_f64().unwrap();
            assert!(
                close(eps, want_eps),
                "{ctx}: ε at δ {delta}: {eps} vs {want_eps}"
            );
            assert_eq!(
                order,
                want[1].as_f64().unwrap(),
                "{ctx}: order at δ {delta}"
            );
        }
    }
}
