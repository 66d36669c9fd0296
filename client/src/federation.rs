//! The federation client: a partner site's loop against the coordinator.
//!
//! Enrol → long-poll for a task → download the global model in chunks (verified) → train
//! locally ([`SiteTrainer`](crate::site::SiteTrainer), on a blocking thread, with heartbeats carrying the epoch
//! meanwhile, unless [`SiteWork::reports_progress`] says no) → upload the delta in chunks → repeat until the coordinator says the run is
//! finished. Evaluation tasks download the model, evaluate it on the validation split and
//! report the metrics. A heartbeat answered with `cancel_task` abandons the task. When the
//! coordinator is unreachable the site waits with exponential backoff and jitter and carries
//! on without operator action; when it refuses a call for coming too fast the site waits
//! what it asks and makes the call again (the pushback of [`fedflow_proto::pushback`]). Messages are built and read,
//! and the coordinator's statuses mapped to errors, in [`crate::wire`].

use std::sync::Arc;
use std::time::Duration;

use fedflow_proto::transfer::{Assembler, MAX_MESSAGE_BYTES, update_chunks};
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_proto::v1::{SiteState, Task, TaskKind, next_task_response};
use rand::Rng;
use tonic::transport::Channel;

use crate::pacing::paced;
use crate::wire::{self, Limits, is_transient, refusal_reason, status_error};
pub use crate::work::{ModelBuffer, SiteWork, Update};
use crate::{Error, Result};

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
    /// When set, the federation's published version is downloaded and installed here
    /// whenever it changes ([`crate::published`]).
    pub published: Option<crate::published::PublishedSink>,
    /// When this turns true the site takes no new task and leaves: at once while it waits
    /// for a task or for the coordinator, after the task in progress otherwise (its caller
    /// bounds that wait). SIGTERM sets it in the binaries.
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
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
            published: None,
            stop: None,
        }
    }

    /// Options for joining the coordinator at `endpoint`: the certificate bundle in
    /// `identity` (checked against the endpoint's scheme, with `insecure_plaintext` for an
    /// `http://` one) and the site id, the certificate's under mutual TLS (a `site_id`
    /// given too must be the same). `names` are how the caller's settings are called in
    /// error messages (command-line flags, or configuration fields).
    pub fn for_coordinator(
        endpoint: &str,
        identity: Option<&std::path::Path>,
        insecure_plaintext: bool,
        site_id: Option<&str>,
        names: SettingNames,
    ) -> Result<SiteOptions> {
        let bundle = identity.map(crate::tls::Bundle::load).transpose()?;
        crate::tls::check_endpoint(endpoint, bundle.as_ref(), insecure_plaintext)?;
        let site_id = match (&bundle, site_id) {
            (Some(b), claimed) => {
                let name = b.site_name()?;
                if let Some(c) = claimed
                    && c != name
                {
                    return Err(Error::Usage(format!(
                        "{} {c} does not match the certificate in {}, which is for site {name}",
                        names.site_id,
                        b.dir().display()
                    )));
                }
                name
            }
            (None, Some(id)) => id.to_string(),
            (None, None) => {
                return Err(Error::Usage(format!(
                    "{} is required without {}",
                    names.site_id, names.identity
                )));
            }
        };
        let mut o = SiteOptions::new(endpoint, site_id);
        o.tls = bundle;
        Ok(o)
    }
}

/// How a caller names the site id and identity settings, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct SettingNames {
    /// E.g. `--site-id` or `site.id`.
    pub site_id: &'static str,
    /// E.g. `--identity` or `coordinator.identity`.
    pub identity: &'static str,
}

/// What a site did over a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SiteSummary {
    /// Rounds this site trained and uploaded for.
    pub rounds_contributed: Vec<u64>,
    /// Rounds whose global model this site evaluated.
    pub rounds_evaluated: Vec<u64>,
    /// Published versions this site installed, in order.
    pub published: Vec<u64>,
    /// Tasks this site declined (it could not do them), with the reason it gave.
    pub declined: Vec<(u64, String)>,
    /// Uploads the coordinator refused, with its reason.
    pub rejected: Vec<(u64, String)>,
    /// Reconnections after the coordinator was unreachable.
    pub reconnects: u32,
    /// The site left because it was asked to ([`SiteOptions::stop`]), before the run
    /// finished.
    pub stopped: bool,
}

/// Resolves when `stop` turns true; never without one.
async fn stop_asked(stop: &Option<tokio::sync::watch::Receiver<bool>>) {
    match stop {
        Some(rx) => {
            let mut rx = rx.clone();
            if rx.wait_for(|s| *s).await.is_err() {
                // The sender is gone: nobody can ask any more.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

fn stop_is_asked(stop: &Option<tokio::sync::watch::Receiver<bool>>) -> bool {
    stop.as_ref().is_some_and(|rx| *rx.borrow())
}

/// Connects, retrying with backoff while the coordinator is unreachable; a certificate
/// problem (ours refused, or the coordinator's not from the federation CA) is final.
/// `None` when the site was asked to stop meanwhile.
async fn connect(
    opts: &SiteOptions,
    summary: &mut SiteSummary,
) -> Result<Option<FederationClient<Channel>>> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match crate::tls::connect(&opts.endpoint, opts.tls.as_ref()).await {
            Ok(channel) => {
                return Ok(Some(
                    FederationClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                ));
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
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop_asked(&opts.stop) => return Ok(None),
                }
                backoff = (backoff * 2).min(opts.max_backoff);
                summary.reconnects += 1;
            }
        }
    }
}

async fn download(
    client: &mut FederationClient<Channel>,
    request: fedflow_proto::v1::DownloadModelRequest,
    sink: ModelBuffer,
) -> Result<ModelBuffer, tonic::Status> {
    let sha = request.sha256.clone();
    let sha = sha.as_str();
    let mut stream = client.download_model(request).await?.into_inner();
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

/// Runs one site until the run finishes or `signal` resolves (SIGTERM, Ctrl-C); then it
/// takes no new task and leaves ([`SiteOptions::stop`]), waiting at most `grace` for a task
/// in progress, which is abandoned after it (the coordinator's deadline and heartbeat
/// timeout then treat the site as gone; under record-level DP a recorded release is re-sent
/// when the site comes back).
pub async fn run_site_until<W: SiteWork + 'static>(
    mut opts: SiteOptions,
    trainer: Arc<W>,
    signal: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> Result<SiteSummary> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    opts.stop = Some(stopped);
    let site_id = opts.site_id.clone();
    let mut site = tokio::spawn(run_site(opts, trainer));
    let joined = |done: std::result::Result<Result<SiteSummary>, tokio::task::JoinError>| {
        done.map_err(|e| Error::Task(format!("the site's loop failed: {e}")))?
    };
    tokio::select! {
        done = &mut site => return joined(done),
        () = signal => {}
    }
    tracing::info!(site = %site_id, "stopping: no new tasks; a task in progress has {grace:?} to finish");
    let _ = stop.send(true);
    match tokio::time::timeout(grace, &mut site).await {
        Ok(done) => joined(done),
        Err(_) => {
            site.abort();
            tracing::warn!(site = %site_id, "abandoned the task in progress after {grace:?}");
            Ok(SiteSummary {
                stopped: true,
                ..SiteSummary::default()
            })
        }
    }
}

/// Runs one site until the coordinator reports the run finished.
pub async fn run_site<W: SiteWork>(opts: SiteOptions, trainer: Arc<W>) -> Result<SiteSummary> {
    let mut summary = SiteSummary::default();
    macro_rules! connected {
        ($c:expr) => {
            match $c {
                Some(c) => c,
                None => {
                    summary.stopped = true;
                    return Ok(summary);
                }
            }
        };
    }
    let mut client = connected!(connect(&opts, &mut summary).await?);
    let mut enrolled = false;
    let mut limits = Limits::default();
    loop {
        if stop_is_asked(&opts.stop) {
            summary.stopped = true;
            return Ok(summary);
        }
        if !enrolled {
            let request = wire::enrol_request(&opts.site_id, trainer.vocab_sha256());
            let reply = tokio::select! {
                reply = paced(&opts.site_id, "enrolling", || {
                    let (mut c, r) = (client.clone(), request.clone());
                    async move { c.enrol(r).await }
                }) => reply,
                () = stop_asked(&opts.stop) => {
                    summary.stopped = true;
                    return Ok(summary);
                }
            };
            match reply {
                Ok(r) => {
                    limits = Limits::from(r.get_ref());
                    enrolled = true;
                }
                Err(s) if is_transient(&s) => {
                    client = connected!(connect(&opts, &mut summary).await?);
                    continue;
                }
                Err(s) => return Err(status_error(&s)),
            }
        }
        let request = wire::next_task_request(&opts.site_id, opts.poll_wait);
        let reply = tokio::select! {
            reply = paced(&opts.site_id, "polling for a task", || {
                let (mut c, r) = (client.clone(), request.clone());
                async move { c.next_task(r).await }
            }) => reply,
            () = stop_asked(&opts.stop) => {
                summary.stopped = true;
                return Ok(summary);
            }
        };
        let outcome = match reply {
            Ok(r) => {
                let r = r.into_inner();
                if let (Some(sink), Some(p)) = (&opts.published, &r.published) {
                    match follow_published(&mut client, &opts.site_id, sink, p).await {
                        Ok(Some(c)) => summary.published.push(c.round),
                        Ok(None) => {}
                        // The site keeps serving what it has; the next poll tries again.
                        Err(e) => tracing::warn!(site = %opts.site_id, round = p.round,
                            "cannot install the published version: {e}"),
                    }
                }
                r.outcome
            }
            Err(s) if is_transient(&s) => {
                enrolled = false;
                client = connected!(connect(&opts, &mut summary).await?);
                continue;
            }
            Err(s) => return Err(status_error(&s)),
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
            Err(TaskError::Transport(s)) if is_transient(&s) => {
                enrolled = false;
                client = connected!(connect(&opts, &mut summary).await?);
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
                let request = wire::decline_request(&opts.site_id, &task, e.to_string());
                let declined = paced(&opts.site_id, "declining the task", || {
                    let (mut c, r) = (client.clone(), request.clone());
                    async move { c.decline_task(r).await }
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

/// Downloads and installs the published version `p` when it is not the one installed;
/// returns what was installed.
async fn follow_published(
    client: &mut FederationClient<Channel>,
    site_id: &str,
    sink: &crate::published::PublishedSink,
    p: &fedflow_proto::v1::PublishedModel,
) -> Result<Option<crate::published::Current>> {
    let model = p
        .model
        .as_ref()
        .ok_or_else(|| Error::Task("the published version names no model".into()))?;
    if sink
        .current()?
        .is_some_and(|c| c.model_sha256 == model.sha256)
    {
        return Ok(None);
    }
    if !fedflow_common::text::is_sha256_hex(&model.sha256) {
        return Err(Error::Task(format!(
            "the published version's sha256 {:?} is not a SHA-256",
            fedflow_common::text::shorten(&model.sha256, 80)
        )));
    }
    let config: fedflow_common::model::ModelConfig = serde_json::from_str(&model.model_config_json)
        .map_err(|e| Error::Task(format!("the published version's model config: {e}")))?;
    tracing::info!(site = %site_id, round = p.round, "downloading the published version {}", p.round);
    let request = fedflow_proto::v1::DownloadModelRequest {
        site_id: site_id.to_string(),
        sha256: model.sha256.clone(),
        round: p.round,
        ..Default::default()
    };
    let bytes = paced(site_id, "downloading the published version", || {
        let (mut c, r) = (client.clone(), request.clone());
        async move { download(&mut c, r, ModelBuffer::Whole(Vec::new())).await }
    })
    .await
    .map_err(|s| status_error(&s))?;
    let installed = sink.install(
        p.round,
        &model.sha256,
        p.published_at_unix_ms,
        &config,
        &model.vocab_sha256,
        bytes.bytes(),
    )?;
    tracing::info!(site = %site_id, round = p.round, "now serving the published version {}", p.round);
    Ok(Some(installed))
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
        .heartbeat(wire::heartbeat_request(
            &opts.site_id,
            task,
            p.state,
            (p.epoch, p.epochs),
            p.bytes_done,
        ))
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
    let spec = wire::task_spec(task).map_err(TaskError::Local)?;
    let round = task.round;
    let evaluate = task.kind == TaskKind::Evaluate as i32;
    tracing::info!(site = %opts.site_id, round, "round {round}: downloading the global model");
    let request = wire::download_request(&opts.site_id, task, &spec.expected_model_sha256);
    let global = paced(&opts.site_id, "downloading the global model", || {
        let (mut c, r, sink) = (client.clone(), request.clone(), trainer.model_buffer());
        async move { download(&mut c, r, sink).await }
    })
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
        let report = wire::evaluation_report(&opts.site_id, task, &spec, &m);
        let reported = paced(&opts.site_id, "reporting the evaluation", || {
            let (mut c, r) = (client.clone(), report.clone());
            async move { c.report_evaluation(r).await }
        })
        .await;
        return match reported {
            Ok(_) => {
                tracing::info!(
                    site = %opts.site_id,
                    round,
                    "round {round}: evaluation reported (accuracy {:.4})",
                    m.validation_accuracy.unwrap_or(f64::NAN)
                );
                Ok(())
            }
            Err(s) if is_transient(&s) => Err(TaskError::Transport(s)),
            Err(s) => Err(TaskError::Refused(refusal_reason(&s))),
        };
    }

    let t = trainer.clone();
    let spec2 = spec.clone();
    let p = progress.clone();
    let site = opts.site_id.clone();
    let epochs = spec.train.epochs;
    // The epoch reached stays at the site when it says so (record-level DP, withheld metrics):
    // heartbeats then say only that it is training.
    let report_progress = trainer.reports_progress(&spec);
    let outcome = with_heartbeats(client, opts, task, limits.heartbeat, &progress, move || {
        t.train(&spec2, global, &mut |e| {
            if report_progress {
                p.lock().expect("progress lock").epoch = e.epoch as u32;
            }
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
    let header = wire::update_header(&opts.site_id, task, &spec, &outcome);
    tracing::info!(site = %opts.site_id, round, "round {round}: uploading {} bytes", outcome.bytes.len());
    let msgs = update_chunks(header, &outcome.bytes, limits.chunk_bytes);
    let uploaded = paced(&opts.site_id, "uploading the update", || {
        let (mut c, m) = (client.clone(), msgs.clone());
        async move { c.upload_update(tokio_stream::iter(m)).await }
    })
    .await;
    match uploaded {
        Ok(_) => {
            tracing::info!(site = %opts.site_id, round, "round {round}: update accepted");
            trainer.delivered(&spec);
            trainer.accepted(&spec);
            Ok(())
        }
        Err(s) if is_transient(&s) => Err(TaskError::Transport(s)),
        Err(s) => {
            // The coordinator has seen the bytes even though it refused them.
            trainer.delivered(&spec);
            Err(TaskError::Refused(refusal_reason(&s)))
        }
    }
}
