//! A whole federation on loopback: a real coordinator (store, round engine, gRPC server on
//! 127.0.0.1:0) and three partner-site clients training real models on generated data.

use std::sync::Arc;

use candle_core::Device;
use fedflow_client::federation::{SiteOptions, run_site};
use fedflow_client::site::SiteTrainer;
use fedflow_common::data::{SiteDataset, Vocab};
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_common::train::evaluate;
use fedflow_coordinator::round::Phase;
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::{GetStatusRequest, ListRoundsRequest, RunPhase};
use fedflow_tests::TestCoordinator;
use fedflow_tests::coordinator::MODEL_SEED;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_train_a_better_global_model_over_real_grpc() {
    let fed = generate(&SynthConfig {
        sites: 3,
        total_sessions: 1_500,
        min_site_sessions: 300,
        seed: 5,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let toml = "[run]\nname = \"e2e\"\nseed = 3\nrounds = 3\n\
                [model]\nvocab = \"vocab.json\"\nembed_dim = 16\nhidden_size = 16\nnum_layers = 1\ndropout = 0.0\n\
                [train]\nepochs = 2\nlearning_rate = 0.01\n\
                [sampling]\nfraction = 1.0\nmin_selected = 3\nmin_available = 3\n\
                [rounds]\ndeadline_secs = 300\nmin_completed = 3\nheartbeat_timeout_secs = 120\n";
    let c = TestCoordinator::builder(toml).vocab(&vocab).spawn().await;
    let addr = c.addr;
    let model_cfg = c.cfg.model_config().unwrap();
    let initial_model = AttentionFlowModel::new(&model_cfg, &Device::Cpu, MODEL_SEED).unwrap();
    let initial = c.initial.clone();

    let datasets: Vec<SiteDataset> = fed
        .sites
        .iter()
        .map(|s| SiteDataset::from_records(&s.records, &vocab, 0.2).unwrap())
        .collect();
    let pooled_validation = SiteDataset::pool(&datasets).validation;
    let sites: Vec<_> = fed
        .sites
        .iter()
        .zip(datasets)
        .map(|(s, ds)| {
            let trainer = Arc::new(SiteTrainer::new(ds, &vocab, Device::Cpu));
            tokio::spawn(run_site(
                SiteOptions::new(format!("http://{addr}"), s.name.clone()),
                trainer,
            ))
        })
        .collect();
    for s in sites {
        let summary = s.await.unwrap().unwrap();
        assert_eq!(summary.rounds_contributed, vec![1, 2, 3], "{summary:?}");
        // Each candidate is evaluated, then (from round 2 on) the publish gate has the same
        // sites measure the published version again: round 1 was published first, and the
        // gate's figures decide whether round 2 replaced it before round 3's baseline.
        assert_eq!(&summary.rounds_evaluated[..4], [1, 2, 1, 3], "{summary:?}");
        assert!(
            matches!(summary.rounds_evaluated[4..], [1] | [2]),
            "{summary:?}"
        );
        assert!(summary.rejected.is_empty(), "{summary:?}");
    }

    // The admin service tells the same story: finished, three rounds with their federated
    // evaluations, every site contributing to each.
    let mut admin = AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let status = admin
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.phase, RunPhase::Finished as i32);
    assert_eq!((status.committed_round, status.total_rounds), (3, 3));
    let latest = status.latest.unwrap();
    assert_eq!(
        (latest.round, latest.updates, latest.evaluated_sites),
        (3, 3, 3)
    );
    let rounds = admin
        .list_rounds(ListRoundsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rounds;
    assert_eq!(rounds.len(), 4, "round 0 (initial model) and three rounds");
    let evaluated: Vec<f64> = rounds[1..]
        .iter()
        .map(|r| {
            assert_eq!(
                (r.status.as_str(), r.selected, r.uploaded),
                ("committed", 3, 3)
            );
            r.metrics.as_ref().unwrap().evaluation_accuracy
        })
        .collect();
    assert!(
        evaluated.iter().all(|a| (0.0..=1.0).contains(a)),
        "{evaluated:?}"
    );

    // The run is finished after three committed rounds, and the global model is better than
    // the one it started from.
    let snap = c.handle.snapshot().await.unwrap();
    assert_eq!(snap.phase, Phase::Finished);
    assert_eq!(snap.committed_round, 3);
    assert_ne!(snap.global_sha256, initial.sha256_hex().unwrap());
    let final_model = AttentionFlowModel::new(&model_cfg, &Device::Cpu, 1).unwrap();
    snap.global.load_into_varmap(final_model.varmap()).unwrap();
    let before = evaluate(&initial_model, &pooled_validation, 256).unwrap();
    let after = evaluate(&final_model, &pooled_validation, 256).unwrap();
    eprintln!(
        "global model: loss {:.4} -> {:.4}, accuracy {:.4} -> {:.4}",
        before.loss, after.loss, before.accuracy, after.accuracy
    );
    assert!(
        after.loss < before.loss - 0.1,
        "loss {} -> {}",
        before.loss,
        after.loss
    );
    assert!(
        after.accuracy > before.accuracy + 0.05,
        "accuracy {} -> {}",
        before.accuracy,
        after.accuracy
    );
}
