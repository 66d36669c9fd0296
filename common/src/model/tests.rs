//! Model tests: fused kernel against references, gradients against finite differences,
//! padding and truncation invariance.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::data::EncodedSession;

pub(super) fn sessions(n: usize, vocab: usize, max_len: usize, seed: u64) -> Vec<EncodedSession> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(1..=max_len);
            EncodedSession {
                events: (0..len)
                    .map(|_| rng.random_range(1..vocab as u32))
                    .collect(),
                class: rng.random_range(0..5),
            }
        })
        .collect()
}

pub(super) fn tiny(encoder: EncoderKind) -> ModelConfig {
    ModelConfig {
        vocab_size: 11,
        embed_dim: 8,
        encoder,
        hidden_size: 6,
        num_layers: 2,
        dropout: 0.0,
        num_classes: 5,
        max_seq_len: 12,
        num_heads: 2,
        ffn_dim: 10,
    }
}

pub(super) fn refs(s: &[EncodedSession]) -> Vec<&EncodedSession> {
    s.iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn fused_lstm_matches_reference_forward_and_gradients() {
    fused_matches_reference(EncoderKind::Lstm);
}

#[test]
fn fused_gru_matches_reference_forward_and_gradients() {
    fused_matches_reference(EncoderKind::Gru);
}

/// The fused kernel and the composition of candle ops give the same logits and the same
/// gradient for every parameter, on a batch with padding, through two layers.
fn fused_matches_reference(encoder: EncoderKind) {
    let cfg = tiny(encoder);
    let data = sessions(9, cfg.vocab_size, 10, 1);
    let batch = Batch::new(&refs(&data), &cfg, &Device::Cpu).unwrap();
    let mut model = AttentionFlowModel::new(&cfg, &Device::Cpu, 7).unwrap();

    let mut run = |fused: bool| {
        model.set_fused(fused);
        let (loss, logits) = model.loss(&batch, &mut Mode::Eval).unwrap();
        let grads = loss.backward().unwrap();
        let mut named: Vec<(String, Tensor)> = model
            .varmap()
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    grads
                        .get(v)
                        .expect("every parameter gets a gradient")
                        .clone(),
                )
            })
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        (logits, named)
    };
    let (logits_f, grads_f) = run(true);
    let (logits_r, grads_r) = run(false);
    assert!(max_abs_diff(&logits_f, &logits_r) < 1e-5);
    for ((name, gf), (_, gr)) in grads_f.iter().zip(&grads_r) {
        let scale = gr
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let scale = scale.to_scalar::<f32>().unwrap().max(1e-3) as f64;
        let diff = max_abs_diff(gf, gr);
        assert!(
            diff < 1e-4 * scale.max(1.0),
            "{name}: fused vs reference gradient differ by {diff}"
        );
    }
}

#[test]
fn fused_lstm_matches_candle_builtin_lstm() {
    // candle_nn::LSTM (no padding support) on full-length sequences is the independent
    // reference for the fused recurrence.
    let (b, t, input, h) = (3, 7, 5, 4);
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let lstm = candle_nn::lstm(input, h, candle_nn::LSTMConfig::default(), vb.pp("enc")).unwrap();
    let x = Tensor::randn(0f32, 1.0, (b, t, input), &Device::Cpu).unwrap();
    let states = candle_nn::RNN::seq(&lstm, &x).unwrap();
    let want = Tensor::stack(&states.iter().map(|s| s.h().clone()).collect::<Vec<_>>(), 1).unwrap();

    let get = |n: &str| {
        varmap.data().lock().unwrap()[&format!("enc.{n}")]
            .as_tensor()
            .clone()
    };
    let bias = (get("bias_ih_l0") + get("bias_hh_l0")).unwrap();
    let xproj = x
        .reshape((b * t, input))
        .unwrap()
        .matmul(&get("weight_ih_l0").t().unwrap())
        .unwrap()
        .reshape((b, t, 4 * h))
        .unwrap();
    let mask = Tensor::ones((b, t), DType::F32, &Device::Cpu).unwrap();
    let got = lstm::fused_lstm_projected(&xproj, &get("weight_hh_l0"), &bias, &mask).unwrap();
    assert!(
        max_abs_diff(&got, &want) < 1e-5,
        "diff {}",
        max_abs_diff(&got, &want)
    );
    // The same layer with the projection inside the op.
    let got =
        lstm::fused_lstm(&x, &get("weight_ih_l0"), &get("weight_hh_l0"), &bias, &mask).unwrap();
    assert!(
        max_abs_diff(&got, &want) < 1e-5,
        "diff {}",
        max_abs_diff(&got, &want)
    );
}

/// Central finite differences in f64 on a handful of coordinates of every parameter.
fn gradient_check(encoder: EncoderKind) {
    let cfg = tiny(encoder);
    let data = sessions(4, cfg.vocab_size, 6, 2);
    let batch = Batch::new(&refs(&data), &cfg, &Device::Cpu).unwrap();
    let model = AttentionFlowModel::with_dtype(&cfg, &Device::Cpu, DType::F64, 3).unwrap();
    let loss_of = || -> f64 {
        let (loss, _) = model.loss(&batch, &mut Mode::Eval).unwrap();
        loss.to_scalar::<f64>().unwrap()
    };
    let (loss, _) = model.loss(&batch, &mut Mode::Eval).unwrap();
    let grads = loss.backward().unwrap();
    let vars: Vec<(String, Var)> = model
        .varmap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let eps = 1e-6;
    let mut checked = 0;
    for (name, var) in vars {
        let analytic = grads
            .get(&var)
            .unwrap_or_else(|| panic!("{name} has no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let original = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for _ in 0..3 {
            let i = rng.random_range(0..original.len());
            let mut plus = original.clone();
            plus[i] += eps;
            var.set(&Tensor::from_vec(plus, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let lp = loss_of();
            let mut minus = original.clone();
            minus[i] -= eps;
            var.set(&Tensor::from_vec(minus, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let lm = loss_of();
            var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let numeric = (lp - lm) / (2.0 * eps);
            let err = (numeric - analytic[i]).abs();
            assert!(
                err <= 1e-6 + 1e-4 * numeric.abs(),
                "{encoder:?} {name}[{i}]: analytic {} vs numeric {numeric}",
                analytic[i]
            );
            checked += 1;
        }
    }
    assert!(checked > 20);
}

#[test]
fn lstm_gradients_match_finite_differences() {
    gradient_check(EncoderKind::Lstm);
}

#[test]
fn gru_gradients_match_finite_differences() {
    gradient_check(EncoderKind::Gru);
}

#[test]
fn transformer_gradients_match_finite_differences() {
    gradient_check(EncoderKind::Transformer);
}

#[test]
fn fused_lstm_gradient_matches_finite_differences_in_f32() {
    // The fused kernel is f32-only: a coarser check, complementing the f64 reference check
    // and the fused-vs-reference comparison above.
    let cfg = tiny(EncoderKind::Lstm);
    let data = sessions(4, cfg.vocab_size, 6, 5);
    let batch = Batch::new(&refs(&data), &cfg, &Device::Cpu).unwrap();
    let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 3).unwrap();
    let var = model.varmap().data().lock().unwrap()["encoder.weight_hh_l0"].clone();
    let (loss, _) = model.loss(&batch, &mut Mode::Eval).unwrap();
    let analytic = model_grad(&loss, &var);
    let original = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let eps = 1e-2f32;
    for i in [0, 7, 19, original.len() - 1] {
        let eval_at = |delta: f32| {
            let mut v = original.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            model
                .loss(&batch, &mut Mode::Eval)
                .unwrap()
                .0
                .to_scalar::<f32>()
                .unwrap()
        };
        let numeric = (eval_at(eps) - eval_at(-eps)) / (2.0 * eps);
        var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
            .unwrap();
        assert!(
            (numeric - analytic[i]).abs() < 2e-3 + 2e-2 * numeric.abs(),
            "[{i}] {} vs {numeric}",
            analytic[i]
        );
    }
}

fn model_grad(loss: &Tensor, var: &Var) -> Vec<f32> {
    loss.backward()
        .unwrap()
        .get(var)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn padding_does_not_change_the_output() {
    for encoder in [
        EncoderKind::Lstm,
        EncoderKind::Gru,
        EncoderKind::Transformer,
    ] {
        for fused in [true, false] {
            let cfg = tiny(encoder);
            let mut model = AttentionFlowModel::new(&cfg, &Device::Cpu, 11).unwrap();
            model.set_fused(fused);
            let short = EncodedSession {
                events: vec![3, 4, 5],
                class: 1,
            };
            let long = EncodedSession {
                events: vec![2, 9, 8, 7, 6, 5, 4, 3, 2],
                class: 2,
            };
            let alone = model
                .forward(
                    &Batch::new(&[&short], &cfg, &Device::Cpu).unwrap(),
                    &mut Mode::Eval,
                )
                .unwrap();
            let padded = model
                .forward(
                    &Batch::new(&[&long, &short], &cfg, &Device::Cpu).unwrap(),
                    &mut Mode::Eval,
                )
                .unwrap();
            let diff = max_abs_diff(&alone.get(0).unwrap(), &padded.get(1).unwrap());
            assert!(
                diff < 1e-5,
                "{encoder:?} fused={fused}: padding changed logits by {diff}"
            );
        }
    }
}

#[test]
fn long_sessions_keep_their_most_recent_events() {
    let cfg = ModelConfig {
        max_seq_len: 4,
        ..tiny(EncoderKind::Lstm)
    };
    let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 1).unwrap();
    let long = EncodedSession {
        events: vec![9, 9, 9, 2, 3, 4, 5],
        class: 0,
    };
    let tail = EncodedSession {
        events: vec![2, 3, 4, 5],
        class: 0,
    };
    let head = EncodedSession {
        events: vec![9, 9, 9, 2],
        class: 0,
    };
    let f = |s: &EncodedSession| {
        model
            .forward(
                &Batch::new(&[s], &cfg, &Device::Cpu).unwrap(),
                &mut Mode::Eval,
            )
            .unwrap()
    };
    assert_eq!(Batch::new(&[&long], &cfg, &Device::Cpu).unwrap().steps, 4);
    assert!(max_abs_diff(&f(&long), &f(&tail)) < 1e-6);
    assert!(max_abs_diff(&f(&long), &f(&head)) > 1e-4);
}

#[test]
fn batches_reject_ids_outside_the_vocabulary() {
    let cfg = tiny(EncoderKind::Lstm);
    let bad = EncodedSession {
        events: vec![3, 11],
        class: 0,
    };
    let err = Batch::new(&[&bad], &cfg, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("event id 11 is outside the vocabulary"),
        "{err}"
    );
    let bad_class = EncodedSession {
        events: vec![3],
        class: 5,
    };
    assert!(Batch::new(&[&bad_class], &cfg, &Device::Cpu).is_err());
}

#[test]
fn invalid_configs_are_rejected_with_the_field_name() {
    let check = |cfg: ModelConfig, field: &str| {
        let err = AttentionFlowModel::new(&cfg, &Device::Cpu, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{err} should name {field}");
    };
    check(
        ModelConfig {
            vocab_size: 2,
            ..ModelConfig::default()
        },
        "vocab_size",
    );
    check(
        ModelConfig {
            dropout: 1.0,
            ..ModelConfig::default()
        },
        "dropout",
    );
    check(
        ModelConfig {
            hidden_size: 0,
            ..ModelConfig::default()
        },
        "hidden_size",
    );
    check(
        ModelConfig {
            encoder: EncoderKind::Transformer,
            num_heads: 5,
            ..ModelConfig::default()
        },
        "num_heads",
    );
}

#[test]
fn default_model_has_the_reference_shapes() {
    let model = AttentionFlowModel::new(&ModelConfig::default(), &Device::Cpu, 0).unwrap();
    let data = model.varmap().data().lock().unwrap();
    let shape = |n: &str| data[n].shape().dims().to_vec();
    assert_eq!(shape("embedding.weight"), [100, 64]);
    assert_eq!(shape("encoder.weight_ih_l0"), [256, 64]);
    assert_eq!(shape("encoder.weight_hh_l1"), [256, 64]);
    assert_eq!(shape("head.weight"), [5, 64]);
    assert_eq!(data.len(), 1 + 2 * 4 + 2);
}

#[test]
fn config_parameter_count_matches_the_built_model() {
    for encoder in [
        EncoderKind::Lstm,
        EncoderKind::Gru,
        EncoderKind::Transformer,
    ] {
        for (layers, hidden, ffn) in [(1, 6, 10), (2, 6, 10), (3, 5, 7)] {
            let cfg = ModelConfig {
                num_layers: layers,
                hidden_size: hidden,
                ffn_dim: ffn,
                ..tiny(encoder)
            };
            let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 0).unwrap();
            assert_eq!(
                cfg.num_parameters(),
                Some(model.num_parameters()),
                "{cfg:?}"
            );
        }
    }
    // Counts that do not fit a usize are `None`, not a wrapped or panicking product.
    for encoder in [
        EncoderKind::Lstm,
        EncoderKind::Gru,
        EncoderKind::Transformer,
    ] {
        let huge = ModelConfig {
            vocab_size: usize::MAX / 2,
            ..tiny(encoder)
        };
        assert_eq!(huge.num_parameters(), None, "{encoder:?}");
        let deep = ModelConfig {
            num_layers: usize::MAX,
            ..tiny(encoder)
        };
        assert_eq!(deep.num_parameters(), None, "{encoder:?}");
    }
}

#[test]
fn fused_and_reference_lstm_train_identically_with_dropout() {
    train_identically_with_dropout(EncoderKind::Lstm);
}

#[test]
fn fused_and_reference_gru_train_identically_with_dropout() {
    train_identically_with_dropout(EncoderKind::Gru);
}

fn train_identically_with_dropout(encoder: EncoderKind) {
    // Same seed, dropout on: both paths must draw the same masks and take the same step.
    let cfg = ModelConfig {
        dropout: 0.3,
        ..tiny(encoder)
    };
    let data = sessions(12, cfg.vocab_size, 9, 8);
    let run = |fused: bool| {
        let mut model = AttentionFlowModel::new(&cfg, &Device::Cpu, 4).unwrap();
        model.set_fused(fused);
        let tc = crate::train::TrainConfig {
            epochs: 2,
            batch_size: 4,
            ..Default::default()
        };
        crate::train::train(&model, &data, &[], &tc, &mut |_| {}).unwrap();
        let map = model.varmap().data().lock().unwrap();
        let mut named: Vec<(String, Tensor)> = map
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    };
    for ((name, f), (_, r)) in run(true).iter().zip(&run(false)) {
        let diff = max_abs_diff(f, r);
        assert!(diff < 1e-4, "{name} differs by {diff} after training");
    }
}
