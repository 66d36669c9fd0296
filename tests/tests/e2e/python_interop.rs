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

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_proto::v1::{GetStatusRequest, ListRoundsRequest, ListSitesRequest, RunPhase, Task};
use fedflow_tests::TestCoordinator;
use fedflow_tests::site::{download, enrol, federation_client, next_task, upload};
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
pub(crate) async fn run(mut cmd: Command, what: &str, limit: Duration) -> String {
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
pub(crate) async fn interop_python() -> PathBuf {
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
async fn coordinator() -> TestCoordinator {
    let toml = "[run]\nname = \"interop\"\nseed = 5\nrounds = 3\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
         [train]\nepochs = 1\nlearning_rate = 0.01\n\
         [sampling]\nmin_selected = 1\nmin_available = 1\n\
         [rounds]\ndeadline_secs = 600\nmin_completed = 1\nheartbeat_timeout_secs = 300\n\
         [evaluation]\nevery = 3\n";
    TestCoordinator::builder(toml).spawn().await
}

/// Trains round `t` the cheap way: downloads the global model and sends back a small delta.
async fn complete(c: &mut FederationClient<Channel>, site: &str, t: &Task) {
    let global = download(c, site, t).await;
    upload(c, site, t, &global.scale(0.01).unwrap(), |_| {})
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_health_checks_and_reads_the_admin_status() {
    // The venv first: on a fresh machine it is the slow part, and it needs no coordinator.
    let python = interop_python().await;

    // A run with something to see: round 1 committed by a Rust site, round 2 open for it.
    let c = coordinator().await;
    let (addr, url) = (c.addr, c.url());
    let mut fed = federation_client(addr).await;
    enrol(&mut fed, "site-rust").await;
    let t1 = next_task(&mut fed, "site-rust").await;
    assert_eq!(t1.round, 1);
    complete(&mut fed, "site-rust", &t1).await;
    // Round 2's task comes only once round 1 is committed.
    let t2 = next_task(&mut fed, "site-rust").await;
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
