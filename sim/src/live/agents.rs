//! The live simulation's sites as site agents ([`fedflow_client::agent`]): each runs in this
//! process with its own folder, feedback store, published folder and HTTP API on loopback,
//! and its federation loop trains on what its store holds when a round starts (the agent's
//! store source, [`StoreSource`]) and installs what is published. The simulation
//! plays every site's application, over HTTP only: it posts each period's sessions with
//! `POST /v1/feedback`, withdraws the sessions that left the site's window with
//! `POST /v1/feedback/delete`, and asks `POST /v1/predict` what the site serves.
//!
//! Periods and rounds are aligned by a gate in front of each agent's store source
//! ([`Gate`]): a training task of round `r` waits until the simulation has released `r`,
//! which it does once it has posted `r`'s period and measured the agents' predictions. A
//! site's first training request for `r` also tells the simulation that round `r - 1` has
//! committed, so the version each agent serves then is the one published after it.
//! Evaluations keep the data of the site's last training task (the gate compares candidate
//! and published version on the same sessions).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fedflow_client::agent::config::AgentConfig;
use fedflow_client::agent::run::{LocalAgent, serve};
use fedflow_client::agent::source::StoreSource;
use fedflow_client::site::source::{SiteSource, TaskStart};
use fedflow_common::data::{SessionRecord, SiteDataset};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::json;

use crate::{Error, Result};

/// Sessions per feedback or predict request (the agents' default limit is 1000).
const REQUEST_SESSIONS: usize = 500;

/// How long an agent may take to serve the version its site installed.
const SWAP_TIMEOUT: Duration = Duration::from_secs(120);

/// The rounds asked for and released, shared by the gates and the simulation.
#[derive(Debug)]
pub(super) struct RoundClock {
    asked: tokio::sync::watch::Sender<u64>,
    released: Mutex<u64>,
    wake: Condvar,
    last_round: u64,
    ended: Arc<tokio::sync::Notify>,
}

impl RoundClock {
    /// A clock for a run of `last_round` rounds; `ended` is notified when a site asks for a
    /// round beyond it.
    pub(super) fn new(last_round: u64, ended: Arc<tokio::sync::Notify>) -> Arc<RoundClock> {
        Arc::new(RoundClock {
            asked: tokio::sync::watch::channel(0).0,
            released: Mutex::new(0),
            wake: Condvar::new(),
            last_round,
            ended,
        })
    }

    /// Lets training tasks up to `round` go on.
    pub(super) fn release(&self, round: u64) {
        *self
            .released
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = round;
        self.wake.notify_all();
    }

    /// Waits until a site asked for a training round of at least `round`.
    pub(super) async fn asked(&self, round: u64) -> Result<()> {
        self.asked
            .subscribe()
            .wait_for(|a| *a >= round)
            .await
            .map(|_| ())
            .map_err(|_| Error::Other("the round clock closed".into()))
    }

    /// Ends the simulation early: the run is stopped and every waiting task goes on (to
    /// fail or finish as the stop decides).
    pub(super) fn abort(&self) {
        self.ended.notify_one();
        self.release(u64::MAX);
    }
}

/// An agent's store source behind the simulation's round clock.
#[derive(Debug)]
pub(super) struct Gate {
    inner: StoreSource,
    clock: Arc<RoundClock>,
}

impl Gate {
    /// `inner` behind `clock`.
    pub(super) fn new(inner: StoreSource, clock: Arc<RoundClock>) -> Gate {
        Gate { inner, clock }
    }
}

impl SiteSource for Gate {
    fn poll(&self, start: TaskStart) -> fedflow_client::Result<Option<SiteDataset>> {
        let TaskStart::Training(round) = start else {
            return Ok(None);
        };
        if round > self.clock.last_round {
            self.clock.ended.notify_one();
            return Err(fedflow_client::Error::Task(format!(
                "the simulation ends after round {}",
                self.clock.last_round
            )));
        }
        self.clock.asked.send_if_modified(|a| {
            let newer = round > *a;
            if newer {
                *a = round;
            }
            newer
        });
        // Training runs on a blocking thread: waiting here holds no executor thread.
        let mut released = self
            .clock
            .released
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *released < round {
            released = self
                .clock
                .wake
                .wait(released)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        drop(released);
        self.inner.poll(start)
    }
}

/// One site's agent.
#[derive(Debug)]
pub(super) struct SiteAgent {
    /// The site's name (its id in the federation).
    pub(super) name: String,
    cfg: AgentConfig,
    local: LocalAgent,
    api: Api,
}

impl SiteAgent {
    /// Starts the local half of `name`'s agent under `dir` (its own folder), with the
    /// federation's vocabulary at `vocab`.
    pub(super) async fn start(name: &str, dir: &Path, vocab: &Path) -> Result<SiteAgent> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Other(format!("cannot create {}: {e}", dir.display())))?;
        // The coordinator section is not used: the simulation runs the site's federation
        // loop with the trainer it gets from the agent.
        let text = format!(
            "[site]\nid = {name:?}\ndata_dir = \"data\"\nvocab = {:?}\n\
             [coordinator]\nurl = \"http://127.0.0.1:9\"\ninsecure_plaintext = true\n\
             [http]\nlisten = \"127.0.0.1:0\"\n",
            vocab.display().to_string()
        );
        let cfg = AgentConfig::parse(&text, dir).map_err(Error::Other)?;
        let local = serve(&cfg, None).await.map_err(|source| Error::Site {
            site: name.to_string(),
            source,
        })?;
        let api = Api {
            addr: local.http_addr,
        };
        Ok(SiteAgent {
            name: name.to_string(),
            cfg,
            local,
            api,
        })
    }

    /// The site's data as its store holds it now, and the store's source behind `clock`
    /// (what the agent's own trainer reads, [`StoreSource`]).
    pub(super) fn source(&self, clock: &Arc<RoundClock>) -> Result<(SiteDataset, Gate)> {
        let (dataset, inner) = StoreSource::open(
            self.local.state.store.clone(),
            &self.local.state.vocab,
            self.cfg.training.val_fraction,
        )
        .map_err(|e| self.err(e))?;
        Ok((dataset, Gate::new(inner, clock.clone())))
    }

    /// Where the site installs published versions.
    pub(super) fn sink(&self) -> fedflow_client::published::PublishedSink {
        self.local.sink.clone()
    }

    fn err(&self, source: fedflow_client::Error) -> Error {
        Error::Site {
            site: self.name.clone(),
            source,
        }
    }

    /// Posts `sessions` as feedback.
    pub(super) async fn post(&self, sessions: &[SessionRecord]) -> Result<()> {
        for chunk in sessions.chunks(REQUEST_SESSIONS) {
            let body = json!({ "sessions": chunk });
            let answer = self.api.call("/v1/feedback", &body).await?;
            if answer["stored"].as_u64().unwrap_or(0) + answer["duplicates"].as_u64().unwrap_or(0)
                != chunk.len() as u64
            {
                return Err(Error::Other(format!(
                    "{}: the agent acknowledged {answer} for {} sessions",
                    self.name,
                    chunk.len()
                )));
            }
        }
        Ok(())
    }

    /// Withdraws the sessions of `sessions`.
    pub(super) async fn withdraw(&self, sessions: &[SessionRecord]) -> Result<()> {
        for chunk in sessions.chunks(REQUEST_SESSIONS) {
            let ids: Vec<&str> = chunk.iter().map(|r| r.session_id.as_str()).collect();
            self.api
                .call("/v1/feedback/delete", &json!({ "session_ids": ids }))
                .await?;
        }
        Ok(())
    }

    /// The version the site installed last, if any.
    pub(super) fn installed(&self) -> Result<Option<fedflow_client::published::Current>> {
        self.local.sink.current().map_err(|e| self.err(e))
    }

    /// Waits until the agent serves `version` (its site installs it at its next poll).
    pub(super) async fn wait_serving(
        &self,
        version: &fedflow_client::published::Current,
    ) -> Result<()> {
        let served = self.local.state.served.clone();
        let mut changes = served.changes();
        let serving = |_: &u64| {
            served
                .current()
                .is_some_and(|m| m.model_sha256 == version.model_sha256)
        };
        tokio::time::timeout(SWAP_TIMEOUT, changes.wait_for(serving))
            .await
            .map_err(|_| {
                Error::Other(format!(
                    "{}: the agent did not serve version {} within {SWAP_TIMEOUT:?}",
                    self.name, version.round
                ))
            })?
            .map_err(|_| Error::Other(format!("{}: the agent stopped", self.name)))?;
        Ok(())
    }

    /// The agent's predicted classes (0-based) of `sessions` (event names), and the round
    /// of the version that answered (the same for all, or an error).
    pub(super) async fn predict(&self, sessions: &[Vec<String>]) -> Result<(u64, Vec<u32>)> {
        let mut classes = Vec::with_capacity(sessions.len());
        let mut round = None;
        for chunk in sessions.chunks(REQUEST_SESSIONS) {
            let body = json!({
                "sessions": chunk.iter().map(|e| json!({ "events": e })).collect::<Vec<_>>()
            });
            let answer = self.api.call("/v1/predict", &body).await?;
            let r = answer["version"]["round"].as_u64();
            if round.is_some() && r != round {
                return Err(Error::Other(format!(
                    "{}: versions {round:?} and {r:?} answered one question",
                    self.name
                )));
            }
            round = r;
            for p in answer["predictions"].as_array().into_iter().flatten() {
                let label = p["label"].as_u64().ok_or_else(|| {
                    Error::Other(format!("{}: a prediction without a label: {p}", self.name))
                })?;
                classes.push(label as u32 - 1);
            }
        }
        if classes.len() != sessions.len() {
            return Err(Error::Other(format!(
                "{}: {} predictions for {} sessions",
                self.name,
                classes.len(),
                sessions.len()
            )));
        }
        Ok((round.unwrap_or(0), classes))
    }

    /// Stops the agent.
    pub(super) async fn shutdown(self) {
        self.local.shutdown().await;
    }
}

/// A client of one agent's HTTP API (a connection per request).
#[derive(Debug, Clone, Copy)]
struct Api {
    addr: SocketAddr,
}

impl Api {
    /// POSTs `body` to `path`; the answer's JSON, or an error naming the status and reason.
    async fn call(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let fail = |what: String| Error::Other(format!("agent at {} {path}: {what}", self.addr));
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| fail(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, self.addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| fail(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        drop(sender);
        let _ = conn.await;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| fail(format!("not JSON: {e}")))?;
        if !status.is_success() {
            return Err(fail(format!("{status}: {}", value["error"])));
        }
        Ok(value)
    }
}
