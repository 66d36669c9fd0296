//! Starting the agent: the feedback store, the published version followed into the served
//! model, and the HTTP API (the site's local half, [`serve`]), then the trainer over the
//! store and the federation loop ([`start`]), all in one process. A simulation that runs
//! many sites in one process uses the local half and runs the federation loop itself over
//! the same store source ([`StoreSource`]) and published folder ([`LocalAgent::sink`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedflow_common::clock::now_ms;
use fedflow_common::data::{SiteDataset, Vocab};

use super::config::AgentConfig;
use super::http::{AgentState, router};
use super::serving::Served;
use super::source::StoreSource;
use super::store::FeedbackStore;
use crate::federation::{SettingNames, SiteOptions, SiteSummary, run_site};
use crate::privacy::SitePrivacy;
use crate::published::PublishedSink;
use crate::site::SiteTrainer;
use crate::{Error, Result};

/// The store's folder inside `site.data_dir`.
pub const FEEDBACK_DIR: &str = "feedback";
/// The published folder inside `site.data_dir`.
pub const PUBLISHED_DIR: &str = "published";
/// The trainer's working state inside `site.data_dir` (error feedback's residual).
pub const STATE_DIR: &str = "state";

/// How often the agent looks for a newly installed version (and applies retention).
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// Retention is applied every this many follow ticks.
const RETENTION_EVERY_TICKS: u64 = 120;

/// The site's local half: the store, the served model following the published folder, and
/// the HTTP API.
#[derive(Debug)]
pub struct LocalAgent {
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Whether it serves HTTPS.
    pub https: bool,
    /// What the API serves from.
    pub state: Arc<AgentState>,
    /// Where published versions are installed (the federation loop's sink).
    pub sink: PublishedSink,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    follower: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl LocalAgent {
    /// The site's trainer over the store as `cfg` sets it up (device, privacy ledger, its
    /// working state in `site.data_dir`).
    fn trainer(&self, cfg: &AgentConfig) -> Result<SiteTrainer> {
        let (dataset, source) = StoreSource::open(
            self.state.store.clone(),
            &self.state.vocab,
            cfg.training.val_fraction,
        )?;
        let mut trainer = SiteTrainer::new(dataset, &self.state.vocab, cfg.training.device.open()?)
            .with_source(source)
            .with_state_dir(&cfg.site.data_dir.join(STATE_DIR))?;
        if let Some(p) = &cfg.privacy {
            trainer = trainer.with_privacy(Arc::new(SitePrivacy::open(
                &p.dir,
                p.max_epsilon,
                p.delta,
                p.release_metrics,
            )?));
        }
        Ok(trainer)
    }

    /// Stops serving and following.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.http.await;
        let _ = self.follower.await;
    }
}

/// A running agent: the local half and the federation loop.
#[derive(Debug)]
pub struct RunningAgent {
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Whether it serves HTTPS.
    pub https: bool,
    /// What the API serves from.
    pub state: Arc<AgentState>,
    /// The site's federation loop; ends when the run finishes.
    pub federation: tokio::task::JoinHandle<Result<SiteSummary>>,
    stop_federation: tokio::sync::watch::Sender<bool>,
    local: LocalAgent,
}

impl RunningAgent {
    /// Stops serving and following; the federation loop is aborted.
    pub async fn shutdown(self) {
        self.federation.abort();
        self.local.shutdown().await;
    }

    /// Stops gracefully: the federation loop takes no new task and leaves, a task in
    /// progress has `grace` to finish (then it is abandoned); then serving stops. Returns
    /// whether the loop left within the grace period.
    pub async fn stop(mut self, grace: Duration) -> bool {
        let _ = self.stop_federation.send(true);
        let left = if self.federation.is_finished() {
            true
        } else {
            match tokio::time::timeout(grace, &mut self.federation).await {
                Ok(_) => true,
                Err(_) => {
                    self.federation.abort();
                    false
                }
            }
        };
        self.local.shutdown().await;
        left
    }
}

/// The site's connection options from `[coordinator]` and `site.id`.
pub fn site_options(cfg: &AgentConfig) -> Result<SiteOptions> {
    let c = &cfg.coordinator;
    SiteOptions::for_coordinator(
        &c.url,
        c.identity.as_deref(),
        c.insecure_plaintext,
        cfg.site.id.as_deref(),
        SettingNames {
            site_id: "site.id",
            identity: "coordinator.identity",
        },
    )
}

/// Starts the agent of `cfg`, its API on `listen` (else `http.listen`).
pub async fn start(cfg: &AgentConfig, listen: Option<SocketAddr>) -> Result<RunningAgent> {
    let mut opts = site_options(cfg)?;
    let local = serve(cfg, listen).await?;
    let trainer = local.trainer(cfg)?;
    opts.published = Some(local.sink.clone());
    let (stop_federation, stop) = tokio::sync::watch::channel(false);
    opts.stop = Some(stop);
    let federation = tokio::spawn(run_site(opts, Arc::new(trainer)));
    Ok(RunningAgent {
        http_addr: local.http_addr,
        https: local.https,
        state: local.state.clone(),
        federation,
        stop_federation,
        local,
    })
}

/// Starts the local half of the agent of `cfg`: opens the store (applying retention), serves
/// the installed version and follows the published folder, and serves the API on `listen`
/// (else `http.listen`).
pub async fn serve(cfg: &AgentConfig, listen: Option<SocketAddr>) -> Result<LocalAgent> {
    let tls = match (&cfg.http.tls_cert, &cfg.http.tls_key) {
        (Some(cert), Some(key)) => Some(super::https::server_config(
            cert,
            key,
            cfg.http.tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    let vocab = Vocab::load(&cfg.site.vocab)?;
    let limits = cfg.api_limits()?;
    let store = Arc::new(FeedbackStore::open(cfg.site.data_dir.join(FEEDBACK_DIR))?);
    let retention = (
        cfg.retention
            .max_age_days
            .map(|d| (d * 86_400_000.0).round() as i64),
        cfg.retention.max_sessions,
    );
    store.enforce_retention(retention.0, retention.1, now_ms())?;
    let sink = PublishedSink {
        dir: cfg.site.data_dir.join(PUBLISHED_DIR),
        vocab: vocab.clone(),
    };
    let served = Arc::new(Served::default());
    // Serve the version installed last at once, coordinator or not.
    if let Some(round) = served.follow(&sink)? {
        tracing::info!(round, "serving the installed version {round}");
    }
    let state = Arc::new(AgentState::new(
        store.clone(),
        served.clone(),
        vocab,
        limits,
    ));

    let listener = tokio::net::TcpListener::bind(listen.unwrap_or(cfg.http.listen))
        .await
        .map_err(|e| Error::Usage(format!("http.listen: cannot listen: {e}")))?;
    let http_addr = listener
        .local_addr()
        .map_err(|e| Error::Usage(e.to_string()))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut http_stop = stopped.clone();
    let app = router(state.clone());
    let https = tls.is_some();
    let http = match tls {
        Some(tls) => tokio::spawn(super::https::serve(listener, tls, app, http_stop)),
        None => tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = http_stop.wait_for(|s| *s).await;
                })
                .await
        }),
    };
    let mut follow_stop = stopped;
    let personalisation = cfg.personalisation.clone();
    let val_fraction = cfg.training.val_fraction;
    let site_vocab = state.vocab.clone();
    // The published version's hash the follower last tried to personalise.
    let mut personalised_from: Option<String> = None;
    let follower_sink = sink.clone();
    let follower = tokio::spawn(async move {
        let sink = follower_sink;
        let mut tick = tokio::time::interval(FOLLOW_EVERY);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = follow_stop.wait_for(|s| *s) => return,
                _ = tick.tick() => {}
            }
            ticks += 1;
            let (served, sink, store) = (served.clone(), sink.clone(), store.clone());
            let prune = ticks.is_multiple_of(RETENTION_EVERY_TICKS);
            // Personalise each published version once (at start, the one installed then);
            // a pinned version is served as it is, and when the pin goes, tried again.
            if served.current().is_some_and(|m| m.pinned) {
                personalised_from = None;
            }
            let personalise = personalisation.clone().filter(|_| {
                served.current().is_some_and(|m| {
                    !m.pinned && personalised_from.as_deref() != Some(&m.model_sha256)
                })
            });
            if personalise.is_some() {
                personalised_from = served.current().map(|m| m.model_sha256.clone());
            }
            let vocab = site_vocab.clone();
            let done = tokio::task::spawn_blocking(move || -> Result<Option<u64>> {
                if prune {
                    store.enforce_retention(retention.0, retention.1, now_ms())?;
                }
                let swapped = served.follow(&sink)?;
                if swapped.is_none()
                    && let Some(p) = personalise
                {
                    let snap = store.snapshot()?;
                    let data = SiteDataset::from_records(&snap.records, &vocab, val_fraction)?;
                    if let Some(r) = served.personalise(&data, &p)? {
                        tracing::info!(
                            chosen = r.chosen,
                            "personalisation: {}",
                            r.reason.as_deref().unwrap_or("the fine-tuned model serves")
                        );
                    }
                }
                Ok(swapped)
            })
            .await;
            match done {
                Ok(Ok(Some(round))) => tracing::info!(round, "now serving version {round}"),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!("following (or personalising) the published version: {e}")
                }
                Err(e) => tracing::error!("the follower's work failed: {e}"),
            }
        }
    });
    Ok(LocalAgent {
        http_addr,
        https,
        state,
        sink,
        http,
        follower,
        stop,
    })
}
