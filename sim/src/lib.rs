//! `fedflow-sim`: a whole federation in one process, and the README's one-command demo.
//!
//! [`run_federation`] starts a real coordinator (SQLite store and checkpoints in a data
//! directory, the gRPC server on `127.0.0.1:0`) and one real partner-site client per site as
//! tokio tasks, talking real gRPC over loopback: the same code paths as separate processes,
//! minus process boundaries. Sites share the machine, so local training takes turns through
//! a small pool of work permits (see [`SimOptions::concurrent_work`]); heartbeats keep
//! waiting sites in their round.
//!
//! [`demo`] builds the README's first command on it: generated partner data, a federated
//! run, and a comparison with the centralised baseline and with each site training alone.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use fedflow_client::federation::{SiteOptions, SiteSummary, run_site};
use fedflow_client::privacy::SitePrivacy;
use fedflow_client::site::SiteTrainer;
use fedflow_client::site::source::SiteSource;
use fedflow_common::data::{SiteDataset, Vocab};
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::params::ParamSet;
use fedflow_coordinator::config::RunConfig;
use fedflow_coordinator::round::{Phase, RoundEngine, RunView};
use fedflow_coordinator::security::Transport;
use fedflow_coordinator::service::RunAction;
use fedflow_coordinator::service::{Coordinator, serve};
use fedflow_coordinator::store::{Publication, RoundRecord, Store};

pub mod compression_study;
pub mod demo;
pub mod live;
pub mod privacy_audit;
pub mod privacy_curve;
pub mod site_curve;
pub mod swarm;

/// Errors of a simulation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the shared core (data, model, training).
    #[error(transparent)]
    Common(#[from] fedflow_common::Error),
    /// From the coordinator (config, store, engine).
    #[error(transparent)]
    Coordinator(#[from] fedflow_coordinator::Error),
    /// From a site's client.
    #[error("site {site}: {source}")]
    Site {
        /// The site.
        site: String,
        /// What went wrong.
        source: fedflow_client::Error,
    },
    /// Anything else (sockets, tasks), with context.
    #[error("{0}")]
    Other(String),
}

/// Result alias for `fedflow-sim`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One simulated partner site: its name and its (already split) data.
#[derive(Debug, Clone)]
pub struct SimSite {
    /// The site id it enrols with.
    pub name: String,
    /// Its local data.
    pub dataset: SiteDataset,
    /// Its record-level privacy settings and ledger (needed for runs with `[record_dp]`).
    pub privacy: Option<Arc<SitePrivacy>>,
    /// Where its data comes from between tasks, when it changes during the run (`dataset`
    /// is what the source holds at the start).
    pub source: Option<Arc<dyn SiteSource>>,
    /// Where it installs each version the federation publishes (a site agent's folder).
    pub published: Option<fedflow_client::published::PublishedSink>,
}

/// How a simulation runs.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// How many sites may train or evaluate at the same time (the rest wait their turn,
    /// heartbeating). One per couple of cores is right for CPU training.
    pub concurrent_work: usize,
    /// How often the progress callback is called.
    pub progress_every: Duration,
    /// Run over mutual TLS with the federation PKI in this folder (created on first use:
    /// a CA, the coordinator's certificate for 127.0.0.1 and one certificate per site, each
    /// site then known by its certificate); `None` serves plaintext on loopback.
    pub pki_dir: Option<std::path::PathBuf>,
    /// When notified, the run is stopped as an operator stops it (how a continuous run
    /// ends in a simulation); the sites then end.
    pub stop: Option<Arc<tokio::sync::Notify>>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            concurrent_work: 1,
            progress_every: Duration::from_millis(500),
            pki_dir: None,
            stop: None,
        }
    }
}

/// What a simulated run produced.
#[derive(Debug, Clone)]
pub struct SimOutcome {
    /// Where the coordinator listened.
    pub addr: SocketAddr,
    /// The final global model.
    pub global: ParamSet,
    /// Its SHA-256.
    pub global_sha256: String,
    /// Last committed round.
    pub committed_round: u64,
    /// What each site did, by site.
    pub sites: Vec<(String, SiteSummary)>,
    /// The run's rounds as the coordinator recorded them (metrics, evaluations, hashes).
    pub rounds: Vec<RoundRecord>,
    /// Wall-clock seconds of the federated run.
    pub seconds: f64,
    /// The run's privacy-audit report (HTML; the JSON is next to it).
    pub privacy_audit: std::path::PathBuf,
    /// Its one-line summary.
    pub privacy_summary: String,
    /// The run report (HTML with charts), next to the privacy-audit report.
    pub run_report: std::path::PathBuf,
    /// The run's publications in order, each with its model's checkpoint file.
    pub publications: Vec<(Publication, std::path::PathBuf)>,
}

/// The run's initial global model: the architecture of `cfg`, initialised from its seed.
pub fn initial_model(cfg: &RunConfig) -> Result<ParamSet> {
    let model = AttentionFlowModel::new(&cfg.model_config()?, &Device::Cpu, cfg.run.seed)?;
    Ok(ParamSet::from_varmap(model.varmap())?)
}

/// The bundle directory of `site` in a simulation's PKI.
fn site_bundle(pki: &Path, site: &str) -> std::path::PathBuf {
    pki.join("sites").join(site)
}

/// Creates (or reuses) a simulation's PKI in `dir`: the CA, the coordinator's bundle for
/// 127.0.0.1 and a bundle per site. Returns the coordinator's bundle.
fn federation_pki(dir: &Path, sites: &[String]) -> Result<std::path::PathBuf> {
    use fedflow_coordinator::security::Role;
    use fedflow_coordinator::security::pki::{BUNDLE_KEY, CA_KEY, Ca, Validity};
    let ca = if dir.join(CA_KEY).is_file() {
        Ca::load(dir)?
    } else {
        Ca::init(dir, Validity::days(30))?
    };
    let server = dir.join("coordinator");
    if !server.join(BUNDLE_KEY).is_file() {
        ca.issue_server(&["127.0.0.1".to_string()], Validity::days(30), &server)?;
    }
    for site in sites {
        let out = site_bundle(dir, site);
        if !out.join(BUNDLE_KEY).is_file() {
            ca.issue(Role::Site, site, Validity::days(30), &out)?;
        }
    }
    Ok(server)
}

/// Runs the federation described by `cfg` to its end: a coordinator with its store in
/// `data_dir` serving on `127.0.0.1:0`, and one client task per site. `on_progress` sees the
/// run's live view every [`SimOptions::progress_every`].
///
/// Fails if a site's client fails (a refused update is not a failure: it is in the site's
/// summary) or the run pauses (quorum failures), with the reason.
pub async fn run_federation(
    cfg: RunConfig,
    data_dir: &Path,
    sites: Vec<SimSite>,
    vocab: &Vocab,
    opts: &SimOptions,
    mut on_progress: impl FnMut(&RunView) + Send,
) -> Result<SimOutcome> {
    let started = Instant::now();
    let run_name = cfg.run.name.clone();
    let store = Store::open(data_dir)?;
    let engine = RoundEngine::open(store, cfg.clone(), initial_model(&cfg)?)?;
    let site_names: Vec<String> = sites.iter().map(|s| s.name.clone()).collect();
    let (transport, scheme) = match &opts.pki_dir {
        Some(dir) => (
            Transport::MutualTls(federation_pki(dir, &site_names)?),
            "https",
        ),
        None => (Transport::InsecurePlaintext, "http"),
    };
    let coordinator = Coordinator::spawn(engine, cfg, &transport)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::Other(format!("cannot listen on 127.0.0.1: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Other(e.to_string()))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, coordinator.clone(), async {
        let _ = stopped.await;
    }));

    let permits = Arc::new(tokio::sync::Semaphore::new(opts.concurrent_work.max(1)));
    let mut clients = tokio::task::JoinSet::new();
    for site in sites {
        let mut trainer = SiteTrainer::new(site.dataset, vocab, Device::Cpu);
        if let Some(p) = site.privacy {
            trainer = trainer.with_privacy(p);
        }
        if let Some(source) = site.source {
            trainer = trainer.with_source(source);
        }
        let trainer = Arc::new(trainer);
        let mut o = SiteOptions::new(format!("{scheme}://{addr}"), site.name.clone());
        if let Some(dir) = &opts.pki_dir {
            let bundle = fedflow_client::tls::Bundle::load(&site_bundle(dir, &site.name)).map_err(
                |source| Error::Site {
                    site: site.name.clone(),
                    source: source.into(),
                },
            )?;
            o.tls = Some(bundle);
        }
        o.work_permits = Some(permits.clone());
        o.poll_wait = Duration::from_secs(2);
        o.published = site.published;
        let name = site.name;
        clients.spawn(async move { (name, run_site(o, trainer).await) });
    }

    let mut summaries = Vec::new();
    let mut tick = tokio::time::interval(opts.progress_every);
    let stop_asked = async {
        match &opts.stop {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop_asked);
    let mut stopping = false;
    let failure = loop {
        tokio::select! {
            biased;
            () = &mut stop_asked, if !stopping => {
                stopping = true;
                coordinator.operate(RunAction::Stop, "the simulation is over").await?;
            }
            joined = clients.join_next() => match joined {
                None => break None,
                Some(Ok((name, Ok(summary)))) => summaries.push((name, summary)),
                Some(Ok((site, Err(source)))) => break Some(Error::Site { site, source }),
                Some(Err(e)) => break Some(Error::Other(format!("a site task failed: {e}"))),
            },
            _ = tick.tick() => {
                let view = coordinator.view().await?;
                on_progress(&view);
                if view.phase == Phase::Paused && !stopping {
                    let reason = coordinator
                        .inspect(|e, _| Ok(e.store().run(e.run_id()).ok().flatten().and_then(|r| r.status_reason)))
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    break Some(Error::Other(format!("the run paused: {reason}")));
                }
            }
        }
    };
    clients.abort_all();
    let snapshot = coordinator.snapshot().await;
    let view = coordinator.view().await;
    let rounds = coordinator
        .inspect(|e, _| e.store().rounds(e.run_id()))
        .await;
    let publications = coordinator
        .inspect(|e, _| {
            let store = e.store();
            Ok(store
                .publications(e.run_id())?
                .into_iter()
                .map(|p| {
                    let path = store.model_checkpoint_path(e.run_id(), p.round);
                    (p, path)
                })
                .collect::<Vec<_>>())
        })
        .await;
    // The run's privacy-audit report, where `fedflow-coordinator privacy-report` puts it.
    let audit_dir = data_dir.join("reports").join(&run_name);
    let dir = audit_dir.clone();
    let audit = coordinator
        .inspect(move |e, _| {
            let audit = fedflow_coordinator::audit::write(e.store(), Some(e.run_id()), &dir, &[])?;
            fedflow_coordinator::run_report::write(e.store(), e.run_id(), &dir)?;
            Ok(audit.summary)
        })
        .await;
    let _ = stop.send(());
    let _ = server.await;
    if let Some(e) = failure {
        return Err(e);
    }
    let snapshot = snapshot?;
    let rounds = rounds?;
    let publications = publications?;
    let privacy_summary = audit?;
    if let Ok(v) = view {
        on_progress(&v);
    }
    summaries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(SimOutcome {
        addr,
        global: snapshot.global,
        global_sha256: snapshot.global_sha256,
        committed_round: snapshot.committed_round,
        sites: summaries,
        rounds,
        seconds: started.elapsed().as_secs_f64(),
        privacy_audit: audit_dir.join(fedflow_coordinator::audit::HTML_FILE),
        run_report: audit_dir.join(fedflow_coordinator::run_report::REPORT_FILE),
        privacy_summary,
        publications,
    })
}
