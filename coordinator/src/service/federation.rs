//! `fedflow.v1.Federation`: what partner sites call. Converts wire types to the engine's and
//! back; errors go out through [`super::status`]. Text fields are checked here, where they
//! enter (`fedflow_common::text`): identifiers and hashes are refused when they are long or
//! hold control characters, a decline's reason is kept but escaped and cut.

use std::time::Duration;

use fedflow_proto::transfer::receive_update_into;
use fedflow_proto::v1::federation_server::Federation;
use fedflow_proto::v1::{
    CompressionInstructions, DeclineTaskRequest, DeclineTaskResponse, DownloadModelRequest,
    DpSgdInstructions, EnrolRequest, EnrolResponse, EvaluationReport, EvaluationReportResponse,
    HeartbeatRequest, HeartbeatResponse, Metrics, ModelChunk, ModelRef, NextTaskRequest,
    NextTaskResponse, NoTask, PublishedModel, SiteDpInstructions, SiteState, Task,
    TaskKind as WireKind, TrainInstructions, UpdateChunk, UploadUpdateResponse, next_task_response,
};
use prost::bytes::Bytes;
use tonic::{Request, Response, Status, Streaming};

use super::{Command, Coordinator, Decline, Upload};
use crate::Error;
use crate::metrics::{SiteReport, finite};
use crate::round::{
    Accepted, DeltaSource, EvaluationSubmission, Heartbeat, Phase, Submission, TaskKind,
    TaskTicket, WorkState,
};
use crate::strategy::UpdateReport;

/// Longest a `NextTask` call is held open.
const MAX_POLL: Duration = Duration::from_secs(30);
/// The longest a held `NextTask` call waits without asking the engine again (it is woken
/// at once when the engine's work changes: a round or evaluation starts, the run pauses or
/// ends).
const POLL_EVERY: Duration = Duration::from_secs(2);

#[tonic::async_trait]
impl Federation for Coordinator {
    async fn enrol(&self, req: Request<EnrolRequest>) -> Result<Response<EnrolResponse>, Status> {
        let call = self.site(&req, &req.get_ref().site_id, "Enrol")?;
        let peer = super::auth::peer(&req);
        let req = req.into_inner();
        check_text("client_version", &req.client_version)?;
        use fedflow_proto::compat::{ClientVersion, check_client};
        match check_client(&req.client_version, env!("CARGO_PKG_VERSION")) {
            ClientVersion::Compatible => {}
            ClientVersion::Unversioned => tracing::info!(
                site = %call.site,
                "site {} enrols with client version {:?} (not a fedflow version): taken at its word",
                call.site,
                fedflow_common::text::shorten(&req.client_version, 40)
            ),
            ClientVersion::Incompatible(why) => {
                return Err(Error::Refused(format!("site {}: {why}", call.site)).into());
            }
        }
        if req.vocab_sha256.is_empty() {
            // Under mutual TLS every site is a real one with a vocabulary; the plaintext
            // mode (demos, tests, the no-op benchmark client) takes sites at their word.
            if self.mutual_tls() {
                return Err(Error::BadRequest(
                    "vocab_sha256: empty; send the SHA-256 of the vocabulary the site's data \
                     is encoded with (fedflow-client sends it)"
                        .into(),
                )
                .into());
            }
        } else if !fedflow_common::text::is_sha256_hex(&req.vocab_sha256) {
            return Err(Error::BadRequest(format!(
                "vocab_sha256: \"{}\" is not a SHA-256 (64 lowercase hex digits)",
                fedflow_common::text::shorten(&req.vocab_sha256, 80)
            ))
            .into());
        } else if req.vocab_sha256 != self.shared.vocab_sha256 {
            return Err(Error::Refused(format!(
                "site {}'s data is encoded with another vocabulary (sha256 {}) than this \
                 federation's ({}): encode the site's data with the federation's vocab.json",
                call.site, req.vocab_sha256, self.shared.vocab_sha256
            ))
            .into());
        }
        if let Some(id) = &call.identity {
            let days = (id.not_after - fedflow_common::clock::now_ms() / 1000) / 86_400;
            if days < 30 {
                tracing::warn!(
                    site = %call.site,
                    days,
                    "site {}'s certificate expires in {days} day(s): it needs a new one",
                    call.site
                );
            }
        }
        self.shared.security.log.record(
            "site_enrolled",
            serde_json::json!({
                "site": call.site,
                "certificate": call.identity.as_ref().map(|id| id.serial.clone()),
                "peer": peer,
            }),
        );
        let _ = self.tx.send(Command::Seen(call.site));
        Ok(Response::new(EnrolResponse {
            coordinator_version: env!("CARGO_PKG_VERSION").into(),
            heartbeat_interval_ms: self.shared.heartbeat_interval_ms,
            max_chunk_bytes: self.shared.cfg.transport.chunk_bytes as u64,
        }))
    }

    async fn next_task(
        &self,
        req: Request<NextTaskRequest>,
    ) -> Result<Response<NextTaskResponse>, Status> {
        let call = self.site(&req, &req.get_ref().site_id, "NextTask")?;
        let req = req.into_inner();
        let until =
            tokio::time::Instant::now() + Duration::from_millis(req.wait_ms as u64).min(MAX_POLL);
        let mut work = self.work.clone();
        loop {
            // Seen before asking: a change after the answer wakes the wait below.
            work.borrow_and_update();
            let site = call.site.clone();
            let (ticket, phase, published) = self.ask(|r| Command::Poll(site, r)).await?;
            let published = published.map(|p| self.published_message(p));
            if let Some(t) = ticket {
                return Ok(Response::new(NextTaskResponse {
                    outcome: Some(next_task_response::Outcome::Task(
                        self.task_message(&call.site, t),
                    )),
                    published,
                }));
            }
            let finished = phase == Phase::Finished;
            if finished || tokio::time::Instant::now() >= until {
                let reason = match phase {
                    Phase::Finished => "the run is finished",
                    Phase::Paused => "the run is paused",
                    Phase::Waiting => "waiting for enough sites to start the next round",
                    Phase::Training => "this site is not in the current round",
                    Phase::Evaluating => "this site is not in the current evaluation",
                };
                return Ok(Response::new(NextTaskResponse {
                    outcome: Some(next_task_response::Outcome::NoTask(NoTask {
                        reason: reason.into(),
                        retry_after_ms: 500,
                        run_finished: finished,
                    })),
                    published,
                }));
            }
            let wake = until.min(tokio::time::Instant::now() + POLL_EVERY);
            if let Ok(Err(_)) = tokio::time::timeout_at(wake, work.changed()).await {
                // The engine thread is gone.
                return Err(Error::ShuttingDown.into());
            }
        }
    }

    type DownloadModelStream = super::transfer::DownloadStream;

    async fn download_model(
        &self,
        req: Request<DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let call = self.site(&req, &req.get_ref().site_id, "DownloadModel")?;
        check_text("sha256", &req.get_ref().sha256)?;
        let one_at_a_time = self.transfer_slot(
            &call.site,
            "download",
            "DownloadModel",
            &super::auth::peer(&req),
        )?;
        let req = req.into_inner();
        let sha = req.sha256.clone();
        let Some((round, path)) = self.ask(|r| Command::Model(sha, r)).await? else {
            return Err(Error::NotFound(
                "no current model with that hash: the round has moved on, ask for a new task"
                    .into(),
            )
            .into());
        };
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let total = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if req.offset > total {
            return Err(Error::OutOfRange("offset past the end of the model".into()).into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let (guard, dropped) = tokio::sync::oneshot::channel();
        let header = ModelChunk {
            run_id: self.shared.cfg.run.name.clone(),
            round,
            sha256: req.sha256,
            total_bytes: total,
            offset: req.offset,
            data: Bytes::new(),
        };
        let settings = super::transfer::StreamSettings {
            chunk_bytes: self.shared.cfg.transport.chunk_bytes,
            slots: self.shared.downloads.clone(),
            stall: Duration::from_secs(self.shared.cfg.rounds.heartbeat_timeout_secs),
            sent: self.shared.telemetry.bytes_out.clone(),
        };
        // The call counts against the site's limits until the stream is done.
        tokio::spawn(async move {
            let _held = (call, one_at_a_time);
            super::transfer::stream_model(file, header, settings, tx, dropped).await;
        });
        Ok(Response::new(super::transfer::download_stream(rx, guard)))
    }

    async fn upload_update(
        &self,
        req: Request<Streaming<UpdateChunk>>,
    ) -> Result<Response<UploadUpdateResponse>, Status> {
        const METHOD: &str = "UploadUpdate";
        let (meta, ext, mut stream) = req.into_parts();
        let ctx = Request::from_parts(meta, ext, ());
        // Under mutual TLS the caller is known before a byte of the update is read.
        let early = if self.mutual_tls() {
            Some(self.site(&ctx, "", METHOD)?)
        } else {
            None
        };
        // One upload per site at a time (under mutual TLS, where the site is known before
        // the upload): a site cannot hold every transfer slot.
        let _one_at_a_time = match &early {
            Some(call) => {
                Some(self.transfer_slot(&call.site, "upload", METHOD, &super::auth::peer(&ctx))?)
            }
            None => None,
        };
        let _slot = self
            .shared
            .uploads
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let (spill, file) = super::transfer::SpillFile::create(&self.shared.incoming)
            .map_err(|e| Error::io(&self.shared.incoming, e))?;
        // The update goes to disk as it arrives (hashed and size-checked on the way) and the
        // engine folds it in from there, so no upload is ever held in memory whole. An upload
        // still arriving after the round's deadline is useless: stop waiting for it then.
        let limits = &self.shared.cfg.limits;
        let limit = Duration::from_secs(match limits.upload_timeout_secs {
            0 => self.shared.cfg.rounds.deadline_secs,
            n => n,
        });
        let who = early
            .as_ref()
            .map_or("unauthenticated", |c| c.site.as_str());
        let received = tokio::time::timeout(
            limit,
            receive_update_into(
                &mut stream,
                file,
                self.shared.max_upload_bytes,
                self.shared.cfg.transport.chunk_bytes,
            ),
        )
        .await
        .map_err(|_| {
            Error::TimedOut(format!(
                "the upload took longer than {}s (limits.upload_timeout_secs, or the round deadline)",
                limit.as_secs()
            ))
        })
        .and_then(|r| r.map_err(Error::Receive))
        .map_err(|e| self.compression_hint(e));
        let (h, file) = match received {
            Ok(r) => r,
            Err(error) => {
                self.rejected(METHOD, who, 0, &error);
                return Err(error.into());
            }
        };
        drop(file);
        self.shared.telemetry.bytes_in.inc_by(h.total_bytes);
        for (field, value) in [
            ("task_id", &h.task_id),
            ("run_id", &h.run_id),
            ("base_model_sha256", &h.base_model_sha256),
            ("encoding", &h.encoding),
        ] {
            if let Err(error) = check_text(field, value) {
                self.rejected(METHOD, who, h.round, &error);
                return Err(error.into());
            }
        }
        if let Err(error) = check_encoding(&self.shared.cfg.compression(), &h.encoding) {
            self.rejected(METHOD, who, h.round, &error);
            return Err(error.into());
        }
        let call = match early {
            Some(call) if !h.site_id.is_empty() && h.site_id != call.site => {
                fedflow_common::names::check_name(&h.site_id)
                    .map_err(|e| Error::BadRequest(format!("site_id: {e}")))?;
                return Err(self
                    .refuse(
                        METHOD,
                        &call.site,
                        &super::auth::peer(&ctx),
                        Error::Forbidden(format!(
                            "the certificate is for site {}, but the update claims site {}",
                            call.site, h.site_id
                        )),
                    )
                    .into());
            }
            Some(call) => call,
            None => self.site(&ctx, &h.site_id, METHOD)?,
        };
        let metrics = site_report(h.metrics.unwrap_or_default());
        let round = h.round;
        let submission = Upload {
            caller: call.identity.clone(),
            submission: Submission {
                site_id: call.site.clone(),
                round: h.round,
                task_id: h.task_id,
                nonce: h.nonce.to_vec(),
                base_model_sha256: h.base_model_sha256,
                delta: DeltaSource::File(spill.path.clone()),
                delta_sha256: h.delta_sha256.clone(),
                report: UpdateReport {
                    train_examples: metrics.train_examples,
                    claimed_weight: h.weight,
                },
                metrics,
                unclipped: h.site_dp_unclipped,
            },
        };
        match self
            .ask(|r| Command::Submit(Box::new(submission), r))
            .await?
        {
            Ok(accepted) => {
                if accepted == Accepted::New {
                    self.shared.telemetry.updates_accepted.inc();
                }
                Ok(Response::new(UploadUpdateResponse {
                    delta_sha256: h.delta_sha256,
                    duplicate: accepted == Accepted::Duplicate,
                }))
            }
            Err(rejection) => {
                let error = Error::Rejected(rejection);
                self.rejected(METHOD, &call.site, round, &error);
                Err(error.into())
            }
        }
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let call = self.site(&req, &req.get_ref().site_id, "Heartbeat")?;
        let req = req.into_inner();
        check_text("task_id", &req.task_id)?;
        let work = match SiteState::try_from(req.state).unwrap_or(SiteState::Unspecified) {
            SiteState::Unspecified | SiteState::Idle => WorkState::Idle,
            SiteState::Downloading => WorkState::Downloading,
            SiteState::Training => WorkState::Training,
            SiteState::Uploading => WorkState::Uploading,
            SiteState::Evaluating => WorkState::Evaluating,
        };
        let hb = Heartbeat {
            site_id: call.site,
            task_id: req.task_id,
            work,
            epoch: req.epoch,
            epochs: req.epochs,
            bytes_done: req.bytes_done,
        };
        let cancel_task = self.ask(|r| Command::Heartbeat(hb, r)).await?;
        Ok(Response::new(HeartbeatResponse {
            cancel_task,
            next_heartbeat_ms: self.shared.heartbeat_interval_ms,
        }))
    }

    async fn decline_task(
        &self,
        req: Request<DeclineTaskRequest>,
    ) -> Result<Response<DeclineTaskResponse>, Status> {
        let call = self.site(&req, &req.get_ref().site_id, "DeclineTask")?;
        let req = req.into_inner();
        check_text("task_id", &req.task_id)?;
        let d = Decline {
            site_id: call.site,
            round: req.round,
            task_id: req.task_id,
            nonce: req.nonce.to_vec(),
            // Kept whatever it holds (a decline is still a decline: the site's client may
            // send a multi-line error), but made safe: control and formatting characters
            // escaped, cut to the length the protocol promises to keep.
            reason: fedflow_common::text::sanitize(
                &req.reason,
                fedflow_common::text::MAX_REASON_CHARS,
            ),
        };
        match self.ask(|r| Command::Decline(Box::new(d), r)).await? {
            Ok(()) => Ok(Response::new(DeclineTaskResponse {})),
            Err(rejection) => Err(Error::Rejected(rejection).into()),
        }
    }

    async fn report_evaluation(
        &self,
        req: Request<EvaluationReport>,
    ) -> Result<Response<EvaluationReportResponse>, Status> {
        let call = self.site(&req, &req.get_ref().site_id, "ReportEvaluation")?;
        let req = req.into_inner();
        check_text("task_id", &req.task_id)?;
        check_text("model_sha256", &req.model_sha256)?;
        let site = call.site.clone();
        let eval = EvaluationSubmission {
            site_id: call.site,
            round: req.round,
            task_id: req.task_id,
            nonce: req.nonce.to_vec(),
            model_sha256: req.model_sha256,
            metrics: site_report(req.metrics.unwrap_or_default()),
        };
        match self.ask(|r| Command::Evaluation(Box::new(eval), r)).await? {
            Ok(accepted) => Ok(Response::new(EvaluationReportResponse {
                duplicate: accepted == Accepted::Duplicate,
            })),
            Err(rejection) => {
                let error = Error::Rejected(rejection);
                self.rejected("ReportEvaluation", &site, req.round, &error);
                Err(error.into())
            }
        }
    }
}

/// Checks an identifier-like text field of a site's request (task ids, hashes, versions):
/// short, plain, one line; refused with `INVALID_ARGUMENT` naming the field otherwise.
fn check_text(field: &str, value: &str) -> Result<(), Error> {
    fedflow_common::text::check(field, value, fedflow_common::text::MAX_ID_CHARS)
        .map_err(Error::BadRequest)
}

/// Wire metrics to the engine's; NaN (not measured) becomes `None`.
fn site_report(m: Metrics) -> SiteReport {
    SiteReport {
        train_examples: m.train_examples,
        validation_examples: m.validation_examples,
        train_loss: finite(m.train_loss),
        validation_loss: finite(m.validation_loss),
        validation_accuracy: finite(m.validation_accuracy),
        validation_macro_f1: finite(m.validation_macro_f1),
        epochs_run: m.epochs_run,
        train_seconds: finite(m.train_seconds).unwrap_or(0.0),
    }
}

/// Refuses an update whose header says it is encoded otherwise than the run's
/// `[compression]` (an empty encoding is an uncompressed update).
fn check_encoding(
    run: &fedflow_common::compress::Compression,
    encoding: &str,
) -> std::result::Result<(), Error> {
    let got = if encoding.is_empty() { "f32" } else { encoding };
    let expected = run.name();
    if got == expected {
        return Ok(());
    }
    Err(Error::BadRequest(format!(
        "the update is encoded as {got}, but this run's sites send {expected} ([compression] \
         of the run configuration; an older client cannot compress: upgrade it)"
    )))
}

impl Coordinator {
    /// An upload refused as too large in a run that compresses updates, with what it
    /// should have been (an uncompressed update from a client that cannot compress is the
    /// usual cause); any other error unchanged.
    fn compression_hint(&self, e: Error) -> Error {
        let compression = self.shared.cfg.compression();
        match e {
            Error::Receive(fedflow_proto::transfer::ReceiveError::Refused(
                ref t @ fedflow_proto::transfer::TransferError::TooLarge { .. },
            )) if compression.is_lossy() => Error::Limited(format!(
                "{t}: this run's sites send updates compressed as {} ([compression]), {} \
                 bytes each; a client that cannot compress must be upgraded",
                compression.name(),
                self.shared.max_upload_bytes
            )),
            e => e,
        }
    }

    /// The published version as the wire tells it.
    fn published_message(&self, p: crate::store::Publication) -> PublishedModel {
        PublishedModel {
            round: p.round,
            model: Some(ModelRef {
                sha256: p.model_sha256,
                size_bytes: 0,
                model_config_json: self.shared.model_config_json.clone(),
                vocab_sha256: self.shared.vocab_sha256.clone(),
            }),
            published_at_unix_ms: p.published_at_ms,
        }
    }

    fn task_message(&self, site: &str, t: TaskTicket) -> Task {
        let cfg = &self.shared.cfg;
        let train = cfg.local_train_config(t.round, site);
        Task {
            task_id: t.task_id,
            run_id: cfg.run.name.clone(),
            round: t.round,
            kind: match t.kind {
                TaskKind::Train => WireKind::Train,
                TaskKind::Evaluate => WireKind::Evaluate,
            } as i32,
            model: Some(ModelRef {
                sha256: t.model_sha256,
                size_bytes: 0,
                model_config_json: self.shared.model_config_json.clone(),
                vocab_sha256: self.shared.vocab_sha256.clone(),
            }),
            train: Some(TrainInstructions {
                local_epochs: train.epochs as u32,
                batch_size: train.batch_size as u32,
                learning_rate: train.learning_rate,
                optimizer: match train.optimizer {
                    fedflow_common::train::OptimizerKind::Adamw => "adamw".into(),
                    fedflow_common::train::OptimizerKind::Sgd => "sgd".into(),
                },
                weight_decay: train.weight_decay,
                momentum: train.momentum,
                fedprox_mu: train.fedprox_mu,
                seed: train.seed,
                patience: train.patience as u32,
                min_delta: train.min_delta,
                length_bucketing: train.length_bucketing,
                dp_sgd: cfg.record_dp.as_ref().map(|dp| DpSgdInstructions {
                    clip_norm: dp.clip_norm,
                    noise_multiplier: dp.noise_multiplier,
                    expected_batch_size: dp.expected_batch_size.unwrap_or(0) as u32,
                    sampling_rate: dp.sampling_rate.unwrap_or(0.0),
                    unit: dp.unit.to_string(),
                    max_sessions_per_user: dp.max_sessions_per_user as u32,
                    target_epsilon: dp.target_epsilon,
                    target_delta: dp.target_delta,
                    count_noise_multiplier: dp.count_noise_multiplier,
                }),
                site_dp: t.site_dp.map(|dp| SiteDpInstructions {
                    mode: dp.mode.to_string(),
                    clip_norm: dp.clip_norm,
                    noise_std: dp.noise_std,
                }),
                compression: Some(cfg.compression()).filter(|c| c.is_lossy()).map(|c| {
                    CompressionInstructions {
                        values: c.values.as_str().into(),
                        block_size: c.block_size as u32,
                        top_k: c.top_k.unwrap_or(0.0),
                        error_feedback: c.error_feedback,
                    }
                }),
            }),
            deadline_unix_ms: t.deadline_ms,
            nonce: Bytes::from(t.nonce),
        }
    }
}
