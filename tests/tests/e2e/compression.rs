//! Compressed updates over real gRPC: sites training real models send top-k int8 updates
//! with error feedback, the coordinator decodes them into the round and records the bytes;
//! an update in another encoding is refused before it reaches the round.

use std::sync::Arc;

use candle_core::Device;
use fedflow_client::federation::{SiteOptions, run_site};
use fedflow_client::site::SiteTrainer;
use fedflow_common::compress::encode;
use fedflow_common::data::{SiteDataset, Vocab};
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::params::ParamSet;
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_common::train::evaluate;
use fedflow_coordinator::metrics::TrainingSummary;
use fedflow_tests::TestCoordinator;
use fedflow_tests::coordinator::MODEL_SEED;
use fedflow_tests::site::{download, header, task_for, upload, upload_bytes};
use prost::bytes::Bytes;

const RUN: &str = "[run]\nname = \"squeeze\"\nseed = 3\nrounds = 3\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 16\nhidden_size = 16\nnum_layers = 1\ndropout = 0.0\n\
    [train]\nepochs = 2\nlearning_rate = 0.01\n\
    [sampling]\nfraction = 1.0\nmin_selected = 3\nmin_available = 3\n\
    [rounds]\ndeadline_secs = 300\nmin_completed = 3\nheartbeat_timeout_secs = 120\n\
    [compression]\nvalues = \"int8\"\ntop_k = 0.1\nerror_feedback = true\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_updates_train_the_model_and_the_round_counts_their_bytes() {
    let fed = generate(&SynthConfig {
        sites: 3,
        total_sessions: 1_500,
        min_site_sessions: 300,
        seed: 5,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let c = TestCoordinator::builder(RUN).vocab(&vocab).spawn().await;
    let compression = c.cfg.compression();
    let spec = c.initial.spec();
    let datasets: Vec<SiteDataset> = fed
        .sites
        .iter()
        .map(|s| SiteDataset::from_records(&s.records, &vocab, 0.2).unwrap())
        .collect();
    let pooled_validation = SiteDataset::pool(&datasets).validation;
    let state = tempfile::tempdir().unwrap();
    let sites: Vec<_> = fed
        .sites
        .iter()
        .zip(datasets)
        .map(|(s, ds)| {
            let trainer = SiteTrainer::new(ds, &vocab, Device::Cpu)
                .with_state_dir(&state.path().join(&s.name))
                .unwrap();
            tokio::spawn(run_site(
                SiteOptions::new(c.url(), s.name.clone()),
                Arc::new(trainer),
            ))
        })
        .collect();
    for s in sites {
        let summary = s.await.unwrap().unwrap();
        assert_eq!(summary.rounds_contributed, vec![1, 2, 3], "{summary:?}");
        assert!(summary.rejected.is_empty(), "{summary:?}");
    }
    for s in &fed.sites {
        let residual = state
            .path()
            .join(&s.name)
            .join(fedflow_client::site::feedback::FEEDBACK_FILE);
        assert!(residual.exists(), "{}", residual.display());
    }

    // Every round folded three updates of exactly the compressed size, and says so.
    let update_bytes = compression.update_bytes(&spec).unwrap();
    let model_bytes = c.initial.to_safetensors_bytes().unwrap().len() as u64;
    assert!(
        update_bytes * 10 < model_bytes * 3,
        "{update_bytes} vs {model_bytes}"
    );
    let rounds = c
        .handle
        .inspect(|engine, _| engine.store().rounds("squeeze"))
        .await
        .unwrap();
    for r in rounds.iter().filter(|r| r.round > 0) {
        let m: TrainingSummary = serde_json::from_str(r.metrics_json.as_ref().unwrap()).unwrap();
        assert_eq!(m.updates, 3);
        assert_eq!(m.upload_bytes, 3 * update_bytes, "round {}", r.round);
        assert_eq!(m.download_bytes, 3 * model_bytes, "round {}", r.round);
    }

    // And the model learned from them.
    let snap = c.handle.snapshot().await.unwrap();
    assert_eq!(snap.committed_round, 3);
    let model_cfg = c.cfg.model_config().unwrap();
    let initial = AttentionFlowModel::new(&model_cfg, &Device::Cpu, MODEL_SEED).unwrap();
    let trained = AttentionFlowModel::new(&model_cfg, &Device::Cpu, 1).unwrap();
    snap.global.load_into_varmap(trained.varmap()).unwrap();
    let before = evaluate(&initial, &pooled_validation, 256).unwrap();
    let after = evaluate(&trained, &pooled_validation, 256).unwrap();
    assert!(
        after.loss < before.loss - 0.05,
        "loss {} -> {}",
        before.loss,
        after.loss
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_in_another_encoding_is_refused_naming_both() {
    let toml = "[run]\nname = \"squeeze\"\nrounds = 1\n\
        [model]\nvocab = \"vocab.json\"\nembed_dim = 32\nhidden_size = 32\nnum_layers = 1\n\
        [sampling]\nmin_selected = 1\nmin_available = 1\n\
        [rounds]\ndeadline_secs = 300\nheartbeat_timeout_secs = 120\n\
        [compression]\nvalues = \"int8\"\n";
    let c = TestCoordinator::builder(toml).spawn().await;
    let compression = c.cfg.compression();
    let mut client = fedflow_tests::site::federation_client(c.addr).await;
    let t = task_for(&mut client, "site-a").await;
    let instructions = t.train.as_ref().unwrap().compression.clone().unwrap();
    assert_eq!(
        (instructions.values.as_str(), instructions.block_size),
        ("int8", 256)
    );
    let global = download(&mut client, "site-a", &t).await;
    let delta = global.scale(1e-3).unwrap();

    // A plain update, as an older client sends it: larger than any update of the run, and
    // refused before its bytes are read, saying what was expected.
    let e = upload(&mut client, "site-a", &t, &delta, |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("compressed as int8/256") && e.message().contains("upgraded"),
        "{}",
        e.message()
    );
    // A smaller update in another encoding: refused naming both.
    let sparse = fedflow_common::compress::Compression {
        top_k: Some(0.1),
        ..compression
    };
    let other = Bytes::from(encode(&delta, &sparse, None).unwrap().bytes);
    let mut h = header("site-a", &t, &other);
    h.encoding = sparse.name();
    let e = upload_bytes(&mut client, h, &other).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("encoded as top0.1+int8/256") && e.message().contains("send int8/256"),
        "{}",
        e.message()
    );
    // Bytes of the right size claiming the run's encoding but laid out otherwise: the
    // layout is refused, naming a part it lacks.
    let wrong = encode(&delta, &compression, None).unwrap().bytes;
    let mut wrong = wrong;
    let at = wrong.windows(2).position(|w| w == b"#q").unwrap();
    wrong[at + 1] = b'z';
    let wrong = Bytes::from(wrong);
    let mut h = header("site-a", &t, &wrong);
    h.encoding = compression.name();
    let e = upload_bytes(&mut client, h, &wrong).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("#q"), "{}", e.message());

    // The real thing is accepted and decoded into the round.
    let enc = encode(&delta, &compression, None).unwrap();
    let bytes = Bytes::from(enc.bytes.clone());
    let mut h = header("site-a", &t, &bytes);
    h.encoding = compression.name();
    upload_bytes(&mut client, h, &bytes).await.unwrap();
    // The last selected site answered: the round closed and committed with the upload.
    let committed = c
        .handle
        .inspect(|engine, _| {
            Ok(ParamSet::load(
                engine.store().model_checkpoint_path("squeeze", 1),
            )?)
        })
        .await
        .unwrap();
    // One update: the model moved by exactly its decoded self.
    let expected = ParamSet::apply_delta(&global, &enc.decoded, 1.0).unwrap();
    let gap = ParamSet::delta(&committed, &expected)
        .unwrap()
        .l2_norm()
        .unwrap();
    assert!(gap < 1e-6, "{gap}");
}

#[test]
fn check_config_states_the_size_of_a_compressed_update() {
    let dir = tempfile::tempdir().unwrap();
    fedflow_tests::coordinator::default_vocab()
        .save(dir.path().join("vocab.json"))
        .unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(&config, RUN).unwrap();
    let cfg = fedflow_coordinator::config::RunConfig::load(&config).unwrap();
    let model = AttentionFlowModel::new(&cfg.model_config().unwrap(), &Device::Cpu, 0).unwrap();
    let spec = ParamSet::from_varmap(model.varmap()).unwrap().spec();
    let sent = cfg.compression().update_bytes(&spec).unwrap();
    let coordinator = fedflow_tests::bin::cargo_bin("fedflow-coordinator", "fedflow-coordinator");
    let (ok, out) = fedflow_tests::bin::output(
        std::process::Command::new(&coordinator)
            .arg("check-config")
            .arg(&config),
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "updates compressed as top0.1+int8/256+ef: {sent} bytes each"
        )),
        "{out}"
    );
    assert!(out.contains("--state-dir"), "{out}");
}
