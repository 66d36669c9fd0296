//! One malicious site over real mutual TLS, holding a valid site certificate: the overflow
//! attack (every value near f32's largest, a claimed 10^12 examples), the weight attack (a
//! large delta with a huge claimed count) and a fake evaluation (10^12 validation examples,
//! a perfect score). None of them does harm beyond the documented bound: the committed
//! model stays finite and moves by at most `aggregation.max_update_norm`, the run goes on,
//! the claimed counts are capped and the median over sites ignores the fake score.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use fedflow_common::params::ParamSet;
use fedflow_coordinator::metrics::EvaluationSummary;
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_proto::v1::{EvaluationReport, Metrics, Task, TaskKind};
use fedflow_tests::site::{download, next_task, task_for, upload};
use fedflow_tests::{Pki, TestCoordinator};
use tonic::transport::Channel;

/// Three sites, all selected; every round is evaluated; the bound B on update norms is set
/// explicitly, so the test knows it.
const RUN: &str = "[run]\nname = \"mal\"\nseed = 3\nrounds = 2\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
    [sampling]\nmin_selected = 3\nmin_available = 3\n\
    [rounds]\ndeadline_secs = 300\nheartbeat_timeout_secs = 120\n\
    [evaluation]\nevery = 1\n\
    [aggregation]\nmax_update_norm = 2.0\nmax_examples = 1000\n";

const BOUND: f64 = 2.0;

/// A delta shaped like `global` with every value `v`.
fn filled(global: &ParamSet, v: f32) -> ParamSet {
    let tensors: BTreeMap<String, Tensor> = global
        .iter()
        .map(|(name, t)| {
            let values = vec![v; t.elem_count()];
            let t = Tensor::from_vec(values, t.shape(), &Device::Cpu).unwrap();
            (name.to_string(), t)
        })
        .collect();
    ParamSet::from_tensors(tensors).unwrap()
}

/// Uploads `delta` claiming `examples` training examples (and as many as its weight).
async fn send(c: &mut FederationClient<Channel>, t: &Task, delta: &ParamSet, examples: u64) {
    upload(c, "", t, delta, |h| {
        h.weight = examples as f64;
        h.metrics.as_mut().unwrap().train_examples = examples;
    })
    .await
    .unwrap();
}

/// Reports an evaluation of task `t` with `n` validation examples and accuracy `acc`.
async fn evaluate(c: &mut FederationClient<Channel>, t: &Task, n: u64, acc: f64) {
    assert_eq!(t.kind, TaskKind::Evaluate as i32, "{t:?}");
    c.report_evaluation(EvaluationReport {
        task_id: t.task_id.clone(),
        run_id: t.run_id.clone(),
        round: t.round,
        nonce: t.nonce.clone(),
        model_sha256: t.model.as_ref().unwrap().sha256.clone(),
        metrics: Some(Metrics {
            validation_examples: n,
            validation_loss: 1.0 - acc,
            validation_accuracy: acc,
            validation_macro_f1: acc,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// The committed model of `round` and the evaluation summary of the round before it.
async fn committed(c: &TestCoordinator, round: u64) -> (ParamSet, Option<EvaluationSummary>) {
    c.handle
        .inspect(move |engine, _| {
            let store = engine.store();
            let model = ParamSet::load(store.model_checkpoint_path("mal", round))?;
            let eval = store
                .rounds("mal")?
                .into_iter()
                .find(|r| r.round == round)
                .and_then(|r| r.evaluation_json)
                .map(|j| serde_json::from_str(&j))
                .transpose()?;
            Ok((model, eval))
        })
        .await
        .unwrap()
}

fn distance(a: &ParamSet, b: &ParamSet) -> f64 {
    ParamSet::apply_delta(a, b, -1.0)
        .unwrap()
        .l2_norm()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_malicious_site_moves_the_model_by_at_most_the_bound_and_cannot_fake_the_median() {
    let pki = Pki::new();
    let c = TestCoordinator::builder(RUN)
        .mutual_tls(pki.bundle("coordinator"))
        .spawn()
        .await;
    let mut evil = pki.site(c.addr, "site-a").await;
    let mut b = pki.site(c.addr, "site-b").await;
    let mut d = pki.site(c.addr, "site-c").await;
    let (ta, tb, td) = tokio::join!(
        task_for(&mut evil, ""),
        task_for(&mut b, ""),
        task_for(&mut d, "")
    );
    let initial = download(&mut evil, "", &ta).await;

    // Round 1, the overflow attack: every value 3.4e38, 10^12 examples claimed; the honest
    // sites send small deltas with weight 1.
    let honest = initial.scale(1e-3).unwrap();
    send(&mut evil, &ta, &filled(&initial, 3.4e38), 1_000_000_000_000).await;
    send(&mut b, &tb, &honest, 1).await;
    send(&mut d, &td, &honest, 1).await;

    // The evaluation of round 1: the malicious site claims 10^12 examples and accuracy 1.
    let (ea, eb, ed) = tokio::join!(
        next_task(&mut evil, ""),
        next_task(&mut b, ""),
        next_task(&mut d, "")
    );
    evaluate(&mut evil, &ea, 1_000_000_000_000, 1.0).await;
    evaluate(&mut b, &eb, 100, 0.40).await;
    evaluate(&mut d, &ed, 300, 0.50).await;

    let (round1, eval1) = committed(&c, 1).await;
    round1.check_finite().unwrap();
    let step = distance(&round1, &initial);
    assert!(step <= BOUND * (1.0 + 1e-5), "moved {step} > {BOUND}");
    let eval1 = eval1.expect("round 1 was evaluated");
    // Capped at 1000 examples against the honest 400: the weighted figure is bounded, and
    // the median over the three sites is an honest one.
    let weighted = (1000.0 * 1.0 + 100.0 * 0.40 + 300.0 * 0.50) / 1400.0;
    assert!(
        (eval1.accuracy.unwrap() - weighted).abs() < 1e-9,
        "{eval1:?}"
    );
    assert_eq!(eval1.examples, 1400);
    let spread = eval1.accuracy_spread.unwrap();
    assert_eq!(spread.median, 0.50);
    assert_eq!((spread.min, spread.max), (0.40, 1.0));

    // Round 2 goes on from a finite model; the weight attack: +1e4 everywhere, 10^12
    // examples claimed. The model moves by at most the bound again.
    let (ta, tb, td) = tokio::join!(
        next_task(&mut evil, ""),
        next_task(&mut b, ""),
        next_task(&mut d, "")
    );
    assert_eq!((ta.round, ta.kind), (2, TaskKind::Train as i32));
    let global = download(&mut b, "", &tb).await;
    send(&mut evil, &ta, &filled(&global, 1e4), 1_000_000_000_000).await;
    send(&mut b, &tb, &honest, 1).await;
    send(&mut d, &td, &honest, 1).await;
    let (ea, eb, ed) = tokio::join!(
        next_task(&mut evil, ""),
        next_task(&mut b, ""),
        next_task(&mut d, "")
    );
    for (site, t) in [(&mut evil, ea), (&mut b, eb), (&mut d, ed)] {
        evaluate(site, &t, 10, 0.5).await;
    }
    let (round2, _) = committed(&c, 2).await;
    round2.check_finite().unwrap();
    let step = distance(&round2, &global);
    assert!(step <= BOUND * (1.0 + 1e-5), "moved {step} > {BOUND}");

    // The malicious site's outcomes say what it sent and what it was counted as.
    let rows = c
        .handle
        .inspect(|engine, _| {
            let store = engine.store();
            let mut rows = Vec::new();
            for round in [1, 2] {
                rows.extend(
                    store
                        .round_sites("mal", round)?
                        .into_iter()
                        .filter(|s| s.site_id == "site-a"),
                );
            }
            Ok(rows)
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert_eq!(r.clipped, Some(true), "{r:?}");
        assert_eq!(r.weight, Some(1000.0), "{r:?}");
        assert!(r.update_norm.unwrap() > BOUND, "{r:?}");
    }
}
