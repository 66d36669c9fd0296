//! The agent's HTTP API on a real socket: every class of bad input refused with its status
//! and reason and nothing stored; idempotent feedback; predictions of the version serving,
//! swapped with requests in flight.

use std::net::SocketAddr;
use std::sync::Arc;

use candle_core::Device;
use fedflow_common::data::{EncodedSession, SessionRecord, Vocab, encode_session};
use fedflow_common::model::{AttentionFlowModel, ModelConfig, save_model};
use fedflow_tests::http::{Answer, request};
use serde_json::json;

use super::http::{AgentState, ApiLimits, router};
use super::serving::{Served, ServedModel};
use super::store::FeedbackStore;

const EVENTS: [&str; 4] = ["opened_help", "searched", "search_no_results", "escalated"];

struct Api {
    addr: SocketAddr,
    state: Arc<AgentState>,
    dir: tempfile::TempDir,
}

async fn api(limits: ApiLimits) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(AgentState::new(
        Arc::new(FeedbackStore::open(dir.path().join("store")).unwrap()),
        Arc::new(Served::default()),
        Vocab::from_events(EVENTS).unwrap(),
        limits,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Api { addr, state, dir }
}

impl Api {
    async fn post(&self, path: &str, body: &str) -> Answer {
        request(self.addr, "POST", path, &[], body.as_bytes()).await
    }

    fn stored(&self) -> Vec<SessionRecord> {
        self.state.store.snapshot().unwrap().records
    }

    /// A model saved under the test's folder, loaded as version `round`.
    fn model(&self, round: u64, seed: u64) -> ServedModel {
        let cfg = ModelConfig {
            vocab_size: self.state.vocab.len(),
            embed_dim: 8,
            hidden_size: 8,
            num_layers: 1,
            ..ModelConfig::default()
        };
        let m = AttentionFlowModel::new(&cfg, &Device::Cpu, seed).unwrap();
        let dir = self.dir.path().join(format!("v{round}"));
        save_model(&dir, &m, &self.state.vocab).unwrap();
        ServedModel::load(&dir, round, &self.state.vocab).unwrap()
    }
}

fn session(id: &str, label: i64) -> serde_json::Value {
    json!({ "session_id": id, "events": ["opened_help", "searched"], "label": label, "user_id": "u1" })
}

#[tokio::test]
async fn feedback_is_stored_once_and_every_bad_request_is_refused_storing_nothing() {
    let a = api(ApiLimits {
        max_body_bytes: 4_096,
        max_sessions: 3,
        max_events: 5,
        refuse_unknown_events: true,
        ..ApiLimits::default()
    })
    .await;
    let ok = a.post("/v1/feedback", &session("s1", 4).to_string()).await;
    assert_eq!(
        (ok.status, ok.json()),
        (200, json!({"stored": 1, "duplicates": 0}))
    );
    let batch = json!({ "sessions": [session("s1", 4), session("s2", 2)] });
    let ok = a.post("/v1/feedback", &batch.to_string()).await;
    assert_eq!(
        (ok.status, ok.json()),
        (200, json!({"stored": 1, "duplicates": 1}))
    );
    let before = a.stored();
    assert_eq!(before.len(), 2);

    let long = json!({"session_id": "s9", "events": vec!["searched"; 6], "label": 3});
    let unknown = json!({"session_id": "s9", "events": ["searched", "new_thing"], "label": 3});
    let too_many =
        json!({"sessions": [session("a", 1), session("b", 1), session("c", 1), session("d", 1)]});
    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"session_id\": ".into(), 400, "malformed JSON"),
        ("[1, 2]".into(), 400, "expected a session object"),
        (
            json!({"session_id": "s9", "events": ["searched"], "label": 3, "mood": "ok"}).to_string(),
            400,
            "unknown field `mood`",
        ),
        (json!({"session_id": "s9", "label": 3}).to_string(), 400, "missing field `events`"),
        (
            json!({"sessions": [session("s9", 3)], "extra": 1}).to_string(),
            400,
            "unknown field `extra`",
        ),
        (
            json!({"session_id": "s9", "events": [], "label": 3}).to_string(),
            422,
            "session 0: events is empty",
        ),
        (session("s9", 7).to_string(), 422, "session 0: label 7 is outside 1..=5"),
        (session("s9", -1).to_string(), 422, "label -1 is outside"),
        (long.to_string(), 422, "session 0: 6 events; at most 5"),
        (unknown.to_string(), 422, "event 2 is not in the federation's vocabulary"),
        (json!({"sessions": []}).to_string(), 422, "no sessions"),
        (too_many.to_string(), 413, "4 sessions in one request; at most 3"),
        (
            json!({"sessions": [session("s9", 3), session("s1", 1)]}).to_string(),
            409,
            "session 1: its session_id is already stored",
        ),
        (
            json!({"session_id": "s9", "events": ["searched"], "label": 3, "user_id": "x".repeat(5_000)})
                .to_string(),
            413,
            "",
        ),
    ];
    for (body, status, reason) in cases {
        let r = a.post("/v1/feedback", &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        if !reason.is_empty() {
            let error = r.json()["error"].as_str().unwrap_or_default().to_string();
            assert!(error.contains(reason), "{body}: {error}");
            // The reason never echoes a session id.
            assert!(!error.contains("s9") || reason.contains("s9"), "{error}");
        }
        assert_eq!(a.stored(), before, "{body} changed the store");
    }
    let r = a.post("/v1/nowhere", "{}").await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn a_token_guards_every_endpoint_and_erasure_deletes_a_users_sessions() {
    let a = api(ApiLimits {
        token: Some("s3cret-token".into()),
        ..ApiLimits::default()
    })
    .await;
    let body = json!({"sessions": [session("s1", 4), session("s2", 2)]}).to_string();
    for auth in [None, Some("Bearer wrong-token!"), Some("s3cret-token")] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|v| ("Authorization", *v)).collect();
        let r = request(a.addr, "POST", "/v1/feedback", &headers, body.as_bytes()).await;
        assert_eq!(r.status, 401, "{auth:?}");
        let r = request(a.addr, "GET", "/v1/status", &headers, b"").await;
        assert_eq!(r.status, 401, "{auth:?}");
    }
    assert!(a.stored().is_empty());
    let auth = [("Authorization", "Bearer s3cret-token")];
    let r = request(a.addr, "POST", "/v1/feedback", &auth, body.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(a.addr, "GET", "/v1/status", &auth, b"").await;
    assert_eq!(r.json()["store"]["sessions"], 2);
    assert!(r.json()["serving"].is_null());
    let r = request(a.addr, "DELETE", "/v1/users/u1", &auth, b"").await;
    assert_eq!((r.status, r.json()), (200, json!({"erased": 2})));
    assert!(a.stored().is_empty());
}

#[tokio::test]
async fn sessions_are_withdrawn_by_id_and_a_bad_withdrawal_deletes_nothing() {
    let a = api(ApiLimits {
        max_sessions: 3,
        ..ApiLimits::default()
    })
    .await;
    let body = json!({"sessions": [session("s1", 4), session("s2", 2), session("s3", 5)]});
    assert_eq!(a.post("/v1/feedback", &body.to_string()).await.status, 200);
    let generation = a.state.store.generation().unwrap();
    for (bad, status, reason) in [
        (
            r#"{"session_ids": ["s1"], "also": 1}"#,
            400,
            "unknown field `also`",
        ),
        (r#"{"session_ids": "s1"}"#, 400, "malformed request"),
        (r#"{"session_ids": []}"#, 422, "no sessions"),
        (
            r#"{"session_ids": ["s1", ""]}"#,
            422,
            "session_ids[1] is empty",
        ),
        (r#"{"session_ids": ["a", "b", "c", "d"]}"#, 413, "at most 3"),
    ] {
        let r = a.post("/v1/feedback/delete", bad).await;
        assert_eq!(r.status, status, "{bad}: {}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains(reason),
            "{bad}: {}",
            r.body
        );
    }
    assert_eq!(a.stored().len(), 3);
    assert_eq!(a.state.store.generation().unwrap(), generation);
    // Ids not stored are passed over; the answer counts what was deleted.
    let r = a
        .post(
            "/v1/feedback/delete",
            r#"{"session_ids": ["s1", "s3", "nope"]}"#,
        )
        .await;
    assert_eq!((r.status, r.json()), (200, json!({"deleted": 2})));
    let left: Vec<String> = a.stored().into_iter().map(|r| r.session_id).collect();
    assert_eq!(left, ["s2"]);
    assert_ne!(a.state.store.generation().unwrap(), generation);
}

fn encoded(vocab: &Vocab, events: &[&str]) -> EncodedSession {
    encode_session(&SessionRecord::new("x", events, 1), vocab).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_come_from_one_version_and_a_swap_fails_no_request() {
    let a = api(ApiLimits::default()).await;
    let body = json!({"sessions": [
        {"events": ["opened_help", "searched", "search_no_results"]},
        {"events": ["opened_help", "unheard_of"]},
    ]})
    .to_string();
    let r = a.post("/v1/predict", &body).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let r = a
        .post("/v1/predict", &json!({"events": ["searched"]}).to_string())
        .await;
    assert_eq!(r.status, 400, "a batch is required: {}", r.body);

    // What each version must answer, computed apart from the API.
    let sessions = [
        encoded(
            &a.state.vocab,
            &["opened_help", "searched", "search_no_results"],
        ),
        encoded(&a.state.vocab, &["opened_help", "unheard_of"]),
    ];
    let (v1, v2) = (a.model(1, 11), a.model(2, 22));
    let want = |m: &ServedModel| m.probabilities(&sessions).unwrap();
    let expected = [(1u64, want(&v1)), (2u64, want(&v2))];
    assert_ne!(expected[0].1, expected[1].1);
    a.state.served.swap(v1);

    let check = |r: &Answer| {
        assert_eq!(r.status, 200, "{}", r.body);
        let j = r.json();
        let round = j["version"]["round"].as_u64().unwrap();
        let (_, probs) = expected.iter().find(|(v, _)| *v == round).unwrap();
        for (p, want) in j["predictions"].as_array().unwrap().iter().zip(probs) {
            let got: Vec<f32> = p["probabilities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(&got, want, "version {round}");
            let label = p["label"].as_u64().unwrap() as usize;
            assert!(want.iter().all(|&q| q <= want[label - 1]));
        }
        round
    };
    assert_eq!(check(&a.post("/v1/predict", &body).await), 1);

    // Requests keep coming while the version swaps back and forth: none fails, each is
    // answered wholly by one version, and both versions answer some.
    let addr = a.addr;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..40 {
                    answers.push(request(addr, "POST", "/v1/predict", &[], body.as_bytes()).await);
                }
                answers
            })
        })
        .collect();
    let mut swaps = 0;
    while !clients.iter().all(|c| c.is_finished()) {
        let next = if swaps % 2 == 0 {
            a.model(2, 22)
        } else {
            a.model(1, 11)
        };
        a.state.served.swap(next);
        swaps += 1;
        tokio::task::yield_now().await;
    }
    let mut seen = std::collections::BTreeSet::new();
    for c in clients {
        for r in c.await.unwrap() {
            seen.insert(check(&r));
        }
    }
    assert!(swaps > 1, "{swaps}");
    assert_eq!(
        seen.len(),
        2,
        "both versions answered: {seen:?}, {swaps} swaps"
    );
}

#[tokio::test]
async fn requests_beyond_the_rate_limit_are_refused_and_store_nothing() {
    // One request per ten seconds sustained, two at once: the third in a row is refused.
    let a = api(ApiLimits {
        rate_per_second: Some(0.1),
        burst: 2,
        ..ApiLimits::default()
    })
    .await;
    for id in ["s1", "s2"] {
        let r = a.post("/v1/feedback", &session(id, 3).to_string()).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = a.post("/v1/feedback", &session("s3", 3).to_string()).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("requests per second")
    );
    assert_eq!(a.stored().len(), 2);
    // Reading the status is not limited.
    let r = request(a.addr, "GET", "/v1/status", &[], b"").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn explanations_attribute_each_event_and_add_up_to_the_logits_change() {
    let a = api(ApiLimits::default()).await;
    let model = a.model(3, 7);
    a.state.served.swap(model);
    let body = json!({
        "sessions": [{"events": ["opened_help", "searched", "search_no_results", "escalated"]}],
        "steps": 256,
    })
    .to_string();
    let r = a.post("/v1/explain", &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(
        (j["version"]["round"].as_u64(), j["steps"].as_u64()),
        (Some(3), Some(256))
    );
    let e = &j["explanations"][0];
    let events = e["events"].as_array().unwrap();
    assert_eq!(events.len(), 4);
    assert_eq!(events[2]["event"], "search_no_results");
    let sum: f64 = events
        .iter()
        .map(|v| v["attribution"].as_f64().unwrap())
        .sum();
    let change = e["logit"].as_f64().unwrap() - e["baseline_logit"].as_f64().unwrap();
    let gap = e["completeness_gap"].as_f64().unwrap();
    assert!(((sum - change).abs() - gap).abs() < 1e-6, "{e}");
    assert!(gap <= 0.01 * change.abs().max(1e-3) + 1e-4, "{e}");
    // By default the predicted label is explained; another can be asked for.
    assert_eq!(e["explained_label"], e["prediction"]["label"]);
    let other = json!({"sessions": [{"events": ["searched"]}], "label": 5}).to_string();
    let r = a.post("/v1/explain", &other).await;
    assert_eq!(r.json()["explanations"][0]["explained_label"], 5);
    for (body, status) in [
        (
            json!({"sessions": [{"events": ["searched"]}], "label": 0}),
            422,
        ),
        (
            json!({"sessions": [{"events": ["searched"]}], "steps": 0}),
            422,
        ),
        (
            json!({"sessions": [{"events": ["searched"]}], "steps": 5000}),
            422,
        ),
        (json!({"sessions": [{"events": []}]}), 422),
        (
            json!({"sessions": [{"events": ["searched"]}], "why": 1}),
            400,
        ),
    ] {
        let r = a.post("/v1/explain", &body.to_string()).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
    }
}
