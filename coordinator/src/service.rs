//! The coordinator's gRPC face: the `fedflow.v1.Federation` service over a [`RoundEngine`]
//! owned by one thread.
//!
//! gRPC handlers are cheap clones of a [`Coordinator`] handle holding a channel sender; the
//! engine lives on its own thread (it does blocking work: SQLite, fsync, aggregation), takes
//! one command at a time, and ticks the clock when idle. Its loop must never panic or exit
//! while handles exist: engine errors are logged and returned to the caller as `internal`.
//! Wire types are converted here and nowhere else.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedflow_common::params::ParamSet;
use fedflow_proto::transfer::receive_update_into;
use fedflow_proto::v1::federation_server::Federation;
use fedflow_proto::v1::{
    DownloadModelRequest, EnrolRequest, EnrolResponse, HeartbeatRequest, HeartbeatResponse,
    ModelChunk, ModelRef, NextTaskRequest, NextTaskResponse, NoTask, Task, TaskKind,
    TrainInstructions, UpdateChunk, UploadUpdateResponse, next_task_response,
};
use prost::bytes::Bytes;
use tokio::sync::{Semaphore, oneshot};
use tonic::{Request, Response, Status, Streaming};

use crate::config::RunConfig;
use crate::round::{Accepted, DeltaSource, Phase, Rejection, RoundEngine, Submission, TaskTicket};
use crate::strategy::UpdateReport;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

/// A sent update, owned, on its way to the engine thread.
struct OwnedSubmission {
    site_id: String,
    round: u64,
    task_id: String,
    nonce: Vec<u8>,
    base_model_sha256: String,
    /// The spilled upload; the handler removes it once the engine has answered.
    delta_path: PathBuf,
    delta_sha256: String,
    report: UpdateReport,
    metrics_json: Option<String>,
}

/// A consistent view of the run, for status displays and tests.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Where the run stands.
    pub phase: Phase,
    /// Last committed round.
    pub committed_round: u64,
    /// The open round, if any.
    pub open_round: Option<u64>,
    /// The current global model.
    pub global: ParamSet,
    /// Its SHA-256.
    pub global_sha256: String,
}

enum Command {
    Seen(String),
    Snapshot(Reply<Snapshot>),
    Poll(String, Reply<(Option<TaskTicket>, Phase)>),
    Model(String, Reply<Option<(u64, PathBuf)>>),
    Submit(Box<OwnedSubmission>, Reply<Result<Accepted, Rejection>>),
}

/// Handle to the engine thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct Coordinator {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

/// What every task message repeats, worked out once at start rather than per task.
#[derive(Debug)]
struct Shared {
    cfg: RunConfig,
    model_config_json: String,
    vocab_sha256: String,
    heartbeat_interval_ms: u32,
    /// Where uploads spill while they arrive (`<data>/incoming`).
    incoming: PathBuf,
    /// Model downloads streaming at once.
    downloads: Arc<Semaphore>,
    /// Uploads being received at once.
    uploads: Semaphore,
}

/// How many model downloads, and separately how many uploads, are in flight at once. Each
/// holds a few chunks in transport buffers, so this bounds the coordinator's transfer memory
/// whatever the number of sites; the others wait their turn (a few fast transfers saturate
/// a machine's cores and disk anyway).
pub const TRANSFER_SLOTS: usize = 8;

/// Distinguishes spill files within a process.
static SPILL_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An upload's spill file in `<data>/incoming`, removed when dropped: after the engine has
/// answered, and on every error path.
#[derive(Debug)]
struct SpillFile {
    path: PathBuf,
}

impl SpillFile {
    fn create(dir: &Path) -> std::io::Result<(SpillFile, std::fs::File)> {
        let n = SPILL_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("upload-{n}.part"));
        let file = std::fs::File::create_new(&path)?;
        Ok((SpillFile { path }, file))
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove spill file {}: {e}", self.path.display());
        }
    }
}

/// Empties (or creates) the spill directory: files there are uploads a previous process was
/// receiving when it stopped, never accepted.
fn reset_incoming(dir: &Path) -> crate::Result<()> {
    let fail = |e: std::io::Error| {
        crate::Error::Store(format!(
            "cannot prepare the upload spill directory {}: {e}",
            dir.display()
        ))
    };
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    std::fs::create_dir_all(dir).map_err(fail)
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Seen(_) => "Seen",
            Command::Snapshot(_) => "Snapshot",
            Command::Poll(..) => "Poll",
            Command::Model(..) => "Model",
            Command::Submit(..) => "Submit",
        })
    }
}

/// The data directory's spill folder for uploads being received.
pub const INCOMING_DIR: &str = "incoming";

/// How often the engine thread ticks when no command arrives.
const TICK: Duration = Duration::from_millis(200);

impl Coordinator {
    /// Starts the engine thread. The thread ends when every handle is dropped. Fails if the
    /// run's model config or vocabulary cannot be read.
    pub fn spawn(engine: RoundEngine, cfg: RunConfig) -> crate::Result<Coordinator> {
        let model_config_json = serde_json::to_string(&cfg.model_config()?)
            .map_err(|e| crate::Error::Strategy(e.to_string()))?;
        let vocab = fedflow_common::data::Vocab::load(&cfg.model.vocab)?;
        let incoming = engine.store().dir().join(INCOMING_DIR);
        reset_incoming(&incoming)?;
        let shared = Shared {
            incoming,
            downloads: Arc::new(Semaphore::new(TRANSFER_SLOTS)),
            uploads: Semaphore::new(TRANSFER_SLOTS),
            model_config_json,
            vocab_sha256: fedflow_common::model::vocab_sha256(&vocab),
            heartbeat_interval_ms: (cfg.rounds.heartbeat_timeout_secs * 1000 / 3).max(100) as u32,
            cfg,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("fedflow-rounds".into())
            .spawn(move || engine_loop(engine, rx))
            .expect("cannot start the round engine thread");
        Ok(Coordinator {
            tx,
            shared: Arc::new(shared),
        })
    }

    /// The run's current state.
    pub async fn snapshot(&self) -> Result<Snapshot, Status> {
        self.ask(Command::Snapshot).await
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?
            .map_err(|e| Status::internal(format!("coordinator error: {e}")))
    }
}

fn engine_loop(mut engine: RoundEngine, rx: mpsc::Receiver<Command>) {
    loop {
        let cmd = match rx.recv_timeout(TICK) {
            Ok(cmd) => Some(cmd),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let now = now_ms();
        match cmd {
            None => {}
            Some(Command::Seen(site)) => {
                if let Err(e) = engine.site_seen(&site, now) {
                    tracing::error!(run = %engine.run_id(), "recording a site failed: {e}");
                }
            }
            Some(Command::Snapshot(reply)) => {
                let (global, sha) = engine.global();
                let _ = reply.send(Ok(Snapshot {
                    phase: engine.phase(),
                    committed_round: engine.committed_round(),
                    open_round: engine.open_round(),
                    global: global.clone(),
                    global_sha256: sha.to_string(),
                }));
            }
            Some(Command::Poll(site, reply)) => {
                let r = engine
                    .poll_task(&site, now)
                    .map(|t| (t, engine.phase()))
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Some(Command::Model(sha, reply)) => {
                // The committed checkpoint file holds exactly the bytes the model hash is
                // taken of, so it is served as is.
                let r = (sha == engine.global().1).then(|| {
                    let round = engine.committed_round();
                    (
                        round,
                        engine.store().model_checkpoint_path(engine.run_id(), round),
                    )
                });
                let _ = reply.send(Ok(r));
            }
            Some(Command::Submit(s, reply)) => {
                let r = engine
                    .submit(
                        Submission {
                            site_id: &s.site_id,
                            round: s.round,
                            task_id: &s.task_id,
                            nonce: &s.nonce,
                            base_model_sha256: &s.base_model_sha256,
                            delta: DeltaSource::File(&s.delta_path),
                            delta_sha256: &s.delta_sha256,
                            report: s.report.clone(),
                            metrics_json: s.metrics_json.clone(),
                        },
                        now,
                    )
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
        }
        if let Err(e) = engine.tick(now_ms()) {
            tracing::error!(run = %engine.run_id(), "round engine tick failed: {e}");
        }
    }
}

/// Streams a model file as `DownloadModel` chunks (laid out like `header`, starting at its
/// offset) into `tx`, one chunk read at a time, once one of the download slots is free.
/// Gives up when the receiver goes away or stops reading for `stall`.
async fn stream_model(
    file: std::fs::File,
    header: ModelChunk,
    chunk_bytes: usize,
    slots: Arc<Semaphore>,
    stall: Duration,
    tx: tokio::sync::mpsc::Sender<Result<ModelChunk, Status>>,
) {
    let Ok(_slot) = slots.acquire_owned().await else {
        return;
    };
    let total = header.total_bytes;
    let mut offset = header.offset;
    let mut file = Some(file);
    loop {
        let n = (chunk_bytes.max(1) as u64).min(total - offset) as usize;
        let Some(f) = file.take() else { return };
        let read = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = f;
            let mut buf = vec![0u8; n];
            let r = f
                .seek(SeekFrom::Start(offset))
                .and_then(|_| f.read_exact(&mut buf));
            (f, r.map(|()| buf))
        })
        .await;
        let msg = match read {
            Ok((f, Ok(buf))) => {
                file = Some(f);
                Ok(ModelChunk {
                    offset,
                    data: Bytes::from(buf),
                    ..header.clone()
                })
            }
            Ok((_, Err(e))) => Err(Status::internal(format!("cannot read the model: {e}"))),
            Err(e) => Err(Status::internal(format!("cannot read the model: {e}"))),
        };
        let failed = msg.is_err();
        match tokio::time::timeout(stall, tx.send(msg)).await {
            Ok(Ok(())) => {}
            // The site went away, or stopped reading: free the slot.
            Ok(Err(_)) | Err(_) => return,
        }
        offset += n as u64;
        if failed || offset >= total {
            return;
        }
    }
}

/// The status a rejection travels as.
fn rejection_status(r: &Rejection) -> Status {
    let msg = r.to_string();
    match r {
        Rejection::Late(_) => Status::deadline_exceeded(msg),
        Rejection::NotSelected(_) | Rejection::WrongTask => Status::permission_denied(msg),
        Rejection::Conflicting => Status::already_exists(msg),
        Rejection::Invalid(_) => Status::invalid_argument(msg),
        Rejection::NoOpenRound
        | Rejection::WrongRound { .. }
        | Rejection::Withdrawn
        | Rejection::WrongBase { .. } => Status::failed_precondition(msg),
    }
}

fn check_site_id(site: &str) -> Result<(), Status> {
    let ok = !site.is_empty()
        && site.len() <= 128
        && site
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "site_id must be 1-128 characters of [A-Za-z0-9._-]",
        ))
    }
}

/// Longest a `NextTask` call is held open.
const MAX_POLL: Duration = Duration::from_secs(30);
/// How often a held `NextTask` call asks the engine again.
const POLL_EVERY: Duration = Duration::from_millis(100);

#[tonic::async_trait]
impl Federation for Coordinator {
    async fn enrol(&self, req: Request<EnrolRequest>) -> Result<Response<EnrolResponse>, Status> {
        let req = req.into_inner();
        check_site_id(&req.site_id)?;
        let _ = self.tx.send(Command::Seen(req.site_id));
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
        let req = req.into_inner();
        check_site_id(&req.site_id)?;
        let until =
            tokio::time::Instant::now() + Duration::from_millis(req.wait_ms as u64).min(MAX_POLL);
        loop {
            let site = req.site_id.clone();
            let (ticket, phase) = self.ask(|r| Command::Poll(site, r)).await?;
            if let Some(t) = ticket {
                return Ok(Response::new(NextTaskResponse {
                    outcome: Some(next_task_response::Outcome::Task(
                        self.task_message(&req.site_id, t),
                    )),
                }));
            }
            let finished = phase == Phase::Finished;
            if finished || tokio::time::Instant::now() >= until {
                let reason = match phase {
                    Phase::Finished => "the run is finished",
                    Phase::Paused => "the run is paused",
                    Phase::Waiting => "waiting for enough sites to start the next round",
                    Phase::Training => "this site is not in the current round",
                };
                return Ok(Response::new(NextTaskResponse {
                    outcome: Some(next_task_response::Outcome::NoTask(NoTask {
                        reason: reason.into(),
                        retry_after_ms: 500,
                        run_finished: finished,
                    })),
                }));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    type DownloadModelStream = tokio_stream::wrappers::ReceiverStream<Result<ModelChunk, Status>>;

    async fn download_model(
        &self,
        req: Request<DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let req = req.into_inner();
        check_site_id(&req.site_id)?;
        let sha = req.sha256.clone();
        let Some((round, path)) = self.ask(|r| Command::Model(sha, r)).await? else {
            return Err(Status::not_found(
                "no current model with that hash: the round has moved on, ask for a new task",
            ));
        };
        let file = std::fs::File::open(&path).map_err(|e| {
            Status::internal(format!(
                "cannot open the model checkpoint {}: {e}",
                path.display()
            ))
        })?;
        let total = file
            .metadata()
            .map_err(|e| Status::internal(format!("cannot read {}: {e}", path.display())))?
            .len();
        if req.offset > total {
            return Err(Status::out_of_range("offset past the end of the model"));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let header = ModelChunk {
            run_id: self.shared.cfg.run.name.clone(),
            round,
            sha256: req.sha256,
            total_bytes: total,
            offset: req.offset,
            data: Bytes::new(),
        };
        tokio::spawn(stream_model(
            file,
            header,
            self.shared.cfg.transport.chunk_bytes,
            self.shared.downloads.clone(),
            Duration::from_secs(self.shared.cfg.rounds.heartbeat_timeout_secs),
            tx,
        ));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn upload_update(
        &self,
        req: Request<Streaming<UpdateChunk>>,
    ) -> Result<Response<UploadUpdateResponse>, Status> {
        let mut stream = req.into_inner();
        let _slot = self
            .shared
            .uploads
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        let (spill, file) = SpillFile::create(&self.shared.incoming).map_err(|e| {
            Status::internal(format!(
                "cannot spill the upload to {}: {e}",
                self.shared.incoming.display()
            ))
        })?;
        // The update goes to disk as it arrives (hashed and size-checked on the way) and the
        // engine folds it in from there, so no upload is ever held in memory whole. An upload
        // still arriving after the round's deadline is useless: stop waiting for it then.
        let limit = Duration::from_secs(self.shared.cfg.rounds.deadline_secs);
        let received = tokio::time::timeout(
            limit,
            receive_update_into(
                &mut stream,
                file,
                self.shared.cfg.transport.max_model_bytes,
                self.shared.cfg.transport.chunk_bytes,
            ),
        )
        .await
        .map_err(|_| Status::deadline_exceeded("the upload took longer than the round deadline"))?;
        let (h, file) = received?;
        drop(file);
        check_site_id(&h.site_id)?;
        let metrics = h.metrics.unwrap_or_default();
        let metrics_json = serde_json::json!({
            "train_examples": metrics.train_examples,
            "validation_examples": metrics.validation_examples,
            "train_loss": metrics.train_loss,
            "validation_loss": metrics.validation_loss,
            "validation_accuracy": metrics.validation_accuracy,
            "validation_macro_f1": metrics.validation_macro_f1,
            "epochs_run": metrics.epochs_run,
            "train_seconds": metrics.train_seconds,
        })
        .to_string();
        let submission = OwnedSubmission {
            site_id: h.site_id,
            round: h.round,
            task_id: h.task_id,
            nonce: h.nonce.to_vec(),
            base_model_sha256: h.base_model_sha256,
            delta_path: spill.path.clone(),
            delta_sha256: h.delta_sha256.clone(),
            report: UpdateReport {
                train_examples: metrics.train_examples,
                claimed_weight: h.weight,
            },
            metrics_json: Some(metrics_json),
        };
        match self
            .ask(|r| Command::Submit(Box::new(submission), r))
            .await?
        {
            Ok(accepted) => Ok(Response::new(UploadUpdateResponse {
                delta_sha256: h.delta_sha256,
                duplicate: accepted == Accepted::Duplicate,
            })),
            Err(rejection) => Err(rejection_status(&rejection)),
        }
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = req.into_inner();
        check_site_id(&req.site_id)?;
        let _ = self.tx.send(Command::Seen(req.site_id));
        Ok(Response::new(HeartbeatResponse {
            cancel_task: false,
            next_heartbeat_ms: self.shared.heartbeat_interval_ms,
        }))
    }
}

impl Coordinator {
    fn task_message(&self, site: &str, t: TaskTicket) -> Task {
        let cfg = &self.shared.cfg;
        let train = cfg.local_train_config(t.round, site);
        Task {
            task_id: t.task_id,
            run_id: cfg.run.name.clone(),
            round: t.round,
            kind: TaskKind::Train as i32,
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
            }),
            deadline_unix_ms: t.deadline_ms,
            nonce: Bytes::from(t.nonce),
        }
    }
}

/// Serves the coordinator on `listener` until `shutdown` resolves: the `Federation` service
/// with fedflow's message limits, standard gRPC health checking (`grpc.health.v1`, serving
/// once the engine is running) and server reflection (so grpcurl and friends work).
pub async fn serve(
    listener: tokio::net::TcpListener,
    coordinator: Coordinator,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    use fedflow_proto::transfer::MAX_MESSAGE_BYTES;
    use fedflow_proto::v1::federation_server::FederationServer;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FederationServer<Coordinator>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fedflow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("fedflow's descriptors are valid (they are generated at build time)");
    let federation = FederationServer::new(coordinator)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(federation)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}
