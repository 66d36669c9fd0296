//! Prometheus metrics: counters the gRPC handlers update as things happen, and gauges and
//! histograms read from the engine and the database at scrape time (so they agree with the
//! database by construction), served as text on `GET /metrics` (`serve --metrics-listen`).
//!
//! No metric carries a site id: under site-level DP, which sites took part is itself
//! protected, and a metrics endpoint is usually read by more people than the database.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use super::Coordinator;
use crate::round::{LiveState, Phase, RoundEngine};
use crate::store::RoundStatus;

/// Counters updated by the handlers; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub(crate) struct Telemetry {
    pub(crate) updates_accepted: Counter,
    pub(crate) updates_rejected: Family<Vec<(String, String)>, Counter>,
    pub(crate) calls_refused: Family<Vec<(String, String)>, Counter>,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
}

impl Telemetry {
    /// Counts a rejected update under its gRPC code.
    pub(crate) fn rejected(&self, code: tonic::Code) {
        self.updates_rejected
            .get_or_create(&vec![("reason".into(), format!("{code:?}"))])
            .inc();
    }

    /// Counts a refused call under its gRPC code.
    pub(crate) fn refused(&self, code: tonic::Code) {
        self.calls_refused
            .get_or_create(&vec![("reason".into(), format!("{code:?}"))])
            .inc();
    }
}

/// What the engine and database say at scrape time.
#[derive(Debug, Default)]
struct EngineFigures {
    phase: &'static str,
    current_round: u64,
    committed_round: u64,
    total_rounds: u64,
    rounds_committed: u64,
    rounds_failed: u64,
    round_seconds: Vec<f64>,
    sites_connected: u64,
    sites_selected: u64,
    sites_completed: u64,
    sites_dropped: u64,
    aggregation_seconds: (f64, u64),
    epsilon: Option<f64>,
    /// The last committed round's update and model bytes (its round metrics).
    round_bytes: Option<(u64, u64)>,
    /// The published version and when it was published.
    published: Option<(u64, i64)>,
    now_ms: i64,
}

fn figures(e: &RoundEngine, now_ms: i64) -> crate::Result<EngineFigures> {
    let view = e.view(now_ms);
    let rounds = e.store().rounds(e.run_id())?;
    let count = |s: LiveState| view.sites.iter().filter(|p| p.state == s).count() as u64;
    Ok(EngineFigures {
        phase: match e.phase() {
            Phase::Waiting => "waiting",
            Phase::Training => "training",
            Phase::Evaluating => "evaluating",
            Phase::Paused => "paused",
            Phase::Finished => "finished",
        },
        current_round: view.current_round.unwrap_or(0),
        committed_round: e.committed_round(),
        total_rounds: e.config().run.rounds,
        rounds_committed: rounds
            .iter()
            .filter(|r| r.round > 0 && r.status == RoundStatus::Committed)
            .count() as u64,
        rounds_failed: rounds
            .iter()
            .filter(|r| r.status == RoundStatus::Failed)
            .count() as u64,
        round_seconds: rounds
            .iter()
            .filter(|r| r.round > 0)
            .filter_map(|r| Some((r.committed_at_ms? - r.started_at_ms) as f64 / 1000.0))
            .collect(),
        sites_connected: view.sites_connected as u64,
        sites_selected: view.sites.len() as u64,
        sites_completed: count(LiveState::Uploaded),
        sites_dropped: count(LiveState::Dropped),
        aggregation_seconds: e.aggregation_seconds(),
        epsilon: e.site_dp_spent()?,
        round_bytes: rounds
            .iter()
            .rev()
            .filter(|r| r.round > 0 && r.status == RoundStatus::Committed)
            .find_map(|r| r.metrics_json.as_deref())
            .and_then(|j| serde_json::from_str::<crate::metrics::TrainingSummary>(j).ok())
            .map(|m| (m.upload_bytes, m.download_bytes)),
        published: e.published().map(|p| (p.round, p.published_at_ms)),
        now_ms,
    })
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    r.register(name, help, g);
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    r.register(name, help, c);
}

/// Every metric family `/metrics` may hold, with the `fedflow_` prefix and counters'
/// `_total` suffix as scrapers see them. Some appear only in some runs: the published
/// version's once one is published, epsilon under site-level DP, the refusals' once a call
/// or update was refused, the last round's bytes once a round is committed. Dashboards are checked against this list, and the list against
/// what a coordinator exports.
pub const METRIC_FAMILIES: &[&str] = &[
    "fedflow_rounds_completed_total",
    "fedflow_rounds_failed_total",
    "fedflow_current_round",
    "fedflow_published_round",
    "fedflow_published_age_seconds",
    "fedflow_committed_round",
    "fedflow_total_rounds",
    "fedflow_phase",
    "fedflow_sites_connected",
    "fedflow_sites_selected",
    "fedflow_sites_completed",
    "fedflow_sites_dropped",
    "fedflow_updates_accepted_total",
    "fedflow_updates_rejected_total",
    "fedflow_calls_refused_total",
    "fedflow_received_bytes_total",
    "fedflow_sent_bytes_total",
    "fedflow_round_duration_seconds",
    "fedflow_aggregation_seconds_sum",
    "fedflow_aggregations",
    "fedflow_site_dp_epsilon_spent",
    "fedflow_last_round_upload_bytes",
    "fedflow_last_round_download_bytes",
    "fedflow_certificate_expiry_seconds",
    "fedflow_site_certificate_expiry_seconds_min",
];

/// The Prometheus text exposition of the coordinator's metrics.
pub(crate) async fn render(c: &Coordinator) -> crate::Result<String> {
    let f = c.inspect(figures).await?;
    let t = &c.shared.telemetry;
    let mut r = Registry::with_prefix("fedflow");
    counter(
        &mut r,
        "rounds_completed",
        "Rounds committed (from the database)",
        f.rounds_committed,
    );
    counter(
        &mut r,
        "rounds_failed",
        "Rounds that missed their quorum or were stopped",
        f.rounds_failed,
    );
    gauge(
        &mut r,
        "current_round",
        "The round being trained or evaluated (0: none)",
        f.current_round as f64,
    );
    if let Some((round, at)) = f.published {
        gauge(
            &mut r,
            "published_round",
            "The published version (the round the sites should serve); absent while none is",
            round as f64,
        );
        gauge(
            &mut r,
            "published_age_seconds",
            "Seconds since the published version was published",
            ((f.now_ms - at) as f64 / 1000.0).max(0.0),
        );
    }
    gauge(
        &mut r,
        "committed_round",
        "The last committed round",
        f.committed_round as f64,
    );
    gauge(
        &mut r,
        "total_rounds",
        "Rounds the run will commit in all",
        f.total_rounds as f64,
    );
    let phase = Family::<Vec<(String, String)>, Gauge>::default();
    for p in ["waiting", "training", "evaluating", "paused", "finished"] {
        phase
            .get_or_create(&vec![("phase".into(), p.into())])
            .set(i64::from(p == f.phase));
    }
    r.register("phase", "1 for the run's current phase", phase);
    gauge(
        &mut r,
        "sites_connected",
        "Sites heard from within the heartbeat timeout",
        f.sites_connected as f64,
    );
    gauge(
        &mut r,
        "sites_selected",
        "Sites in the current (or last) round",
        f.sites_selected as f64,
    );
    gauge(
        &mut r,
        "sites_completed",
        "Of those, sites whose update was accepted",
        f.sites_completed as f64,
    );
    gauge(
        &mut r,
        "sites_dropped",
        "Of those, sites dropped (silent past the heartbeat timeout)",
        f.sites_dropped as f64,
    );
    r.register(
        "updates_accepted",
        "Updates accepted (resends not counted again)",
        t.updates_accepted.clone(),
    );
    r.register(
        "updates_rejected",
        "Updates rejected, by gRPC status",
        t.updates_rejected.clone(),
    );
    r.register(
        "calls_refused",
        "Calls refused (authentication, role, revocation, limits), by gRPC status",
        t.calls_refused.clone(),
    );
    r.register(
        "received_bytes",
        "Update bytes received",
        t.bytes_in.clone(),
    );
    r.register("sent_bytes", "Model bytes sent", t.bytes_out.clone());
    let durations = Histogram::new([
        1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    ]);
    for s in &f.round_seconds {
        durations.observe(*s);
    }
    r.register(
        "round_duration_seconds",
        "From a round's start to its commit (committed rounds, from the database)",
        durations,
    );
    gauge(
        &mut r,
        "aggregation_seconds_sum",
        "Time spent aggregating and committing rounds since start",
        f.aggregation_seconds.0,
    );
    gauge(
        &mut r,
        "aggregations",
        "Rounds aggregated since start",
        f.aggregation_seconds.1 as f64,
    );
    if let Some(not_after) = c.certificate_not_after() {
        gauge(
            &mut r,
            "certificate_expiry_seconds",
            "Seconds until the coordinator's server certificate expires (negative: expired)",
            (not_after - fedflow_common::clock::now_ms() / 1000) as f64,
        );
    }
    if let Some(soonest) = c.site_certificates().values().min() {
        gauge(
            &mut r,
            "site_certificate_expiry_seconds_min",
            "Seconds until the soonest-expiring certificate of the sites heard from expires",
            (soonest - fedflow_common::clock::now_ms() / 1000) as f64,
        );
    }
    if let Some((up, down)) = f.round_bytes {
        gauge(
            &mut r,
            "last_round_upload_bytes",
            "Update bytes folded into the last committed round (compressed when the run compresses)",
            up as f64,
        );
        gauge(
            &mut r,
            "last_round_download_bytes",
            "The model's bytes times the sites given a task in the last committed round",
            down as f64,
        );
    }
    if let Some(eps) = f.epsilon {
        gauge(
            &mut r,
            "site_dp_epsilon_spent",
            "Site-level epsilon spent at the target delta",
            eps,
        );
    }
    let mut out = String::new();
    encode(&mut out, &r)
        .map_err(|e| crate::Error::Store(format!("cannot encode the metrics: {e}")))?;
    Ok(out)
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    coordinator: Coordinator,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    let c = Arc::new(coordinator);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let c = c.clone();
            async move {
                match render(&c).await {
                    Ok(text) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    ),
                    Err(e) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        format!("the coordinator is not ready: {e}\n"),
                    ),
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
