//! Continuous runs, the publish gate, operators' publish and rollback, and retention, with
//! explicit times.

use super::tests::{SEC, SITES, T0, engine, evaluate, fixture, poll_all, report, submit, update};
use super::*;
use crate::store::PublishAction;

/// Trains one round with every site at `now` (all three selected).
fn train_round(e: &mut RoundEngine, f: &super::tests::Fixture, now: i64) -> u64 {
    let tickets = poll_all(e, now);
    let round = tickets["site-a"].round;
    for site in SITES {
        let t = &tickets[site];
        assert_eq!(t.kind, TaskKind::Train, "{site} trains in round {round}");
        submit(e, site, t, &update(f, 0.01), 10, now).unwrap();
    }
    assert_eq!(e.committed_round(), round);
    round
}

/// Every site evaluates the model its ticket names, reporting `accuracy`; returns the
/// tickets' round and model hash.
fn evaluate_all(e: &mut RoundEngine, accuracy: f64, now: i64) -> (u64, String) {
    let tickets = poll_all(e, now);
    let t = tickets["site-a"].clone();
    for site in SITES {
        assert_eq!(tickets[site].kind, TaskKind::Evaluate);
        evaluate(e, site, &tickets[site], report(10, accuracy), now).unwrap();
    }
    (t.round, t.model_sha256)
}

#[test]
fn a_continuous_run_goes_past_run_rounds_paced_by_the_interval() {
    let f = fixture(
        "[schedule]\nmode = \"continuous\"\ninterval_secs = 100\n\
         [publish]\nrule = \"every\"\nevery = 2\n\
         [evaluation]\nevery = 0\nfinal_round = false\n",
    );
    f.cfg.validate().unwrap();
    let mut e = engine(&f);
    let mut now = T0;
    for expected in 1..=5 {
        assert_eq!(train_round(&mut e, &f, now), expected);
        assert_eq!(e.phase(), Phase::Waiting, "round {expected} is not the end");
        // Not before the interval has passed since the round started.
        for s in SITES {
            e.site_seen(s, now + 99 * SEC).unwrap();
        }
        assert_eq!(e.poll_task("site-a", now + 99 * SEC).unwrap(), None);
        now += 100 * SEC;
    }
    assert_eq!(e.committed_round(), 5, "run.rounds = 2 does not end it");
    assert_eq!(
        e.published().map(|p| p.round),
        Some(4),
        "every second round"
    );
    let decisions = e.store().gate_decisions("t").unwrap();
    assert_eq!(decisions.len(), 5);
    assert!(
        decisions
            .iter()
            .all(|d| d.published == d.round.is_multiple_of(2))
    );
    // An operator ends it.
    e.stop("enough").unwrap();
    assert_eq!(e.phase(), Phase::Finished);
}

#[test]
fn the_gate_publishes_a_version_only_when_it_is_not_worse_on_the_same_sites() {
    let mut f = fixture("[publish]\ntolerance = 0.05\n");
    f.cfg.run.rounds = 4;
    let mut e = engine(&f);
    let mut now = T0;
    // Round 1: nothing published yet, so its evaluation alone decides.
    train_round(&mut e, &f, now);
    let (round, sha1) = evaluate_all(&mut e, 0.6, now);
    assert_eq!(round, 1);
    assert_eq!(e.published().map(|p| p.round), Some(1));
    // Round 2: worse than the published version re-measured on the same sites.
    now += 100 * SEC;
    train_round(&mut e, &f, now);
    assert_eq!(evaluate_all(&mut e, 0.5, now).0, 2);
    assert_eq!(
        e.phase(),
        Phase::Evaluating,
        "the published version is measured again"
    );
    let (baseline_round, baseline_sha) = evaluate_all(&mut e, 0.7, now);
    assert_eq!((baseline_round, &baseline_sha), (1, &sha1));
    assert_eq!(
        e.model_file(&sha1).map(|(r, _)| r),
        Some(1),
        "the published model is served by hash"
    );
    assert_eq!(e.published().map(|p| p.round), Some(1), "0.5 < 0.7 - 0.05");
    // Round 3: within the tolerance of the published version's fresh figure.
    now += 100 * SEC;
    train_round(&mut e, &f, now);
    evaluate_all(&mut e, 0.66, now);
    evaluate_all(&mut e, 0.7, now);
    assert_eq!(e.published().map(|p| p.round), Some(3));
    let d = e.store().gate_decisions("t").unwrap();
    let by_round: Vec<(u64, bool, Option<u64>)> = d
        .iter()
        .map(|d| (d.round, d.published, d.baseline_round))
        .collect();
    assert_eq!(
        by_round,
        [(1, true, None), (2, false, Some(1)), (3, true, Some(1))]
    );
    assert!((d[1].candidate.unwrap() - 0.5).abs() < 1e-12);
    assert!((d[1].baseline.unwrap() - 0.7).abs() < 1e-12);
    assert_eq!(d[1].sites, 3);
    assert!(d[1].reason.contains("worse"), "{}", d[1].reason);
    // A restart keeps the registry.
    drop(e);
    let e = engine(&f);
    assert_eq!(e.published().map(|p| p.round), Some(3));
}

#[test]
fn without_evaluations_the_gate_publishes_nothing_and_says_why() {
    let mut f = fixture("[publish]\nmin_sites = 3\n");
    f.cfg.run.rounds = 3;
    let mut e = engine(&f);
    train_round(&mut e, &f, T0);
    // Sites that withhold their metrics decline evaluations.
    let tickets = poll_all(&mut e, T0);
    for site in SITES {
        let t = &tickets[site];
        e.decline(site, t.round, &t.task_id, &t.nonce, "metrics withheld", T0)
            .unwrap()
            .unwrap();
    }
    assert_eq!(e.published(), None);
    let d = e.store().gate_decisions("t").unwrap();
    assert_eq!(d.len(), 1);
    assert!(!d[0].published);
    assert!(d[0].reason.contains("min_sites is 3"), "{}", d[0].reason);
    assert!(d[0].reason.contains("publish by hand"), "{}", d[0].reason);
    // An operator can still publish it.
    let p = e
        .publish_version(1, "admin/ops", "checked by hand", T0)
        .unwrap();
    assert_eq!((p.round, p.action), (1, PublishAction::Publish));
    assert_eq!(e.published().map(|p| p.round), Some(1));
}

#[test]
fn operators_publish_and_roll_back_through_a_stack_of_versions() {
    let mut f =
        fixture("[publish]\nrule = \"every\"\n[evaluation]\nevery = 0\nfinal_round = false\n");
    f.cfg.run.rounds = 3;
    let mut e = engine(&f);
    let err = e.rollback("admin/ops", "oops", T0).unwrap_err().to_string();
    assert!(err.contains("no version has been published"), "{err}");
    for i in 0..3 {
        train_round(&mut e, &f, T0 + i * 100 * SEC);
    }
    assert_eq!(e.published().map(|p| p.round), Some(3));
    assert_eq!(e.rollback("admin/ops", "bad", T0).unwrap().round, 2);
    assert_eq!(e.rollback("admin/ops", "bad too", T0).unwrap().round, 1);
    let err = e
        .rollback("admin/ops", "again", T0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no version was published before version 1"),
        "{err}"
    );
    assert_eq!(
        e.publish_version(3, "admin/ops", "fixed", T0)
            .unwrap()
            .round,
        3
    );
    let err = e
        .publish_version(7, "admin/ops", "?", T0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no round 7"), "{err}");
    let history: Vec<(u64, PublishAction)> = e
        .store()
        .publications("t")
        .unwrap()
        .iter()
        .map(|p| (p.round, p.action))
        .collect();
    assert_eq!(
        history,
        [
            (1, PublishAction::Gate),
            (2, PublishAction::Gate),
            (3, PublishAction::Gate),
            (2, PublishAction::Rollback),
            (1, PublishAction::Rollback),
            (3, PublishAction::Publish),
        ]
    );
}

#[test]
fn retention_keeps_the_last_rounds_every_published_version_and_round_zero() {
    let f = fixture(
        "[schedule]\nmode = \"continuous\"\n[retention]\nkeep_last = 2\n\
         [publish]\nrule = \"every\"\nevery = 3\n[evaluation]\nevery = 0\n",
    );
    f.cfg.validate().unwrap();
    let mut e = engine(&f);
    for i in 0..7 {
        train_round(&mut e, &f, T0 + i * 100 * SEC);
    }
    assert_eq!(e.store().kept_rounds("t").unwrap(), [0, 3, 6, 7]);
    for round in 0..=7 {
        let file = e.store().model_checkpoint_path("t", round);
        assert_eq!(
            file.exists(),
            [0, 3, 6, 7].contains(&round),
            "round {round}"
        );
    }
    assert!(e.store().pruned("t", 2).unwrap());
    let err = e
        .publish_version(2, "admin/ops", "old", T0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("deleted by the retention rule"), "{err}");
    // A restart resumes from the kept state, and a rollback finds its version.
    let sha = e.global().1.to_string();
    drop(e);
    let mut e = engine(&f);
    assert_eq!((e.committed_round(), e.global().1), (7, sha.as_str()));
    assert_eq!(e.rollback("admin/ops", "back", T0).unwrap().round, 3);
}

#[test]
fn a_corrupt_published_checkpoint_is_refused_at_start() {
    let mut f = fixture("[publish]\nrule = \"every\"\n[evaluation]\nevery = 0\n");
    f.cfg.run.rounds = 3;
    f.cfg.evaluation.final_round = false;
    let mut e = engine(&f);
    train_round(&mut e, &f, T0);
    train_round(&mut e, &f, T0 + 100 * SEC);
    e.rollback("admin/ops", "keep 1", T0).unwrap();
    let path = e.store().model_checkpoint_path("t", 1);
    drop(e);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let store = Store::open(f.dir.path().join("data")).unwrap();
    let err = RoundEngine::open(store, f.cfg.clone(), f.initial.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("published version 1"), "{err}");
    assert!(err.contains("corrupt"), "{err}");
}
