//! DP-SGD tests: exact per-unit clipping, per-unit gradients against a batched backward,
//! noise moments, and the whole loop against ordinary training in its non-private limit.

use candle_core::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::*;
use crate::model::{EncoderKind, ModelConfig};
use crate::train::{OptimizerKind, train};

fn config(encoder: EncoderKind) -> ModelConfig {
    crate::train::tests::small_model(encoder)
}

fn sessions(n: usize, seed: u64) -> Vec<EncodedSession> {
    crate::train::tests::random_sessions(n, seed)
}

fn norm(sums: &[Vec<f32>]) -> f64 {
    sums.iter()
        .flatten()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn every_clipped_unit_gradient_is_within_the_bound() {
    let data = sessions(12, 3);
    for encoder in [
        EncoderKind::Lstm,
        EncoderKind::Gru,
        EncoderKind::Transformer,
    ] {
        let model = AttentionFlowModel::new(&config(encoder), &Device::Cpu, 5).unwrap();
        for clip in [1e-6, 0.05, 1e6] {
            for s in &data {
                let mut sum = ClippedSum::new(&model, clip);
                let raw: Vec<f32> = sum
                    .unit_gradient(&model, &[s], &mut Mode::Eval)
                    .unwrap()
                    .2
                    .to_vec();
                let raw_norm = raw
                    .iter()
                    .map(|&g| f64::from(g).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let (before, _, _) = sum.add_unit(&model, &[s], &mut Mode::Eval).unwrap();
                assert!((before - raw_norm).abs() <= 1e-9 * raw_norm.max(1.0));
                let after = norm(sum.sums());
                assert!(
                    after <= clip * (1.0 + 1e-5),
                    "{encoder:?} C={clip}: {after}"
                );
                if raw_norm > clip {
                    // Scaled onto the sphere of radius C, direction kept.
                    assert!((after - clip).abs() <= 1e-5 * clip, "{after} vs {clip}");
                    assert_eq!(sum.clipped, 1);
                } else {
                    // Untouched.
                    let flat: Vec<f32> = sum.sums().concat();
                    assert_eq!(flat, raw);
                    assert_eq!(sum.clipped, 0);
                }
            }
        }
    }
}

#[test]
fn unit_gradients_sum_to_the_batched_gradient() {
    // With no clipping in effect, the sum of per-session gradients must equal B times the
    // gradient of the batch-mean loss: each backward really sees one session only.
    let data = sessions(10, 4);
    for encoder in [EncoderKind::Lstm, EncoderKind::Transformer] {
        let model = AttentionFlowModel::new(&config(encoder), &Device::Cpu, 6).unwrap();
        let mut sum = ClippedSum::new(&model, 1e9);
        for s in &data {
            sum.add_unit(&model, &[s], &mut Mode::Eval).unwrap();
        }
        let refs: Vec<&EncodedSession> = data.iter().collect();
        let batch = Batch::new(&refs, model.config(), model.device()).unwrap();
        let (loss, _) = model.loss(&batch, &mut Mode::Eval).unwrap();
        let grads = loss.backward().unwrap();
        for (v, s) in sum.vars().iter().zip(sum.sums()) {
            let g = grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (a, b) in s.iter().zip(&g) {
                let want = b * data.len() as f32;
                assert!(
                    (a - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{encoder:?}: {a} vs {want}"
                );
            }
        }
    }
}

#[test]
fn noise_has_the_configured_scale() {
    let model = AttentionFlowModel::new(&ModelConfig::default(), &Device::Cpu, 1).unwrap();
    let mut sum = ClippedSum::new(&model, 1.0);
    let std = 2.5;
    sum.add_noise(std, &mut ChaCha20Rng::seed_from_u64(9));
    let x: Vec<f64> = sum.sums().iter().flatten().map(|&v| f64::from(v)).collect();
    let n = x.len() as f64;
    assert!(n > 50_000.0);
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let kurt = x.iter().map(|v| (v - mean).powi(4)).sum::<f64>() / n / var.powi(2);
    // Standard errors: mean std/√n, variance ≈ √(2/n) relative, kurtosis ≈ √(24/n).
    assert!(mean.abs() < 4.0 * std / n.sqrt(), "mean {mean}");
    assert!(
        (var.sqrt() / std - 1.0).abs() < 0.01,
        "std {} vs {std}",
        var.sqrt()
    );
    assert!(
        (kurt - 3.0).abs() < 4.0 * (24.0 / n).sqrt(),
        "kurtosis {kurt}"
    );
    // Different seeds give different noise; the same seed the same.
    let draw = |seed| {
        let mut s = ClippedSum::new(&model, 1.0);
        s.add_noise(std, &mut ChaCha20Rng::seed_from_u64(seed));
        s.sums()[0].clone()
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
}

#[test]
fn users_group_sessions_up_to_the_cap() {
    let users = [7, 3, 7, 7, 9, 3, 7];
    let session = DpSgdConfig::default();
    assert_eq!(privacy_units(&users, &session).len(), 7);
    let user = DpSgdConfig {
        unit: PrivacyUnit::User,
        max_sessions_per_user: 2,
        ..DpSgdConfig::default()
    };
    assert_eq!(
        privacy_units(&users, &user),
        vec![vec![0, 2], vec![1, 5], vec![4]]
    );
}

fn sgd(epochs: usize, batch_size: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size,
        learning_rate: 0.05,
        optimizer: OptimizerKind::Sgd,
        momentum: 0.0,
        weight_decay: 0.0,
        patience: 0,
        length_bucketing: false,
        ..TrainConfig::default()
    }
}

/// All parameters, by name (a `VarMap`'s own order differs between instances).
fn flat(model: &AttentionFlowModel) -> Vec<f32> {
    let data = model.varmap().data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .into_iter()
        .flat_map(|n| {
            data[n]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn without_noise_or_clipping_it_is_full_batch_gradient_descent() {
    // q = 1 (B = n), C = ∞, z = 0: DP-SGD must reduce to plain full-batch SGD step for step.
    let data = sessions(16, 8);
    let cfg = config(EncoderKind::Lstm);
    let private = AttentionFlowModel::new(&cfg, &Device::Cpu, 2).unwrap();
    let plain = AttentionFlowModel::new(&cfg, &Device::Cpu, 2).unwrap();
    let dp = DpSgdConfig {
        clip_norm: 1e12,
        noise_multiplier: 0.0,
        expected_batch_size: data.len(),
        ..DpSgdConfig::default()
    };
    let units = privacy_units(
        &vec![0; data.len()]
            .iter()
            .enumerate()
            .map(|(i, _)| i as u32)
            .collect::<Vec<_>>(),
        &dp,
    );
    let report = train_dp(
        &private,
        &data,
        &units,
        &sgd(3, 16),
        &dp,
        &mut ChaCha20Rng::seed_from_u64(1),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.event.q, 1.0);
    assert_eq!(report.train.steps, 3);
    assert_eq!(report.sampled, 3 * 16);
    train(&plain, &data, &[], &sgd(3, 16), &mut |_| {}).unwrap();
    let (a, b) = (flat(&private), flat(&plain));
    let moved = a
        .iter()
        .zip(flat(
            &AttentionFlowModel::new(&cfg, &Device::Cpu, 2).unwrap(),
        ))
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "training did not move the weights");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn poisson_batches_have_the_expected_size_and_the_event_matches() {
    let data = sessions(200, 9);
    let model = AttentionFlowModel::new(&config(EncoderKind::Lstm), &Device::Cpu, 3).unwrap();
    let dp = DpSgdConfig {
        clip_norm: 0.5,
        noise_multiplier: 1.1,
        expected_batch_size: 20,
        ..DpSgdConfig::default()
    };
    let users: Vec<u32> = (0..200).collect();
    let units = privacy_units(&users, &dp);
    let cfg = sgd(2, 20);
    let run = |seed| {
        let model = AttentionFlowModel::new(&config(EncoderKind::Lstm), &Device::Cpu, 3).unwrap();
        train_dp(
            &model,
            &data,
            &units,
            &cfg,
            &dp,
            &mut ChaCha20Rng::seed_from_u64(seed),
            &mut |_| {},
        )
        .unwrap();
        flat(&model)
    };
    let report = train_dp(
        &model,
        &data,
        &units,
        &cfg,
        &dp,
        &mut ChaCha20Rng::seed_from_u64(4),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.event, dp.round_event(200, 2).unwrap());
    assert_eq!((report.event.steps, report.train.steps), (20, 20));
    assert!((report.event.q - 0.1).abs() < 1e-15);
    // 20 steps x Binomial(200, 0.1): mean 400, sd 19.
    assert!(
        (report.sampled as f64 - 400.0).abs() < 80.0,
        "{}",
        report.sampled
    );
    assert!(report.clipped_fraction > 0.0 && report.clipped_fraction <= 1.0);
    // The sampling and noise RNG decides the result: same seed, same weights.
    let (a, b, c) = (run(5), run(5), run(6));
    assert!(a == b, "same seed, different weights");
    assert!(a != c, "different seeds, same weights");
}

#[test]
fn the_result_does_not_depend_on_the_number_of_threads() {
    let data = sessions(120, 12);
    let cfg = config(EncoderKind::Lstm);
    let dp = DpSgdConfig {
        expected_batch_size: 24,
        ..DpSgdConfig::default()
    };
    let units = privacy_units(&(0..120).collect::<Vec<u32>>(), &dp);
    let run_on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 4).unwrap();
            let tc = TrainConfig {
                seed: 3,
                ..sgd(2, 24)
            };
            train_dp(
                &model,
                &data,
                &units,
                &tc,
                &dp,
                &mut ChaCha20Rng::seed_from_u64(8),
                &mut |_| {},
            )
            .unwrap();
            flat(&model)
        })
    };
    let (one, three) = (run_on(1), run_on(3));
    assert!(one == three, "1 and 3 threads gave different weights");
}

#[test]
fn a_shared_sampling_rate_fixes_q_and_the_batch_follows_the_site_size() {
    let dp = DpSgdConfig {
        expected_batch_size: 0,
        sampling_rate: Some(0.1),
        ..DpSgdConfig::default()
    };
    dp.validate().unwrap();
    // Same event for any site size: q = 0.1, ten steps per epoch.
    let (small, large) = (
        dp.round_event(50, 2).unwrap(),
        dp.round_event(5000, 2).unwrap(),
    );
    assert_eq!((small.q, small.steps), (0.1, 20));
    assert_eq!(small, large);
    let data = sessions(150, 13);
    let units = privacy_units(&(0..150).collect::<Vec<u32>>(), &dp);
    let model = AttentionFlowModel::new(&config(EncoderKind::Lstm), &Device::Cpu, 3).unwrap();
    let report = train_dp(
        &model,
        &data,
        &units,
        &sgd(2, 1),
        &dp,
        &mut ChaCha20Rng::seed_from_u64(2),
        &mut |_| {},
    )
    .unwrap();
    // 20 steps x Binomial(150, 0.1): mean 300, sd 16.
    assert_eq!(report.train.steps, 20);
    assert!(
        (report.sampled as f64 - 300.0).abs() < 70.0,
        "{}",
        report.sampled
    );
    // Exactly one of the two ways to set the sampling.
    for bad in [
        DpSgdConfig {
            sampling_rate: Some(0.1),
            ..DpSgdConfig::default()
        },
        DpSgdConfig {
            expected_batch_size: 0,
            ..DpSgdConfig::default()
        },
        DpSgdConfig {
            expected_batch_size: 0,
            sampling_rate: Some(1.5),
            ..DpSgdConfig::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

/// Every step's clipped sum (before noise) of a DP-SGD run over `data` with every unit
/// sampled (q = 1), no noise and a learning rate too small to move the weights, so that
/// what changes between runs is the dropout masks and the units present.
fn step_sums(data: &[EncodedSession], noise_seed: u64, coordinator_seed: u64) -> Vec<Vec<f32>> {
    let cfg = ModelConfig {
        dropout: 0.4,
        ..config(EncoderKind::Lstm)
    };
    let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 7).unwrap();
    let dp = DpSgdConfig {
        clip_norm: 1.0,
        noise_multiplier: 0.0,
        expected_batch_size: 0,
        sampling_rate: Some(1.0),
        ..DpSgdConfig::default()
    };
    let units = privacy_units(&(0..data.len() as u32).collect::<Vec<_>>(), &dp);
    let tc = TrainConfig {
        seed: coordinator_seed,
        learning_rate: 1e-12,
        ..sgd(4, 1)
    };
    let mut sums = Vec::new();
    let report = train_dp_observed(
        &model,
        data,
        &units,
        &tc,
        &dp,
        &mut ChaCha20Rng::seed_from_u64(noise_seed),
        &mut |_| {},
        Observer {
            canaries: &[],
            before_noise: &mut |step, sum| {
                assert_eq!(step as usize, sums.len());
                sums.push(sum.sums().concat());
            },
            released: &mut |_, _| {},
        },
    )
    .unwrap();
    assert_eq!((report.train.steps, sums.len()), (4, 4));
    sums
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_units_presence_leaves_every_other_units_dropout_masks_unchanged() {
    // D, the unit x alone, and D with x first: with every unit in every step, each step's
    // sum over D + x must be the sum over D plus x's own contribution, at the same step and
    // every later one. Were masks drawn per sampled unit in order, x would shift every other
    // unit's masks and the difference would be far from x's contribution.
    let data = sessions(10, 21);
    let x = sessions(1, 22);
    let with_x: Vec<EncodedSession> = x.iter().chain(&data).cloned().collect();
    let (without, alone, both) = (
        step_sums(&data, 5, 1),
        step_sums(&x, 5, 1),
        step_sums(&with_x, 5, 1),
    );
    for step in 0..4 {
        let predicted: Vec<f32> = without[step]
            .iter()
            .zip(&alone[step])
            .map(|(a, b)| a + b)
            .collect();
        let off = max_abs_diff(&both[step], &predicted);
        assert!(off < 1e-5, "step {step}: off by {off}");
    }
    // The masks really are in play and fresh at every step: x's own contribution changes from
    // step to step although the weights do not.
    assert!(max_abs_diff(&alone[0], &alone[1]) > 1e-3);
    // They come from the site's secret generator, not from the coordinator's seed.
    assert!(max_abs_diff(&step_sums(&x, 6, 1)[0], &alone[0]) > 1e-3);
    assert_eq!(step_sums(&x, 5, 99), alone);
}

#[test]
fn a_unit_with_a_non_finite_gradient_contributes_zero_instead_of_failing() {
    let data = sessions(3, 30);
    let model = AttentionFlowModel::new(&config(EncoderKind::Lstm), &Device::Cpu, 3).unwrap();
    // Poison one weight: every unit's loss, hence gradient, becomes NaN.
    {
        let vars = model.varmap().data().lock().unwrap();
        let (_, v) = vars.iter().find(|(n, _)| n.starts_with("head")).unwrap();
        let mut w = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        w[0] = f32::NAN;
        v.set(
            &Tensor::from_vec(w, v.shape(), v.device())
                .unwrap()
                .to_dtype(v.dtype())
                .unwrap(),
        )
        .unwrap();
    }
    let strict = ClippedSum::new(&model, 1.0).add_unit(&model, &[&data[0]], &mut Mode::Eval);
    assert!(matches!(strict, Err(Error::Training(_))), "{strict:?}");
    let mut zeroing = ClippedSum::new(&model, 1.0).zeroing_non_finite();
    for s in &data {
        zeroing.add_unit(&model, &[s], &mut Mode::Eval).unwrap();
    }
    assert_eq!((zeroing.units, zeroing.non_finite), (3, 3));
    assert!(zeroing.sums().iter().flatten().all(|&v| v == 0.0));
}
