//! Local training: mini-batch optimisation with AdamW or momentum SGD, dropout in training
//! only, early stopping on validation loss (restoring the best weights), and evaluation.
//!
//! Everything random (parameter init, shuffling, dropout) draws from ChaCha8 streams derived
//! from [`TrainConfig::seed`], so a CPU run is reproducible bit for bit.

pub mod audit;
pub mod dpsgd;
mod metrics;
mod optim;

use std::time::Instant;

use candle_core::{D, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use dpsgd::{DpSgdConfig, DpTrainReport, PrivacyUnit, privacy_units, train_dp};
pub use metrics::{EvalMetrics, MetricsAccumulator};
pub use optim::OptimizerKind;

use crate::data::EncodedSession;
use crate::model::{AttentionFlowModel, Batch, Mode};
use crate::{Error, Result};

/// Hyper-parameters of local training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training data.
    pub epochs: usize,
    /// Sessions per optimisation step.
    pub batch_size: usize,
    /// Learning rate.
    pub learning_rate: f64,
    /// Optimiser.
    pub optimizer: OptimizerKind,
    /// Momentum (SGD only).
    pub momentum: f64,
    /// Weight decay: decoupled for AdamW, L2 for SGD.
    pub weight_decay: f64,
    /// Stop after this many epochs without a validation-loss improvement (0 disables early
    /// stopping); the best weights are restored either way when there is validation data.
    pub patience: usize,
    /// Minimum decrease of validation loss that counts as an improvement.
    pub min_delta: f64,
    /// Seed for shuffling and dropout.
    pub seed: u64,
    /// Group sessions of similar length into batches (less padding, same data per epoch).
    pub length_bucketing: bool,
    /// FedProx proximal weight μ (Li et al. 2020, "Federated Optimization in Heterogeneous
    /// Networks"): adds `μ/2 · ‖w − w₀‖²` to every step's loss, where `w₀` are the weights
    /// training started from (the global model, in a federated round). 0 disables it.
    pub fedprox_mu: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 64,
            learning_rate: 2e-3,
            optimizer: OptimizerKind::Adamw,
            momentum: 0.9,
            weight_decay: 0.01,
            patience: 3,
            min_delta: 0.0,
            seed: 0,
            length_bucketing: true,
            fedprox_mu: 0.0,
        }
    }
}

impl TrainConfig {
    /// Checks every field, naming the first one that is out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: String| Err(Error::Config(format!("train.{f}: {why}")));
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "learning_rate",
                format!("{} must be a positive number", self.learning_rate),
            );
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("momentum", format!("{} is outside [0, 1)", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("{} must be >= 0", self.weight_decay),
            );
        }
        if !(self.fedprox_mu.is_finite() && self.fedprox_mu >= 0.0) {
            return bad("fedprox_mu", format!("{} must be >= 0", self.fedprox_mu));
        }
        if !(self.min_delta.is_finite() && self.min_delta >= 0.0) {
            return bad("min_delta", format!("{} must be >= 0", self.min_delta));
        }
        Ok(())
    }
}

/// What happened in one epoch.
#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch (with dropout active).
    pub train_loss: f64,
    /// Training accuracy over the epoch (with dropout active).
    pub train_accuracy: f64,
    /// Validation metrics after the epoch, when there is validation data.
    pub validation: Option<EvalMetrics>,
    /// Whether validation loss improved (the weights of this epoch are the best so far).
    pub improved: bool,
    /// Wall-clock seconds for the epoch's training steps.
    pub seconds: f64,
    /// Training throughput in sessions per second.
    pub samples_per_sec: f64,
}

/// Summary of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Per-epoch reports.
    pub epochs: Vec<EpochReport>,
    /// The epoch whose weights the model holds at the end (1-based).
    pub best_epoch: usize,
    /// Whether training stopped before `epochs` because of early stopping.
    pub stopped_early: bool,
    /// Number of training sessions.
    pub train_examples: usize,
    /// Optimisation steps taken.
    pub steps: usize,
}

/// Splits `data` into batches of indices; with bucketing, sessions of similar length share
/// a batch (sorted inside windows of 50 batches, then the batch order is shuffled).
fn make_batches(
    data: &[EncodedSession],
    cfg: &TrainConfig,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(rng);
    if cfg.length_bucketing {
        for window in order.chunks_mut(cfg.batch_size * 50) {
            window.sort_by_key(|&i| data[i].events.len());
        }
    }
    let mut batches: Vec<Vec<usize>> = order.chunks(cfg.batch_size).map(|c| c.to_vec()).collect();
    if cfg.length_bucketing {
        batches.shuffle(rng);
    }
    batches
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// Steps whose loss and predictions are still on the device. Reading a value back from a
/// GPU waits for its queue to drain, so there the training loop reads a window of steps at
/// once and the GPU stays busy; on the CPU the window is one step, read before the backward
/// pass, so a non-finite loss never reaches the parameters.
struct PendingSteps {
    window: usize,
    steps: Vec<(usize, Tensor, Tensor, Vec<u32>)>,
}

impl PendingSteps {
    /// GPU queues are read every this many steps.
    const DEVICE_WINDOW: usize = 32;

    fn new(device: &candle_core::Device) -> Self {
        PendingSteps {
            window: if device.is_cpu() {
                1
            } else {
                Self::DEVICE_WINDOW
            },
            steps: Vec::new(),
        }
    }

    /// Keeps step `step`'s loss and logits, with its sessions' true classes.
    fn push(&mut self, step: usize, loss: &Tensor, logits: &Tensor, truth: Vec<u32>) -> Result<()> {
        let predicted = logits.argmax(D::Minus1)?;
        self.steps.push((step, loss.detach(), predicted, truth));
        Ok(())
    }

    fn full(&self) -> bool {
        self.steps.len() >= self.window
    }

    /// Reads the kept steps into `acc`; a non-finite loss is an error naming its step.
    fn flush(&mut self, acc: &mut MetricsAccumulator, epoch: usize) -> Result<()> {
        for (step, loss, predicted, truth) in self.steps.drain(..) {
            let loss_value = scalar(&loss)?;
            if !loss_value.is_finite() {
                return Err(Error::Training(format!(
                    "loss became {loss_value} at epoch {epoch}, step {step}: lower the learning rate"
                )));
            }
            acc.add(loss_value, &truth, &predicted.to_vec1::<u32>()?);
        }
        Ok(())
    }
}

/// Trains `model` in place on `train`, early-stopping on `validation` (which may be empty).
///
/// `on_epoch` is called after every epoch (progress printing, heartbeats). On return the
/// model holds the best weights seen on validation data, or the last weights if there is none.
pub fn train(
    model: &AttentionFlowModel,
    train: &[EncodedSession],
    validation: &[EncodedSession],
    cfg: &TrainConfig,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<TrainReport> {
    cfg.validate()?;
    if train.is_empty() {
        return Err(Error::Training("no training sessions".into()));
    }
    let vars = model.varmap().all_vars();
    // FedProx anchor: the starting weights. `copy()` alone would stay in the autograd graph
    // (its gradient would cancel the proximal term exactly), hence `detach()`.
    let anchor: Vec<Tensor> = if cfg.fedprox_mu > 0.0 {
        vars.iter()
            .map(|v| Ok(v.as_tensor().copy()?.detach()))
            .collect::<candle_core::Result<_>>()?
    } else {
        Vec::new()
    };
    let mut optimizer = optim::Optimizer::new(
        cfg.optimizer,
        vars.clone(),
        cfg.learning_rate,
        cfg.momentum,
        cfg.weight_decay,
    )?;
    // Streams separate from each other and from parameter initialisation (which uses `seed`).
    let mut shuffle_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed_5bff_1e00_0001);
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed_d20b_0000_0001);
    let mut best: Option<(f64, usize, Vec<Tensor>)> = None;
    let mut reports = Vec::new();
    let mut steps = 0;
    let mut stopped_early = false;
    for epoch in 1..=cfg.epochs {
        let started = Instant::now();
        let mut acc = MetricsAccumulator::new(model.config().num_classes);
        let mut pending = PendingSteps::new(model.device());
        for idx in make_batches(train, cfg, &mut shuffle_rng) {
            let sessions: Vec<&EncodedSession> = idx.iter().map(|&i| &train[i]).collect();
            let batch = Batch::new(&sessions, model.config(), model.device())?;
            let (mut loss, logits) = model.loss(&batch, &mut Mode::Train(&mut dropout_rng))?;
            if !anchor.is_empty() {
                let mut prox = Tensor::zeros((), loss.dtype(), loss.device())?;
                for (v, a) in vars.iter().zip(&anchor) {
                    prox = (prox + (v.as_tensor() - a)?.sqr()?.sum_all()?)?;
                }
                loss = (loss + (prox * (cfg.fedprox_mu / 2.0))?)?;
            }
            let truth: Vec<u32> = sessions.iter().map(|s| s.class).collect();
            pending.push(steps, &loss, &logits, truth)?;
            if pending.full() {
                pending.flush(&mut acc, epoch)?;
            }
            let grads = loss.backward()?;
            optimizer.step(&grads)?;
            steps += 1;
        }
        pending.flush(&mut acc, epoch)?;
        let seconds = started.elapsed().as_secs_f64();
        let epoch_metrics = acc.finish();
        let val = if validation.is_empty() {
            None
        } else {
            Some(evaluate(model, validation, 256)?)
        };
        let improved = match (&val, &best) {
            (Some(v), Some((best_loss, _, _))) => v.loss < best_loss - cfg.min_delta,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if improved {
            let snapshot = vars
                .iter()
                .map(|v| Ok(v.as_tensor().copy()?.detach()))
                .collect::<candle_core::Result<_>>()?;
            best = Some((
                val.as_ref().map(|v| v.loss).unwrap_or(f64::NAN),
                epoch,
                snapshot,
            ));
        }
        let report = EpochReport {
            epoch,
            train_loss: epoch_metrics.loss,
            train_accuracy: epoch_metrics.accuracy,
            validation: val,
            improved,
            seconds,
            samples_per_sec: train.len() as f64 / seconds.max(1e-9),
        };
        on_epoch(&report);
        reports.push(report);
        if cfg.patience > 0
            && let Some((_, best_epoch, _)) = &best
            && epoch - best_epoch >= cfg.patience
            && epoch < cfg.epochs
        {
            stopped_early = true;
            break;
        }
    }
    let best_epoch = match best {
        Some((_, epoch, snapshot)) => {
            for (var, value) in vars.iter().zip(snapshot) {
                var.set(&value)?;
            }
            epoch
        }
        None => reports.len(),
    };
    Ok(TrainReport {
        epochs: reports,
        best_epoch,
        stopped_early,
        train_examples: train.len(),
        steps,
    })
}

/// Evaluates `model` (dropout off) on `data` in batches of `batch_size`.
pub fn evaluate(
    model: &AttentionFlowModel,
    data: &[EncodedSession],
    batch_size: usize,
) -> Result<EvalMetrics> {
    if data.is_empty() {
        return Err(Error::Training("no sessions to evaluate".into()));
    }
    let mut acc = MetricsAccumulator::new(model.config().num_classes);
    // Sort by length so batches carry little padding; metrics do not depend on order.
    let mut order: Vec<&EncodedSession> = data.iter().collect();
    order.sort_by_key(|s| s.events.len());
    for chunk in order.chunks(batch_size.max(1)) {
        let batch = Batch::new(chunk, model.config(), model.device())?;
        let (loss, logits) = model.loss(&batch, &mut Mode::Eval)?;
        let truth: Vec<u32> = chunk.iter().map(|s| s.class).collect();
        acc.add(scalar(&loss)?, &truth, &argmax(&logits)?);
    }
    Ok(acc.finish())
}

/// The class `model` (dropout off) predicts for each session of `data`, in `data`'s order,
/// computed in batches of `batch_size`.
pub fn predict(
    model: &AttentionFlowModel,
    data: &[EncodedSession],
    batch_size: usize,
) -> Result<Vec<u32>> {
    Ok(probabilities(model, data, batch_size)?
        .iter()
        .map(|p| {
            // The first of equal maxima, as `argmax` over the logits.
            let mut best = 0;
            for (k, &v) in p.iter().enumerate() {
                if v > p[best] {
                    best = k;
                }
            }
            best as u32
        })
        .collect())
}

/// The class probabilities (softmax of the logits, dropout off) of each session of `data`,
/// in `data`'s order, computed in batches of `batch_size` sorted by length. A session's
/// figures do not depend on the others in its batch (padding is masked).
pub fn probabilities(
    model: &AttentionFlowModel,
    data: &[EncodedSession],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| data[i].events.len());
    let mut out = vec![Vec::new(); data.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let sessions: Vec<&EncodedSession> = chunk.iter().map(|&i| &data[i]).collect();
        let batch = Batch::new(&sessions, model.config(), model.device())?;
        let logits = model.forward(&batch, &mut Mode::Eval)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits.to_dtype(candle_core::DType::F32)?)?
            .to_vec2::<f32>()?;
        for (&i, p) in chunk.iter().zip(probs) {
            out[i] = p;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
