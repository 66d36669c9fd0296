//! Round engine tests, with explicit times (no clocks, no sleeps).

use candle_core::Device;
use fedflow_common::data::Vocab;
use fedflow_common::model::AttentionFlowModel;

use super::*;

const T0: i64 = 1_000_000;
const SEC: i64 = 1000;

struct Fixture {
    dir: tempfile::TempDir,
    cfg: RunConfig,
    initial: ParamSet,
}

fn fixture(extra: &str) -> Fixture {
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

fn engine(f: &Fixture) -> RoundEngine {
    let store = Store::open(f.dir.path().join("data")).unwrap();
    RoundEngine::open(store, f.cfg.clone(), f.initial.clone()).unwrap()
}

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

/// All three sites show up; the first poll after that starts round 1.
fn start(e: &mut RoundEngine) -> BTreeMap<String, TaskTicket> {
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

fn first_value(p: &ParamSet) -> f32 {
    p.get("head.bias").unwrap().to_vec1::<f32>().unwrap()[0]
}

struct Update {
    delta: ParamSet,
    sha: String,
}

fn update(f: &Fixture, scale: f32) -> Update {
    let delta = f.initial.scale(scale).unwrap();
    let sha = delta.sha256_hex().unwrap();
    Update { delta, sha }
}

fn submit(
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
            site_id: site,
            round: t.round,
            task_id: &t.task_id,
            nonce: &t.nonce,
            base_model_sha256: &base,
            delta: (&u.delta).into(),
            delta_sha256: &u.sha,
            report: UpdateReport {
                train_examples: examples,
                claimed_weight: examples as f64,
            },
            metrics_json: None,
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
                site_id: site,
                round,
                task_id: task,
                nonce,
                base_model_sha256: base,
                delta: (&u.delta).into(),
                delta_sha256: &u.sha,
                report: UpdateReport {
                    train_examples: 5,
                    claimed_weight: 5.0,
                },
                metrics_json: None,
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
    assert!(late.is_err());
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

#[test]
fn the_run_finishes_after_its_last_round() {
    let f = fixture("");
    let mut e = engine(&f);
    for round in 1..=2 {
        let now = T0 + round as i64 * 100 * SEC;
        for s in SITES {
            e.site_seen(s, now).unwrap();
        }
        let tickets: BTreeMap<String, TaskTicket> = SITES
            .iter()
            .map(|s| (s.to_string(), e.poll_task(s, now).unwrap().unwrap()))
            .collect();
        for site in SITES {
            submit(&mut e, site, &tickets[site], &update(&f, 0.01), 10, now).unwrap();
        }
    }
    assert_eq!(e.phase(), Phase::Finished);
    assert_eq!(e.poll_task("site-a", T0 + 400 * SEC).unwrap(), None);
    assert_eq!(
        e.store().run("t").unwrap().unwrap().status,
        RunStatus::Finished
    );
}
