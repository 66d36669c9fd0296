//! Round engine tests, with explicit times (no clocks, no sleeps).

use candle_core::Device;
use fedflow_common::data::Vocab;
use fedflow_common::model::AttentionFlowModel;

use super::*;
use crate::metrics::SiteReport;

pub(crate) const T0: i64 = 1_000_000;
pub(crate) const SEC: i64 = 1000;

pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) cfg: RunConfig,
    pub(crate) initial: ParamSet,
}

pub(crate) fn fixture(extra: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    Vocab::from_events(["a", "b", "c"])
        .unwrap()
        .save(dir.path().join("vocab.json"))
        .unwrap();
    let text = format!(
        "[run]\nname = \"t\"\nseed = 1\nrounds = 2\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 4\nhidden_size = 4\nnum_layers = 1\n\
         [sampling]\nfraction = 1.0\nmin_selected = 2\nmin_available = 3\n\
         [rounds]\ndeadline_secs = 60\nmin_completed = 2\nheartbeat_timeout_secs = 30\nmax_retries = 1\n{extra}"
    );
    let cfg = RunConfig::from_toml_str(&text, dir.path()).unwrap();
    let model = AttentionFlowModel::new(&cfg.model_config().unwrap(), &Device::Cpu, 0).unwrap();
    let initial = ParamSet::from_varmap(model.varmap()).unwrap();
    Fixture { dir, cfg, initial }
}

pub(crate) fn engine(f: &Fixture) -> RoundEngine {
    let store = Store::open(f.dir.path().join("data")).unwrap();
    RoundEngine::open(store, f.cfg.clone(), f.initial.clone()).unwrap()
}

pub(crate) const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

/// All three sites show up; the first poll after that starts round 1.
pub(crate) fn start(e: &mut RoundEngine) -> BTreeMap<String, TaskTicket> {
    for s in SITES {
        e.site_seen(s, T0).unwrap();
    }
    SITES
        .iter()
        .map(|s| {
            (
                s.to_string(),
                e.poll_task(s, T0).unwrap().expect("selected"),
            )
        })
        .collect()
}

pub(super) fn first_value(p: &ParamSet) -> f32 {
    p.get("head.bias").unwrap().to_vec1::<f32>().unwrap()[0]
}

pub(crate) struct Update {
    pub(crate) delta: ParamSet,
    pub(crate) sha: String,
}

pub(crate) fn update(f: &Fixture, scale: f32) -> Update {
    let delta = f.initial.scale(scale).unwrap();
    let sha = delta.sha256_hex().unwrap();
    Update { delta, sha }
}

pub(crate) fn submit(
    e: &mut RoundEngine,
    site: &str,
    t: &TaskTicket,
    u: &Update,
    examples: u64,
    now: i64,
) -> std::result::Result<Accepted, Rejection> {
    let base = e.global().1.to_string();
    e.submit(
        Submission {
            site_id: site.to_owned(),
            round: t.round,
            task_id: t.task_id.clone(),
            nonce: t.nonce.clone(),
            base_model_sha256: base.clone(),
            delta: u.delta.clone().into(),
            delta_sha256: u.sha.clone(),
            report: UpdateReport {
                train_examples: examples,
                claimed_weight: examples as f64,
            },
            metrics: SiteReport::default(),
            unclipped: false,
        },
        now,
    )
    .unwrap()
}

#[test]
fn a_round_commits_the_weighted_mean_when_every_site_answered() {
    let f = fixture("");
    let mut e = engine(&f);
    assert_eq!(e.phase(), Phase::Waiting);
    let tickets = start(&mut e);
    assert_eq!(e.open_round(), Some(1));
    let before = first_value(e.global().0);
    for (site, scale, n) in [
        ("site-a", 0.1, 10),
        ("site-b", 0.2, 20),
        ("site-c", 0.3, 30),
    ] {
        assert_eq!(
            submit(
                &mut e,
                site,
                &tickets[site],
                &update(&f, scale),
                n,
                T0 + SEC
            ),
            Ok(Accepted::New)
        );
    }
    // Weighted mean delta = (10·0.1 + 20·0.2 + 30·0.3) / 60 = 14/60 of the initial model.
    assert_eq!(e.committed_round(), 1);
    let after = first_value(e.global().0);
    assert!(
        (after - before * (1.0 + 14.0 / 60.0)).abs() < 1e-6,
        "{before} -> {after}"
    );
    let rounds = e.store().rounds("t").unwrap();
    assert_eq!(
        rounds.last().unwrap().model_sha256.as_deref(),
        Some(e.global().1)
    );

    // A restart resumes at round 1 with the identical model.
    let sha = e.global().1.to_string();
    drop(e);
    let e = engine(&f);
    assert_eq!(e.committed_round(), 1);
    assert_eq!(e.global().1, sha);
}

#[test]
fn every_bad_update_is_rejected_and_changes_nothing() {
    let f = fixture("");
    let mut e = engine(&f);
    let tickets = start(&mut e);
    let t = &tickets["site-a"];
    let good = update(&f, 0.1);
    let base = e.global().1.to_string();
    let try_submit = |e: &mut RoundEngine,
                      site: &str,
                      round: u64,
                      task: &str,
                      nonce: &[u8],
                      base: &str,
                      u: &Update,
                      now: i64| {
        e.submit(
            Submission {
                site_id: site.to_owned(),
                round,
                task_id: task.to_owned(),
                nonce: nonce.to_owned(),
                base_model_sha256: base.to_owned(),
                delta: u.delta.clone().into(),
                delta_sha256: u.sha.clone(),
                report: UpdateReport {
                    train_examples: 5,
                    claimed_weight: 5.0,
                },
                metrics: SiteReport::default(),
                unclipped: false,
            },
            now,
        )
        .unwrap()
    };
    assert_eq!(
        try_submit(&mut e, "site-d", 1, &t.task_id, &t.nonce, &base, &good, T0),
        Err(Rejection::NotSelected(1))
    );
    assert_eq!(
        try_submit(&mut e, "site-a", 1, &t.task_id, b"forged", &base, &good, T0),
        Err(Rejection::WrongTask)
    );
    assert_eq!(
        try_submit(&mut e, "site-a", 2, &t.task_id, &t.nonce, &base, &good, T0),
        Err(Rejection::WrongRound { open: 1, got: 2 })
    );
    assert!(matches!(
        try_submit(&mut e, "site-a", 1, &t.task_id, &t.nonce, "0000", &good, T0),
        Err(Rejection::WrongBase { .. })
    ));
    // A delta with a wrong shape: the accumulator refuses it before touching anything.
    let mut tensors = good.delta.clone().into_tensors();
    tensors.insert(
        "head.bias".into(),
        candle_core::Tensor::zeros(7, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let bad_delta = ParamSet::from_tensors(tensors).unwrap();
    let bad = Update {
        sha: bad_delta.sha256_hex().unwrap(),
        delta: bad_delta,
    };
    assert!(matches!(
        try_submit(&mut e, "site-a", 1, &t.task_id, &t.nonce, &base, &bad, T0),
        Err(Rejection::Invalid(_))
    ));

    assert_eq!(
        try_submit(&mut e, "site-a", 1, &t.task_id, &t.nonce, &base, &good, T0),
        Ok(Accepted::New)
    );
    // The same update again (a resend) is accepted once; a different one is refused.
    assert_eq!(
        try_submit(&mut e, "site-a", 1, &t.task_id, &t.nonce, &base, &good, T0),
        Ok(Accepted::Duplicate)
    );
    let other = update(&f, 0.5);
    assert_eq!(
        try_submit(&mut e, "site-a", 1, &t.task_id, &t.nonce, &base, &other, T0),
        Err(Rejection::Conflicting)
    );
    // Late: after the deadline, even before the round is closed by a tick.
    let tb = &tickets["site-b"];
    assert_eq!(
        try_submit(
            &mut e,
            "site-b",
            1,
            &tb.task_id,
            &tb.nonce,
            &base,
            &good,
            T0 + 61 * SEC
        ),
        Err(Rejection::Late(1))
    );
    assert_eq!(
        e.committed_round(),
        0,
        "nothing committed by rejected updates"
    );
}

#[test]
fn a_silent_site_is_dropped_and_the_quorum_commits_without_it() {
    let f = fixture("");
    let mut e = engine(&f);
    let tickets = start(&mut e);
    submit(
        &mut e,
        "site-a",
        &tickets["site-a"],
        &update(&f, 0.1),
        10,
        T0 + SEC,
    )
    .unwrap();
    submit(
        &mut e,
        "site-b",
        &tickets["site-b"],
        &update(&f, 0.1),
        10,
        T0 + SEC,
    )
    .unwrap();
    e.tick(T0 + 20 * SEC).unwrap();
    assert_eq!(
        e.open_round(),
        Some(1),
        "site-c is still within its heartbeat timeout"
    );
    e.tick(T0 + 31 * SEC).unwrap();
    assert_eq!(
        e.committed_round(),
        1,
        "site-c dropped; two updates meet the quorum"
    );
    let sites = e.store().round_sites("t", 1).unwrap();
    let c = sites.iter().find(|s| s.site_id == "site-c").unwrap();
    assert_eq!(c.state, SiteState::Dropped);
    // Its late update is refused: the round is closed.
    let late = submit(
        &mut e,
        "site-c",
        &tickets["site-c"],
        &update(&f, 0.1),
        10,
        T0 + 32 * SEC,
    );
    assert_eq!(late, Err(Rejection::Late(1)));
}

#[test]
fn missing_the_quorum_retries_then_pauses_the_run() {
    let f = fixture("");
    let mut e = engine(&f);
    let tickets = start(&mut e);
    submit(
        &mut e,
        "site-a",
        &tickets["site-a"],
        &update(&f, 0.1),
        10,
        T0 + SEC,
    )
    .unwrap();
    // Keep b and c alive (heartbeats) but silent on updates until the deadline.
    e.site_seen("site-b", T0 + 50 * SEC).unwrap();
    e.site_seen("site-c", T0 + 50 * SEC).unwrap();
    e.tick(T0 + 61 * SEC).unwrap();
    assert_eq!(e.phase(), Phase::Waiting, "first failure: retry");
    assert_eq!(e.committed_round(), 0);

    // The retry hands out new tasks for the same round.
    let now = T0 + 62 * SEC;
    for s in SITES {
        e.site_seen(s, now).unwrap();
    }
    let retry = e.poll_task("site-a", now).unwrap().expect("round 1 again");
    assert_eq!(retry.round, 1);
    assert_ne!(retry.task_id, tickets["site-a"].task_id);
    e.tick(now + 61 * SEC).unwrap();
    assert_eq!(
        e.phase(),
        Phase::Paused,
        "second failure exceeds max_retries = 1"
    );
    let run = e.store().run("t").unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Paused);
    assert!(
        run.status_reason
            .unwrap()
            .contains("of the 2 updates needed")
    );
}

#[test]
fn a_round_open_at_a_crash_is_run_again_from_the_committed_model() {
    let f = fixture("");
    let mut e = engine(&f);
    let sha0 = e.global().1.to_string();
    let tickets = start(&mut e);
    submit(
        &mut e,
        "site-a",
        &tickets["site-a"],
        &update(&f, 0.1),
        10,
        T0 + SEC,
    )
    .unwrap();
    drop(e); // crash with round 1 half done

    let mut e = engine(&f);
    assert_eq!(e.committed_round(), 0);
    assert_eq!(e.global().1, sha0);
    assert_eq!(e.phase(), Phase::Waiting);
    let again = start(&mut e);
    assert_eq!(again["site-a"].round, 1);
    for site in SITES {
        submit(
            &mut e,
            site,
            &again[site],
            &update(&f, 0.1),
            10,
            T0 + 2 * SEC,
        )
        .unwrap();
    }
    assert_eq!(e.committed_round(), 1);
}

pub(crate) fn report(val_examples: u64, accuracy: f64) -> SiteReport {
    SiteReport {
        train_examples: 10,
        validation_examples: val_examples,
        train_loss: Some(1.5),
        validation_loss: Some(1.0 - accuracy),
        validation_accuracy: Some(accuracy),
        validation_macro_f1: Some(accuracy / 2.0),
        epochs_run: 1,
        train_seconds: 0.1,
    }
}

pub(crate) fn evaluate(
    e: &mut RoundEngine,
    site: &str,
    t: &TaskTicket,
    metrics: SiteReport,
    now: i64,
) -> std::result::Result<Accepted, Rejection> {
    let sha = t.model_sha256.clone();
    e.submit_evaluation(
        EvaluationSubmission {
            site_id: site.to_owned(),
            round: t.round,
            task_id: t.task_id.clone(),
            nonce: t.nonce.clone(),
            model_sha256: sha.clone(),
            metrics,
        },
        now,
    )
    .unwrap()
}

/// Every site polls at `now`; returns the tickets.
pub(crate) fn poll_all(e: &mut RoundEngine, now: i64) -> BTreeMap<String, TaskTicket> {
    for s in SITES {
        e.site_seen(s, now).unwrap();
    }
    SITES
        .iter()
        .map(|s| (s.to_string(), e.poll_task(s, now).unwrap().expect("a task")))
        .collect()
}

#[test]
fn the_run_finishes_after_its_last_round_and_its_evaluation() {
    // Evaluate after round 2 only (the last round).
    let f = fixture("[evaluation]\nevery = 5\nfinal_round = true\n");
    let mut e = engine(&f);
    for round in 1..=2 {
        let now = T0 + round as i64 * 100 * SEC;
        let tickets = poll_all(&mut e, now);
        assert!(tickets.values().all(|t| t.kind == TaskKind::Train));
        for site in SITES {
            submit(&mut e, site, &tickets[site], &update(&f, 0.01), 10, now).unwrap();
        }
    }
    assert_eq!(e.committed_round(), 2);
    assert_eq!(e.phase(), Phase::Evaluating, "the last round is evaluated");
    assert_eq!(
        e.store().run("t").unwrap().unwrap().status,
        RunStatus::Running
    );
    let now = T0 + 210 * SEC;
    let tickets = poll_all(&mut e, now);
    for (i, site) in SITES.iter().enumerate() {
        let t = &tickets[*site];
        assert_eq!((t.kind, t.round), (TaskKind::Evaluate, 2));
        evaluate(&mut e, site, t, report(10, 0.5 + 0.1 * i as f64), now).unwrap();
    }
    assert_eq!(e.phase(), Phase::Finished);
    assert_eq!(e.poll_task("site-a", T0 + 400 * SEC).unwrap(), None);
    assert_eq!(
        e.store().run("t").unwrap().unwrap().status,
        RunStatus::Finished
    );
    let last = e.store().rounds("t").unwrap().pop().unwrap();
    let summary: crate::metrics::EvaluationSummary =
        serde_json::from_str(last.evaluation_json.as_deref().unwrap()).unwrap();
    assert_eq!((summary.sites, summary.examples), (3, 30));
    assert!((summary.accuracy.unwrap() - 0.6).abs() < 1e-12);
}

#[test]
fn rounds_record_weighted_training_metrics_and_evaluations_follow_the_schedule() {
    let f = fixture("");
    let mut e = engine(&f);
    let tickets = start(&mut e);
    let base = e.global().1.to_string();
    for (site, n, acc) in [
        ("site-a", 10, 0.2),
        ("site-b", 30, 0.6),
        ("site-c", 60, 0.9),
    ] {
        let mut m = report(n, acc);
        m.train_examples = n;
        e.submit(
            Submission {
                site_id: site.to_owned(),
                round: 1,
                task_id: tickets[site].task_id.clone(),
                nonce: tickets[site].nonce.clone(),
                base_model_sha256: base.clone(),
                delta: update(&f, 0.1).delta.clone().into(),
                delta_sha256: update(&f, 0.1).sha.clone(),
                report: UpdateReport {
                    train_examples: n,
                    claimed_weight: n as f64,
                },
                metrics: m,
                unclipped: false,
            },
            T0 + SEC,
        )
        .unwrap()
        .unwrap();
    }
    let r1 = &e.store().rounds("t").unwrap()[1];
    let train: crate::metrics::TrainingSummary =
        serde_json::from_str(r1.metrics_json.as_deref().unwrap()).unwrap();
    assert_eq!((train.updates, train.train_examples), (3, 100));
    let want = (0.2 * 10.0 + 0.6 * 30.0 + 0.9 * 60.0) / 100.0;
    assert!((train.local_validation_accuracy.unwrap() - want).abs() < 1e-12);
    assert_eq!(train.closed_because, "every selected site answered");

    // evaluation.every = 1: the model of round 1 is evaluated before round 2 starts, and a
    // site that went silent is dropped from it without blocking it.
    assert_eq!(e.phase(), Phase::Evaluating);
    let now = T0 + 2 * SEC;
    let ta = e.poll_task("site-a", now).unwrap().unwrap();
    let tb = e.poll_task("site-b", now).unwrap().unwrap();
    assert_eq!(ta.kind, TaskKind::Evaluate);
    evaluate(&mut e, "site-a", &ta, report(10, 0.4), now).unwrap();
    evaluate(&mut e, "site-b", &tb, report(30, 0.8), now).unwrap();
    assert_eq!(e.phase(), Phase::Evaluating, "site-c has not answered");
    e.tick(now + 31 * SEC).unwrap();
    assert_eq!(
        e.phase(),
        Phase::Waiting,
        "site-c dropped, evaluation closed"
    );
    let view = e.view(now + 31 * SEC);
    let c = view.sites.iter().find(|s| s.site_id == "site-c").unwrap();
    assert_eq!(c.state, LiveState::Dropped);
    let evals = e.store().evaluations("t", 1).unwrap();
    assert_eq!(evals.len(), 2);
    let r1 = &e.store().rounds("t").unwrap()[1];
    let eval: crate::metrics::EvaluationSummary =
        serde_json::from_str(r1.evaluation_json.as_deref().unwrap()).unwrap();
    assert_eq!((eval.sites, eval.examples), (2, 40));
    assert!((eval.accuracy.unwrap() - (0.4 * 10.0 + 0.8 * 30.0) / 40.0).abs() < 1e-12);
}

#[test]
fn bad_evaluation_reports_are_rejected_and_change_nothing() {
    let f = fixture("");
    let mut e = engine(&f);
    let tickets = start(&mut e);
    for site in SITES {
        submit(&mut e, site, &tickets[site], &update(&f, 0.1), 10, T0).unwrap();
    }
    let now = T0 + SEC;
    let t = poll_all(&mut e, now);
    let ta = &t["site-a"];
    let sha = e.global().1.to_string();
    let try_eval = |e: &mut RoundEngine, nonce: &[u8], model: &str, m: SiteReport, now| {
        e.submit_evaluation(
            EvaluationSubmission {
                site_id: "site-a".to_owned(),
                round: 1,
                task_id: ta.task_id.clone(),
                nonce: nonce.to_owned(),
                model_sha256: model.to_owned(),
                metrics: m,
            },
            now,
        )
        .unwrap()
    };
    assert_eq!(
        try_eval(&mut e, b"forged", &sha, report(5, 0.5), now),
        Err(Rejection::WrongTask)
    );
    assert!(matches!(
        try_eval(&mut e, &ta.nonce, "00", report(5, 0.5), now),
        Err(Rejection::WrongBase { .. })
    ));
    assert!(matches!(
        try_eval(&mut e, &ta.nonce, &sha, report(5, 1.5), now),
        Err(Rejection::Invalid(_))
    ));
    assert!(e.store().evaluations("t", 1).unwrap().is_empty());
    let view = e.view(now);
    let a = view.sites.iter().find(|s| s.site_id == "site-a").unwrap();
    assert_eq!(a.state, LiveState::Rejected, "{a:?}");
    // A training update for the round that closed is refused as late, even during its evaluation.
    assert_eq!(
        submit(
            &mut e,
            "site-a",
            &tickets["site-a"],
            &update(&f, 0.1),
            10,
            now
        ),
        Err(Rejection::Late(1))
    );
    // A valid report is accepted once; a resend is a duplicate, a different one a conflict.
    assert_eq!(
        try_eval(&mut e, &ta.nonce, &sha, report(5, 0.5), now),
        Ok(Accepted::New)
    );
    assert_eq!(
        try_eval(&mut e, &ta.nonce, &sha, report(5, 0.5), now),
        Ok(Accepted::Duplicate)
    );
    assert_eq!(
        try_eval(&mut e, &ta.nonce, &sha, report(5, 0.7), now),
        Err(Rejection::Conflicting)
    );
    assert_eq!(
        try_eval(&mut e, &ta.nonce, &sha, report(5, 0.5), now + 61 * SEC),
        Ok(Accepted::Duplicate),
        "the resend of an accepted report stays a duplicate"
    );
    let tb = &t["site-b"];
    assert_eq!(
        evaluate(&mut e, "site-b", tb, report(5, 0.5), now + 61 * SEC),
        Err(Rejection::Late(1))
    );
}

#[test]
fn an_evaluation_interrupted_by_a_crash_is_run_again() {
    let f = fixture("");
    let mut e = engine(&f);
    let tickets = start(&mut e);
    for site in SITES {
        submit(&mut e, site, &tickets[site], &update(&f, 0.1), 10, T0).unwrap();
    }
    let t = poll_all(&mut e, T0 + SEC);
    evaluate(&mut e, "site-a", &t["site-a"], report(5, 0.5), T0 + SEC).unwrap();
    let sha = e.global().1.to_string();
    drop(e); // crash during the evaluation

    let mut e = engine(&f);
    assert_eq!((e.committed_round(), e.global().1), (1, sha.as_str()));
    assert_eq!(e.phase(), Phase::Evaluating);
    let t = poll_all(&mut e, T0 + 10 * SEC);
    assert!(
        e.store().evaluations("t", 1).unwrap().is_empty(),
        "the interrupted attempt was forgotten"
    );
    for site in SITES {
        evaluate(&mut e, site, &t[site], report(5, 0.5), T0 + 10 * SEC).unwrap();
    }
    assert_eq!(e.phase(), Phase::Waiting);
    assert!(!e.store().evaluation_pending("t", 1).unwrap());
}

#[test]
fn heartbeats_report_progress_and_cancel_stale_tasks() {
    let f = fixture("");
    let mut e = engine(&f);
    let tickets = start(&mut e);
    fn hb(task: &str, work: WorkState) -> Heartbeat {
        Heartbeat {
            site_id: "site-a".to_owned().to_owned(),
            task_id: task.to_owned().to_owned(),
            work,
            epoch: 2,
            epochs: 5,
            bytes_done: 0,
        }
    }
    let ta = tickets["site-a"].task_id.clone();
    assert!(!e.heartbeat(hb(&ta, WorkState::Training), T0 + SEC).unwrap());
    let view = e.view(T0 + SEC);
    assert_eq!(view.current_round, Some(1));
    assert_eq!(view.sites_connected, 3);
    let a = &view.sites[0];
    assert_eq!((a.state, a.epoch, a.epochs), (LiveState::Training, 2, 5));
    assert_eq!(view.sites[1].state, LiveState::Selected);
    // An idle heartbeat (no task) never cancels; an unknown task is cancelled.
    assert!(!e.heartbeat(hb("", WorkState::Idle), T0 + SEC).unwrap());
    assert!(
        e.heartbeat(hb("t-r9-x", WorkState::Training), T0 + SEC)
            .unwrap()
    );
    // Heartbeats keep a long-training site in the round past the timeout...
    e.heartbeat(hb(&ta, WorkState::Training), T0 + 25 * SEC)
        .unwrap();
    e.site_seen("site-b", T0 + 25 * SEC).unwrap();
    e.tick(T0 + 40 * SEC).unwrap();
    let view = e.view(T0 + 40 * SEC);
    let states: Vec<LiveState> = view.sites.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [LiveState::Training, LiveState::Selected, LiveState::Dropped]
    );
    // ...and once the task is withdrawn, its next heartbeat is told to cancel.
    e.tick(T0 + 61 * SEC).unwrap();
    assert!(
        e.heartbeat(hb(&ta, WorkState::Training), T0 + 62 * SEC)
            .unwrap()
    );
}

#[test]
fn a_declined_task_is_recorded_and_the_round_stops_waiting_for_it() {
    let f = fixture("");
    let mut e = engine(&f);
    let tickets = start(&mut e);
    for site in ["site-a", "site-b"] {
        submit(&mut e, site, &tickets[site], &update(&f, 0.1), 10, T0).unwrap();
    }
    let tc = &tickets["site-c"];
    assert_eq!(
        e.decline("site-c", 1, &tc.task_id, b"forged", "no", T0)
            .unwrap(),
        Err(Rejection::WrongTask)
    );
    assert_eq!(e.open_round(), Some(1));
    e.decline(
        "site-c",
        1,
        &tc.task_id,
        &tc.nonce,
        "vocabulary differs",
        T0 + SEC,
    )
    .unwrap()
    .unwrap();
    assert_eq!(e.committed_round(), 1, "nobody left to wait for");
    let sites = e.store().round_sites("t", 1).unwrap();
    let c = sites.iter().find(|s| s.site_id == "site-c").unwrap();
    assert_eq!(c.state, SiteState::Declined);
    assert_eq!(c.reason.as_deref(), Some("vocabulary differs"));
}
