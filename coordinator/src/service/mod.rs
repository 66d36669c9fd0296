//! The coordinator's gRPC face: the `fedflow.v1.Federation` service (what partner sites
//! call, in [`federation`]) and the `fedflow.v1.Admin` service (what operators call, in
//! [`admin`]) over a [`RoundEngine`] owned by one thread.
//!
//! gRPC handlers are cheap clones of a [`Coordinator`] handle holding a channel sender; the
//! engine lives on its own thread (it does blocking work: SQLite, fsync, aggregation), takes
//! one command at a time, and ticks the clock when idle. Its loop must never panic or exit
//! while handles exist: engine errors are logged and returned to the caller typed
//! ([`crate::Error`], with a site's [`Rejection`]). Wire types are converted in the two
//! service modules and nowhere else; [`status`] is the one place a [`crate::Error`] becomes a
//! gRPC status.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use fedflow_common::clock::now_ms;

use fedflow_common::params::ParamSet;
use tokio::sync::oneshot;

use crate::config::RunConfig;
use crate::round::{
    Accepted, EvaluationSubmission, Heartbeat, Phase, Rejection, RoundEngine, RunView, Submission,
    TaskTicket, WorkKey,
};
use crate::security::Transport;

pub mod admin;
mod auth;
pub mod enrolment;
pub mod federation;
mod models;
pub mod status;
mod telemetry;
pub use telemetry::METRIC_FAMILIES;
mod transfer;

pub use telemetry::serve_metrics;
pub use transfer::{INCOMING_DIR, TRANSFER_SLOTS};

type Reply<T> = oneshot::Sender<crate::Result<T>>;

/// A sent update on its way to the engine thread, with the verified caller (mutual TLS):
/// checked against the revocations once more on the engine thread, so an update whose
/// certificate was revoked while it was arriving is discarded. The handler removes the
/// spilled file (`DeltaSource::File`) once the engine has answered.
struct Upload {
    submission: Submission,
    caller: Option<crate::security::Identity>,
}

/// A declined task.
struct Decline {
    site_id: String,
    round: u64,
    task_id: String,
    nonce: Vec<u8>,
    reason: String,
}

/// A consistent view of the run, for tests and embedders.
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

/// Read-only work run on the engine thread (status views, database reads).
type Inspection = Box<dyn FnOnce(&RoundEngine, i64) + Send>;

/// What an operator asks of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAction {
    /// Hold the run: no new round starts (the open one goes on).
    Pause,
    /// Go on after a pause.
    Resume,
    /// End the run for good (an open round is abandoned).
    Stop,
}

enum Command {
    Seen(String),
    Heartbeat(Heartbeat, Reply<bool>),
    Inspect(Inspection),
    Poll(String, Reply<Polled>),
    Model(String, Reply<Option<(u64, std::path::PathBuf)>>),
    Submit(Box<Upload>, Reply<Result<Accepted, Rejection>>),
    Evaluation(
        Box<EvaluationSubmission>,
        Reply<Result<Accepted, Rejection>>,
    ),
    Decline(Box<Decline>, Reply<Result<(), Rejection>>),
    /// An operator action; answered with the phase after it (or why it was refused).
    Act(RunAction, String, Reply<Phase>),
    /// An operator publishes a round (`Some`) or rolls back (`None`), with who and why.
    Publish(
        Option<u64>,
        String,
        String,
        Reply<crate::store::Publication>,
    ),
    /// A revocation (stored, then in force); answered with whether it is new.
    Revoke(crate::security::Revoked, String, String, Reply<bool>),
    /// An enrolment token issued or redeemed.
    Enrolment(enrolment::EnrolmentJob),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Seen(_) => "Seen",
            Command::Heartbeat(..) => "Heartbeat",
            Command::Inspect(_) => "Inspect",
            Command::Poll(..) => "Poll",
            Command::Model(..) => "Model",
            Command::Submit(..) => "Submit",
            Command::Evaluation(..) => "Evaluation",
            Command::Decline(..) => "Decline",
            Command::Act(..) => "Act",
            Command::Publish(..) => "Publish",
            Command::Revoke(..) => "Revoke",
            Command::Enrolment(_) => "Enrolment",
        })
    }
}

/// What a poll answers: the site's task if it has one, the run's phase and the published
/// version.
type Polled = (Option<TaskTicket>, Phase, Option<crate::store::Publication>);

/// Handle to the engine thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct Coordinator {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    /// The engine's [`WorkKey`], updated by its thread after every command that changes it:
    /// what held `NextTask` calls wait on.
    work: tokio::sync::watch::Receiver<WorkKey>,
}

/// What every task message repeats, worked out once at start rather than per task.
#[derive(Debug)]
struct Shared {
    cfg: RunConfig,
    model_config_json: String,
    vocab_sha256: String,
    heartbeat_interval_ms: u32,
    /// Where uploads spill while they arrive (`<data>/incoming`).
    incoming: std::path::PathBuf,
    /// Model downloads streaming at once.
    downloads: Arc<tokio::sync::Semaphore>,
    /// Uploads being received at once.
    uploads: tokio::sync::Semaphore,
    /// Largest update accepted (`limits.max_upload_bytes`, or the size of the run's updates:
    /// the model's, or its compressed form's).
    max_upload_bytes: u64,
    /// Transport security, revocations, audit log and per-caller limits.
    security: Security,
    /// Counters for the metrics endpoint.
    telemetry: telemetry::Telemetry,
}

/// The coordinator's security state, shared by every handler.
#[derive(Debug)]
struct Security {
    /// The mutual-TLS server configuration; `None` in plaintext mode.
    tls: Option<Arc<crate::security::tls::ServerTls>>,
    log: crate::security::SecurityLog,
    revocations: crate::security::Revocations,
    limiter: crate::security::limits::CallLimiter,
    /// One upload and one download per site at a time.
    transfers: crate::security::limits::CallLimiter,
    /// When the certificate each site last called with expires (Unix seconds).
    site_certificates: std::sync::Mutex<std::collections::BTreeMap<String, i64>>,
}

/// Largest answer the admin service sends.
pub const ADMIN_MAX_REPLY_BYTES: usize = 32 << 20;

/// How often the engine thread ticks when no command arrives.
const TICK: Duration = Duration::from_millis(200);

impl Coordinator {
    /// Starts the engine thread, serving callers over `transport`. The thread ends when
    /// every handle is dropped. Fails if the run's model config or vocabulary cannot be
    /// read, the TLS bundle is unusable, or the security audit log
    /// (`<data>/security-audit.jsonl`) fails verification.
    pub fn spawn(
        mut engine: RoundEngine,
        cfg: RunConfig,
        transport: &Transport,
    ) -> crate::Result<Coordinator> {
        let model_config_json = serde_json::to_string(&cfg.model_config()?)?;
        let vocab = fedflow_common::data::Vocab::load(&cfg.model.vocab)?;
        let dir = engine.store().dir().to_path_buf();
        let incoming = dir.join(INCOMING_DIR);
        transfer::reset_incoming(&incoming)?;
        let tls = match transport {
            Transport::MutualTls(bundle) => {
                Some(Arc::new(crate::security::tls::ServerTls::load(bundle)?))
            }
            Transport::InsecurePlaintext => None,
        };
        let log = crate::security::SecurityLog::open(&dir.join(crate::security::SECURITY_LOG))?;
        let (events, head) = log.head();
        tracing::info!(
            "security audit log {}: {events} event(s), last hash {head} (keep it elsewhere to detect a rewritten log)",
            dir.join(crate::security::SECURITY_LOG).display()
        );
        let revocations = crate::security::Revocations::from_list(
            engine.store().revocations()?.into_iter().map(|r| r.revoked),
        );
        log.record(
            "coordinator_started",
            serde_json::json!({
                "run": cfg.run.name,
                "transport": if tls.is_some() { "mutual-tls" } else { "insecure-plaintext" },
                "revocations": engine.store().revocations()?.len(),
            }),
        );
        let checkpoint = engine
            .store()
            .model_checkpoint_path(engine.run_id(), engine.committed_round());
        let model_bytes = std::fs::metadata(&checkpoint)
            .map_err(|e| crate::Error::io(&checkpoint, e))?
            .len();
        // Every update of the run has one size: the model's, or its compressed form's.
        let compression = cfg.compression();
        let update_bytes = if compression.is_lossy() {
            let mut file =
                std::fs::File::open(&checkpoint).map_err(|e| crate::Error::io(&checkpoint, e))?;
            let layout = fedflow_common::params::SafetensorsLayout::read(&mut file)?;
            compression.update_bytes(&layout.spec)?
        } else {
            model_bytes
        };
        let max_upload_bytes = match cfg.limits.max_upload_bytes {
            0 => update_bytes,
            n => n,
        }
        .min(cfg.transport.max_model_bytes);
        engine.set_security_log(log.clone());
        let security = Security {
            tls,
            log,
            site_certificates: Default::default(),
            revocations: revocations.clone(),
            limiter: crate::security::limits::CallLimiter::new(cfg.limits.call_limits()),
            transfers: crate::security::limits::CallLimiter::new(
                crate::security::limits::CallLimits {
                    max_concurrent: 1,
                    rate_per_sec: 1e9,
                    burst: 1e9,
                },
            ),
        };
        let shared = Shared {
            telemetry: telemetry::Telemetry::default(),
            max_upload_bytes,
            security,
            incoming,
            downloads: Arc::new(tokio::sync::Semaphore::new(TRANSFER_SLOTS)),
            uploads: tokio::sync::Semaphore::new(TRANSFER_SLOTS),
            model_config_json,
            vocab_sha256: fedflow_common::model::vocab_sha256(&vocab),
            heartbeat_interval_ms: (cfg.rounds.heartbeat_timeout_secs * 1000 / 3).max(100) as u32,
            cfg,
        };
        let (tx, rx) = mpsc::channel();
        let (work_tx, work) = tokio::sync::watch::channel(engine.work_key());
        std::thread::Builder::new()
            .name("fedflow-rounds".into())
            .spawn(move || engine_loop(engine, rx, revocations, work_tx))
            .expect("cannot start the round engine thread");
        Ok(Coordinator {
            tx,
            shared: Arc::new(shared),
            work,
        })
    }

    /// The run's current state.
    pub async fn snapshot(&self) -> crate::Result<Snapshot> {
        self.inspect(|engine, _| {
            let (global, sha) = engine.global();
            Ok(Snapshot {
                phase: engine.phase(),
                committed_round: engine.committed_round(),
                open_round: engine.open_round(),
                global: global.clone(),
                global_sha256: sha.to_string(),
            })
        })
        .await
    }

    /// Where the run stands, with each site's progress in the current round.
    pub async fn view(&self) -> crate::Result<RunView> {
        self.inspect(|engine, now| Ok(engine.view(now))).await
    }

    /// Runs `f` on the engine thread with read access to the engine (and through it the
    /// store) and the current time, and returns its answer. `f` must be quick: the engine
    /// does nothing else meanwhile.
    pub async fn inspect<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RoundEngine, i64) -> crate::Result<T> + Send + 'static,
    ) -> crate::Result<T> {
        self.ask(|reply| {
            Command::Inspect(Box::new(move |engine, now| {
                let _ = reply.send(f(engine, now));
            }))
        })
        .await
    }

    /// An operator action taken inside this process (a simulation ending its continuous
    /// run), answered with the phase after it. Remote operators go through the admin
    /// service, which authenticates them and records the action in the audit log.
    pub async fn operate(&self, action: RunAction, reason: &str) -> crate::Result<Phase> {
        let reason = reason.to_string();
        self.ask(|reply| Command::Act(action, reason, reply)).await
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> crate::Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| crate::Error::ShuttingDown)?;
        rx.await.map_err(|_| crate::Error::ShuttingDown)?
    }
}

fn engine_loop(
    mut engine: RoundEngine,
    rx: mpsc::Receiver<Command>,
    revocations: crate::security::Revocations,
    work: tokio::sync::watch::Sender<WorkKey>,
) {
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
            Some(Command::Heartbeat(hb, reply)) => {
                let r = engine.heartbeat(hb, now);
                let _ = reply.send(r);
            }
            Some(Command::Inspect(f)) => f(&engine, now),
            Some(Command::Poll(site, reply)) => {
                let r = engine
                    .poll_task(&site, now)
                    .map(|t| (t, engine.phase(), engine.published().cloned()));
                let _ = reply.send(r);
            }
            Some(Command::Model(sha, reply)) => {
                // A committed checkpoint file holds exactly the bytes the model hash is
                // taken of, so it is served as is.
                let _ = reply.send(Ok(engine.model_file(&sha)));
            }
            Some(Command::Submit(s, reply))
                if s.caller
                    .as_ref()
                    .is_some_and(|id| revocations.check(id).is_some())
                    || revocations.site_revoked(&s.submission.site_id) =>
            {
                let _ = reply.send(Ok(Err(Rejection::Revoked)));
            }
            Some(Command::Act(action, reason, reply)) => {
                let r = match action {
                    RunAction::Pause => engine.pause(&reason),
                    RunAction::Resume => engine.resume(&reason),
                    RunAction::Stop => engine.stop(&reason),
                };
                let _ = reply.send(r);
            }
            Some(Command::Publish(round, by, reason, reply)) => {
                let r = match round {
                    Some(round) => engine.publish_version(round, &by, &reason, now),
                    None => engine.rollback(&by, &reason, now),
                };
                let _ = reply.send(r);
            }
            Some(Command::Revoke(what, reason, by, reply)) => {
                // Stored first: a revocation in force is never lost by a crash.
                let r = engine.store_mut().revoke(&what, &reason, &by);
                if r.is_ok() {
                    if let crate::security::Revoked::Identity(crate::security::Role::Site, site) =
                        &what
                        && let Err(e) = engine.forget_site(site, &format!("revoked: {reason}"))
                    {
                        tracing::error!(run = %engine.run_id(), "withdrawing a revoked site's task failed: {e}");
                    }
                    revocations.add(what);
                }
                let _ = reply.send(r);
            }
            Some(Command::Enrolment(job)) => enrolment::run(job, engine.store_mut(), now),
            Some(Command::Submit(s, reply)) => {
                let r = engine.submit(s.submission, now);
                let _ = reply.send(r);
            }
            Some(Command::Decline(d, reply)) => {
                let r = engine.decline(&d.site_id, d.round, &d.task_id, &d.nonce, &d.reason, now);
                let _ = reply.send(r);
            }
            Some(Command::Evaluation(s, reply)) => {
                let r = engine.submit_evaluation(*s, now);
                let _ = reply.send(r);
            }
        }
        if let Err(e) = engine.tick(now_ms()) {
            tracing::error!(run = %engine.run_id(), "round engine tick failed: {e}");
        }
        let key = engine.work_key();
        work.send_if_modified(|k| {
            let changed = *k != key;
            if changed {
                *k = key;
            }
            changed
        });
    }
}

/// The HTTP/2 flow-control window the server grants each stream and each connection: the
/// protocol's default of 64 KiB, instead of hyper's 1 MiB.
///
/// A site may send this much before the server reads it, and the server must buffer it. An
/// upload waiting for one of the [`TRANSFER_SLOTS`] has already pushed a window's worth, so
/// with 1 MiB windows the coordinator held up to 1 MiB (the whole update, for small models)
/// per waiting site, which made its memory grow with the number of sites. Measured on
/// loopback, the smaller window does not slow a 40 MB upload down.
pub const HTTP2_WINDOW: u32 = 65_535;

/// Serves the coordinator on `listener` until `shutdown` resolves: the `Federation` and
/// `Admin` services with fedflow's message limits, standard gRPC health checking
/// (`grpc.health.v1`, `SERVING` only while the engine thread answers and the database holds
/// the run, checked every second) and server reflection, `grpc.reflection.v1` and
/// `v1alpha` (so grpcurl, Python's grpcio-reflection and friends work).
pub async fn serve(
    listener: tokio::net::TcpListener,
    coordinator: Coordinator,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    serve_with_health(listener, None, coordinator, shutdown).await
}

/// [`serve`], and when `health` is given, gRPC health alone (`grpc.health.v1`, the same
/// statuses) in plaintext on that listener too, for probes that cannot present a client
/// certificate (Kubernetes' gRPC probes, container health checks). It says only whether
/// the coordinator is ready; keep it on a network only the probes reach.
pub async fn serve_with_health(
    listener: tokio::net::TcpListener,
    health: Option<tokio::net::TcpListener>,
    coordinator: Coordinator,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    use fedflow_proto::transfer::MAX_MESSAGE_BYTES;
    use fedflow_proto::v1::admin_server::AdminServer;
    use fedflow_proto::v1::federation_server::FederationServer;

    let tls = coordinator.shared.security.tls.clone();
    let log = coordinator.shared.security.log.clone();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // tonic-health starts the whole server ("") as SERVING; nothing is until the probe says.
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let probe = readiness(coordinator.clone(), health_reporter);
    let (stopped, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stopped.send(true);
    };
    let health_only = health.map(|listener| {
        let mut stop = stop_rx.clone();
        let service = health_service.clone();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await;
            if let Err(e) = served {
                tracing::error!("the plaintext health endpoint stopped: {e}");
            }
        })
    });
    // Both versions of server reflection: `v1`, and `v1alpha`, which Python's
    // grpcio-reflection and older grpcurl speak. Each describes the whole server, both
    // reflection services included.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(fedflow_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .include_reflection_service(false)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("fedflow's descriptors are valid (they are generated at build time)");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("fedflow's descriptors are valid (they are generated at build time)");
    // Admin requests are tiny; answers grow with sites and rounds (a 1,000-site status is
    // about 100 KB), so they get more room, but still a bound.
    let admin = AdminServer::new(coordinator.clone())
        .max_decoding_message_size(64 * 1024)
        .max_encoding_message_size(ADMIN_MAX_REPLY_BYTES);
    let federation = FederationServer::new(coordinator)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(HTTP2_WINDOW)
        .initial_connection_window_size(HTTP2_WINDOW)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .add_service(federation);
    let server = async {
        match tls {
            Some(config) => {
                router
                    .serve_with_incoming_shutdown(
                        crate::security::tls::incoming(
                            listener,
                            config,
                            crate::security::tls::ClientAuth::Required,
                            log,
                        ),
                        shutdown,
                    )
                    .await
            }
            None => {
                router
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        shutdown,
                    )
                    .await
            }
        }
    };
    // The readiness probe runs as long as the server does.
    let served = tokio::select! {
        r = server => r,
        () = probe => Ok(()),
    };
    if let Some(h) = health_only {
        h.abort();
    }
    served
}

/// What [`Coordinator::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reload {
    /// The server certificate now in force (mutual TLS only).
    pub tls: Option<crate::security::tls::Reloaded>,
    /// Revocations in force.
    pub revocations: usize,
}

impl Coordinator {
    /// Reads the server certificate bundle and the revocations again (`serve` does on
    /// SIGHUP): new connections are served with the new certificate, connections already
    /// established and the run go on. An unusable bundle changes nothing; either way the
    /// outcome is in the security audit log.
    pub async fn reload(&self) -> crate::Result<Reload> {
        let security = &self.shared.security;
        let tls = match &security.tls {
            None => None,
            Some(t) => match t.reload() {
                Ok(r) => Some(r),
                Err(e) => {
                    security.log.record(
                        "configuration_reload_failed",
                        serde_json::json!({ "reason": e.to_string() }),
                    );
                    return Err(e);
                }
            },
        };
        let revoked = self.inspect(|e, _| e.store().revocations()).await?;
        let revocations = revoked.len();
        for r in revoked {
            security.revocations.add(r.revoked);
        }
        security.log.record(
            "configuration_reloaded",
            serde_json::json!({
                "certificate": tls.as_ref().map(|t| t.serial.clone()),
                "not_after": tls.as_ref().map(|t| t.not_after),
                "revocations": revocations,
            }),
        );
        Ok(Reload { tls, revocations })
    }

    /// Records that `site` called with a certificate expiring at `not_after`.
    pub(crate) fn saw_site_certificate(&self, site: &str, not_after: i64) {
        let mut certs = self
            .shared
            .security
            .site_certificates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if certs.get(site) != Some(&not_after) {
            certs.insert(site.to_string(), not_after);
        }
    }

    /// When the certificate each site last called with expires (Unix seconds).
    pub fn site_certificates(&self) -> std::collections::BTreeMap<String, i64> {
        self.shared
            .security
            .site_certificates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// When the server certificate in force expires (Unix seconds); `None` in plaintext.
    pub fn certificate_not_after(&self) -> Option<i64> {
        self.shared.security.tls.as_ref().map(|t| t.not_after())
    }
}

/// How often gRPC health is brought up to date.
const READINESS_EVERY: Duration = Duration::from_secs(1);

/// Keeps gRPC health (`grpc.health.v1`, the whole server `""` and each fedflow service) in
/// step with real readiness: `SERVING` while the engine thread answers and the database
/// holds the run, `NOT_SERVING` otherwise (before the first check, if the engine stops
/// answering, or the database fails). Never returns.
async fn readiness(coordinator: Coordinator, health: tonic_health::server::HealthReporter) {
    use fedflow_proto::v1::admin_server::AdminServer;
    use fedflow_proto::v1::federation_server::FederationServer;
    use tonic_health::ServingStatus;
    let mut last = None;
    loop {
        let ready = tokio::time::timeout(
            READINESS_EVERY * 5,
            coordinator.inspect(|e, _| e.store().run(e.run_id()).map(|r| r.is_some())),
        )
        .await
        .is_ok_and(|r| r.unwrap_or(false));
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            health
                .set_service_status(
                    <FederationServer<Coordinator> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
            health
                .set_service_status(
                    <AdminServer<Coordinator> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
            if !ready {
                tracing::warn!("not ready: the round engine or its database does not answer");
            }
            last = Some(ready);
        }
        tokio::time::sleep(READINESS_EVERY).await;
    }
}

#[cfg(test)]
mod tests;
