//! The federation client: a partner site's loop against the coordinator.
//!
//! Enrol → long-poll for a task → download the global model in chunks (verified) → train
//! locally ([`SiteTrainer`](crate::site::SiteTrainer), on a blocking thread, with heartbeats carrying the epoch
//! meanwhile) → upload the delta in chunks → repeat until the coordinator says the run is
//! finished. Evaluation tasks download the model, evaluate it on the validation split and
//! report the metrics. A heartbeat answered with `cancel_task` abandons the task. When the
//! coordinator is unreachable the site waits with exponential backoff and jitter and carries
//! on without operator action. Wire types are converted here and nowhere else in the client.

use std::sync::Arc;
use std::time::Duration;

use fedflow_common::model::ModelConfig;
use fedflow_common::train::{DpSgdConfig, OptimizerKind, TrainConfig};
use fedflow_proto::transfer::{Assembler, MAX_MESSAGE_BYTES, update_chunks};
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_proto::v1::{
    DeclineTaskRequest, DownloadModelRequest, EnrolRequest, EvaluationReport, HeartbeatRequest,
    Metrics, NextTaskRequest, SiteState, Task, TaskKind, UpdateHeader, next_task_response,
};
use rand::Rng;
use tonic::transport::Channel;

use crate::privacy::RecordDp;
use crate::site::{SiteMetrics, TaskSpec};
pub use crate::work::{ModelBuffer, SiteWork, Update};
use crate::{Error, Result};
use fedflow_common::privacy::dpfedavg::{SiteDpTask, TrustMode};

/// How a site connects and behaves.
#[derive(Debug, Clone)]
pub struct SiteOptions {
    /// Coordinator address, e.g. `https://coordinator.example:50051` (or
    /// `http://127.0.0.1:50051` for a coordinator serving plaintext).
    pub endpoint: String,
    /// The site's certificate bundle (mutual TLS); `None` for a plaintext coordinator.
    pub tls: Option<crate::tls::Bundle>,
    /// This site's id.
    pub site_id: String,
    /// How long each task poll may be held by the coordinator.
    pub poll_wait: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// When set, local training and evaluation first take a permit from this semaphore
    /// (heartbeats go on while waiting). Simulations of many sites on one machine share one,
    /// so sites take turns instead of all training at once.
    pub work_permits: Option<Arc<tokio::sync::Semaphore>>,
}

impl SiteOptions {
    /// Options with defaults for a site id and endpoint.
    pub fn new(endpoint: impl Into<String>, site_id: impl Into<String>) -> Self {
        SiteOptions {
            endpoint: endpoint.into(),
            tls: None,
            site_id: site_id.into(),
            poll_wait: Duration::from_secs(10),
            max_backoff: Duration::from_secs(30),
            work_permits: None,
        }
    }
}

/// What a site did over a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SiteSummary {
    /// Rounds this site trained and uploaded for.
    pub rounds_contributed: Vec<u64>,
    /// Rounds whose global model this site evaluated.
    pub rounds_evaluated: Vec<u64>,
    /// Tasks this site declined (it could not do them), with the reason it gave.
    pub declined: Vec<(u64, String)>,
    /// Uploads the coordinator refused, with its reason.
    pub rejected: Vec<(u64, String)>,
    /// Reconnections after the coordinator was unreachable.
    pub reconnects: u32,
}

/// What the coordinator told the site at enrolment.
#[derive(Debug, Clone, Copy)]
struct Limits {
    heartbeat: Duration,
    chunk_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            heartbeat: Duration::from_secs(2),
            chunk_bytes: 1 << 20,
        }
    }
}

impl Limits {
    fn from_enrolment(r: &fedflow_proto::v1::EnrolResponse) -> Self {
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

fn status_err(s: tonic::Status) -> Error {
    Error::Usage(format!("coordinator: {} ({:?})", s.message(), s.code()))
}

/// Whether an error means "try again later" (coordinator away) rather than "this failed".
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && !crate::tls::is_certificate_error(s)
}

/// Connects, retrying with backoff while the coordinator is unreachable; a certificate
/// problem (ours refused, or the coordinator's not from the federation CA) is final.
async fn connect(
    opts: &SiteOptions,
    summary: &mut SiteSummary,
) -> Result<FederationClient<Channel>> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match crate::tls::connect(&opts.endpoint, opts.tls.as_ref()).await {
            Ok(channel) => {
                return Ok(FederationClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES));
            }
            Err(e) if crate::tls::is_certificate_error(&e) => {
                return Err(Error::Usage(format!(
                    "cannot connect to the coordinator at {}: {}. Check that the bundle's ca.pem \
                     is the federation's CA and that the address is a name in the coordinator's \
                     certificate",
                    opts.endpoint,
                    crate::tls::error_chain(&e)
                )));
            }
            Err(e) => {
                let jitter = rand::rng().random_range(0.5..1.5);
                let wait = backoff.mul_f64(jitter);
                tracing::warn!(site = %opts.site_id, "cannot reach the coordinator at {}: {}; retrying in {wait:?}", opts.endpoint, crate::tls::error_chain(&e));
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(opts.max_backoff);
                summary.reconnects += 1;
            }
        }
    }
}

/// The site's reading of a task message: validates every field and builds the
/// [`TaskSpec`] the trainer runs, so what the coordinator's `[train]` says reaches the
/// trainer unchanged.
pub fn task_spec(task: &Task) -> Result<TaskSpec> {
    let model = task
        .model
        .as_ref()
        .ok_or_else(|| Error::Task("the task names no model".into()))?;
    let t = task.train.clone().unwrap_or_default();
    let model_config: ModelConfig = serde_json::from_str(&model.model_config_json)
        .map_err(|e| Error::Task(format!("the task's model config is not valid: {e}")))?;
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
    let record_dp = match &t.dp_sgd {
        None => None,
        Some(d) => Some(RecordDp {
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
        }),
    };
    if let Some(dp) = &record_dp {
        dp.sgd
            .validate()
            .map_err(|e| Error::Task(format!("the task's DP-SGD instructions: {e}")))?;
        if !(dp.target_epsilon > 0.0 && dp.target_delta > 0.0 && dp.target_delta < 1.0) {
            return Err(Error::Task(format!(
                "the task's record-level target ({}, {}) is not a valid (epsilon, delta)",
                dp.target_epsilon, dp.target_delta
            )));
        }
    }
    let site_dp = match &t.site_dp {
        None => None,
        Some(d) => {
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
            Some(SiteDpTask {
                mode,
                clip_norm: d.clip_norm,
                noise_std: d.noise_std,
            })
        }
    };
    Ok(TaskSpec {
        run_id: task.run_id.clone(),
        round: task.round,
        task_id: task.task_id.clone(),
        record_dp,
        site_dp,
        model: model_config,
        vocab_sha256: model.vocab_sha256.clone(),
        expected_model_sha256: model.sha256.clone(),
        train,
    })
}

async fn download(
    client: &mut FederationClient<Channel>,
    opts: &SiteOptions,
    task: &Task,
    sha: &str,
    sink: ModelBuffer,
) -> Result<ModelBuffer, tonic::Status> {
    let mut stream = client
        .download_model(DownloadModelRequest {
            site_id: opts.site_id.clone(),
            task_id: task.task_id.clone(),
            run_id: task.run_id.clone(),
            round: task.round,
            sha256: sha.to_string(),
            offset: 0,
        })
        .await?
        .into_inner();
    let mut asm: Option<Assembler<ModelBuffer>> = None;
    let mut sink = Some(sink);
    while let Some(chunk) = stream.message().await? {
        let a = match &mut asm {
            Some(a) => a,
            None => asm.insert(
                Assembler::new(
                    sink.take().expect("the assembler is made once"),
                    sha,
                    chunk.total_bytes,
                    u64::MAX,
                    MAX_MESSAGE_BYTES,
                )
                .map_err(|e| tonic::Status::internal(e.to_string()))?,
            ),
        };
        a.push(chunk.offset, &chunk.data)
            .map_err(|e| tonic::Status::data_loss(e.to_string()))?;
    }
    asm.ok_or_else(|| tonic::Status::data_loss("empty model stream"))?
        .finish()
        .map_err(|e| tonic::Status::data_loss(e.to_string()))
}

/// Runs one site until the coordinator reports the run finished.
pub async fn run_site<W: SiteWork>(opts: SiteOptions, trainer: Arc<W>) -> Result<SiteSummary> {
    let mut summary = SiteSummary::default();
    let mut client = connect(&opts, &mut summary).await?;
    let mut enrolled = false;
    let mut limits = Limits::default();
    loop {
        if !enrolled {
            match client
                .enrol(EnrolRequest {
                    site_id: opts.site_id.clone(),
                    client_version: env!("CARGO_PKG_VERSION").into(),
                    vocab_sha256: trainer.vocab_sha256().to_string(),
                })
                .await
            {
                Ok(r) => {
                    limits = Limits::from_enrolment(&r.into_inner());
                    enrolled = true;
                }
                Err(s) if transient(&s) => {
                    client = connect(&opts, &mut summary).await?;
                    continue;
                }
                Err(s) => return Err(status_err(s)),
            }
        }
        let reply = client
            .next_task(NextTaskRequest {
                site_id: opts.site_id.clone(),
                wait_ms: opts.poll_wait.as_millis() as u32,
            })
            .await;
        let outcome = match reply {
            Ok(r) => r.into_inner().outcome,
            Err(s) if transient(&s) => {
                enrolled = false;
                client = connect(&opts, &mut summary).await?;
                continue;
            }
            Err(s) => return Err(status_err(s)),
        };
        let task = match outcome {
            Some(next_task_response::Outcome::Task(t)) => t,
            Some(next_task_response::Outcome::NoTask(n)) if n.run_finished => return Ok(summary),
            _ => continue,
        };
        match run_task(&mut client, &opts, &limits, &trainer, &task).await {
            Ok(()) if task.kind == TaskKind::Evaluate as i32 => {
                summary.rounds_evaluated.push(task.round)
            }
            Ok(()) => summary.rounds_contributed.push(task.round),
            Err(TaskError::Refused(msg)) => {
                tracing::warn!(site = %opts.site_id, round = task.round, "update refused: {msg}");
                summary.rejected.push((task.round, msg));
            }
            Err(TaskError::Transport(s)) if transient(&s) => {
                enrolled = false;
                client = connect(&opts, &mut summary).await?;
            }
            Err(TaskError::Transport(s)) => {
                tracing::warn!(site = %opts.site_id, round = task.round, "task failed: {}", s.message());
                summary.rejected.push((task.round, s.message().to_string()));
            }
            Err(TaskError::Local(e)) => {
                // Tell the coordinator, so it stops waiting and the operators see why;
                // otherwise the same task would come back at the next poll.
                if matches!(e, Error::Budget(_) | Error::Policy(_)) {
                    tracing::warn!(site = %opts.site_id, round = task.round, "declining the task: {e}");
                } else {
                    tracing::error!(site = %opts.site_id, round = task.round, "cannot do the task, declining it: {e}");
                }
                let declined = client
                    .decline_task(DeclineTaskRequest {
                        site_id: opts.site_id.clone(),
                        task_id: task.task_id.clone(),
                        run_id: task.run_id.clone(),
                        round: task.round,
                        nonce: task.nonce.clone(),
                        reason: e.to_string(),
                    })
                    .await;
                if let Err(s) = declined {
                    tracing::warn!(site = %opts.site_id, round = task.round, "declining the task failed: {}", s.message());
                }
                summary.declined.push((task.round, e.to_string()));
            }
        }
    }
}

enum TaskError {
    Refused(String),
    Transport(tonic::Status),
    Local(Error),
}

/// What the site is doing, shared between the worker and the heartbeat loop.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    state: SiteState,
    epoch: u32,
    epochs: u32,
    bytes_done: u64,
}

/// Runs `work` on a blocking thread while sending heartbeats with the current progress every
/// `every`. Ends early with [`TaskError::Refused`] when the coordinator withdraws the task
/// (the blocking work then finishes in the background and its result is dropped).
async fn with_heartbeats<T: Send + 'static>(
    client: &mut FederationClient<Channel>,
    opts: &SiteOptions,
    task: &Task,
    every: Duration,
    progress: &Arc<std::sync::Mutex<Progress>>,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T, TaskError> {
    let mut beat = tokio::time::interval(every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let _permit = match &opts.work_permits {
        None => None,
        Some(permits) => {
            let acquire = permits.clone().acquire_owned();
            tokio::pin!(acquire);
            loop {
                tokio::select! {
                    p = &mut acquire => break Some(p.map_err(|_| TaskError::Local(Error::Usage("the work permits were closed".into())))?),
                    _ = beat.tick() => {
                        if beat_once(client, opts, task, progress).await {
                            return Err(withdrawn());
                        }
                    }
                }
            }
        }
    };
    let mut handle = tokio::task::spawn_blocking(work);
    loop {
        tokio::select! {
            r = &mut handle => {
                return r
                    .map_err(|e| TaskError::Local(Error::Usage(format!("local work panicked: {e}"))))?
                    .map_err(TaskError::Local);
            }
            _ = beat.tick() => {
                if beat_once(client, opts, task, progress).await {
                    return Err(withdrawn());
                }
            }
        }
    }
}

fn withdrawn() -> TaskError {
    TaskError::Refused("the coordinator withdrew the task (round closed or site dropped)".into())
}

/// Sends one heartbeat with the current progress; returns whether the task was withdrawn.
/// A failed heartbeat is not fatal (the upload will tell).
async fn beat_once(
    client: &mut FederationClient<Channel>,
    opts: &SiteOptions,
    task: &Task,
    progress: &Arc<std::sync::Mutex<Progress>>,
) -> bool {
    let p = *progress.lock().expect("progress lock");
    let reply = client
        .heartbeat(HeartbeatRequest {
            site_id: opts.site_id.clone(),
            task_id: task.task_id.clone(),
            state: p.state as i32,
            epoch: p.epoch,
            epochs: p.epochs,
            bytes_done: p.bytes_done,
        })
        .await;
    matches!(reply, Ok(r) if r.get_ref().cancel_task)
}

async fn run_task<W: SiteWork>(
    client: &mut FederationClient<Channel>,
    opts: &SiteOptions,
    limits: &Limits,
    trainer: &Arc<W>,
    task: &Task,
) -> Result<(), TaskError> {
    let spec = task_spec(task).map_err(TaskError::Local)?;
    let round = task.round;
    let evaluate = task.kind == TaskKind::Evaluate as i32;
    tracing::info!(site = %opts.site_id, round, "round {round}: downloading the global model");
    let global = download(
        client,
        opts,
        task,
        &spec.expected_model_sha256,
        trainer.model_buffer(),
    )
    .await
    .map_err(TaskError::Transport)?;
    let progress = Arc::new(std::sync::Mutex::new(Progress {
        state: if evaluate {
            SiteState::Evaluating
        } else {
            SiteState::Training
        },
        epochs: spec.train.epochs as u32,
        ..Progress::default()
    }));
    if evaluate {
        tracing::info!(site = %opts.site_id, round, "round {round}: evaluating the global model");
        let t = trainer.clone();
        let spec2 = spec.clone();
        let m = with_heartbeats(client, opts, task, limits.heartbeat, &progress, move || {
            t.evaluate(&spec2, global)
        })
        .await?;
        let report = EvaluationReport {
            site_id: opts.site_id.clone(),
            task_id: task.task_id.clone(),
            run_id: task.run_id.clone(),
            round,
            nonce: task.nonce.clone(),
            model_sha256: spec.expected_model_sha256.clone(),
            metrics: Some(wire_metrics(&m)),
        };
        return match client.report_evaluation(report).await {
            Ok(_) => {
                tracing::info!(
                    site = %opts.site_id,
                    round,
                    "round {round}: evaluation reported (accuracy {:.4})",
                    m.validation_accuracy.unwrap_or(f64::NAN)
                );
                Ok(())
            }
            Err(s) if transient(&s) => Err(TaskError::Transport(s)),
            Err(s) => Err(TaskError::Refused(format!(
                "{} ({:?})",
                s.message(),
                s.code()
            ))),
        };
    }

    let t = trainer.clone();
    let spec2 = spec.clone();
    let p = progress.clone();
    let site = opts.site_id.clone();
    let epochs = spec.train.epochs;
    let outcome = with_heartbeats(client, opts, task, limits.heartbeat, &progress, move || {
        t.train(&spec2, global, &mut |e| {
            p.lock().expect("progress lock").epoch = e.epoch as u32;
            tracing::info!(
                site = %site,
                round,
                "round {round}: training epoch {}/{epochs} (loss {:.4})",
                e.epoch,
                e.train_loss
            );
        })
    })
    .await?;
    let m = &outcome.metrics;
    let header = UpdateHeader {
        site_id: opts.site_id.clone(),
        task_id: task.task_id.clone(),
        run_id: task.run_id.clone(),
        round,
        nonce: task.nonce.clone(),
        base_model_sha256: spec.expected_model_sha256.clone(),
        delta_sha256: outcome.sha256.clone(),
        total_bytes: outcome.bytes.len() as u64,
        weight: m.train_examples as f64,
        metrics: Some(wire_metrics(m)),
        // Only the trusted coordinator of central mode learns the bit.
        site_dp_unclipped: spec
            .site_dp
            .is_some_and(|d| d.mode == TrustMode::Central && outcome.unclipped),
    };
    tracing::info!(site = %opts.site_id, round, "round {round}: uploading {} bytes", outcome.bytes.len());
    let msgs = update_chunks(header, &outcome.bytes, limits.chunk_bytes);
    match client.upload_update(tokio_stream::iter(msgs)).await {
        Ok(_) => {
            tracing::info!(site = %opts.site_id, round, "round {round}: update accepted");
            trainer.delivered(&spec);
            Ok(())
        }
        Err(s) if transient(&s) => Err(TaskError::Transport(s)),
        Err(s) => {
            // The coordinator has seen the bytes even though it refused them.
            trainer.delivered(&spec);
            Err(TaskError::Refused(format!(
                "{} ({:?})",
                s.message(),
                s.code()
            )))
        }
    }
}

fn wire_metrics(m: &SiteMetrics) -> Metrics {
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
