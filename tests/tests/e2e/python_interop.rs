//! A client built by a *different* gRPC implementation talks to the coordinator: Python
//! grpcio, with stubs that `grpc_tools.protoc` generates from fedflow's own `.proto` files at
//! run time (`tests/python/interop_client.py`). It passes the standard health checks
//! (`grpc.health.v1`), reads the admin status and rounds, and enrols a site; what it reads
//! must be what the Rust client reads.
//!
//! What it needs: `python3` (3.9 or newer, with its `venv` module; `FEDFLOW_PYTHON` names
//! another interpreter) and, the first time, PyPI. The test runs `tests/python/setup-venv.sh`,
//! which builds a venv with the exact packages of `tests/python/requirements.txt` in
//! `$FEDFLOW_PY_VENV` (default `~/.cache/fedflow/py-venv`) — about a minute, once — and
//! afterwards returns at once, offline, while the requirements are unchanged. `.ci/run`
//! prepares the venv before the tests. Without python3, or when the venv cannot be built,
//! the test FAILS saying what to install; it never skips.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use candle_core::Device;
use fedflow_common::data::Vocab;
use fedflow_common::hash::sha256_hex;
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::params::ParamSet;
use fedflow_coordinator::config::RunConfig;
use fedflow_coordinator::round::RoundEngine;
use fedflow_coordinator::service::{Coordinator, serve};
use fedflow_coordinator::store::Store;
use fedflow_proto::transfer::{MAX_MESSAGE_BYTES, update_chunks};
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_proto::v1::{
    DownloadModelRequest, EnrolRequest, GetStatusRequest, ListRoundsRequest, ListSitesRequest,
    Metrics, NextTaskRequest, RunPhase, Task, UpdateHeader, next_task_response,
};
use prost::bytes::Bytes;
use serde_json::Value;
use tokio::process::Command;
use tonic::transport::Channel;

/// The venv is built once per machine (about a minute); pip has its own network timeouts.
const SETUP_LIMIT: Duration = Duration::from_secs(600);
/// The client itself: interpreter start, stub generation and a handful of calls.
const CLIENT_LIMIT: Duration = Duration::from_secs(120);

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Runs `cmd` to completion within `limit`, killing it past the limit; returns its stdout,
/// panicking with its stderr when it fails.
async fn run(mut cmd: Command, what: &str, limit: Duration) -> String {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: still running after {limit:?}; killed"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stderr\n{stderr}--- stdout\n{stdout}",
        out.status
    );
    // Shown by the test harness only when the test fails.
    eprint!("{stderr}");
    stdout
}

/// The venv's python, after `setup-venv.sh` made sure the venv matches the requirements.
async fn interop_python() -> PathBuf {
    let base = std::env::var("FEDFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    match std::process::Command::new(&base)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        r => panic!(
            "the Python interop test needs `{base}` (Python 3.9+ with the venv module; \
             Debian/Ubuntu: apt-get install python3 python3-venv), or FEDFLOW_PYTHON set to \
             such an interpreter, and PyPI access the first time; `{base} --version` gave {r:?}"
        ),
    }
    let mut setup = Command::new("bash");
    setup.arg(python_dir().join("setup-venv.sh"));
    let stdout = run(setup, "tests/python/setup-venv.sh", SETUP_LIMIT).await;
    let python = PathBuf::from(stdout.trim());
    assert!(
        python.is_file(),
        "setup-venv.sh named {python:?}, not a file"
    );
    python
}

/// A coordinator on 127.0.0.1:0 running 3 rounds of a tiny model, one site per round,
/// deadlines far off, and evaluation only after the last round (so nothing moves on its own
/// while the Python client looks).
async fn coordinator(dir: &Path) -> SocketAddr {
    let vocab = Vocab::from_events(["open", "search", "click", "escalate"]).unwrap();
    vocab.save(dir.join("vocab.json")).unwrap();
    let toml = "[run]\nname = \"interop\"\nseed = 5\nrounds = 3\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
         [train]\nepochs = 1\nlearning_rate = 0.01\n\
         [sampling]\nmin_selected = 1\nmin_available = 1\n\
         [rounds]\ndeadline_secs = 600\nmin_completed = 1\nheartbeat_timeout_secs = 300\n\
         [evaluation]\nevery = 3\n";
    let cfg = RunConfig::from_toml_str(toml, dir).unwrap();
    let model = AttentionFlowModel::new(&cfg.model_config().unwrap(), &Device::Cpu, 1).unwrap();
    let initial = ParamSet::from_varmap(model.varmap()).unwrap();
    let store = Store::open(dir.join("coordinator")).unwrap();
    let engine = RoundEngine::open(store, cfg.clone(), initial).unwrap();
    let coordinator = Coordinator::spawn(
        engine,
        cfg,
        &fedflow_coordinator::security::Transport::InsecurePlaintext,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, coordinator, std::future::pending()));
    addr
}

/// Long-polls until `site` gets a task (the coordinator's answer, not a timer, decides).
async fn task_for(c: &mut FederationClient<Channel>, site: &str) -> Task {
    loop {
        let r = c
            .next_task(NextTaskRequest {
                site_id: site.into(),
                wait_ms: 5_000,
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(next_task_response::Outcome::Task(t)) = r.outcome {
            return t;
        }
    }
}

/// Trains round `t` the cheap way: downloads the global model and sends back a small delta.
async fn complete(c: &mut FederationClient<Channel>, site: &str, t: &Task) {
    let sha = t.model.as_ref().unwrap().sha256.clone();
    let mut stream = c
        .download_model(DownloadModelRequest {
            site_id: site.into(),
            task_id: t.task_id.clone(),
            run_id: t.run_id.clone(),
            round: t.round,
            sha256: sha.clone(),
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        bytes.extend_from_slice(&chunk.data);
    }
    let global = ParamSet::from_safetensors_bytes(&bytes).unwrap();
    let delta = Bytes::from(global.scale(0.01).unwrap().to_safetensors_bytes().unwrap());
    let header = UpdateHeader {
        site_id: site.into(),
        task_id: t.task_id.clone(),
        run_id: t.run_id.clone(),
        round: t.round,
        nonce: t.nonce.clone(),
        base_model_sha256: sha,
        delta_sha256: sha256_hex(&delta),
        total_bytes: delta.len() as u64,
        weight: 10.0,
        site_dp_unclipped: false,
        metrics: Some(Metrics {
            train_examples: 10,
            validation_examples: 2,
            train_loss: 1.0,
            validation_loss: 1.0,
            validation_accuracy: 0.5,
            validation_macro_f1: 0.4,
            epochs_run: 1,
            train_seconds: 0.1,
        }),
    };
    c.upload_update(tokio_stream::iter(update_chunks(header, &delta, 64 * 1024)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_health_checks_and_reads_the_admin_status() {
    // The venv first: on a fresh machine it is the slow part, and it needs no coordinator.
    let python = interop_python().await;

    // A run with something to see: round 1 committed by a Rust site, round 2 open for it.
    let dir = tempfile::tempdir().unwrap();
    let addr = coordinator(dir.path()).await;
    let url = format!("http://{addr}");
    let mut fed = FederationClient::connect(url.clone())
        .await
        .unwrap()
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    fed.enrol(EnrolRequest {
        site_id: "site-rust".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let t1 = task_for(&mut fed, "site-rust").await;
    assert_eq!(t1.round, 1);
    complete(&mut fed, "site-rust", &t1).await;
    // Round 2's task comes only once round 1 is committed.
    let t2 = task_for(&mut fed, "site-rust").await;
    assert_eq!(t2.round, 2);

    // What the Rust side knows.
    let mut admin = AdminClient::connect(url).await.unwrap();
    let status = admin
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let rounds = admin
        .list_rounds(ListRoundsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rounds;
    let phase = RunPhase::try_from(status.phase).unwrap();
    assert_eq!(phase, RunPhase::Training);
    assert_eq!((status.committed_round, status.current_round), (1, 2));
    let seen: Vec<(u64, &str)> = rounds
        .iter()
        .map(|r| (r.round, r.status.as_str()))
        .collect();
    // Round 0 is the initial model, committed when the run was created.
    assert_eq!(seen, [(0, "committed"), (1, "committed"), (2, "open")]);

    // What the Python client reads.
    let mut client = Command::new(&python);
    client
        .arg(python_dir().join("interop_client.py"))
        .arg(addr.to_string())
        .args(["--enrol", "site-python"]);
    let stdout = run(client, "tests/python/interop_client.py", CLIENT_LIMIT).await;
    eprintln!("python client: {stdout}");
    let py: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the client's stdout is not one JSON object ({e}): {stdout}"));

    for service in ["", "fedflow.v1.Admin", "fedflow.v1.Federation"] {
        assert_eq!(py["health"][service], "SERVING", "{py}");
    }
    assert_eq!(py["run_id"], status.run_id.as_str(), "{py}");
    assert_eq!(py["phase"], phase.as_str_name(), "{py}");
    assert_eq!(py["committed_round"], status.committed_round, "{py}");
    assert_eq!(py["current_round"], status.current_round, "{py}");
    assert_eq!(py["total_rounds"], 3, "{py}");
    assert_eq!(py["total_rounds"], status.total_rounds, "{py}");
    assert_eq!(
        py["global_model_sha256"],
        status.global_model_sha256.as_str(),
        "{py}"
    );
    assert_eq!(py["status_sites"], serde_json::json!(["site-rust"]), "{py}");
    assert_eq!(py["rounds_run_id"], status.run_id.as_str(), "{py}");
    assert_eq!(py["rounds_listed"], rounds.len(), "{py}");
    let listed: Vec<Value> = rounds
        .iter()
        .map(|r| serde_json::json!({"round": r.round, "status": r.status}))
        .collect();
    assert_eq!(py["rounds"], Value::Array(listed), "{py}");
    assert_eq!(
        py["enrol"]["coordinator_version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        py["sites"],
        serde_json::json!(["site-python", "site-rust"]),
        "{py}"
    );

    // And the coordinator recorded the Python site's enrolment.
    let sites = admin
        .list_sites(ListSitesRequest {})
        .await
        .unwrap()
        .into_inner()
        .sites;
    assert!(
        sites.iter().any(|s| s.site_id == "site-python"),
        "{sites:?}"
    );
}
