//! Wire conversion tests: a task's training instructions reach the trainer unchanged, and a
//! bad field is refused by name.

use fedflow_common::model::ModelConfig;
use fedflow_common::privacy::dpfedavg::TrustMode;
use fedflow_common::train::{OptimizerKind, PrivacyUnit, TrainConfig};
use fedflow_proto::v1::{
    DpSgdInstructions, ModelRef, SiteDpInstructions, Task, TaskKind, TrainInstructions,
};

use super::*;

/// A task in which every field differs from its default.
fn task() -> Task {
    Task {
        task_id: "task-7".into(),
        run_id: "run-x".into(),
        round: 4,
        kind: TaskKind::Train as i32,
        model: Some(ModelRef {
            sha256: "ab".repeat(32),
            size_bytes: 1234,
            model_config_json: serde_json::to_string(&ModelConfig {
                vocab_size: 42,
                ..ModelConfig::default()
            })
            .unwrap(),
            vocab_sha256: "cd".repeat(32),
        }),
        train: Some(TrainInstructions {
            local_epochs: 5,
            batch_size: 16,
            learning_rate: 0.05,
            optimizer: "sgd".into(),
            weight_decay: 0.001,
            momentum: 0.7,
            fedprox_mu: 0.25,
            seed: 99,
            dp_sgd: Some(DpSgdInstructions {
                clip_norm: 1.5,
                noise_multiplier: 1.1,
                expected_batch_size: 0,
                unit: "user".into(),
                max_sessions_per_user: 3,
                target_epsilon: 8.0,
                target_delta: 1e-6,
                sampling_rate: 0.02,
                count_noise_multiplier: 2.5,
            }),
            site_dp: Some(SiteDpInstructions {
                mode: "central".into(),
                clip_norm: 0.5,
                noise_std: 0.01,
            }),
            patience: 2,
            min_delta: 0.01,
            length_bucketing: false,
            compression: Some(CompressionInstructions {
                values: "int8".into(),
                block_size: 64,
                top_k: 0.01,
                error_feedback: true,
            }),
        }),
        deadline_unix_ms: 1_700_000_000_000,
        nonce: vec![1, 2, 3].into(),
    }
}

#[test]
fn every_training_instruction_reaches_the_train_config() {
    let spec = TaskSpec::try_from(&task()).unwrap();
    assert_eq!(
        spec.train,
        TrainConfig {
            epochs: 5,
            batch_size: 16,
            learning_rate: 0.05,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.7,
            weight_decay: 0.001,
            patience: 2,
            min_delta: 0.01,
            seed: 99,
            length_bucketing: false,
            fedprox_mu: 0.25,
        }
    );
    assert_eq!(
        (spec.run_id.as_str(), spec.round, spec.task_id.as_str()),
        ("run-x", 4, "task-7")
    );
    assert_eq!(spec.model.vocab_size, 42);
    assert_eq!(spec.vocab_sha256, "cd".repeat(32));
    assert_eq!(spec.expected_model_sha256, "ab".repeat(32));
    let dp = spec.record_dp.unwrap();
    assert_eq!(dp.sgd.unit, PrivacyUnit::User);
    assert_eq!(dp.sgd.sampling_rate, Some(0.02));
    assert_eq!((dp.target_epsilon, dp.target_delta), (8.0, 1e-6));
    assert_eq!(dp.count_noise_multiplier, 2.5);
    let site_dp = spec.site_dp.unwrap();
    assert_eq!(site_dp.mode, TrustMode::Central);
    assert_eq!((site_dp.clip_norm, site_dp.noise_std), (0.5, 0.01));
    assert_eq!(spec.compression.name(), "top0.01+int8/64+ef");
    // The public path gives the same.
    assert_eq!(task_spec(&task()).unwrap().train, spec.train);
}

#[test]
fn a_bad_field_is_refused_by_name() {
    let mut t = task();
    t.train.as_mut().unwrap().batch_size = 0;
    let err = TaskSpec::try_from(&t).unwrap_err();
    assert!(matches!(err, Error::Task(_)), "{err:?}");
    assert!(err.to_string().contains("batch_size"), "{err}");
    for (values, top_k, why) in [("int4", 0.0, "int4"), ("int8", 1.5, "compression.top_k")] {
        let mut t = task();
        let c = t.train.as_mut().unwrap().compression.as_mut().unwrap();
        c.values = values.into();
        c.top_k = top_k;
        let err = TaskSpec::try_from(&t).unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
    }
    // No compression instructions: plain updates.
    let mut t = task();
    t.train.as_mut().unwrap().compression = None;
    assert!(TaskSpec::try_from(&t).unwrap().compression.is_none());
}

#[test]
fn statuses_map_to_what_the_coordinator_said() {
    let refused = status_error(&tonic::Status::permission_denied("not you"));
    assert!(
        matches!(&refused, Error::Refused { code, message } if code == "PermissionDenied" && message == "not you"),
        "{refused:?}"
    );
    let rejected = status_error(&tonic::Status::invalid_argument("bad nonce"));
    assert!(
        matches!(&rejected, Error::Rejected { code, .. } if code == "InvalidArgument"),
        "{rejected:?}"
    );
    let failed = status_error(&tonic::Status::internal("disk full"));
    assert!(
        matches!(&failed, Error::Coordinator { code, .. } if code == "Internal"),
        "{failed:?}"
    );
    assert!(is_transient(&tonic::Status::unavailable("away")));
    assert!(!is_transient(&tonic::Status::internal("disk full")));
}
