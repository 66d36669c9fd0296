//! Engine tests of bounded influence: every update's norm is clipped (or refused) at the
//! run's bound, claimed counts are capped, and an aggregate that is not finite or exceeds
//! the bound its updates imply is never committed: the attempt fails and the round is run
//! again.

use std::collections::BTreeMap as Map;

use candle_core::{Device, Tensor};
use proptest::prelude::*;

use super::tests::{SEC, T0, Update, engine, fixture, start, submit, update};
use super::*;
use crate::config::DEFAULT_MAX_EXAMPLES;

/// A delta shaped like the fixture's model with every value `v`.
fn filled(f: &super::tests::Fixture, v: f32) -> Update {
    let tensors: Map<String, Tensor> = f
        .initial
        .iter()
        .map(|(name, t)| {
            let values = vec![v; t.elem_count()];
            (
                name.to_string(),
                Tensor::from_vec(values, t.shape(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let delta = ParamSet::from_tensors(tensors).unwrap();
    let sha = delta.sha256_hex().unwrap();
    Update { delta, sha }
}

/// The L2 distance between two models.
fn moved(a: &ParamSet, b: &ParamSet) -> f64 {
    ParamSet::apply_delta(b, a, -1.0)
        .unwrap()
        .l2_norm()
        .unwrap()
}

#[test]
fn an_overflowing_update_with_a_huge_count_is_clipped_and_the_run_goes_on() {
    let f = fixture("[evaluation]\nevery = 0\nfinal_round = false\n");
    let mut e = engine(&f);
    let bound = f.initial.l2_norm().unwrap();
    assert_eq!(
        e.update_bound(),
        NormBound::Clip(bound),
        "the default bound"
    );
    let tickets = start(&mut e);
    let before = e.global().0.clone();
    let attack = filled(&f, 3.4e38);
    let honest = update(&f, 0.01);
    assert_eq!(
        submit(
            &mut e,
            "site-a",
            &tickets["site-a"],
            &attack,
            1_000_000_000_000,
            T0 + SEC
        ),
        Ok(Accepted::New)
    );
    for site in ["site-b", "site-c"] {
        assert_eq!(
            submit(&mut e, site, &tickets[site], &honest, 1, T0 + SEC),
            Ok(Accepted::New)
        );
    }
    assert_eq!(e.committed_round(), 1);
    let after = e.global().0.clone();
    after.check_finite().unwrap();
    let step = moved(&before, &after);
    assert!(step <= bound * (1.0 + 1e-5), "moved {step} > bound {bound}");
    // The attacker's outcome records what it sent and what it was counted as.
    let a = e
        .store()
        .round_sites("t", 1)
        .unwrap()
        .into_iter()
        .find(|s| s.site_id == "site-a")
        .unwrap();
    assert_eq!(a.clipped, Some(true));
    assert!(a.update_norm.unwrap() > 1e38, "{:?}", a.update_norm);
    assert_eq!(a.weight, Some(DEFAULT_MAX_EXAMPLES as f64));
    // Round 2 starts and the honest sites can train from a finite model.
    e.tick(T0 + 2 * SEC).unwrap();
    assert!(e.poll_task("site-b", T0 + 2 * SEC).unwrap().is_some());
    assert_eq!(e.open_round(), Some(2));
}

#[test]
fn a_large_update_is_refused_when_the_run_says_so() {
    let f = fixture("[aggregation]\nmax_update_norm = 0.5\non_large_update = \"refuse\"\n");
    let mut e = engine(&f);
    assert_eq!(e.update_bound(), NormBound::Refuse(0.5));
    let tickets = start(&mut e);
    let big = update(&f, 1.0);
    let r = submit(&mut e, "site-a", &tickets["site-a"], &big, 10, T0 + SEC);
    match r {
        Err(Rejection::Invalid(why)) => assert!(why.contains("exceeds the bound 0.5"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_aggregate_that_overflows_is_not_committed_and_the_round_is_run_again() {
    // An operator who raised the bound past anything (and a server learning rate of 2)
    // lets deltas near f32's largest value through: the next model would be infinite.
    let mut f = fixture("[aggregation]\nmax_update_norm = 1e300\n");
    f.cfg.run.strategy = crate::config::StrategyKind::Fedavgm;
    f.cfg.run.server_learning_rate = Some(2.0);
    f.cfg.run.server_momentum = Some(0.0);
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("security.jsonl");
    let mut e = engine(&f);
    e.set_security_log(crate::security::SecurityLog::open(&log_path).unwrap());
    let tickets = start(&mut e);
    let before = e.global().1.to_string();
    let huge = filled(&f, 3.0e38);
    for site in ["site-a", "site-b", "site-c"] {
        assert_eq!(
            submit(&mut e, site, &tickets[site], &huge, 10, T0 + SEC),
            Ok(Accepted::New)
        );
    }
    assert_eq!(e.committed_round(), 0, "nothing is committed");
    assert_eq!(e.global().1, before);
    assert_eq!(e.phase(), Phase::Waiting, "the round is tried again");
    assert!(
        e.strategy.state().is_none(),
        "the refused round left no momentum"
    );
    let r1 = e
        .store()
        .rounds("t")
        .unwrap()
        .into_iter()
        .find(|r| r.round == 1)
        .unwrap();
    assert_eq!(r1.status, crate::store::RoundStatus::Failed);
    let reason = r1.failure_reason.unwrap();
    assert!(reason.starts_with("the aggregate was refused"), "{reason}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let event: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["event"] == "aggregate_refused")
        .expect("the refusal is in the security log");
    let sites: Vec<&str> = event["detail"]["updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["site"].as_str().unwrap())
        .collect();
    assert_eq!(sites.len(), 3, "{event}");
    e.tick(T0 + 2 * SEC).unwrap();
    assert!(e.poll_task("site-a", T0 + 2 * SEC).unwrap().is_some());
    assert_eq!(e.open_round(), Some(1), "a new attempt of round 1");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever finite values and claimed counts the accepted updates carry, the committed
    /// model is finite and the mean moves it by at most the bound.
    #[test]
    fn any_accepted_updates_commit_a_finite_model_within_the_bound(
        scales in proptest::collection::vec(-3.4e38f32..3.4e38f32, 3),
        counts in proptest::collection::vec(1u64..=1_000_000_000_000u64, 3),
        rule in prop_oneof![Just("mean"), Just("median"), Just("trimmed_mean")],
    ) {
        let f = fixture(&format!(
            "[evaluation]\nevery = 0\nfinal_round = false\n[aggregation]\nrule = \"{rule}\"\n"
        ));
        let mut e = engine(&f);
        let bound = e.update_bound().limit();
        let tickets = start(&mut e);
        let before = e.global().0.clone();
        for ((site, scale), n) in ["site-a", "site-b", "site-c"].iter().zip(&scales).zip(&counts) {
            let u = filled(&f, *scale);
            let r = submit(&mut e, site, &tickets[*site], &u, *n, T0 + SEC);
            prop_assert_eq!(r, Ok(Accepted::New));
        }
        prop_assert_eq!(e.committed_round(), 1);
        let after = e.global().0.clone();
        prop_assert!(after.check_finite().is_ok());
        let limit = if rule == "mean" { bound } else { 3f64.sqrt() * bound };
        let step = moved(&before, &after);
        prop_assert!(step <= limit * (1.0 + 1e-5), "{rule}: moved {step} > {limit}");
    }
}
