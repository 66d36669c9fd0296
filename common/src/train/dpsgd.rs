//! DP-SGD at a partner site (Abadi et al. 2016, "Deep Learning with Differential Privacy",
//! Algorithm 1; with Poisson sampling as analysed by Mironov, Talwar, Zhang 2019 and
//! implemented by Opacus and TF Privacy).
//!
//! Each step:
//! 1. every privacy unit (a session, or all of one end user's sessions) joins the batch
//!    independently with probability `q = B / n` (B the expected batch size, n the number of
//!    units), drawn from the caller's cryptographically secure RNG;
//! 2. each sampled unit's gradient is computed on its own (a backward pass over that unit
//!    alone, so it is a true per-unit gradient, not a micro-batch average) and scaled to L2
//!    norm at most `C` over all parameters together;
//! 3. Gaussian noise N(0, (z·C)²) is added to every coordinate of the sum of clipped
//!    gradients, and the sum is divided by the *expected* batch size B (a fixed denominator,
//!    so the sensitivity stays C / B whatever the sampled size);
//! 4. the optimiser (AdamW or SGD: post-processing) takes the noisy gradient.
//!
//! One round of local training is `epochs · ⌈n / B⌉` such steps: exactly the
//! [`SampledGaussian`] event of [`dpsgd_round`], which is what the site's ledger records.
//! Validation data is not used for model selection (that would be a release outside the
//! accounting): the weights after the last step are the result.
//!
//! # Dropout under DP-SGD
//!
//! The subsampled-Gaussian analysis needs each sampled unit's clipped gradient to be a
//! function of that unit (and the step's weights) alone: then adding or removing one unit
//! changes the step's sum by at most C. Dropout masks are random, so where they come from
//! matters. Each unit's masks at step `t` are drawn from a ChaCha8 stream seeded with
//! `SHA-256(domain ‖ K ‖ t ‖ the unit's sessions)`, where K is a 256-bit key drawn from the
//! caller's CSPRNG at the start of [`train_dp`] (so it is fresh per call and known only to
//! the site). A unit's masks therefore depend on nothing but the key, the step and the unit
//! itself: not on which other units were sampled, nor on the unit's position in the data, nor
//! on the coordinator's `seed`. For every fixed K the per-step sensitivity bound holds exactly;
//! the key's secrecy additionally keeps the masks unknown outside the site. Two units with
//! identical sessions get identical masks, which the argument allows (each is still a
//! function of its own unit). A unit whose gradient is not finite contributes zero (a
//! function of that unit alone, so within the same bound) instead of aborting training, so
//! the outcome of a task reveals nothing about single units; the count is reported locally.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rand::{CryptoRng, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{EpochReport, MetricsAccumulator, TrainConfig, TrainReport, argmax, optim, scalar};
use crate::data::EncodedSession;
use crate::model::{AttentionFlowModel, Batch, Mode};
use crate::privacy::planner::{dpsgd_round, dpsgd_round_at_rate};
use crate::privacy::{SampledGaussian, add_gaussian};
use crate::{Error, Result};

/// What one unit of privacy protection is: the neighbouring datasets differ by one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivacyUnit {
    /// One session (one row of the site's data).
    #[default]
    Session,
    /// One end user: all of a user's sessions together (at most `max_sessions_per_user`).
    User,
}

impl std::fmt::Display for PrivacyUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrivacyUnit::Session => "session",
            PrivacyUnit::User => "user",
        })
    }
}

impl std::str::FromStr for PrivacyUnit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "session" => Ok(PrivacyUnit::Session),
            "user" => Ok(PrivacyUnit::User),
            other => Err(Error::Config(format!(
                "privacy unit {other:?}: expected \"session\" or \"user\""
            ))),
        }
    }
}

/// DP-SGD parameters, as the coordinator's run config dictates them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpSgdConfig {
    /// L2 bound C on each unit's gradient.
    pub clip_norm: f64,
    /// Noise multiplier z: the noise standard deviation is z·C.
    pub noise_multiplier: f64,
    /// Expected batch size B (in units): the sampling rate is q = B / n at a site with n
    /// units, so small sites sample a larger share (and spend more ε). Must be 0 when
    /// `sampling_rate` is set.
    pub expected_batch_size: usize,
    /// A sampling rate q shared by every site instead: each site's expected batch is q·n, and
    /// every site spends the same ε whatever its size. `None`: use `expected_batch_size`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling_rate: Option<f64>,
    /// The privacy unit.
    pub unit: PrivacyUnit,
    /// With `unit = "user"`: at most this many sessions of one user are used (the first ones
    /// in file order); the rest are left out of training.
    pub max_sessions_per_user: usize,
}

impl Default for DpSgdConfig {
    fn default() -> Self {
        DpSgdConfig {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            expected_batch_size: 64,
            sampling_rate: None,
            unit: PrivacyUnit::Session,
            max_sessions_per_user: 8,
        }
    }
}

impl DpSgdConfig {
    /// Checks every field, naming the first one out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: String| Err(Error::Config(format!("dp_sgd.{f}: {why}")));
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return bad(
                "clip_norm",
                format!("{} must be a positive number", self.clip_norm),
            );
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return bad(
                "noise_multiplier",
                format!("{} must be a number >= 0", self.noise_multiplier),
            );
        }
        match self.sampling_rate {
            Some(q) if !(q > 0.0 && q <= 1.0) => {
                return bad("sampling_rate", format!("{q} must be in (0, 1]"));
            }
            Some(_) if self.expected_batch_size != 0 => {
                return bad(
                    "expected_batch_size",
                    "set either expected_batch_size or sampling_rate, not both".into(),
                );
            }
            None if self.expected_batch_size == 0 => {
                return bad(
                    "expected_batch_size",
                    "must be at least 1 (or set sampling_rate instead)".into(),
                );
            }
            _ => {}
        }
        if self.max_sessions_per_user == 0 {
            return bad("max_sessions_per_user", "must be at least 1".into());
        }
        Ok(())
    }

    /// The privacy event of one round of `epochs` epochs over `units` units.
    pub fn round_event(&self, units: usize, epochs: usize) -> Result<SampledGaussian> {
        match self.sampling_rate {
            Some(q) => dpsgd_round_at_rate(units as u64, q, epochs as u64, self.noise_multiplier),
            None => dpsgd_round(
                units as u64,
                self.expected_batch_size as u64,
                epochs as u64,
                self.noise_multiplier,
            ),
        }
    }
}

/// Groups training sessions into privacy units: one per session, or one per user (given
/// `users[i]` for session `i`) holding at most `max_sessions_per_user` of the user's sessions,
/// the first ones in order. Units are in order of their first session.
pub fn privacy_units(users: &[u32], cfg: &DpSgdConfig) -> Vec<Vec<usize>> {
    match cfg.unit {
        PrivacyUnit::Session => (0..users.len()).map(|i| vec![i]).collect(),
        PrivacyUnit::User => {
            let mut index: std::collections::HashMap<u32, usize> = Default::default();
            let mut units: Vec<Vec<usize>> = Vec::new();
            for (i, &u) in users.iter().enumerate() {
                let k = *index.entry(u).or_insert_with(|| {
                    units.push(Vec::new());
                    units.len() - 1
                });
                if units[k].len() < cfg.max_sessions_per_user {
                    units[k].push(i);
                }
            }
            units
        }
    }
}

/// Sampled units per parallel work item. Fixed (not derived from the thread count) so that
/// the summation order, hence the result, is the same on any machine.
const UNITS_PER_CHUNK: usize = 4;

/// What DP-SGD did in one call of [`train_dp`], beyond the usual training report.
#[derive(Debug, Clone, Serialize)]
pub struct DpTrainReport {
    /// The usual per-epoch report (metrics over the sampled units, with dropout; local only).
    pub train: TrainReport,
    /// The privacy event actually run: sampling rate, noise multiplier, steps.
    pub event: SampledGaussian,
    /// Number of privacy units n.
    pub units: usize,
    /// Units sampled over all steps (its mean per step should be about B).
    pub sampled: u64,
    /// Fraction of sampled units whose gradient norm exceeded C.
    pub clipped_fraction: f64,
    /// Sampled units whose gradient was not finite and which contributed zero (see the
    /// module docs); kept for the site's own log.
    pub non_finite: u64,
}

/// The secret key of one [`train_dp`] call, from which every unit's dropout masks are
/// derived (see the module docs).
#[derive(Clone)]
pub struct DropoutKey([u8; 32]);

impl std::fmt::Debug for DropoutKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DropoutKey(..)")
    }
}

impl DropoutKey {
    /// A fresh key drawn from `rng` (the site's CSPRNG).
    pub fn draw<R: Rng + CryptoRng>(rng: &mut R) -> Self {
        DropoutKey(rng.random())
    }

    /// The dropout stream of the unit made of `sessions` at DP-SGD step `step` (0-based):
    /// ChaCha8 seeded with `SHA-256(domain ‖ key ‖ step ‖ sessions)`, every field fixed-width
    /// or length-prefixed so that distinct inputs never encode alike.
    pub fn unit_rng(&self, step: u64, sessions: &[&EncodedSession]) -> ChaCha8Rng {
        let mut h = Sha256::new();
        h.update(b"fedflow/dp-sgd/dropout/v1\0");
        h.update(self.0);
        h.update(step.to_le_bytes());
        h.update((sessions.len() as u64).to_le_bytes());
        for s in sessions {
            h.update(s.class.to_le_bytes());
            h.update((s.events.len() as u64).to_le_bytes());
            for e in &s.events {
                h.update(e.to_le_bytes());
            }
        }
        ChaCha8Rng::from_seed(h.finalize().into())
    }
}

/// Per-unit gradient clipping and summation into flat f32 buffers, one per parameter.
#[derive(Debug)]
pub struct ClippedSum {
    vars: Vec<Var>,
    sums: Vec<Vec<f32>>,
    grad: Vec<f32>,
    clip_norm: f64,
    /// Units added since the last reset.
    pub units: u64,
    /// Of which had a gradient norm above C.
    pub clipped: u64,
    /// Of which had a gradient that was not finite (added as zero, see
    /// [`ClippedSum::zeroing_non_finite`]).
    pub non_finite: u64,
    zero_non_finite: bool,
}

impl ClippedSum {
    /// Empty sums for the parameters of `model`, clipping at `clip_norm`.
    pub fn new(model: &AttentionFlowModel, clip_norm: f64) -> Self {
        // By name: a `VarMap` iterates in a per-instance order, and the noise must land on the
        // same coordinates for the same RNG stream (reproducible tests, comparable runs).
        let vars: Vec<Var> = {
            let data = model.varmap().data().lock().expect("varmap lock");
            let mut named: Vec<(&String, &Var)> = data.iter().collect();
            named.sort_by(|a, b| a.0.cmp(b.0));
            named.into_iter().map(|(_, v)| v.clone()).collect()
        };
        let sums = vars.iter().map(|v| vec![0f32; v.elem_count()]).collect();
        let total = vars.iter().map(|v| v.elem_count()).sum();
        ClippedSum {
            vars,
            sums,
            grad: Vec::with_capacity(total),
            clip_norm,
            units: 0,
            clipped: 0,
            non_finite: 0,
            zero_non_finite: false,
        }
    }

    /// The same sums, but a unit whose gradient is not finite is added as zero (and counted
    /// in [`ClippedSum::non_finite`]) instead of failing [`ClippedSum::add_unit`]: how
    /// [`train_dp`] adds units, so that no error depends on a single unit.
    pub fn zeroing_non_finite(mut self) -> Self {
        self.zero_non_finite = true;
        self
    }

    /// The parameters, sorted by name, in the order of [`ClippedSum::sums`].
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The running sums, one flat buffer per parameter.
    pub fn sums(&self) -> &[Vec<f32>] {
        &self.sums
    }

    /// Empty sums over the same parameters and bound.
    pub fn empty_like(&self) -> Self {
        ClippedSum {
            vars: self.vars.clone(),
            sums: self.sums.iter().map(|s| vec![0f32; s.len()]).collect(),
            grad: Vec::with_capacity(self.grad.capacity()),
            clip_norm: self.clip_norm,
            units: 0,
            clipped: 0,
            non_finite: 0,
            zero_non_finite: self.zero_non_finite,
        }
    }

    /// Adds another partial sum (over the same parameters) into this one.
    pub fn merge(&mut self, other: &ClippedSum) {
        for (mine, theirs) in self.sums.iter_mut().zip(&other.sums) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
        self.units += other.units;
        self.clipped += other.clipped;
        self.non_finite += other.non_finite;
    }

    /// Zeroes the sums and counters.
    pub fn reset(&mut self) {
        for s in &mut self.sums {
            s.fill(0.0);
        }
        self.units = 0;
        self.clipped = 0;
        self.non_finite = 0;
    }

    /// The gradient of the mean loss over `sessions` (one privacy unit), flattened over all
    /// parameters in order; returns the loss and logits too.
    pub fn unit_gradient(
        &mut self,
        model: &AttentionFlowModel,
        sessions: &[&EncodedSession],
        mode: &mut Mode<'_>,
    ) -> Result<(f64, Tensor, &[f32])> {
        let batch = Batch::new(sessions, model.config(), model.device())?;
        let (loss, logits) = model.loss(&batch, mode)?;
        let grads = loss.backward()?;
        self.grad.clear();
        for v in &self.vars {
            match grads.get(v.as_tensor()) {
                Some(g) => self
                    .grad
                    .extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => self.grad.extend(std::iter::repeat_n(0.0, v.elem_count())),
            }
        }
        Ok((scalar(&loss)?, logits, &self.grad))
    }

    /// Adds one unit's gradient, scaled to L2 norm at most C. Returns the norm before
    /// clipping and the loss and logits. A gradient that is not finite is an error, or adds
    /// nothing with [`ClippedSum::zeroing_non_finite`].
    pub fn add_unit(
        &mut self,
        model: &AttentionFlowModel,
        sessions: &[&EncodedSession],
        mode: &mut Mode<'_>,
    ) -> Result<(f64, f64, Tensor)> {
        let clip_norm = self.clip_norm;
        let (loss, logits, grad) = self.unit_gradient(model, sessions, mode)?;
        let norm = grad
            .iter()
            .map(|&g| f64::from(g) * f64::from(g))
            .sum::<f64>()
            .sqrt();
        if !norm.is_finite() && self.zero_non_finite {
            self.units += 1;
            self.non_finite += 1;
            return Ok((norm, loss, logits));
        }
        if !norm.is_finite() {
            return Err(Error::Training(format!(
                "a per-example gradient is {norm}: lower the learning rate"
            )));
        }
        // min(1, C / ‖g‖), as in Abadi et al. (g / max(1, ‖g‖ / C)).
        let factor = if norm > clip_norm {
            (clip_norm / norm) as f32
        } else {
            1.0
        };
        let mut offset = 0;
        for sum in &mut self.sums {
            let g = &self.grad[offset..offset + sum.len()];
            for (s, &x) in sum.iter_mut().zip(g) {
                *s += factor * x;
            }
            offset += sum.len();
        }
        self.units += 1;
        if norm > clip_norm {
            self.clipped += 1;
        }
        Ok((norm, loss, logits))
    }

    /// Adds one canary unit: `sign · C` at the flat coordinate `coordinate` (its norm is C,
    /// so clipping leaves it as it is; `sign` outside [−1, 1] is clipped like any gradient).
    pub fn add_dirac(&mut self, coordinate: usize, sign: f32) {
        let value = f64::from(sign) * self.clip_norm;
        let clipped = value.clamp(-self.clip_norm, self.clip_norm) as f32;
        let mut offset = 0;
        for sum in &mut self.sums {
            if coordinate < offset + sum.len() {
                sum[coordinate - offset] += clipped;
                break;
            }
            offset += sum.len();
        }
        self.units += 1;
        if value.abs() > self.clip_norm {
            self.clipped += 1;
        }
    }

    /// Adds N(0, std²) to every coordinate of the sums.
    pub fn add_noise<R: Rng + CryptoRng>(&mut self, std: f64, rng: &mut R) {
        for sum in &mut self.sums {
            add_gaussian(sum, std, rng);
        }
    }

    /// The sums divided by `denominator`, as a gradient store for the optimiser.
    pub fn gradients(&self, denominator: f64) -> Result<GradStore> {
        let mut store = GradStore::default();
        let scale = (1.0 / denominator) as f32;
        for (v, sum) in self.vars.iter().zip(&self.sums) {
            let g: Vec<f32> = sum.iter().map(|s| s * scale).collect();
            let t = Tensor::from_vec(g, v.shape(), v.device())?.to_dtype(v.dtype())?;
            store.insert(v.as_tensor(), t);
        }
        Ok(store)
    }
}

/// Trains `model` in place with DP-SGD for `cfg.epochs` epochs over the given privacy `units`
/// (indices into `train`, see [`privacy_units`]).
///
/// `noise_rng` draws the dropout key (see the module docs), the Poisson sampling and the
/// Gaussian noise: it must be a cryptographically secure generator seeded from the
/// operating system in production (tests pass a seeded one). The learning rate, optimiser
/// and weight decay come from `cfg`; `cfg.seed`, `cfg.batch_size`, early stopping and
/// FedProx do not apply, and no validation data is looked at (model selection on it would be
/// a release outside the accounting).
pub fn train_dp<R: Rng + CryptoRng>(
    model: &AttentionFlowModel,
    train: &[EncodedSession],
    units: &[Vec<usize>],
    cfg: &TrainConfig,
    dp: &DpSgdConfig,
    noise_rng: &mut R,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<DpTrainReport> {
    let (mut before_noise, mut released) =
        (|_: u64, _: &ClippedSum| {}, |_: u64, _: &ClippedSum| {});
    let observer = Observer {
        canaries: &[],
        before_noise: &mut before_noise,
        released: &mut released,
    };
    train_dp_observed(model, train, units, cfg, dp, noise_rng, on_epoch, observer)
}

/// A gradient canary for an empirical audit ([`crate::train::audit`]): a unit whose
/// gradient, at every step it is sampled, is `sign · C` on one coordinate of the flattened
/// parameters (in [`ClippedSum::vars`] order) and zero elsewhere (Steinke, Nasr, Jagielski
/// 2023, Section 7, "Dirac canaries"). Only the audit harness makes these; it goes through
/// the same Poisson sampling, clipping, sum and noise as every real unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiracCanary {
    /// The flat parameter index.
    pub coordinate: usize,
    /// +1 or −1.
    pub sign: f32,
}

/// What a test or an audit sees of [`train_dp`] beyond its result.
pub(crate) struct Observer<'a> {
    /// Extra units, sampled after the real ones at each step (see [`DiracCanary`]).
    pub canaries: &'a [DiracCanary],
    /// Each step's clipped sum before the noise is added.
    pub before_noise: &'a mut dyn FnMut(u64, &ClippedSum),
    /// Each step's released (noisy) sum: what the accountant's guarantee covers.
    pub released: &'a mut dyn FnMut(u64, &ClippedSum),
}

/// [`train_dp`] with an [`Observer`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_dp_observed<R: Rng + CryptoRng>(
    model: &AttentionFlowModel,
    train: &[EncodedSession],
    units: &[Vec<usize>],
    cfg: &TrainConfig,
    dp: &DpSgdConfig,
    noise_rng: &mut R,
    on_epoch: &mut dyn FnMut(&EpochReport),
    observer: Observer<'_>,
) -> Result<DpTrainReport> {
    cfg.validate()?;
    dp.validate()?;
    if units.is_empty() {
        return Err(Error::Training("no training sessions".into()));
    }
    if let Some(bad) = units.iter().flatten().find(|&&i| i >= train.len()) {
        return Err(Error::Training(format!(
            "privacy unit refers to session {bad} of {}",
            train.len()
        )));
    }
    let total = model.num_parameters();
    if let Some(c) = observer.canaries.iter().find(|c| c.coordinate >= total) {
        return Err(Error::Training(format!(
            "canary at coordinate {} of {total}",
            c.coordinate
        )));
    }
    let event = dp.round_event(units.len() + observer.canaries.len(), cfg.epochs)?;
    let steps_per_epoch = event.steps / cfg.epochs as u64;
    // The fixed denominator: the expected batch size q·n (B, or n when B > n).
    let expected_batch = event.q * units.len() as f64;
    let vars = model.varmap().all_vars();
    let mut optimizer = optim::Optimizer::new(
        cfg.optimizer,
        vars,
        cfg.learning_rate,
        cfg.momentum,
        cfg.weight_decay,
    )?;
    // Drawn before anything else, from the secret generator: never from `cfg.seed`, which
    // the coordinator chose.
    let dropout_key = DropoutKey::draw(noise_rng);
    let mut acc_sum = ClippedSum::new(model, dp.clip_norm).zeroing_non_finite();
    let std = dp.noise_multiplier * dp.clip_norm;
    let (mut sampled, mut clipped, mut non_finite) = (0u64, 0u64, 0u64);
    let mut reports = Vec::new();
    let mut steps = 0;
    for epoch in 1..=cfg.epochs {
        let started = Instant::now();
        let mut metrics = MetricsAccumulator::new(model.config().num_classes);
        let mut seen = 0usize;
        for _ in 0..steps_per_epoch {
            acc_sum.reset();
            // Poisson sampling, drawn in unit order, so the result does not depend on how the
            // units are spread over threads; each unit's dropout stream is derived from the
            // key, the step and the unit alone.
            let step = steps as u64;
            let batch: Vec<&Vec<usize>> = units
                .iter()
                .filter(|_| noise_rng.random::<f64>() < event.q)
                .collect();
            let canaries: Vec<&DiracCanary> = observer
                .canaries
                .iter()
                .filter(|_| noise_rng.random::<f64>() < event.q)
                .collect();
            // Per-unit backward passes are independent: fixed chunks run in parallel, each
            // into its own partial sum, merged in chunk order (bit-identical on any core count).
            let parts = batch
                .par_chunks(UNITS_PER_CHUNK)
                .map(|chunk| {
                    let mut part = acc_sum.empty_like();
                    let mut seen = Vec::with_capacity(chunk.len());
                    for &unit in chunk {
                        let sessions: Vec<&EncodedSession> =
                            unit.iter().map(|&i| &train[i]).collect();
                        let mut rng = dropout_key.unit_rng(step, &sessions);
                        let (_, loss, logits) =
                            part.add_unit(model, &sessions, &mut Mode::Train(&mut rng))?;
                        let truth: Vec<u32> = sessions.iter().map(|s| s.class).collect();
                        seen.push((loss, truth, argmax(&logits)?));
                    }
                    Ok((part, seen))
                })
                .collect::<Result<Vec<_>>>()?;
            for (part, seen_units) in parts {
                acc_sum.merge(&part);
                for (loss, truth, predicted) in seen_units {
                    metrics.add(loss, &truth, &predicted);
                    seen += truth.len();
                }
            }
            for c in canaries {
                acc_sum.add_dirac(c.coordinate, c.sign);
            }
            (observer.before_noise)(step, &acc_sum);
            acc_sum.add_noise(std, noise_rng);
            (observer.released)(step, &acc_sum);
            optimizer.step(&acc_sum.gradients(expected_batch)?)?;
            sampled += acc_sum.units;
            clipped += acc_sum.clipped;
            non_finite += acc_sum.non_finite;
            steps += 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        let m = metrics.finish();
        let report = EpochReport {
            epoch,
            train_loss: m.loss,
            train_accuracy: m.accuracy,
            validation: None,
            improved: false,
            seconds,
            samples_per_sec: seen as f64 / seconds.max(1e-9),
        };
        on_epoch(&report);
        reports.push(report);
    }
    Ok(DpTrainReport {
        train: TrainReport {
            epochs: reports,
            best_epoch: cfg.epochs,
            stopped_early: false,
            train_examples: units.iter().map(Vec::len).sum(),
            steps,
        },
        event,
        units: units.len(),
        sampled,
        clipped_fraction: if sampled == 0 {
            0.0
        } else {
            clipped as f64 / sampled as f64
        },
        non_finite,
    })
}

#[cfg(test)]
mod tests;
