//! The site agent against a real coordinator (real gRPC, a continuous run) and through its
//! real HTTP API: feedback posted in three batches between rounds is trained on as it
//! arrives (the rounds' training counts grow), each published version is installed and
//! served, a publish swaps the served version while predictions run (zero errors, one
//! version per answer), and the agent's predictions equal the coordinator's checkpoint.

use std::time::Duration;

use candle_core::Device;
use fedflow_client::agent::config::AgentConfig;
use fedflow_common::data::{SessionRecord, Vocab, encode_session};
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::params::ParamSet;
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::{GetStatusRequest, RunActionRequest, RunPhase};
use fedflow_tests::TestCoordinator;
use fedflow_tests::http::request;
use serde_json::json;
use tonic::transport::Channel;

const RUN: &str = "[run]\nname = \"agent\"\nseed = 3\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
    [train]\nepochs = 1\n\
    [sampling]\nmin_selected = 1\nmin_available = 1\n\
    [rounds]\ndeadline_secs = 300\nmin_completed = 1\nheartbeat_timeout_secs = 120\n\
    [evaluation]\nevery = 0\n\
    [schedule]\nmode = \"continuous\"\n\
    [publish]\nrule = \"every\"\n";

async fn status(admin: &mut AdminClient<Channel>) -> fedflow_proto::v1::RunStatus {
    admin
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Lets exactly one more round commit, then holds the run again; returns the round.
async fn one_round(admin: &mut AdminClient<Channel>) -> u64 {
    let before = status(admin).await.committed_round;
    admin.resume_run(RunActionRequest::default()).await.unwrap();
    for _ in 0..3000 {
        if status(admin).await.committed_round > before {
            admin.pause_run(RunActionRequest::default()).await.unwrap();
            for _ in 0..3000 {
                let s = status(admin).await;
                if s.phase == RunPhase::Paused as i32 {
                    return s.committed_round;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no round committed");
}

/// Waits (bounded) until the agent serves `round`.
async fn serving(addr: std::net::SocketAddr, round: u64) {
    for _ in 0..600 {
        let s = request(addr, "GET", "/v1/status", &[], b"").await.json();
        if s["serving"]["round"].as_u64() == Some(round) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the agent never served version {round}");
}

fn feedback(records: &[SessionRecord]) -> Vec<u8> {
    json!({ "sessions": records }).to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_trains_on_posted_feedback_and_serves_each_published_version() {
    let fed = generate(&SynthConfig {
        sites: 1,
        total_sessions: 600,
        min_site_sessions: 600,
        seed: 6,
        ..SynthConfig::default()
    })
    .unwrap();
    let records = &fed.sites[0].records;
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let c = TestCoordinator::builder(RUN).vocab(&vocab).spawn().await;
    let mut admin = AdminClient::connect(c.url()).await.unwrap();
    admin.pause_run(RunActionRequest::default()).await.unwrap();

    let site = c.dir().join("site-a");
    std::fs::create_dir_all(&site).unwrap();
    vocab.save(site.join("vocab.json")).unwrap();
    let toml = format!(
        "[site]\nid = \"site-a\"\ndata_dir = \"data\"\nvocab = \"vocab.json\"\n\
         [coordinator]\nurl = \"{}\"\ninsecure_plaintext = true\n\
         [http]\nlisten = \"127.0.0.1:0\"\n",
        c.url()
    );
    std::fs::write(site.join("site.toml"), toml).unwrap();
    let cfg = AgentConfig::load(&site.join("site.toml")).unwrap();
    let agent = fedflow_client::agent::run::start(&cfg, None).await.unwrap();
    let api = agent.http_addr;

    // Three batches, each posted while the run is held, then one round.
    let mut rounds = Vec::new();
    for batch in [&records[..150], &records[150..300], &records[300..450]] {
        let r = request(api, "POST", "/v1/feedback", &[], &feedback(batch)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["stored"], batch.len());
        rounds.push(one_round(&mut admin).await);
        let s = request(api, "GET", "/v1/status", &[], b"").await.json();
        assert_eq!(
            s["store"]["since_last_snapshot"], 0,
            "the round took them: {s}"
        );
    }
    let per_round = c
        .handle
        .inspect(move |e, _| {
            rounds
                .iter()
                .map(|&r| {
                    Ok(e.store().round_sites("agent", r)?[0]
                        .train_examples
                        .unwrap_or(0))
                })
                .collect::<fedflow_coordinator::Result<Vec<u64>>>()
        })
        .await
        .unwrap();
    assert!(
        per_round.windows(2).all(|w| w[0] < w[1]),
        "training counts grow with the feedback: {per_round:?}"
    );
    let last = status(&mut admin).await.committed_round;
    serving(api, last).await;
    // The trainer keeps its working state next to the store.
    assert!(
        site.join("data")
            .join(fedflow_client::agent::run::STATE_DIR)
            .is_dir()
    );

    // The agent's predictions are the coordinator's checkpoint of that version.
    let sessions: Vec<serde_json::Value> = records[450..470]
        .iter()
        .map(|r| json!({ "events": r.events }))
        .collect();
    let body = json!({ "sessions": sessions }).to_string();
    let answer = request(api, "POST", "/v1/predict", &[], body.as_bytes()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let expected = |round: u64| {
        let params = ParamSet::load(
            c.data
                .join(format!("checkpoints/agent/round-{round:06}.safetensors")),
        )
        .unwrap();
        let model =
            AttentionFlowModel::new(&c.cfg.model_config().unwrap(), &Device::Cpu, 0).unwrap();
        params.load_into_varmap(model.varmap()).unwrap();
        let encoded: Vec<_> = records[450..470]
            .iter()
            .map(|r| encode_session(r, &vocab).unwrap())
            .collect();
        fedflow_common::train::probabilities(&model, &encoded, 256).unwrap()
    };
    let probs = |j: &serde_json::Value| -> Vec<Vec<f32>> {
        j["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                p["probabilities"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect()
    };
    let j = answer.json();
    assert_eq!(j["version"]["round"], last);
    assert_eq!(probs(&j), expected(last));

    // More rounds are published while predictions run: none fails, each is wholly one
    // version's, and the newest version takes over.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let runner = tokio::spawn(async move {
        let mut answers = Vec::new();
        while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
            answers.push(request(api, "POST", "/v1/predict", &[], body.as_bytes()).await);
        }
        answers.push(request(api, "POST", "/v1/predict", &[], body.as_bytes()).await);
        answers
    });
    // (Holding the run lets the round already open finish too: one or two more commit.)
    let next = one_round(&mut admin).await;
    assert!(next > last);
    serving(api, next).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let answers = runner.await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut want = std::collections::HashMap::new();
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.body);
        let j = a.json();
        let round = j["version"]["round"].as_u64().unwrap();
        assert!((last..=next).contains(&round), "version {round}");
        let want = want.entry(round).or_insert_with(|| expected(round));
        assert_eq!(&probs(&j), want, "version {round}");
        seen.insert(round);
    }
    assert!(seen.contains(&last) || answers.len() == 1, "{seen:?}");
    assert_eq!(
        answers.last().unwrap().json()["version"]["round"],
        next,
        "{} answers",
        answers.len()
    );

    admin.stop_run(RunActionRequest::default()).await.unwrap();
    agent.shutdown().await;
}

/// The API description is a valid OpenAPI document (checked by `openapi-spec-validator`),
/// the agent serves it, and every path and method it names is a route of the real API,
/// and the other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_description_is_valid_and_names_exactly_the_apis_routes() {
    use fedflow_client::agent::http::OPENAPI;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, OPENAPI).unwrap();
    let python = crate::python_interop::interop_python().await;
    let mut cmd = tokio::process::Command::new(python);
    cmd.args([
        "-c",
        "import json, sys; from openapi_spec_validator import validate; \
         validate(json.load(open(sys.argv[1]))); print('valid')",
    ])
    .arg(&file);
    let out =
        crate::python_interop::run(cmd, "openapi-spec-validator", Duration::from_secs(60)).await;
    assert_eq!(out.trim(), "valid");

    let vocab = Vocab::from_events(["searched"]).unwrap();
    vocab.save(dir.path().join("vocab.json")).unwrap();
    std::fs::write(
        dir.path().join("site.toml"),
        "[site]\nid = \"s\"\ndata_dir = \"data\"\nvocab = \"vocab.json\"\n\
         [coordinator]\nurl = \"http://127.0.0.1:9\"\ninsecure_plaintext = true\n\
         [http]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let cfg = AgentConfig::load(&dir.path().join("site.toml")).unwrap();
    let agent = fedflow_client::agent::run::start(&cfg, None).await.unwrap();
    let api = agent.http_addr;
    let served = request(api, "GET", "/v1/openapi.json", &[], b"").await;
    assert_eq!(
        served.json(),
        serde_json::from_str::<serde_json::Value>(OPENAPI).unwrap()
    );

    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    let mut documented = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.replace("{user_id}", "u1")));
        }
    }
    documented.sort();
    let routes = [
        ("DELETE", "/v1/users/u1"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/v1/status"),
        ("POST", "/v1/explain"),
        ("POST", "/v1/feedback"),
        ("POST", "/v1/feedback/delete"),
        ("POST", "/v1/predict"),
    ];
    let want: Vec<(String, String)> = routes
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, want);
    for (method, path) in &documented {
        let r = request(api, method, path, &[], b"{}").await;
        assert!(
            ![404, 405].contains(&r.status),
            "{method} {path}: {}",
            r.status
        );
        let documented_statuses = doc["paths"][path.replace("u1", "{user_id}")]
            [method.to_lowercase()]["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>();
        assert!(
            documented_statuses.contains(&r.status.to_string()),
            "{method} {path} answered {} ({}), not documented",
            r.status,
            r.body
        );
    }
    // A path the description does not name is not a route.
    assert_eq!(
        request(api, "GET", "/v1/feedback", &[], b"").await.status,
        405
    );
    assert_eq!(
        request(api, "GET", "/v2/status", &[], b"").await.status,
        404
    );
    agent.shutdown().await;
}
