//! The one-run audit estimator against fixtures written by the code of Steinke, Nasr and
//! Jagielski 2023 (Appendix D) with SciPy's binomial (`common/tests/privacy/
//! make_audit_fixtures.py`): every p-value within 1e-9 relative (or 1e-300 absolute, where
//! both are that small), every ε lower bound within 1e-5.

use fedflow_common::privacy::audit::{epsilon_lower_bound, p_value};
use serde_json::Value;

const FIXTURES: &str = include_str!("privacy/audit_fixtures.json");

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"))
}

#[test]
fn p_values_match_the_papers_code() {
    let all: Value = serde_json::from_str(FIXTURES).unwrap();
    let cases = all["p_values"].as_array().unwrap();
    assert!(cases.len() >= 300, "{} fixtures", cases.len());
    let mut worst = 0f64;
    for c in cases {
        let ours = p_value(
            u(c, "m"),
            u(c, "r"),
            u(c, "v"),
            f(c, "epsilon"),
            f(c, "delta"),
        )
        .unwrap();
        let theirs = f(c, "p_value");
        if ours.abs() < 1e-300 && theirs.abs() < 1e-300 {
            continue;
        }
        let rel = (ours - theirs).abs() / theirs.abs();
        worst = worst.max(rel);
        assert!(rel <= 1e-9, "{c}: ours {ours}, reference {theirs}");
    }
    eprintln!("p-values: largest relative difference {worst:.3e}");
}

#[test]
fn lower_bounds_match_the_papers_code() {
    let all: Value = serde_json::from_str(FIXTURES).unwrap();
    let cases = all["bounds"].as_array().unwrap();
    assert!(cases.len() >= 100, "{} fixtures", cases.len());
    let mut nonzero = 0;
    for c in cases {
        let ours =
            epsilon_lower_bound(u(c, "m"), u(c, "r"), u(c, "v"), f(c, "delta"), f(c, "p")).unwrap();
        let theirs = f(c, "epsilon_lower_bound");
        nonzero += usize::from(theirs > 0.0);
        assert!(
            (ours - theirs).abs() <= 1e-5,
            "{c}: ours {ours}, reference {theirs}"
        );
    }
    assert!(
        nonzero > cases.len() / 2,
        "too few fixtures reject anything"
    );
}
