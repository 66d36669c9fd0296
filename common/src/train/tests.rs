//! Training tests: overfitting, reproducibility, early stopping.

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::model::{EncoderKind, ModelConfig};

pub(crate) fn small_model(encoder: EncoderKind) -> ModelConfig {
    ModelConfig {
        vocab_size: 12,
        embed_dim: 16,
        encoder,
        hidden_size: 16,
        num_layers: 2,
        dropout: 0.0,
        max_seq_len: 20,
        num_heads: 2,
        ffn_dim: 32,
        ..ModelConfig::default()
    }
}

pub(crate) fn random_sessions(n: usize, seed: u64) -> Vec<EncodedSession> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| EncodedSession {
            events: (0..rng.random_range(2..10))
                .map(|_| rng.random_range(2..12))
                .collect(),
            class: rng.random_range(0..5),
        })
        .collect()
}

fn params_of(model: &AttentionFlowModel) -> Vec<(String, Vec<f32>)> {
    let data = model.varmap().data().lock().unwrap();
    let mut v: Vec<_> = data
        .iter()
        .map(|(n, var)| {
            (
                n.clone(),
                var.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn every_encoder_overfits_a_tiny_batch() {
    // Random labels: only memorisation reaches 100%, which needs working gradients end to end.
    let data = random_sessions(16, 1);
    for encoder in [
        EncoderKind::Lstm,
        EncoderKind::Gru,
        EncoderKind::Transformer,
    ] {
        let model = AttentionFlowModel::new(&small_model(encoder), &Device::Cpu, 2).unwrap();
        let cfg = TrainConfig {
            epochs: 150,
            batch_size: 16,
            learning_rate: 1e-2,
            weight_decay: 0.0,
            patience: 0,
            ..TrainConfig::default()
        };
        train(&model, &data, &[], &cfg, &mut |_| {}).unwrap();
        let m = evaluate(&model, &data, 16).unwrap();
        assert_eq!(m.accuracy, 1.0, "{encoder:?} reached only {}", m.accuracy);
    }
}

#[test]
fn sgd_with_momentum_reduces_the_loss() {
    // A learnable rule (class from the last event), so loss can fall without memorising.
    let mut data = random_sessions(64, 3);
    for s in &mut data {
        s.class = s.events.last().unwrap() % 5;
    }
    let model = AttentionFlowModel::new(&small_model(EncoderKind::Lstm), &Device::Cpu, 4).unwrap();
    let before = evaluate(&model, &data, 32).unwrap().loss;
    let cfg = TrainConfig {
        epochs: 30,
        batch_size: 8,
        learning_rate: 0.05,
        optimizer: OptimizerKind::Sgd,
        patience: 0,
        ..TrainConfig::default()
    };
    train(&model, &data, &[], &cfg, &mut |_| {}).unwrap();
    let after = evaluate(&model, &data, 32).unwrap().loss;
    assert!(after < 0.5 * before, "loss {before} -> {after}");
}

#[test]
fn training_is_reproducible_with_a_seed() {
    let data = random_sessions(40, 5);
    let run = |seed: u64| {
        let cfg = ModelConfig {
            dropout: 0.3,
            ..small_model(EncoderKind::Lstm)
        };
        let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 9).unwrap();
        let tc = TrainConfig {
            epochs: 2,
            batch_size: 8,
            seed,
            ..TrainConfig::default()
        };
        train(&model, &data, &[], &tc, &mut |_| {}).unwrap();
        params_of(&model)
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn early_stopping_restores_the_best_epoch() {
    // Random labels on train and validation: validation loss gets worse as the model
    // memorises, so training stops early and the restored weights are the best epoch's.
    let train_data = random_sessions(32, 6);
    let val = random_sessions(32, 7);
    let model = AttentionFlowModel::new(&small_model(EncoderKind::Lstm), &Device::Cpu, 1).unwrap();
    let cfg = TrainConfig {
        epochs: 60,
        batch_size: 8,
        learning_rate: 1e-2,
        weight_decay: 0.0,
        patience: 3,
        ..TrainConfig::default()
    };
    let mut seen = Vec::new();
    let report = train(&model, &train_data, &val, &cfg, &mut |e| {
        seen.push(e.validation.clone().unwrap().loss)
    })
    .unwrap();
    assert!(report.stopped_early);
    assert_eq!(report.epochs.len(), report.best_epoch + 3);
    let best = seen.iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(seen[report.best_epoch - 1], best);
    let now = evaluate(&model, &val, 256).unwrap().loss;
    assert!(
        (now - best).abs() < 1e-9,
        "restored loss {now} vs best {best}"
    );
}

#[test]
fn bad_train_config_is_rejected() {
    let model = AttentionFlowModel::new(&small_model(EncoderKind::Lstm), &Device::Cpu, 1).unwrap();
    let data = random_sessions(4, 1);
    let cfg = TrainConfig {
        learning_rate: f64::NAN,
        ..TrainConfig::default()
    };
    let err = train(&model, &data, &[], &cfg, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.learning_rate"), "{err}");
    let err = train(&model, &[], &[], &TrainConfig::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("no training sessions"), "{err}");
}

#[test]
fn fedprox_keeps_weights_near_the_starting_point() {
    let data = random_sessions(32, 9);
    let distance = |mu: f64| {
        let model =
            AttentionFlowModel::new(&small_model(EncoderKind::Lstm), &Device::Cpu, 3).unwrap();
        let start = params_of(&model);
        let cfg = TrainConfig {
            epochs: 5,
            batch_size: 8,
            learning_rate: 1e-2,
            fedprox_mu: mu,
            ..TrainConfig::default()
        };
        train(&model, &data, &[], &cfg, &mut |_| {}).unwrap();
        params_of(&model)
            .iter()
            .zip(&start)
            .flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)))
            .sum::<f64>()
            .sqrt()
    };
    let free = distance(0.0);
    let proximal = distance(10.0);
    assert!(
        proximal < 0.5 * free,
        "FedProx distance {proximal} vs plain {free}"
    );
    let bad = TrainConfig {
        fedprox_mu: -1.0,
        ..TrainConfig::default()
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("fedprox_mu")
    );
}

#[test]
fn predictions_come_in_the_sessions_order_and_agree_with_evaluate() {
    let data = random_sessions(70, 9);
    let model = AttentionFlowModel::new(&small_model(EncoderKind::Lstm), &Device::Cpu, 4).unwrap();
    let cfg = TrainConfig {
        epochs: 5,
        batch_size: 16,
        learning_rate: 1e-2,
        ..TrainConfig::default()
    };
    train(&model, &data, &[], &cfg, &mut |_| {}).unwrap();
    // Batches of 8 sorted by length: many batches, each out of the input order.
    let predicted = predict(&model, &data, 8).unwrap();
    assert_eq!(predicted.len(), data.len());
    let right = predicted
        .iter()
        .zip(&data)
        .filter(|(p, s)| **p == s.class)
        .count();
    let m = evaluate(&model, &data, 256).unwrap();
    assert_eq!(right as f64 / data.len() as f64, m.accuracy);
    assert!(
        predicted.iter().any(|&p| p != predicted[0]),
        "{predicted:?}"
    );
    // Each prediction belongs to its session: one session alone gets the same class.
    for i in [0, 33, 69] {
        let alone = predict(&model, &data[i..=i], 8).unwrap();
        assert_eq!(alone, [predicted[i]], "session {i}");
    }
    assert!(predict(&model, &[], 8).unwrap().is_empty());
}

#[test]
fn steps_read_back_in_a_window_are_counted_once_and_a_non_finite_loss_names_its_step() {
    let dev = Device::Cpu;
    assert_eq!(PendingSteps::new(&dev).window, 1);
    let mut pending = PendingSteps {
        window: PendingSteps::DEVICE_WINDOW,
        steps: Vec::new(),
    };
    let logits = Tensor::new(&[[0.0f32, 2.0, 1.0], [3.0, 0.0, 1.0]], &dev).unwrap();
    let mut acc = MetricsAccumulator::new(3);
    for step in 0..3 {
        let loss = Tensor::new(0.5f32 * (step + 1) as f32, &dev).unwrap();
        pending.push(step, &loss, &logits, vec![1, 2]).unwrap();
        assert!(!pending.full());
    }
    pending.flush(&mut acc, 1).unwrap();
    assert!(pending.steps.is_empty());
    let m = acc.finish();
    assert_eq!(m.examples, 6);
    // Predictions 1 and 0 against truths 1 and 2: half right.
    assert!((m.accuracy - 0.5).abs() < 1e-12, "{}", m.accuracy);
    assert!((m.loss - 1.0).abs() < 1e-6, "{}", m.loss);

    let mut acc = MetricsAccumulator::new(3);
    pending
        .push(7, &Tensor::new(1.0f32, &dev).unwrap(), &logits, vec![0, 0])
        .unwrap();
    pending
        .push(
            8,
            &Tensor::new(f32::NAN, &dev).unwrap(),
            &logits,
            vec![0, 0],
        )
        .unwrap();
    let err = pending.flush(&mut acc, 2).unwrap_err().to_string();
    assert!(err.contains("epoch 2, step 8"), "{err}");
}
