//! The client's side of the wire: every conversion between the generated protocol types
//! ([`fedflow_proto::v1`]) and the site's own types, and the one map from the coordinator's
//! gRPC statuses to [`Error`].
//!
//! Incoming messages are validated as they are converted ([`TaskSpec::try_from`] refuses a
//! task naming the field that is wrong), so what the coordinator's run configuration says
//! reaches the trainer unchanged or not at all. Nothing else in the client builds or reads a
//! protocol message field by field.

use std::time::Duration;

use fedflow_common::compress::{Compression, DEFAULT_BLOCK, ValueCodec};
use fedflow_common::model::ModelConfig;
use fedflow_common::privacy::dpfedavg::{SiteDpTask, TrustMode};
use fedflow_common::train::{DpSgdConfig, OptimizerKind, TrainConfig};
use fedflow_proto::transfer::MAX_MESSAGE_BYTES;
use fedflow_proto::v1::{
    CompressionInstructions, DeclineTaskRequest, DownloadModelRequest, DpSgdInstructions,
    EnrolRequest, EnrolResponse, EvaluationReport, HeartbeatRequest, Metrics, NextTaskRequest,
    SiteDpInstructions, SiteState, Task, TrainInstructions, UpdateHeader,
};

use crate::privacy::RecordDp;
use crate::site::{SiteMetrics, TaskSpec};
use crate::work::Update;
use crate::{Error, Result};

// Statuses.

/// What the coordinator's status means for the site: [`Error::Refused`] for its identity or
/// permissions, [`Error::Rejected`] for a request it judged invalid, [`Error::Coordinator`]
/// for its own failures. A status caused by a certificate problem is a refusal whatever its
/// code (it will not go away by retrying).
pub(crate) fn status_error(s: &tonic::Status) -> Error {
    use tonic::Code;
    let code = format!("{:?}", s.code());
    let message = s.message().to_string();
    if crate::tls::is_certificate_error(s) {
        return Error::Refused { code, message };
    }
    match s.code() {
        Code::PermissionDenied | Code::Unauthenticated => Error::Refused { code, message },
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::AlreadyExists
        | Code::NotFound
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::DataLoss => Error::Rejected { code, message },
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::Unimplemented
        | Code::Internal
        | Code::Unavailable => Error::Coordinator { code, message },
    }
}

/// Whether a status means "try again later" (coordinator away) rather than "this failed".
/// Certificate problems are never transient.
pub(crate) fn is_transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && !crate::tls::is_certificate_error(s)
}

/// The reason recorded when the coordinator refuses an upload or an evaluation report.
pub(crate) fn refusal_reason(s: &tonic::Status) -> String {
    format!("{} ({:?})", s.message(), s.code())
}

// Enrolment.

/// What the coordinator told the site at enrolment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How often to send heartbeats while working.
    pub(crate) heartbeat: Duration,
    /// Largest upload chunk.
    pub(crate) chunk_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            heartbeat: Duration::from_secs(2),
            chunk_bytes: 1 << 20,
        }
    }
}

impl From<&EnrolResponse> for Limits {
    fn from(r: &EnrolResponse) -> Self {
        let d = Limits::default();
        // Never above what either side's message limit allows, never absurdly small.
        let max_chunk = MAX_MESSAGE_BYTES - 64 * 1024;
        Limits {
            heartbeat: if r.heartbeat_interval_ms == 0 {
                d.heartbeat
            } else {
                Duration::from_millis(r.heartbeat_interval_ms.clamp(100, 60_000) as u64)
            },
            chunk_bytes: if r.max_chunk_bytes == 0 {
                d.chunk_bytes
            } else {
                (r.max_chunk_bytes as usize).clamp(4096, max_chunk)
            },
        }
    }
}

// Tasks.

/// The site's reading of a task message: [`TaskSpec::try_from`] under another name, for
/// callers outside the crate.
pub fn task_spec(task: &Task) -> Result<TaskSpec> {
    TaskSpec::try_from(task)
}

impl TryFrom<&Task> for TaskSpec {
    type Error = Error;

    /// Validates every field and builds the [`TaskSpec`] the trainer runs; an invalid field
    /// is refused with [`Error::Task`], naming it.
    fn try_from(task: &Task) -> Result<Self> {
        let model = task
            .model
            .as_ref()
            .ok_or_else(|| Error::Task("the task names no model".into()))?;
        let t = task.train.clone().unwrap_or_default();
        let model_config: ModelConfig = serde_json::from_str(&model.model_config_json)
            .map_err(|e| Error::Task(format!("the task's model config is not valid: {e}")))?;
        let record_dp = t.dp_sgd.as_ref().map(RecordDp::try_from).transpose()?;
        let site_dp = t.site_dp.as_ref().map(site_dp_task).transpose()?;
        let compression = t
            .compression
            .as_ref()
            .map_or(Ok(Compression::NONE), compression)?;
        Ok(TaskSpec {
            compression,
            run_id: task.run_id.clone(),
            round: task.round,
            task_id: task.task_id.clone(),
            record_dp,
            site_dp,
            model: model_config,
            vocab_sha256: model.vocab_sha256.clone(),
            expected_model_sha256: model.sha256.clone(),
            train: train_config(&t)?,
        })
    }
}

/// The local training configuration a task's instructions give, validated.
fn train_config(t: &TrainInstructions) -> Result<TrainConfig> {
    let optimizer: OptimizerKind = t
        .optimizer
        .parse()
        .map_err(|e| Error::Task(format!("{e}")))?;
    let train = TrainConfig {
        epochs: t.local_epochs as usize,
        batch_size: t.batch_size as usize,
        learning_rate: t.learning_rate,
        optimizer,
        momentum: t.momentum,
        weight_decay: t.weight_decay,
        patience: t.patience as usize,
        min_delta: t.min_delta,
        seed: t.seed,
        length_bucketing: t.length_bucketing,
        fedprox_mu: t.fedprox_mu,
    };
    train
        .validate()
        .map_err(|e| Error::Task(format!("the task's training instructions: {e}")))?;
    Ok(train)
}

impl TryFrom<&DpSgdInstructions> for RecordDp {
    type Error = Error;

    /// The run's record-level DP-SGD, validated (parameters and target).
    fn try_from(d: &DpSgdInstructions) -> Result<Self> {
        let dp = RecordDp {
            sgd: DpSgdConfig {
                clip_norm: d.clip_norm,
                noise_multiplier: d.noise_multiplier,
                expected_batch_size: d.expected_batch_size as usize,
                sampling_rate: (d.sampling_rate > 0.0).then_some(d.sampling_rate),
                unit: d.unit.parse().map_err(|e| Error::Task(format!("{e}")))?,
                max_sessions_per_user: d.max_sessions_per_user as usize,
            },
            target_epsilon: d.target_epsilon,
            target_delta: d.target_delta,
            count_noise_multiplier: d.count_noise_multiplier,
        };
        if !(dp.count_noise_multiplier.is_finite() && dp.count_noise_multiplier >= 0.0) {
            return Err(Error::Task(format!(
                "the task's count noise multiplier {} is not a number >= 0",
                dp.count_noise_multiplier
            )));
        }
        dp.sgd
            .validate()
            .map_err(|e| Error::Task(format!("the task's DP-SGD instructions: {e}")))?;
        if !(dp.target_epsilon > 0.0 && dp.target_delta > 0.0 && dp.target_delta < 1.0) {
            return Err(Error::Task(format!(
                "the task's record-level target ({}, {}) is not a valid (epsilon, delta)",
                dp.target_epsilon, dp.target_delta
            )));
        }
        Ok(dp)
    }
}

/// The run's update compression, validated.
fn compression(c: &CompressionInstructions) -> Result<Compression> {
    let values = ValueCodec::parse(&c.values).ok_or_else(|| {
        Error::Task(format!(
            "the task's compression codec {:?} is not f32, f16, bf16 or int8; upgrade this \
             client",
            c.values
        ))
    })?;
    let compression = Compression {
        values,
        block_size: match values {
            ValueCodec::Int8 => c.block_size as usize,
            _ => DEFAULT_BLOCK,
        },
        top_k: (c.top_k != 0.0).then_some(c.top_k),
        error_feedback: c.error_feedback,
    };
    compression
        .check()
        .map_err(|e| Error::Task(format!("the task's compression: {e}")))?;
    Ok(compression)
}

/// The run's site-level DP-FedAvg instructions, validated.
fn site_dp_task(d: &SiteDpInstructions) -> Result<SiteDpTask> {
    let mode = match d.mode.as_str() {
        "central" => TrustMode::Central,
        "distributed" => TrustMode::Distributed,
        "local" => TrustMode::Local,
        other => {
            return Err(Error::Task(format!(
                "the task's site-level DP mode {other:?} is not central, distributed \
                 or local; upgrade this client"
            )));
        }
    };
    let valid = d.clip_norm.is_finite()
        && d.clip_norm > 0.0
        && d.noise_std.is_finite()
        && d.noise_std >= 0.0;
    if !valid {
        return Err(Error::Task(format!(
            "the task's site-level DP instructions (clip {}, noise std {}) are not valid",
            d.clip_norm, d.noise_std
        )));
    }
    Ok(SiteDpTask {
        mode,
        clip_norm: d.clip_norm,
        noise_std: d.noise_std,
    })
}

// Requests and reports.

impl From<&SiteMetrics> for Metrics {
    /// Missing measurements travel as NaN.
    fn from(m: &SiteMetrics) -> Self {
        Metrics {
            train_examples: m.train_examples as u64,
            validation_examples: m.validation_examples as u64,
            train_loss: m.train_loss.unwrap_or(f64::NAN),
            validation_loss: m.validation_loss.unwrap_or(f64::NAN),
            validation_accuracy: m.validation_accuracy.unwrap_or(f64::NAN),
            validation_macro_f1: m.validation_macro_f1.unwrap_or(f64::NAN),
            epochs_run: m.epochs_run as u32,
            train_seconds: m.train_seconds,
        }
    }
}

/// Enrolment of `site_id` with the vocabulary it was encoded with.
pub(crate) fn enrol_request(site_id: &str, vocab_sha256: &str) -> EnrolRequest {
    EnrolRequest {
        site_id: site_id.to_string(),
        client_version: env!("CARGO_PKG_VERSION").into(),
        vocab_sha256: vocab_sha256.to_string(),
    }
}

/// A long poll for the site's next task, held at most `wait`.
pub(crate) fn next_task_request(site_id: &str, wait: Duration) -> NextTaskRequest {
    NextTaskRequest {
        site_id: site_id.to_string(),
        wait_ms: wait.as_millis() as u32,
    }
}

/// The download of `task`'s global model, announced with SHA-256 `sha`, from the start.
pub(crate) fn download_request(site_id: &str, task: &Task, sha: &str) -> DownloadModelRequest {
    DownloadModelRequest {
        site_id: site_id.to_string(),
        task_id: task.task_id.clone(),
        run_id: task.run_id.clone(),
        round: task.round,
        sha256: sha.to_string(),
        offset: 0,
    }
}

/// A heartbeat for `task`: what the site is doing and how far it got.
pub(crate) fn heartbeat_request(
    site_id: &str,
    task: &Task,
    state: SiteState,
    (epoch, epochs): (u32, u32),
    bytes_done: u64,
) -> HeartbeatRequest {
    HeartbeatRequest {
        site_id: site_id.to_string(),
        task_id: task.task_id.clone(),
        state: state as i32,
        epoch,
        epochs,
        bytes_done,
    }
}

/// The site declines `task`, saying why.
pub(crate) fn decline_request(site_id: &str, task: &Task, reason: String) -> DeclineTaskRequest {
    DeclineTaskRequest {
        site_id: site_id.to_string(),
        task_id: task.task_id.clone(),
        run_id: task.run_id.clone(),
        round: task.round,
        nonce: task.nonce.clone(),
        reason,
    }
}

/// The report of an evaluation task: metrics `m` of the model `spec` announced.
pub(crate) fn evaluation_report(
    site_id: &str,
    task: &Task,
    spec: &TaskSpec,
    m: &SiteMetrics,
) -> EvaluationReport {
    EvaluationReport {
        site_id: site_id.to_string(),
        task_id: task.task_id.clone(),
        run_id: task.run_id.clone(),
        round: task.round,
        nonce: task.nonce.clone(),
        model_sha256: spec.expected_model_sha256.clone(),
        metrics: Some(m.into()),
    }
}

/// The header of a training task's upload: what the delta is, its FedAvg weight (the
/// training sessions) and metrics.
pub(crate) fn update_header(
    site_id: &str,
    task: &Task,
    spec: &TaskSpec,
    outcome: &Update,
) -> UpdateHeader {
    let m = &outcome.metrics;
    UpdateHeader {
        site_id: site_id.to_string(),
        task_id: task.task_id.clone(),
        run_id: task.run_id.clone(),
        round: task.round,
        nonce: task.nonce.clone(),
        base_model_sha256: spec.expected_model_sha256.clone(),
        delta_sha256: outcome.sha256.clone(),
        total_bytes: outcome.bytes.len() as u64,
        weight: m.train_examples as f64,
        metrics: Some(m.into()),
        // Only the trusted coordinator of central mode learns the bit.
        site_dp_unclipped: spec
            .site_dp
            .is_some_and(|d| d.mode == TrustMode::Central && outcome.unclipped),
        encoding: if spec.compression.is_none() {
            String::new()
        } else {
            spec.compression.name()
        },
    }
}

#[cfg(test)]
mod tests;
