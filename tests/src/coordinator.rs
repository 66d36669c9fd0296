//! A real coordinator (store, round engine, gRPC server) serving on 127.0.0.1:0 from a
//! temporary directory, built from a run's TOML.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use fedflow_common::data::Vocab;
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::params::ParamSet;
use fedflow_coordinator::config::RunConfig;
use fedflow_coordinator::round::RoundEngine;
use fedflow_coordinator::security::Transport;
use fedflow_coordinator::service::{Coordinator, serve, serve_metrics};
use fedflow_coordinator::store::Store;
use tonic::transport::Channel;

/// The seed of the initial model every test coordinator starts from (tests that compare
/// against the initial model rebuild it from [`TestCoordinator::initial`]).
pub const MODEL_SEED: u64 = 1;

/// The event vocabulary a [`TestCoordinator`] has unless its builder is given another:
/// open, search, click, escalate.
pub fn default_vocab() -> Vocab {
    Vocab::from_events(["open", "search", "click", "escalate"]).expect("a valid vocabulary")
}

/// The SHA-256 of [`default_vocab`], what a site of such a coordinator enrols with.
pub fn default_vocab_sha256() -> String {
    fedflow_common::model::vocab_sha256(&default_vocab())
}

/// How a [`TestCoordinator`] is set up; start from [`TestCoordinator::builder`].
#[derive(Debug)]
pub struct Builder {
    toml: String,
    vocab: Vocab,
    transport: Transport,
    site_dp_seed: Option<u64>,
    metrics: bool,
}

impl Builder {
    /// The event vocabulary, saved as `vocab.json` beside the run (the TOML's
    /// `[model] vocab = "vocab.json"` names it). Default: open, search, click, escalate.
    pub fn vocab(mut self, vocab: &Vocab) -> Self {
        self.vocab = vocab.clone();
        self
    }

    /// Serves under mutual TLS with the coordinator bundle in `bundle` (default: plaintext).
    pub fn mutual_tls(mut self, bundle: PathBuf) -> Self {
        self.transport = Transport::MutualTls(bundle);
        self
    }

    /// Seeds the coordinator's site-level DP randomness, so that two runs given the same
    /// updates commit the same model.
    pub fn site_dp_seed(mut self, seed: u64) -> Self {
        self.site_dp_seed = Some(seed);
        self
    }

    /// Also serves `/metrics` on a port of its own ([`TestCoordinator::metrics_addr`]).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Creates the run in a new temporary directory and starts serving it.
    pub async fn spawn(self) -> TestCoordinator {
        let dir = tempfile::tempdir().expect("a temporary directory");
        self.vocab
            .save(dir.path().join("vocab.json"))
            .expect("write vocab.json");
        let cfg = RunConfig::from_toml_str(&self.toml, dir.path()).expect("the run's TOML");
        let model = AttentionFlowModel::new(
            &cfg.model_config().expect("the run's model"),
            &Device::Cpu,
            MODEL_SEED,
        )
        .expect("the initial model");
        let initial = ParamSet::from_varmap(model.varmap()).expect("the initial parameters");
        let data = dir.path().join("coordinator");
        let store = Store::open(&data).expect("open the store");
        let mut engine =
            RoundEngine::open(store, cfg.clone(), initial.clone()).expect("open the run");
        if let Some(seed) = self.site_dp_seed {
            engine.seed_site_dp_randomness(seed);
        }
        let handle = Coordinator::spawn(engine, cfg.clone(), &self.transport)
            .expect("start the coordinator");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let shutdown = move || {
            let mut stopped = stopped.clone();
            async move {
                // Resolves when the handle's sender says so or is dropped.
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        let metrics_addr = if self.metrics {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(serve_metrics(listener, handle.clone(), shutdown()));
            Some(addr)
        } else {
            None
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, handle.clone(), shutdown()));
        TestCoordinator {
            vocab_sha256: fedflow_common::model::vocab_sha256(&self.vocab),
            addr,
            metrics_addr,
            data,
            handle,
            cfg,
            initial,
            _stop: stop,
            dir,
        }
    }
}

/// A coordinator serving on 127.0.0.1:0; it stops serving when dropped (its temporary
/// directory goes with it).
pub struct TestCoordinator {
    /// Where the gRPC services listen.
    pub addr: SocketAddr,
    /// Where `/metrics` listens, when the builder asked for it.
    pub metrics_addr: Option<SocketAddr>,
    /// The coordinator's data directory (database, checkpoints, audit log, `incoming/`).
    pub data: PathBuf,
    /// The in-process handle (snapshots, inspection of the engine).
    pub handle: Coordinator,
    /// The run's configuration.
    pub cfg: RunConfig,
    /// The model round 0 committed.
    pub initial: ParamSet,
    /// The SHA-256 of the run's vocabulary, what its sites enrol with.
    pub vocab_sha256: String,
    _stop: tokio::sync::watch::Sender<bool>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCoordinator")
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("data", &self.data)
            .finish_non_exhaustive()
    }
}

impl TestCoordinator {
    /// A coordinator for the run `toml` (`vocab.json` is written beside it); see [`Builder`].
    pub fn builder(toml: impl Into<String>) -> Builder {
        Builder {
            toml: toml.into(),
            vocab: default_vocab(),
            transport: Transport::InsecurePlaintext,
            site_dp_seed: None,
            metrics: false,
        }
    }

    /// The temporary directory the run lives in, free for the test's own files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `http://ADDR`, for plaintext clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every event of the coordinator's security audit log, after checking that the log
    /// verifies (see [`audit_events`]).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        audit_events(&self.data)
    }
}

/// Every event of the security audit log in the coordinator data directory `data`, after
/// checking that its hash chain verifies.
pub fn audit_events(data: &Path) -> Vec<serde_json::Value> {
    use fedflow_coordinator::security::{SECURITY_LOG, audit_log};
    let path = data.join(SECURITY_LOG);
    audit_log::verify(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .expect("the audit log verifies");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("an audit log line is JSON"))
        .collect()
}

/// Polls gRPC health (`grpc.health.v1`, bounded) on `channel` until the coordinator reports
/// the `Federation` service SERVING: the database is open and the run loaded.
pub async fn wait_serving(channel: Channel) {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let mut health = HealthClient::new(channel);
    for _ in 0..200 {
        let s = health
            .check(HealthCheckRequest {
                service: "fedflow.v1.Federation".into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .ok();
        if s == Some(ServingStatus::Serving as i32) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the coordinator never reported SERVING");
}
