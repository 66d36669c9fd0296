//! fedflow's PLD accountant against fixtures written by Google's `dp_accounting` 0.6.0
//! `PLDAccountant` (`common/tests/privacy/make_pld_fixtures.py`): every ε for δ and δ for ε
//! within 1e-3 relative (δ below about 1e-12 is the FFTs' rounding in both, so δ is compared
//! with an absolute floor of 1e-12), never below the reference by more than that (the bound
//! must stay a bound), and never looser than the RDP accountant's ε for the same events.

use fedflow_common::privacy::RdpAccountant;
use fedflow_common::privacy::SampledGaussian;
use fedflow_common::privacy::pld::PldAccountant;
use serde_json::Value;

const FIXTURES: &str = include_str!("privacy/pld_fixtures.json");
const REL_TOL: f64 = 1e-3;

fn num(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "inf" => f64::INFINITY,
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        v => v.as_f64().expect("a number"),
    }
}

fn events(setting: &Value) -> Vec<SampledGaussian> {
    setting["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| SampledGaussian {
            q: num(&r["q"]),
            z: num(&r["z"]),
            steps: r["steps"].as_u64().unwrap(),
        })
        .collect()
}

/// Relative difference of `ours` from `theirs` (both infinite: 0), with an absolute floor.
fn rel(ours: f64, theirs: f64, floor: f64) -> f64 {
    if ours.is_infinite() || theirs.is_infinite() {
        return if ours == theirs { 0.0 } else { f64::INFINITY };
    }
    (ours - theirs).abs() / theirs.abs().max(floor)
}

#[test]
fn every_epsilon_and_delta_is_the_references_within_a_thousandth() {
    let f: Value = serde_json::from_str(FIXTURES).unwrap();
    let settings = f["settings"].as_array().unwrap();
    assert!(settings.len() >= 130, "{} settings", settings.len());
    let (mut worst_eps, mut worst_delta, mut checked) = (0.0f64, 0.0f64, 0);
    let mut tighter = 0;
    // Settings are independent: composed on every core, checked in order.
    use rayon::prelude::*;
    let composed: Vec<(PldAccountant, RdpAccountant)> = settings
        .par_iter()
        .map(|s| {
            let mut acc = PldAccountant::default();
            let mut rdp = RdpAccountant::default();
            for e in events(s) {
                acc.compose(&e).unwrap();
                rdp.compose(&e).unwrap();
            }
            (acc, rdp)
        })
        .collect();
    for (s, (acc, rdp)) in settings.iter().zip(&composed) {
        // The point of PLD: never looser than RDP for the same events.
        let (r, _) = rdp.epsilon(1e-5).unwrap();
        let p = acc.epsilon(1e-5);
        if r.is_finite() && r > 0.05 {
            assert!(p <= r * 1.0001, "{}: PLD {p} > RDP {r}", s["rounds"]);
            tighter += 1;
        }
        for q in s["epsilons"].as_array().unwrap() {
            let (delta, want) = (num(&q["delta"]), num(&q["epsilon"]));
            let got = acc.epsilon(delta);
            let r = rel(got, want, 1e-3);
            assert!(
                r <= REL_TOL,
                "{}: delta {delta}: epsilon {got}, the reference's {want} (relative {r:.2e})",
                s["rounds"]
            );
            // Never optimistic beyond the tolerance: a bound must not shrink.
            assert!(
                want.is_infinite() || got >= want - REL_TOL * want.abs().max(1e-3),
                "{}",
                s["rounds"]
            );
            worst_eps = worst_eps.max(r);
            checked += 1;
        }
        for q in s["deltas"].as_array().unwrap() {
            let (eps, want) = (num(&q["epsilon"]), num(&q["delta"]));
            let got = acc.delta(eps);
            // delta spans many orders of magnitude; below about 1e-12 it is the FFTs'
            // rounding, in the reference as here, so differences of 1e-12 are noise.
            let r = rel(got, want, 1e-9);
            assert!(
                r <= REL_TOL,
                "{}: epsilon {eps}: delta {got}, the reference's {want} (relative {r:.2e})",
                s["rounds"]
            );
            assert!(got >= want - REL_TOL * want - 1e-12, "{}", s["rounds"]);
            worst_delta = worst_delta.max(r);
            checked += 1;
        }
    }
    assert!(checked >= 600, "{checked} figures");
    assert!(tighter >= 100, "{tighter} settings compared with RDP");
    eprintln!(
        "{checked} figures: largest relative difference {worst_eps:.3e} (epsilon), \
         {worst_delta:.3e} (delta)"
    );
}
