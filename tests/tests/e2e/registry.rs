//! The model registry over real mutual TLS, in a continuous run: two honest sites training
//! and evaluating real models, and a third that poisons round 2 (a delta within the norm
//! bound that makes the model predict the rarest class, claiming the most examples that
//! count). Round 2 is committed but the publish gate keeps version 1 published (the honest
//! sites measured version 1 again, on the same data, and it is better); the honest sites
//! install each published version; an admin publishes and rolls back (a viewer may not), in
//! the audit log; status, metrics and the run report name the published version.

use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use fedflow_client::federation::{SiteOptions, run_site};
use fedflow_client::published::PublishedSink;
use fedflow_client::site::SiteTrainer;
use fedflow_common::data::{SiteDataset, Vocab};
use fedflow_common::model::load_model;
use fedflow_common::params::ParamSet;
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_coordinator::security::SECURITY_LOG;
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_proto::v1::{
    DeclineTaskRequest, GetStatusRequest, ListModelsRequest, ListModelsResponse, PublishRequest,
    RunActionRequest, Task, TaskKind,
};
use fedflow_tests::site::{download, enrol_with, next_task, upload};
use fedflow_tests::{Pki, TestCoordinator};
use tonic::Code;
use tonic::transport::Channel;

const RUN: &str = "[run]\nname = \"reg\"\nseed = 3\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 16\nhidden_size = 16\nnum_layers = 1\ndropout = 0.0\n\
    [train]\nepochs = 2\nlearning_rate = 0.01\n\
    [sampling]\nmin_selected = 3\nmin_available = 3\n\
    [rounds]\ndeadline_secs = 300\nmin_completed = 3\nheartbeat_timeout_secs = 120\n\
    [evaluation]\nevery = 1\n\
    [schedule]\nmode = \"continuous\"\n\
    [publish]\nmin_sites = 2\ntolerance = 0.02\n\
    [aggregation]\nmax_update_norm = 10.0\nmax_examples = 1000\n";

/// A delta shaped like `global`: zero, except `head.bias[class] = bias`.
fn bias_delta(global: &ParamSet, class: usize, bias: f32) -> ParamSet {
    let tensors = global
        .iter()
        .map(|(name, t)| {
            let mut values = vec![0f32; t.elem_count()];
            if name == "head.bias" {
                values[class] = bias;
            }
            let t = Tensor::from_vec(values, t.shape(), &Device::Cpu).unwrap();
            (name.to_string(), t)
        })
        .collect();
    ParamSet::from_tensors(tensors).unwrap()
}

/// Site-c's next task: a training task is answered with `delta` (weight `examples`), an
/// evaluation declined; returns the training task it answered.
async fn answer(
    c: &mut FederationClient<Channel>,
    delta: impl Fn(&ParamSet) -> (ParamSet, u64),
) -> Task {
    loop {
        let t = next_task(c, "site-c").await;
        if t.kind == TaskKind::Evaluate as i32 {
            c.decline_task(DeclineTaskRequest {
                site_id: String::new(),
                task_id: t.task_id.clone(),
                run_id: t.run_id.clone(),
                round: t.round,
                nonce: t.nonce.clone(),
                reason: "metrics withheld".into(),
            })
            .await
            .unwrap();
            continue;
        }
        let global = download(c, "", &t).await;
        let (d, examples) = delta(&global);
        upload(c, "", &t, &d, |h| {
            h.weight = examples as f64;
            h.metrics.as_mut().unwrap().train_examples = examples;
        })
        .await
        .unwrap();
        return t;
    }
}

async fn models(admin: &mut AdminClient<Channel>) -> ListModelsResponse {
    admin
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Waits (bounded, on the sites' own files) until `dir` serves `round`.
async fn serving(sink: &PublishedSink, round: u64) {
    for _ in 0..600 {
        if sink.current().unwrap().is_some_and(|c| c.round == round) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} never served version {round}", sink.dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_round_is_committed_but_not_published_and_admins_publish_and_roll_back() {
    let pki = Pki::new();
    let fed = generate(&SynthConfig {
        sites: 2,
        total_sessions: 1_000,
        min_site_sessions: 400,
        seed: 8,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let c = TestCoordinator::builder(RUN)
        .vocab(&vocab)
        .mutual_tls(pki.bundle("coordinator"))
        .metrics()
        .spawn()
        .await;
    // The rarest label in the sites' data: a model always predicting it is poor.
    let mut counts = [0usize; 5];
    for s in &fed.sites {
        for r in &s.records {
            counts[r.label as usize - 1] += 1;
        }
    }
    let rarest = (0..5).min_by_key(|&k| counts[k]).unwrap();

    let sinks: Vec<PublishedSink> = ["site-a", "site-b"]
        .iter()
        .map(|name| PublishedSink {
            dir: c.dir().join(format!("{name}-published")),
            vocab: vocab.clone(),
        })
        .collect();
    let honest: Vec<_> = fed
        .sites
        .iter()
        .zip(["site-a", "site-b"])
        .zip(&sinks)
        .map(|((s, name), sink)| {
            let ds = SiteDataset::from_records(&s.records, &vocab, 0.3).unwrap();
            let trainer = Arc::new(SiteTrainer::new(ds, &vocab, Device::Cpu));
            let mut o = SiteOptions::new(format!("https://{}", c.addr), name);
            o.tls = Some(fedflow_client::tls::Bundle::load(&pki.bundle(name)).unwrap());
            o.poll_wait = Duration::from_secs(1);
            o.published = Some(sink.clone());
            tokio::spawn(run_site(o, trainer))
        })
        .collect();

    let mut poisoner = pki.site(c.addr, "site-c").await;
    enrol_with(&mut poisoner, "", &c.vocab_sha256).await;
    let zero = |g: &ParamSet| (bias_delta(g, rarest, 0.0), 10);
    assert_eq!(answer(&mut poisoner, zero).await.round, 1);
    // Round 2: every logit of the rarest class raised by 10, with 1000 examples' weight.
    let poison = |g: &ParamSet| (bias_delta(g, rarest, 10.0), 1_000);
    assert_eq!(answer(&mut poisoner, poison).await.round, 2);
    // Round 3's task reaches site-c only after round 2's evaluations and the gate's
    // decision; site-c holds it, so the run waits here.
    let held = loop {
        let t = next_task(&mut poisoner, "site-c").await;
        if t.kind == TaskKind::Train as i32 {
            break t;
        }
        poisoner
            .decline_task(DeclineTaskRequest {
                task_id: t.task_id.clone(),
                run_id: t.run_id.clone(),
                round: t.round,
                nonce: t.nonce.clone(),
                reason: "metrics withheld".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    };
    assert_eq!(held.round, 3);

    let mut viewer = pki.admin(c.addr, "val").await;
    let m = models(&mut viewer).await;
    let v: Vec<_> = m.versions.iter().map(|v| (v.round, v.published)).collect();
    assert_eq!(v, [(0, false), (1, true), (2, false)], "{m:?}");
    let r2 = &m.versions[2];
    assert!(
        r2.gate_reason.contains("worse than round 1"),
        "{}",
        r2.gate_reason
    );
    assert!(
        r2.evaluation_accuracy + 0.02 < m.versions[1].evaluation_accuracy,
        "the poisoned round measured worse: {m:?}"
    );
    assert!(r2.kept && m.versions[1].kept);
    // The honest sites installed version 1, byte for byte the coordinator's checkpoint.
    for sink in &sinks {
        serving(sink, 1).await;
        let current = sink.current().unwrap().unwrap();
        assert_eq!(current.model_sha256, m.versions[1].model_sha256);
        let (_, _, card) = load_model(&sink.dir.join(&current.path), &Device::Cpu).unwrap();
        assert_eq!(card.params_sha256, m.versions[1].model_sha256);
    }

    // A viewer may not publish; an admin may, and may roll back.
    let denied = viewer
        .publish(PublishRequest {
            round: 2,
            reason: "try".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let mut admin = pki.admin(c.addr, "ada").await;
    let p = admin
        .publish(PublishRequest {
            round: 2,
            reason: "inspected".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .published
        .unwrap();
    assert_eq!(
        (p.round, p.action.as_str(), p.by.as_str()),
        (2, "publish", "spiffe://fedflow/admin/ada")
    );
    serving(&sinks[0], 2).await;
    let status = admin
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.published.as_ref().map(|p| p.round), Some(2));
    assert!(status.continuous);
    let metrics = crate::ctl::scrape(c.metrics_addr.unwrap()).await;
    assert_eq!(
        metrics.get("fedflow_published_round"),
        Some(&2.0),
        "{metrics:?}"
    );
    assert!(metrics["fedflow_published_age_seconds"] >= 0.0);
    let back = admin
        .rollback(RunActionRequest {
            reason: "not good enough".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .published
        .unwrap();
    assert_eq!((back.round, back.action.as_str()), (1, "rollback"));
    serving(&sinks[0], 1).await;
    let unknown = admin
        .publish(PublishRequest {
            round: 99,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::FailedPrecondition, "{unknown:?}");

    // The run report and the audit log tell the same story.
    let report = c
        .handle
        .inspect(|e, _| fedflow_coordinator::run_report::build(e.store(), "reg"))
        .await
        .unwrap();
    assert!(report.contains("Version <b>1</b> is published"), "{report}");
    let log = std::fs::read_to_string(c.data.join(SECURITY_LOG)).unwrap();
    for (method, by) in [
        ("\"Publish\"", "spiffe://fedflow/admin/ada"),
        ("\"Rollback\"", "spiffe://fedflow/admin/ada"),
    ] {
        assert!(
            log.lines().any(|l| l.contains(method) && l.contains(by)),
            "{method} by {by} not in the audit log"
        );
    }

    // The published version exported by the real binary (reading the running coordinator's
    // data) loads in the real `fedflow-client evaluate`, with the predictions of the
    // coordinator's checkpoint evaluated here.
    let out = c.dir().join("export");
    let ok = std::process::Command::new(fedflow_tests::bin::cargo_bin(
        "fedflow-coordinator",
        "fedflow-coordinator",
    ))
    .args(["export", "--published", "--data"])
    .arg(&c.data)
    .arg("--out")
    .arg(&out)
    .output()
    .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let csv = c.dir().join("site-a.csv");
    fedflow_common::data::write_sessions(&csv, &fed.sites[0].records).unwrap();
    let eval = std::process::Command::new(fedflow_tests::bin::cargo_bin(
        "fedflow-client",
        "fedflow-client",
    ))
    .args(["evaluate", "--device", "cpu", "--json", "--model"])
    .arg(&out)
    .arg("--data")
    .arg(&csv)
    .output()
    .unwrap();
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    let checkpoint =
        ParamSet::load(c.data.join("checkpoints/reg/round-000001.safetensors")).unwrap();
    let model = fedflow_common::model::AttentionFlowModel::new(
        &c.cfg.model_config().unwrap(),
        &Device::Cpu,
        0,
    )
    .unwrap();
    checkpoint.load_into_varmap(model.varmap()).unwrap();
    let sessions: Vec<_> = fed.sites[0]
        .records
        .iter()
        .map(|r| fedflow_common::data::encode_session(r, &vocab).unwrap())
        .collect();
    let ours = fedflow_common::train::evaluate(&model, &sessions, 256).unwrap();
    assert_eq!(
        theirs["metrics"]["examples"].as_u64(),
        Some(ours.examples as u64)
    );
    assert_eq!(theirs["metrics"]["accuracy"].as_f64(), Some(ours.accuracy));
    assert!((theirs["metrics"]["loss"].as_f64().unwrap() - ours.loss).abs() < 1e-9);

    // Stopped for good, the honest sites end; site-c's held task is discarded.
    admin
        .stop_run(RunActionRequest {
            reason: "test over".into(),
        })
        .await
        .unwrap();
    // Site-a was watched installing 1, 2 and 1 again; site-b polls on its own clock and may
    // have missed version 2's short spell, but it served version 1 first and nothing else
    // than the two published versions.
    for (i, h) in honest.into_iter().enumerate() {
        let summary = h.await.unwrap().unwrap();
        if i == 0 {
            assert!(summary.published.starts_with(&[1, 2, 1]), "{summary:?}");
        } else {
            assert_eq!(summary.published.first(), Some(&1), "{summary:?}");
            assert!(
                summary.published.iter().all(|r| [1, 2].contains(r)),
                "{summary:?}"
            );
        }
        assert!(summary.rounds_evaluated.contains(&2), "{summary:?}");
    }
}
