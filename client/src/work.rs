//! What a site does with a task, as the federation loop ([`run_site`](crate::federation::run_site))
//! needs it: the [`SiteWork`] trait, implemented by the real
//! [`SiteTrainer`] and by the no-op trainer, and the
//! [`ModelBuffer`] a downloaded global model is assembled into.

use fedflow_common::train::EpochReport;
use prost::bytes::Bytes;

use crate::Result;
use crate::site::source::TaskStart;
use crate::site::{SiteMetrics, SiteTrainer, TaskSpec};

/// What a site does with a training task, as [`run_site`](crate::federation::run_site) needs it: the real
/// [`SiteTrainer`], or the [`NoopTrainer`](crate::noop::NoopTrainer) that measures the
/// coordinator apart from training.
pub trait SiteWork: Send + Sync + 'static {
    /// SHA-256 of the vocabulary the site's data is encoded with (sent at enrolment).
    fn vocab_sha256(&self) -> &str;

    /// Where the downloaded global model goes (it is hashed against the task's SHA-256
    /// either way): kept whole by default.
    fn model_buffer(&self) -> ModelBuffer {
        ModelBuffer::Whole(Vec::new())
    }

    /// Runs a training task on the verified global model, calling `on_epoch` after each
    /// local epoch. Called on a blocking thread.
    fn train(
        &self,
        task: &TaskSpec,
        model: ModelBuffer,
        on_epoch: &mut dyn FnMut(&EpochReport),
    ) -> Result<Update>;

    /// Evaluates the verified global model on the site's validation split. Called on a
    /// blocking thread.
    fn evaluate(&self, task: &TaskSpec, model: ModelBuffer) -> Result<SiteMetrics>;

    /// Called once the coordinator has received the task's update (accepted or refused):
    /// the site's privacy ledger marks it released. Nothing by default.
    fn delivered(&self, _task: &TaskSpec) {}

    /// Called once the coordinator has accepted the task's update (after
    /// [`SiteWork::delivered`]): error feedback moves on. Nothing by default.
    fn accepted(&self, _task: &TaskSpec) {}

    /// Whether heartbeats may carry the epoch a task's training has reached. Yes by default;
    /// the [`SiteTrainer`] says no under record-level DP (how fast epochs go depends on the
    /// sampled units) and when it withholds metrics (when training stops early depends on
    /// its validation data).
    fn reports_progress(&self, _task: &TaskSpec) -> bool {
        true
    }
}

/// The update a [`SiteWork`] returns for upload.
#[derive(Debug, Clone)]
pub struct Update {
    /// The delta's safetensors bytes.
    pub bytes: Bytes,
    /// Their SHA-256 (hex).
    pub sha256: String,
    /// The metrics to report.
    pub metrics: SiteMetrics,
    /// Site-level DP: the delta was within the clip before clipping.
    pub unclipped: bool,
}

impl SiteWork for SiteTrainer {
    fn vocab_sha256(&self) -> &str {
        SiteTrainer::vocab_sha256(self)
    }

    fn train(
        &self,
        task: &TaskSpec,
        model: ModelBuffer,
        on_epoch: &mut dyn FnMut(&EpochReport),
    ) -> Result<Update> {
        if let Some(c) = self.refresh(TaskStart::Training(task.round))? {
            tracing::info!(
                round = task.round,
                before = c.before,
                after = c.after,
                "the site's data changed: {} session(s), {} before",
                c.after,
                c.before
            );
        }
        let outcome = self.train_task(task, model.bytes(), on_epoch)?;
        Ok(Update {
            bytes: Bytes::from(outcome.delta_bytes),
            sha256: outcome.delta_sha256,
            metrics: outcome.metrics,
            unclipped: outcome.unclipped,
        })
    }

    fn evaluate(&self, task: &TaskSpec, model: ModelBuffer) -> Result<SiteMetrics> {
        self.refresh(TaskStart::Evaluation(task.round))?;
        self.evaluate_task(task, model.bytes())
    }

    fn reports_progress(&self, task: &TaskSpec) -> bool {
        task.record_dp.is_none() && !self.withholds_metrics()
    }

    fn accepted(&self, task: &TaskSpec) {
        if let Err(e) = SiteTrainer::accepted(self, task) {
            // The next task then starts from the residual this one started from.
            tracing::warn!(
                round = task.round,
                "cannot record that the update was accepted for error feedback: {e}"
            );
        }
    }

    fn delivered(&self, task: &TaskSpec) {
        if task.record_dp.is_some()
            && let Some(p) = self.privacy()
            && let Err(e) = p.delivered(task)
        {
            // The entry stays (it counts either way); only its bytes are kept longer.
            tracing::warn!(
                round = task.round,
                "cannot mark the ledger entry released: {e}"
            );
        }
    }
}

/// Largest safetensors header [`ModelBuffer::HeaderOnly`] keeps.
const MAX_KEPT_HEADER: u64 = 100_000_000;

/// A downloaded global model as a site keeps it.
#[derive(Debug)]
pub enum ModelBuffer {
    /// All of its bytes.
    Whole(Vec<u8>),
    /// Only the safetensors length prefix and JSON header (names, shapes, dtypes); the
    /// tensor data is dropped as it arrives.
    HeaderOnly(Vec<u8>),
}

impl ModelBuffer {
    /// A buffer keeping only the safetensors header.
    pub fn header_only() -> Self {
        ModelBuffer::HeaderOnly(Vec::new())
    }

    /// The bytes kept.
    pub fn bytes(&self) -> &[u8] {
        match self {
            ModelBuffer::Whole(b) | ModelBuffer::HeaderOnly(b) => b,
        }
    }
}

impl std::io::Write for ModelBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            ModelBuffer::Whole(b) => b.extend_from_slice(data),
            ModelBuffer::HeaderOnly(b) => {
                let mut rest = data;
                loop {
                    let wanted = match b.get(..8) {
                        None => 8,
                        Some(prefix) => {
                            let n = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
                            8 + n.min(MAX_KEPT_HEADER) as usize
                        }
                    };
                    let take = wanted.saturating_sub(b.len()).min(rest.len());
                    if take == 0 {
                        break;
                    }
                    b.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                }
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
