//! What a partner site does with one federated task, without any networking.
//!
//! A [`SiteTrainer`] holds the site's encoded data, the hash and size of the vocabulary it was
//! encoded with, and the device to train on. Given a [`TaskSpec`] and the global model's
//! safetensors bytes it
//!
//! 1. checks the bytes hash to the announced SHA-256 ([`Error::HashMismatch`] otherwise),
//! 2. refuses tasks built for another vocabulary or class count ([`Error::Task`], naming both
//!    sides and what to do),
//! 3. builds the model, loads the global parameters (names, shapes and dtypes validated),
//! 4. trains on the training split with early stopping on the validation split, and
//! 5. returns `delta = local - global`, checked finite, as safetensors bytes with their
//!    SHA-256, plus [`SiteMetrics`].
//!
//! Evaluation-only tasks ([`SiteTrainer::evaluate_task`]) do steps 1-3 and report validation
//! metrics. The gRPC client loop calls these functions; everything here is pure and seeded,
//! so the same task on the same data gives the same delta bytes on the CPU.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use fedflow_common::compress::Compression;
use fedflow_common::data::{NUM_LABELS, SiteDataset, Vocab};
pub use fedflow_common::hash::sha256_hex;
use fedflow_common::model::{AttentionFlowModel, ModelConfig, vocab_sha256};
use fedflow_common::params::ParamSet;
use fedflow_common::privacy::dpfedavg::SiteDpTask;
use fedflow_common::train::{EpochReport, TrainConfig, evaluate, train};
use serde::{Deserialize, Serialize};

use crate::privacy::{RecordDp, SitePrivacy};
use crate::{Error, Result};

/// Sessions per forward pass when computing metrics (no gradients, so larger than training).
const EVAL_BATCH: usize = 256;

/// One federated task as the site receives it (after the wire types are converted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The federated run this task belongs to.
    pub run_id: String,
    /// The round number within the run.
    pub round: u64,
    /// The coordinator's id of this task (the site's ledger keys releases by it).
    pub task_id: String,
    /// Architecture of the global model (its `vocab_size` must equal the site vocabulary's).
    pub model: ModelConfig,
    /// SHA-256 (hex) of the vocabulary the federation uses (see [`vocab_sha256`]).
    pub vocab_sha256: String,
    /// SHA-256 (hex) of the global model's safetensors bytes.
    pub expected_model_sha256: String,
    /// Local training hyper-parameters (seed, epochs, FedProx μ, ...).
    pub train: TrainConfig,
    /// Record-level DP-SGD the run dictates, if any.
    pub record_dp: Option<RecordDp>,
    /// Site-level DP-FedAvg: how the delta is clipped and noised before it leaves, if at all.
    pub site_dp: Option<SiteDpTask>,
    /// How the update is compressed before it leaves (after any DP).
    #[serde(default)]
    pub compression: Compression,
}

/// Metrics a site reports for one task. Counts are sessions of the site's own splits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteMetrics {
    /// Sessions in the site's training split.
    pub train_examples: usize,
    /// Sessions in the site's validation split.
    pub validation_examples: usize,
    /// Mean training loss (dropout active) of the epoch whose weights were kept; `None` for
    /// evaluation-only tasks.
    pub train_loss: Option<f64>,
    /// Validation loss of the final weights; `None` without validation sessions.
    pub validation_loss: Option<f64>,
    /// Validation accuracy of the final weights; `None` without validation sessions.
    pub validation_accuracy: Option<f64>,
    /// Validation macro-F1 of the final weights; `None` without validation sessions.
    pub validation_macro_f1: Option<f64>,
    /// Epochs trained (fewer than configured when early stopping ended training; 0 for
    /// evaluation-only tasks).
    pub epochs_run: usize,
    /// The epoch whose weights were kept (1-based; 0 for evaluation-only tasks).
    pub best_epoch: usize,
    /// Wall-clock seconds of local training (0 for evaluation-only tasks).
    pub train_seconds: f64,
}

impl SiteMetrics {
    /// Split sizes only: nothing measured on the data.
    pub fn counts_only(train_examples: usize, validation_examples: usize) -> Self {
        SiteMetrics {
            train_examples,
            validation_examples,
            train_loss: None,
            validation_loss: None,
            validation_accuracy: None,
            validation_macro_f1: None,
            epochs_run: 0,
            best_epoch: 0,
            train_seconds: 0.0,
        }
    }
}

/// What a training task produced: the update to send and the metrics to report.
#[derive(Debug, Clone)]
pub struct TaskOutcome {
    /// The update as the coordinator decodes it: `local - global` made private as the task
    /// says (site-level DP), then compressed and decoded when the run compresses; every
    /// value finite.
    pub delta: ParamSet,
    /// [`ParamSet::to_safetensors_bytes`] of `delta`: what goes on the wire.
    pub delta_bytes: Vec<u8>,
    /// SHA-256 (hex) of `delta_bytes`.
    pub delta_sha256: String,
    /// Training and validation metrics.
    pub metrics: SiteMetrics,
    /// Site-level DP: the delta's norm was at most the clip before clipping (always true
    /// without site-level DP).
    pub unclipped: bool,
}

/// How a site's data changed before a task: sessions held before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataChange {
    /// Sessions (both splits) before.
    pub before: usize,
    /// Sessions (both splits) after.
    pub after: usize,
}

/// A partner site's data and device, ready to run federated tasks.
#[derive(Debug)]
pub struct SiteTrainer {
    /// The data of the task being run; replaced between tasks when the source changed.
    dataset: std::sync::RwLock<Arc<SiteDataset>>,
    /// Where the data comes from, when it is taken in again before every task.
    source: Option<Box<dyn source::SiteSource>>,
    vocab_sha256: String,
    vocab_size: usize,
    device: Device,
    privacy: Option<Arc<SitePrivacy>>,
    withhold_metrics: bool,
    min_site_noise: Option<f64>,
    /// Error feedback's residuals (compressed runs that ask for it).
    feedback: feedback::ErrorFeedback,
}

impl SiteTrainer {
    /// A site whose `dataset` was encoded with `vocab`, training on `device`.
    pub fn new(dataset: SiteDataset, vocab: &Vocab, device: Device) -> Self {
        Self {
            dataset: std::sync::RwLock::new(Arc::new(dataset)),
            source: None,
            vocab_sha256: vocab_sha256(vocab),
            vocab_size: vocab.len(),
            device,
            privacy: None,
            withhold_metrics: false,
            min_site_noise: None,
            feedback: feedback::ErrorFeedback::in_memory(),
        }
    }

    /// The same site keeping its working state in `dir` (created if missing): error
    /// feedback's residual of compressed updates, so it survives restarts. Without one the
    /// residual is kept in memory only.
    pub fn with_state_dir(mut self, dir: &std::path::Path) -> Result<Self> {
        self.feedback = feedback::ErrorFeedback::open(dir)?;
        Ok(self)
    }

    /// Called when the coordinator accepted `task`'s update: error feedback moves on to the
    /// residual that update left.
    pub fn accepted(&self, task: &TaskSpec) -> Result<()> {
        self.feedback.accepted(task)
    }

    /// The same site, withholding every metric computed on its data (losses, accuracy,
    /// macro-F1, the epoch early stopping kept, epochs run, training time, the validation
    /// count; and, under site-level DP, where it carries no weight, the training count):
    /// updates carry counts only and evaluation tasks are declined. For sites whose only
    /// protection is site-level DP, whose guarantee covers the update and nothing sent beside
    /// it.
    pub fn withholding_metrics(mut self, withhold: bool) -> Self {
        self.withhold_metrics = withhold;
        self
    }

    /// Whether the site withholds metrics (see [`SiteTrainer::withholding_metrics`]).
    pub fn withholds_metrics(&self) -> bool {
        self.withhold_metrics
    }

    /// The same site, declining every training task in which it would itself add less
    /// site-level noise than `multiplier` times the task's clip (`noise_std / clip_norm`,
    /// the multiplier of the Gaussian mechanism the site's own release is against the
    /// coordinator): tasks without site-level DP, central mode (no noise at the site), and
    /// local or distributed tasks below the floor. Refuses a multiplier that is not a
    /// positive number.
    pub fn with_min_site_noise(mut self, multiplier: f64) -> Result<Self> {
        if !(multiplier.is_finite() && multiplier > 0.0) {
            return Err(Error::Usage(format!(
                "the site's minimum site-level noise multiplier must be a positive number, \
                 got {multiplier}"
            )));
        }
        self.min_site_noise = Some(multiplier);
        Ok(self)
    }

    /// Refuses a task below the site's own site-level noise floor, if it has one.
    fn check_site_noise(&self, task: &TaskSpec) -> Result<()> {
        let Some(min) = self.min_site_noise else {
            return Ok(());
        };
        let (own, what) = match &task.site_dp {
            None => (0.0, "no site-level DP".to_string()),
            Some(d) => (
                d.noise_std / d.clip_norm,
                format!("site-level DP in {} mode", d.mode),
            ),
        };
        if own < min {
            return Err(Error::Policy(format!(
                "run {} round {}: the task has {what}, in which this site would add noise of \
                 {own:.4} times the clip itself, below its own floor of {min} \
                 (--min-site-noise); declining: run local or distributed site-level DP with \
                 at least that much noise at each site",
                task.run_id, task.round
            )));
        }
        Ok(())
    }

    /// What a site withholding metrics reports for a training task.
    fn withheld(&self, task: &TaskSpec) -> SiteMetrics {
        let train = if task.site_dp.is_some() {
            0
        } else {
            self.dataset().train.len()
        };
        SiteMetrics::counts_only(train, 0)
    }

    /// The same site with its record-level privacy settings and ledger: tasks with DP-SGD
    /// instructions are trained privately, recorded, and declined beyond the site's limit.
    pub fn with_privacy(mut self, privacy: Arc<SitePrivacy>) -> Self {
        self.privacy = Some(privacy);
        self
    }

    /// The site's privacy settings, if it has them.
    pub fn privacy(&self) -> Option<&Arc<SitePrivacy>> {
        self.privacy.as_ref()
    }

    /// The site's data as the current task sees it.
    pub fn dataset(&self) -> Arc<SiteDataset> {
        self.dataset
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The same site, asking `source` for its data before every task (see [`source`]); the
    /// dataset given to [`SiteTrainer::new`] is what the source held.
    pub fn with_source(mut self, source: impl source::SiteSource + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Takes in the data the source holds for the task `start`, if it changed since the last
    /// task; returns the sizes before and after (`None` without a source or a change). A
    /// source that cannot be read fails the task with the reason (file and line): the site
    /// declines it rather than train on data it cannot vouch for, and keeps what it had.
    pub fn refresh(&self, start: source::TaskStart) -> Result<Option<DataChange>> {
        let Some(src) = &self.source else {
            return Ok(None);
        };
        let Some(fresh) = src.poll(start)? else {
            return Ok(None);
        };
        let mut current = self
            .dataset
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let change = DataChange {
            before: current.train.len() + current.validation.len(),
            after: fresh.train.len() + fresh.validation.len(),
        };
        *current = Arc::new(fresh);
        Ok(Some(change))
    }

    /// SHA-256 (hex) of the site's vocabulary.
    pub fn vocab_sha256(&self) -> &str {
        &self.vocab_sha256
    }

    /// Number of ids in the site's vocabulary (padding and unknown included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The device training runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs a training task: verify, load the global model, train locally, return the delta.
    ///
    /// `on_epoch` is called after every local epoch (progress, heartbeats).
    pub fn train_task(
        &self,
        task: &TaskSpec,
        global_bytes: &[u8],
        on_epoch: &mut dyn FnMut(&EpochReport),
    ) -> Result<TaskOutcome> {
        let (model, global) = self.prepare(task, global_bytes)?;
        if self.dataset().train.is_empty() {
            return Err(Error::Task(format!(
                "run {} round {}: this site has no training sessions ({} validation); \
                 add data or lower the validation fraction, or leave this site out of training",
                task.run_id,
                task.round,
                self.dataset().validation.len()
            )));
        }
        if self.privacy.is_some() && task.record_dp.is_none() {
            return Err(Error::Policy(format!(
                "run {} round {}: this site trains only with record-level DP (it has a \
                 privacy ledger) and the task carries no DP-SGD instructions; add [record_dp] \
                 to the run configuration",
                task.run_id, task.round
            )));
        }
        self.check_site_noise(task)?;
        if let Some(dp) = &task.record_dp {
            let privacy = self.privacy.as_ref().ok_or_else(|| {
                Error::Task(format!(
                    "run {} requires record-level DP (DP-SGD) but this site has no privacy \
                     ledger; join with --privacy-dir DIR and --max-epsilon E",
                    task.run_id
                ))
            })?;
            let started = Instant::now();
            let mut outcome = self.train_private(privacy, dp, task, &model, &global, on_epoch)?;
            // How long training took depends on the sampled units: sent only with metrics.
            if privacy.release_metrics && !self.withhold_metrics {
                outcome.metrics.train_seconds = started.elapsed().as_secs_f64();
            }
            if self.withhold_metrics {
                outcome.metrics = SiteMetrics {
                    epochs_run: outcome.metrics.epochs_run,
                    best_epoch: outcome.metrics.best_epoch,
                    ..self.withheld(task)
                };
            }
            return Ok(outcome);
        }
        let started = Instant::now();
        let report = train(
            &model,
            &self.dataset().train,
            &self.dataset().validation,
            &task.train,
            on_epoch,
        )?;
        let train_seconds = started.elapsed().as_secs_f64();
        let local = ParamSet::from_varmap(model.varmap())?;
        let release::Release {
            delta,
            bytes: delta_bytes,
            sha256: delta_sha256,
            unclipped,
        } = self.release(task, ParamSet::delta(&local, &global)?)?;
        if self.withhold_metrics {
            return Ok(TaskOutcome {
                delta,
                delta_bytes,
                delta_sha256,
                metrics: self.withheld(task),
                unclipped,
            });
        }
        let mut metrics = self.validation_metrics(&model)?;
        metrics.train_loss = report
            .epochs
            .get(report.best_epoch.saturating_sub(1))
            .map(|e| e.train_loss);
        metrics.epochs_run = report.epochs.len();
        metrics.best_epoch = report.best_epoch;
        metrics.train_seconds = train_seconds;
        Ok(TaskOutcome {
            delta,
            delta_bytes,
            delta_sha256,
            metrics,
            unclipped,
        })
    }

    /// Runs an evaluation-only task: verify and load the global model, then report its
    /// metrics on the site's validation split. Fails when that split is empty.
    pub fn evaluate_task(&self, task: &TaskSpec, global_bytes: &[u8]) -> Result<SiteMetrics> {
        if self.withhold_metrics {
            return Err(Error::Policy(format!(
                "run {} round {}: this site withholds metrics computed on its data \
                 (--withhold-metrics), so it does not answer evaluation tasks",
                task.run_id, task.round
            )));
        }
        let withheld = match &self.privacy {
            Some(p) => !p.release_metrics,
            None => task.record_dp.is_some(),
        };
        if withheld {
            return Err(Error::Policy(format!(
                "run {} round {}: under record-level DP this site does not release metrics \
                 computed on its data (they are outside the guarantee); join with \
                 --release-metrics to allow it",
                task.run_id, task.round
            )));
        }
        let (model, _global) = self.prepare(task, global_bytes)?;
        if self.dataset().validation.is_empty() {
            return Err(Error::Task(format!(
                "run {} round {}: this site has no validation sessions to evaluate on; \
                 raise the validation fraction or leave this site out of evaluation",
                task.run_id, task.round
            )));
        }
        self.validation_metrics(&model)
    }

    /// Steps shared by both task kinds: hash check, compatibility checks, model with the
    /// global parameters loaded. Returns the model and the parsed global parameters.
    fn prepare(
        &self,
        task: &TaskSpec,
        global_bytes: &[u8],
    ) -> Result<(AttentionFlowModel, ParamSet)> {
        let actual = sha256_hex(global_bytes);
        if !actual.eq_ignore_ascii_case(&task.expected_model_sha256) {
            return Err(Error::HashMismatch {
                what: "global model",
                expected: task.expected_model_sha256.clone(),
                actual,
            });
        }
        self.check_compatible(task)?;
        let global = ParamSet::from_safetensors_bytes(global_bytes)?;
        let model = AttentionFlowModel::new(&task.model, &self.device, task.train.seed)?;
        global.load_into_varmap(model.varmap())?;
        Ok((model, global))
    }

    /// Refuses tasks whose vocabulary or label space differs from the site's.
    fn check_compatible(&self, task: &TaskSpec) -> Result<()> {
        if !task.vocab_sha256.eq_ignore_ascii_case(&self.vocab_sha256) {
            return Err(Error::Task(format!(
                "run {} uses vocabulary sha256 {} but this site's data is encoded with \
                 vocabulary sha256 {}; fetch the federation's vocab.json and re-encode the \
                 site's data with it",
                task.run_id, task.vocab_sha256, self.vocab_sha256
            )));
        }
        if task.model.vocab_size != self.vocab_size {
            return Err(Error::Task(format!(
                "run {} model has vocab_size {} but this site's vocabulary has {} ids; \
                 the run's model.vocab_size must equal the federation vocabulary's size, \
                 fix the run configuration",
                task.run_id, task.model.vocab_size, self.vocab_size
            )));
        }
        if task.model.num_classes != NUM_LABELS {
            return Err(Error::Task(format!(
                "run {} model has {} classes but site labels take {NUM_LABELS} values; \
                 set model.num_classes = {NUM_LABELS} in the run configuration",
                task.run_id, task.model.num_classes
            )));
        }
        Ok(())
    }

    /// Split sizes only.
    fn counts(&self) -> SiteMetrics {
        SiteMetrics::counts_only(self.dataset().train.len(), self.dataset().validation.len())
    }

    /// Split sizes and validation metrics of `model`; training fields left empty.
    fn validation_metrics(&self, model: &AttentionFlowModel) -> Result<SiteMetrics> {
        let validation = if self.dataset().validation.is_empty() {
            None
        } else {
            Some(evaluate(model, &self.dataset().validation, EVAL_BATCH)?)
        };
        Ok(SiteMetrics {
            validation_loss: validation.as_ref().map(|m| m.loss),
            validation_accuracy: validation.as_ref().map(|m| m.accuracy),
            validation_macro_f1: validation.as_ref().map(|m| m.macro_f1),
            ..self.counts()
        })
    }
}

pub mod feedback;
mod private;
mod release;
pub mod source;

#[cfg(test)]
mod compression_tests;
#[cfg(test)]
mod growing_tests;
#[cfg(test)]
mod tests;
