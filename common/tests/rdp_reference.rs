//! fedflow's RDP accountant against fixtures written by Google's `dp_accounting` 0.6.0
//! (`common/tests/privacy/make_rdp_fixtures.py`): every RDP value, ε and δ within 1e-6
//! relative, and the same optimal order wherever the optimum is not a near-tie.

use fedflow_common::privacy::rdp::{
    RdpAccountant, SampledGaussian, compute_epsilon, default_orders,
    rdp_poisson_subsampled_gaussian,
};
use serde_json::Value;

const FIXTURES: &str = include_str!("privacy/rdp_fixtures.json");
const REL_TOL: f64 = 1e-6;

fn num(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "inf" => f64::INFINITY,
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        Value::String(s) if s == "nan" => f64::NAN,
        v => v.as_f64().expect("a number"),
    }
}

thread_local! {
    /// The largest relative difference seen by this thread's test (printed at its end).
    static WORST: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Relative difference, with both-infinite equal and an absolute floor for values near 0.
fn close(ours: f64, theirs: f64) -> bool {
    if ours.is_infinite() || theirs.is_infinite() {
        return ours == theirs;
    }
    let rel = (ours - theirs).abs() / theirs.abs().max(1e-12);
    WORST.with(|w| w.set(w.get().max(rel)));
    rel <= REL_TOL
}

fn report_worst(what: &str) {
    eprintln!(
        "{what}: largest relative difference {:.3e}",
        WORST.with(|w| w.get())
    );
}

/// Checks that our optimal order is the reference's, unless the two orders are a near-tie:
/// ε at the reference's order, computed from our own RDP curve, within `REL_TOL` of our
/// optimum. Returns whether the orders were compared strictly (not a near-tie).
fn check_order(
    acc: &RdpAccountant,
    delta: f64,
    ours: (f64, f64),
    want_order: f64,
    ctx: &str,
) -> bool {
    let (eps, order) = ours;
    if order == want_order {
        return true;
    }
    let i = acc
        .orders()
        .iter()
        .position(|&a| a == want_order)
        .unwrap_or_else(|| panic!("{ctx}: reference order {want_order} is not one of ours"));
    let (at_theirs, _) = compute_epsilon(&[want_order], &[acc.rdp()[i]], delta).unwrap();
    let rel = (at_theirs - eps).abs() / eps.abs().max(1e-12);
    assert!(
        rel <= REL_TOL,
        "{ctx} delta={delta}: optimal order {order} (epsilon {eps}) but the reference's is \
         {want_order} (epsilon there {at_theirs}), not a near-tie"
    );
    false
}

fn fixtures() -> Value {
    serde_json::from_str(FIXTURES).expect("fixtures parse")
}

#[test]
fn default_orders_are_the_references() {
    let f = fixtures();
    let theirs: Vec<f64> = f["orders"].as_array().unwrap().iter().map(num).collect();
    assert_eq!(default_orders(), theirs);
}

#[test]
fn single_mechanism_matches_dp_accounting() {
    let f = fixtures();
    let orders = default_orders();
    let settings = f["single"].as_array().unwrap();
    assert!(settings.len() >= 100, "{} settings", settings.len());
    let mut checked = 0;
    let mut strict_orders = 0;
    for s in settings {
        let (q, z, steps) = (num(&s["q"]), num(&s["z"]), s["steps"].as_u64().unwrap());
        let ctx = format!("q={q} z={z} steps={steps}");
        if let Some(rdp) = s.get("rdp_one_step") {
            let ours = rdp_poisson_subsampled_gaussian(q, z, &orders).unwrap();
            for ((o, r), a) in ours.iter().zip(rdp.as_array().unwrap()).zip(&orders) {
                assert!(close(*o, num(r)), "{ctx} order {a}: rdp {o} vs {}", num(r));
            }
        }
        let mut acc = RdpAccountant::default();
        acc.compose(&SampledGaussian { q, z, steps }).unwrap();
        for e in s["epsilons"].as_array().unwrap() {
            let delta = num(&e["delta"]);
            let (eps, order) = acc.epsilon(delta).unwrap();
            let (want, want_order) = (num(&e["epsilon"]), num(&e["order"]));
            assert!(
                close(eps, want),
                "{ctx} delta={delta}: epsilon {eps} (order {order}) vs {want} (order {want_order})"
            );
            if check_order(&acc, delta, (eps, order), want_order, &ctx) {
                strict_orders += 1;
            }
            checked += 1;
        }
        for d in s["deltas"].as_array().unwrap() {
            let target = num(&d["epsilon"]);
            let (delta, _) = acc.delta(target).unwrap();
            let want = num(&d["delta"]);
            // δ spans hundreds of orders of magnitude; below 1e-300 only "tiny" matters.
            assert!(
                close(delta, want) || delta < 1e-300 && want < 1e-300,
                "{ctx} epsilon={target}: delta {delta} vs {want}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 1000, "only {checked} figures checked");
    // Most optima are not near-ties, so the order check is not vacuous.
    assert!(
        strict_orders >= 100,
        "only {strict_orders} optimal orders matched exactly"
    );
    report_worst("single mechanism");
}

#[test]
fn composed_runs_match_dp_accounting() {
    let f = fixtures();
    for run in f["composed"].as_array().unwrap() {
        let mut acc = RdpAccountant::default();
        for r in run["rounds"].as_array().unwrap() {
            acc.compose(&SampledGaussian {
                q: num(&r["q"]),
                z: num(&r["z"]),
                steps: r["steps"].as_u64().unwrap(),
            })
            .unwrap();
        }
        for (o, t) in acc.rdp().iter().zip(run["rdp"].as_array().unwrap()) {
            assert!(close(*o, num(t)), "rdp {o} vs {}", num(t));
        }
        for e in run["epsilons"].as_array().unwrap() {
            let delta = num(&e["delta"]);
            let (eps, _) = acc.epsilon(delta).unwrap();
            assert!(
                close(eps, num(&e["epsilon"])),
                "delta={delta}: {eps} vs {}",
                num(&e["epsilon"])
            );
        }
    }
    report_worst("composed runs");
}
