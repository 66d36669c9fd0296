//! The agent's local HTTP API (axum): feedback in, predictions out.
//!
//! - `POST /v1/feedback`: one session (`{"session_id", "events", "label", "user_id"?,
//!   "timestamp"?}`) or a batch (`{"sessions": [...]}`), stored and synced before the answer
//!   `200 {"stored", "duplicates"}`. A request is taken whole or not at all.
//! - `POST /v1/predict`: `{"sessions": [{"events": [...]}, ...]}` → per session the class
//!   probabilities (label 1 first), the predicted label and the expected satisfaction, with
//!   the version that answered (one version for the whole request).
//! - `POST /v1/explain`: the same sessions (and optionally `"label"` to explain, default
//!   the predicted one, and `"steps"`, default [`IG_STEPS`]) → the predictions and per
//!   event the integrated-gradients attribution of that label's logit, with the
//!   completeness gap (how far the attributions' sum is from the logit's change from the
//!   all-zero-embedding baseline).
//! - `DELETE /v1/users/{user_id}`: erases the user's sessions → `{"erased"}`.
//! - `GET /v1/status`: the store's counts and the version serving.
//! - `GET /v1/openapi.json`: the API's OpenAPI 3.1 description ([`OPENAPI`]).
//!
//! Errors are `{"error": reason}` with 400 (malformed JSON, unknown or missing fields),
//! 401 (a token is configured and the request lacks it), 409 (a session id stored with
//! other content), 413 (body or batch too large), 422 (a value breaks a rule: empty events,
//! label outside 1-5, too many events, unknown event names when refused), 429 (feedback and
//! predict requests beyond the rate limit, a token bucket), 503 (no version published yet); nothing of a refused request is stored. Sessions are named by their
//! position in the request, never by their ids (personal data). Model work runs on the
//! blocking pool, never on the async executor's threads.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use fedflow_common::clock::now_ms;
use fedflow_common::data::{EncodedSession, SessionRecord, Vocab, encode_session};
use fedflow_common::model::IG_STEPS;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::serving::Served;
use super::store::{FeedbackStore, Refusal};

/// The API's OpenAPI 3.1 description (`client/src/agent/openapi.json`).
pub const OPENAPI: &str = include_str!("openapi.json");

/// What the API accepts.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most sessions in one request.
    pub max_sessions: usize,
    /// Most events in one session.
    pub max_events: usize,
    /// Refuse feedback with event names the vocabulary does not list (else they are stored
    /// and encoded as unknown, or into the vocabulary's buckets).
    pub refuse_unknown_events: bool,
    /// A bearer token every request must carry (`Authorization: Bearer ...`).
    pub token: Option<String>,
    /// Feedback and predict requests per second, sustained (`None`: unlimited); beyond it
    /// they are refused with 429.
    pub rate_per_second: Option<f64>,
    /// Requests that may come at once above the sustained rate.
    pub burst: u32,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_body_bytes: 1 << 20,
            max_sessions: 1_000,
            max_events: 1_000,
            refuse_unknown_events: false,
            token: None,
            rate_per_second: None,
            burst: 100,
        }
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct AgentState {
    /// The feedback store.
    pub store: Arc<FeedbackStore>,
    /// The version serving.
    pub served: Arc<Served>,
    /// The federation's vocabulary.
    pub vocab: Vocab,
    /// The API's limits.
    pub limits: ApiLimits,
    /// The rate limit's bucket: tokens left and when it was last filled.
    pub bucket: std::sync::Mutex<Option<(f64, std::time::Instant)>>,
}

impl AgentState {
    /// The state of an API over `store` serving `served`.
    pub fn new(
        store: Arc<FeedbackStore>,
        served: Arc<Served>,
        vocab: Vocab,
        limits: ApiLimits,
    ) -> AgentState {
        AgentState {
            store,
            served,
            vocab,
            limits,
            bucket: std::sync::Mutex::new(None),
        }
    }

    /// Takes one request from the rate limit's token bucket, or refuses with 429.
    fn admit(&self) -> Result<(), ApiError> {
        let Some(rate) = self.limits.rate_per_second else {
            return Ok(());
        };
        let burst = f64::from(self.limits.burst.max(1));
        let now = std::time::Instant::now();
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, at) = bucket.unwrap_or((burst, now));
        let tokens = (tokens + rate * now.duration_since(at).as_secs_f64()).min(burst);
        if tokens < 1.0 {
            *bucket = Some((tokens, now));
            return Err(ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!("more than {rate} requests per second (burst {burst}); retry later"),
            ));
        }
        *bucket = Some((tokens - 1.0, now));
        Ok(())
    }
}

/// An answer of the API.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.0, &json!({ "error": self.1 }))
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

type ApiResult = Result<Response, ApiError>;

fn bad(reason: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, reason.into())
}

fn unprocessable(reason: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, reason.into())
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!("agent API: {e}");
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// The router of the API over `state`.
pub fn router(state: Arc<AgentState>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/feedback", post(feedback))
        .route("/v1/predict", post(predict))
        .route("/v1/explain", post(explain))
        .route("/v1/feedback/delete", post(delete_sessions))
        .route("/v1/users/{user_id}", delete(erase_user))
        .route("/v1/status", get(status))
        .route("/v1/openapi.json", get(openapi))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn authorised(state: &AgentState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.limits.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in constant time: the token is a secret.
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
}

/// One session of feedback as the API takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackSession {
    session_id: String,
    events: Vec<String>,
    label: i64,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    timestamp: Option<String>,
}

/// Parses `body` as one session or `{"sessions": [...]}`, naming what is wrong.
fn sessions_of<T: serde::de::DeserializeOwned>(
    body: &[u8],
    batch_only: bool,
) -> Result<Vec<T>, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    let items = match value {
        serde_json::Value::Object(mut o) if o.contains_key("sessions") => {
            if o.len() != 1 {
                let other = o.keys().find(|k| *k != "sessions").cloned();
                return Err(bad(format!(
                    "unknown field `{}` next to `sessions`",
                    other.unwrap_or_default()
                )));
            }
            match o.remove("sessions") {
                Some(serde_json::Value::Array(items)) => items,
                _ => return Err(bad("`sessions` must be an array")),
            }
        }
        v @ serde_json::Value::Object(_) if !batch_only => vec![v],
        _ => {
            return Err(bad(if batch_only {
                "expected {\"sessions\": [...]}"
            } else {
                "expected a session object or {\"sessions\": [...]}"
            }));
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| serde_json::from_value(v).map_err(|e| bad(format!("session {i}: {e}"))))
        .collect()
}

fn check_count(state: &AgentState, n: usize) -> Result<(), ApiError> {
    if n == 0 {
        return Err(unprocessable("no sessions"));
    }
    if n > state.limits.max_sessions {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{n} sessions in one request; at most {}",
                state.limits.max_sessions
            ),
        ));
    }
    Ok(())
}

fn check_events(state: &AgentState, i: usize, events: &[String]) -> Result<(), ApiError> {
    if events.len() > state.limits.max_events {
        return Err(unprocessable(format!(
            "session {i}: {} events; at most {}",
            events.len(),
            state.limits.max_events
        )));
    }
    Ok(())
}

async fn feedback(
    State(state): State<Arc<AgentState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    authorised(&state, &headers)?;
    state.admit()?;
    let sessions: Vec<FeedbackSession> = sessions_of(&body, false)?;
    check_count(&state, sessions.len())?;
    let mut records = Vec::with_capacity(sessions.len());
    for (i, s) in sessions.into_iter().enumerate() {
        check_events(&state, i, &s.events)?;
        let label = u8::try_from(s.label)
            .ok()
            .filter(|l| (1..=5).contains(l))
            .ok_or_else(|| {
                unprocessable(format!("session {i}: label {} is outside 1..=5", s.label))
            })?;
        if state.limits.refuse_unknown_events
            && let Some(at) = s.events.iter().position(|e| state.vocab.id(e).is_none())
        {
            return Err(unprocessable(format!(
                "session {i}: event {} is not in the federation's vocabulary (this agent \
                 refuses unknown events)",
                at + 1
            )));
        }
        records.push(SessionRecord {
            session_id: s.session_id,
            events: s.events,
            label,
            user_id: s.user_id,
            timestamp: s.timestamp,
        });
    }
    let store = state.store.clone();
    let outcome = tokio::task::spawn_blocking(move || store.append(&records, now_ms()))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    match outcome {
        Ok(a) => Ok(json_response(
            StatusCode::OK,
            &json!({ "stored": a.stored, "duplicates": a.duplicates }),
        )),
        Err(r @ Refusal::Conflict { .. }) => Err(ApiError(StatusCode::CONFLICT, r.to_string())),
        Err(r @ Refusal::Invalid { .. }) => Err(unprocessable(r.to_string())),
    }
}

/// One session to predict.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictSession {
    events: Vec<String>,
}

/// One prediction.
#[derive(Debug, Serialize)]
struct Prediction {
    /// `p(label = k + 1)`.
    probabilities: Vec<f32>,
    /// The most probable label, 1-5.
    label: u8,
    /// The expected label, `sum_k (k + 1) p_k`.
    expected: f32,
}

/// Checks and encodes the sessions of a predict or explain request, with the version that
/// answers it.
fn prepared(
    state: &AgentState,
    sessions: &[PredictSession],
) -> Result<(Arc<super::serving::ServedModel>, Vec<EncodedSession>), ApiError> {
    check_count(state, sessions.len())?;
    let model = state.served.current().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no model published to this site yet".into(),
        )
    })?;
    let mut encoded = Vec::with_capacity(sessions.len());
    for (i, s) in sessions.iter().enumerate() {
        check_events(state, i, &s.events)?;
        if s.events.is_empty() {
            return Err(unprocessable(format!("session {i}: events is empty")));
        }
        // The label is not used: any valid one encodes.
        let r = SessionRecord {
            session_id: String::new(),
            events: s.events.clone(),
            label: 1,
            user_id: None,
            timestamp: None,
        };
        encoded.push(
            encode_session(&r, model.vocab())
                .map_err(|e| unprocessable(format!("session {i}: {e}")))?,
        );
    }
    Ok((model, encoded))
}

fn prediction(p: Vec<f32>) -> Prediction {
    let mut best = 0;
    for k in 1..p.len() {
        if p[k] > p[best] {
            best = k;
        }
    }
    Prediction {
        expected: p.iter().enumerate().map(|(k, v)| (k + 1) as f32 * v).sum(),
        label: best as u8 + 1,
        probabilities: p,
    }
}

fn version(model: &super::serving::ServedModel) -> serde_json::Value {
    json!({
        "round": model.round,
        "model_sha256": model.model_sha256,
        "pinned": model.pinned,
        "personalised": model.personalised,
    })
}

async fn predict(
    State(state): State<Arc<AgentState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    authorised(&state, &headers)?;
    state.admit()?;
    let sessions: Vec<PredictSession> = sessions_of(&body, true)?;
    let (model, encoded) = prepared(&state, &sessions)?;
    let answering = model.clone();
    let probs = tokio::task::spawn_blocking(move || answering.probabilities(&encoded))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let predictions: Vec<Prediction> = probs.into_iter().map(prediction).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "version": version(&model), "predictions": predictions }),
    ))
}

/// An explain request: the sessions, and optionally the label to explain and the steps.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainRequest {
    sessions: Vec<serde_json::Value>,
    #[serde(default)]
    label: Option<i64>,
    #[serde(default)]
    steps: Option<usize>,
}

/// Most integration steps one request may ask for.
const MAX_IG_STEPS: usize = 1_024;

async fn explain(
    State(state): State<Arc<AgentState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    authorised(&state, &headers)?;
    state.admit()?;
    let req: ExplainRequest = serde_json::from_slice(&body).map_err(|e| {
        bad(format!(
            "expected {{\"sessions\": [...], \"label\"?, \"steps\"?}}: {e}"
        ))
    })?;
    let sessions = req
        .sessions
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::from_value::<PredictSession>(v)
                .map_err(|e| bad(format!("session {i}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let class = match req.label {
        None => None,
        Some(l) if (1..=5).contains(&l) => Some(l as usize - 1),
        Some(l) => return Err(unprocessable(format!("label {l} is outside 1..=5"))),
    };
    let steps = req.steps.unwrap_or(IG_STEPS);
    if !(1..=MAX_IG_STEPS).contains(&steps) {
        return Err(unprocessable(format!(
            "steps {steps} is outside 1..={MAX_IG_STEPS}"
        )));
    }
    let (model, encoded) = prepared(&state, &sessions)?;
    let answering = model.clone();
    let out = tokio::task::spawn_blocking(move || {
        let probs = answering.probabilities(&encoded)?;
        probs
            .into_iter()
            .zip(&encoded)
            .map(|(p, s)| {
                let pred = prediction(p);
                let c = class.unwrap_or(pred.label as usize - 1);
                let a = answering.explain(s, c, steps)?;
                Ok((pred, a))
            })
            .collect::<crate::Result<Vec<_>>>()
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    let explanations: Vec<serde_json::Value> = out
        .into_iter()
        .zip(&sessions)
        .map(|((pred, a), s)| {
            json!({
                "prediction": pred,
                "explained_label": a.class + 1,
                "logit": a.logit,
                "baseline_logit": a.baseline_logit,
                "completeness_gap": a.completeness_gap,
                "events": s.events.iter().zip(&a.per_event)
                    .map(|(e, v)| json!({ "event": e, "attribution": v }))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "version": version(&model), "steps": steps, "explanations": explanations }),
    ))
}

/// A request to withdraw sessions by id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteRequest {
    session_ids: Vec<String>,
}

async fn delete_sessions(
    State(state): State<Arc<AgentState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    authorised(&state, &headers)?;
    let request: DeleteRequest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("malformed request: {e}")))?;
    check_count(&state, request.session_ids.len())?;
    if let Some(i) = request.session_ids.iter().position(|id| id.is_empty()) {
        return Err(unprocessable(format!("session_ids[{i}] is empty")));
    }
    let store = state.store.clone();
    let deleted = tokio::task::spawn_blocking(move || store.delete_sessions(&request.session_ids))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "deleted": deleted }),
    ))
}

async fn erase_user(
    State(state): State<Arc<AgentState>>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
) -> ApiResult {
    authorised(&state, &headers)?;
    if user_id.is_empty() {
        return Err(unprocessable("empty user_id"));
    }
    let store = state.store.clone();
    let erased = tokio::task::spawn_blocking(move || store.erase_user(&user_id))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    Ok(json_response(StatusCode::OK, &json!({ "erased": erased })))
}

async fn openapi(State(state): State<Arc<AgentState>>, headers: HeaderMap) -> ApiResult {
    authorised(&state, &headers)?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response())
}

async fn status(State(state): State<Arc<AgentState>>, headers: HeaderMap) -> ApiResult {
    authorised(&state, &headers)?;
    let store = state.store.clone();
    let counts = tokio::task::spawn_blocking(move || store.counts())
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let serving = state.served.current().map(|m| version(&m));
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "store": counts,
            "serving": serving,
            "personalisation": state.served.personalisation(),
        }),
    ))
}
