//! The record-level audit harness: DP-SGD through the real [`train_dp`](super::train_dp)
//! code path, with Dirac gradient canaries added as extra privacy units (Steinke, Nasr,
//! Jagielski 2023, "Privacy Auditing with One (1) Training Run", Section 7: white-box
//! auditing with gradient canaries). Production training never adds canaries: only this
//! module makes [`DiracCanary`]s.
//!
//! Each canary is included independently with probability 1/2 (the caller draws
//! `included`). Included canaries are Poisson-sampled at every step like real units, their
//! gradient (`±C` on one coordinate) is clipped and summed with the real ones, and the step's
//! noise is added to the whole sum. The auditor sees every released noisy sum, which is what
//! the accountant's guarantee covers (the optimiser's steps are post-processing of them), and
//! scores canary `i` by `sign_i · Σ_t released_t[coordinate_i] / C`. The estimator is in
//! [`crate::privacy::audit`].

use rand::seq::index;
use rand::{CryptoRng, Rng};

use super::dpsgd::{ClippedSum, DiracCanary, Observer, train_dp_observed};
use super::{DpSgdConfig, DpTrainReport, EpochReport, TrainConfig};
use crate::data::EncodedSession;
use crate::model::AttentionFlowModel;
use crate::{Error, Result};

/// `m` canaries on distinct coordinates of `model`'s parameters, drawn uniformly, each with a
/// random sign.
pub fn draw_canaries<R: Rng>(
    model: &AttentionFlowModel,
    m: usize,
    rng: &mut R,
) -> Result<Vec<DiracCanary>> {
    let parameters = model.num_parameters();
    if m > parameters {
        return Err(Error::Training(format!(
            "{m} canaries for a model of {parameters} parameters"
        )));
    }
    Ok(index::sample(rng, parameters, m)
        .into_iter()
        .map(|coordinate| DiracCanary {
            coordinate,
            sign: if rng.random::<bool>() { 1.0 } else { -1.0 },
        })
        .collect())
}

/// What one audited DP-SGD call produced.
#[derive(Debug)]
pub struct CanaryRun {
    /// The training report (its event counts the included canaries as units).
    pub report: DpTrainReport,
    /// One score per canary (included or not), in the order given.
    pub scores: Vec<f64>,
}

/// Runs DP-SGD on `model` as [`train_dp`](super::train_dp) does, with the canaries for which
/// `included` is true added as units, and scores every canary on the released noisy sums.
/// `dp.sampling_rate` must be set, so that the sampling rate (hence the accounted event) does
/// not depend on how many canaries were included.
#[allow(clippy::too_many_arguments)]
pub fn train_dp_with_canaries<R: Rng + CryptoRng>(
    model: &AttentionFlowModel,
    train: &[EncodedSession],
    units: &[Vec<usize>],
    cfg: &TrainConfig,
    dp: &DpSgdConfig,
    canaries: &[DiracCanary],
    included: &[bool],
    noise_rng: &mut R,
) -> Result<CanaryRun> {
    if canaries.len() != included.len() {
        return Err(Error::Training(format!(
            "{} canaries, {} inclusion flags",
            canaries.len(),
            included.len()
        )));
    }
    if dp.sampling_rate.is_none() {
        return Err(Error::Config(
            "dp_sgd.sampling_rate: an audit needs a fixed sampling rate".into(),
        ));
    }
    let inside: Vec<DiracCanary> = canaries
        .iter()
        .zip(included)
        .filter(|(_, inc)| **inc)
        .map(|(c, _)| *c)
        .collect();
    // Where each canary's coordinate lies in ClippedSum's per-parameter buffers.
    let sizes: Vec<usize> = ClippedSum::new(model, dp.clip_norm)
        .sums()
        .iter()
        .map(Vec::len)
        .collect();
    let total: usize = sizes.iter().sum();
    if let Some(c) = canaries.iter().find(|c| c.coordinate >= total) {
        return Err(Error::Training(format!(
            "canary at coordinate {} of {total}",
            c.coordinate
        )));
    }
    let locate = |coordinate: usize| {
        let mut offset = 0;
        for (k, &n) in sizes.iter().enumerate() {
            if coordinate < offset + n {
                return (k, coordinate - offset);
            }
            offset += n;
        }
        unreachable!("coordinates are checked against the model's size")
    };
    let places: Vec<(usize, usize)> = canaries.iter().map(|c| locate(c.coordinate)).collect();
    let mut scores = vec![0f64; canaries.len()];
    let clip = dp.clip_norm;
    let mut released = |_: u64, sum: &ClippedSum| {
        for ((score, c), &(k, j)) in scores.iter_mut().zip(canaries).zip(&places) {
            *score += f64::from(c.sign) * f64::from(sum.sums()[k][j]) / clip;
        }
    };
    let observer = Observer {
        canaries: &inside,
        before_noise: &mut |_, _| {},
        released: &mut released,
    };
    let report = train_dp_observed(
        model,
        train,
        units,
        cfg,
        dp,
        noise_rng,
        &mut |_: &EpochReport| {},
        observer,
    )?;
    Ok(CanaryRun { report, scores })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;
    use crate::model::EncoderKind;
    use crate::privacy::audit::{AuditOutcome, audit, default_grid};
    use crate::privacy::planner::{Accounting, epsilon_by, noise_for_epsilon_by};
    use crate::train::{OptimizerKind, privacy_units};

    const CANARIES: usize = 1000;
    const Q: f64 = 0.2;
    const EPOCHS: usize = 3;
    const DELTA: f64 = 1e-5;

    /// One audited DP-SGD call on a small LSTM with 60 real sessions and 1,000 canaries at
    /// noise multiplier `z`; the audit at 95% confidence.
    fn audited(z: f64, seed: u64) -> AuditOutcome {
        let data = crate::train::tests::random_sessions(60, seed);
        let model = AttentionFlowModel::new(
            &crate::train::tests::small_model(EncoderKind::Lstm),
            &Device::Cpu,
            seed,
        )
        .unwrap();
        let dp = DpSgdConfig {
            clip_norm: 1.0,
            noise_multiplier: z,
            expected_batch_size: 0,
            sampling_rate: Some(Q),
            ..DpSgdConfig::default()
        };
        let units = privacy_units(&(0..data.len() as u32).collect::<Vec<_>>(), &dp);
        let cfg = TrainConfig {
            epochs: EPOCHS,
            learning_rate: 0.05,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.0,
            weight_decay: 0.0,
            ..TrainConfig::default()
        };
        let mut rng = ChaCha20Rng::seed_from_u64(seed + 100);
        let canaries = draw_canaries(&model, CANARIES, &mut rng).unwrap();
        let included: Vec<bool> = (0..CANARIES).map(|_| rng.random()).collect();
        let run = train_dp_with_canaries(
            &model, &data, &units, &cfg, &dp, &canaries, &included, &mut rng,
        )
        .unwrap();
        assert_eq!(run.scores.len(), CANARIES);
        assert_eq!(run.report.event.steps, (EPOCHS as u64) * 5);
        audit(&run.scores, &included, DELTA, 0.95, &default_grid(CANARIES)).unwrap()
    }

    #[test]
    fn without_noise_the_audit_finds_a_large_epsilon() {
        let out = audited(0.0, 1);
        eprintln!("no noise: {:.3} ({:?})", out.epsilon_lower_bound, out.best);
        assert!(
            out.epsilon_lower_bound > 2.0,
            "no noise, yet the bound is only {}: {out:?}",
            out.epsilon_lower_bound
        );
    }

    #[test]
    fn with_calibrated_noise_the_audit_never_exceeds_the_accountants_epsilon() {
        let steps = (EPOCHS as u64) * 5;
        for (target, seed) in [(1.0, 2), (8.0, 3)] {
            let z = noise_for_epsilon_by(Accounting::Pld, Q, steps, 1, DELTA, target).unwrap();
            let stated = epsilon_by(
                Accounting::Pld,
                &[crate::privacy::SampledGaussian { q: Q, z, steps }],
                1,
                DELTA,
            )
            .unwrap();
            assert!(stated <= target + 1e-9);
            let out = audited(z, seed);
            eprintln!(
                "target {target}, z {z:.3}: {:.3} ({:?})",
                out.epsilon_lower_bound, out.best
            );
            assert!(
                out.epsilon_lower_bound <= stated,
                "the audit ({}) exceeds the accountant ({}) at z = {z}: {out:?}",
                out.epsilon_lower_bound,
                stated
            );
        }
    }

    #[test]
    fn canaries_are_distinct_and_checked_against_the_model() {
        let model = AttentionFlowModel::new(
            &crate::train::tests::small_model(EncoderKind::Lstm),
            &Device::Cpu,
            1,
        )
        .unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let c = draw_canaries(&model, 500, &mut rng).unwrap();
        let mut coords: Vec<usize> = c.iter().map(|c| c.coordinate).collect();
        coords.sort_unstable();
        coords.dedup();
        assert_eq!(coords.len(), 500);
        assert!(draw_canaries(&model, 10_000_000, &mut rng).is_err());
    }
}
