//! The `fedflow-client agent` binary killed in the middle of a stream of feedback posts:
//! after a restart every acknowledged session is in the store, and the only unacknowledged
//! sessions present are whole batches (the one whose answer was lost), never part of one.
//! Once with SIGKILL while the coordinator is away (a closed port: the agent serves its API
//! anyway), once aborted during a record-level DP round right after the release was
//! recorded in its privacy ledger: the restarted agent re-sends that update, and the ledger
//! holds each release once.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};

use fedflow_client::agent::store::FeedbackStore;
use fedflow_client::ledger::Ledger;
use fedflow_client::privacy::FAILPOINT_ENV;
use fedflow_common::data::{Vocab, write_sessions};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_coordinator::store::SiteState;
use fedflow_tests::http::request;
use serde_json::json;

use super::record_privacy::{coordinator, round_states};

/// Starts the agent of `config`; returns it and its API address (from its first line).
fn start(config: &std::path::Path) -> (Child, SocketAddr) {
    let (child, addr, _) = start_with(config, None);
    (child, addr)
}

/// Starts the agent of `config` with `failpoint`; returns it, its API address (from its
/// first line) and the rest of its standard output.
fn start_with(
    config: &std::path::Path,
    failpoint: Option<&str>,
) -> (Child, SocketAddr, BufReader<ChildStdout>) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedflow-client"));
    c.args(["agent", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    match failpoint {
        Some(f) => c.env(FAILPOINT_ENV, f),
        None => c.env_remove(FAILPOINT_ENV),
    };
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no API address in {line:?}"))
        .parse()
        .unwrap();
    (child, addr, out)
}

fn batch(b: usize) -> (Vec<String>, Vec<u8>) {
    let ids: Vec<String> = (0..5).map(|i| format!("b{b}-s{i}")).collect();
    let sessions: Vec<_> = ids
        .iter()
        .map(|id| json!({"session_id": id, "events": ["searched", "opened_help"], "label": 3}))
        .collect();
    (
        ids,
        json!({ "sessions": sessions }).to_string().into_bytes(),
    )
}

#[test]
fn an_agent_killed_mid_stream_keeps_every_acknowledged_session_and_no_half_batch() {
    let dir = tempfile::tempdir().unwrap();
    fedflow_common::data::Vocab::from_events(["searched", "opened_help"])
        .unwrap()
        .save(dir.path().join("vocab.json"))
        .unwrap();
    // A port nothing listens on: the federation loop keeps retrying, the API serves.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let away = closed.local_addr().unwrap();
    drop(closed);
    let config = dir.path().join("site.toml");
    std::fs::write(
        &config,
        format!(
            "[site]\nid = \"site-a\"\ndata_dir = \"data\"\nvocab = \"vocab.json\"\n\
             [coordinator]\nurl = \"http://{away}\"\ninsecure_plaintext = true\n\
             [http]\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut child, addr) = start(&config);

    // Posts batches one after another until the process dies; records what was acknowledged.
    let poster = rt.spawn(post_until_dead(addr, 0));
    // Kill once a good number were acknowledged (the store's own count says so).
    let store_dir = dir.path().join("data/feedback");
    loop {
        let n = rt.block_on(async {
            request(addr, "GET", "/v1/status", &[], b"").await.json()["store"]["sessions"]
                .as_u64()
                .unwrap()
        });
        if n >= 100 {
            break;
        }
        std::thread::yield_now();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (acked, attempted) = rt.block_on(poster).unwrap();
    // 100 sessions were stored: 20 batches, the last of which may have been committed with
    // its answer lost in the kill.
    assert!(acked.len() >= 19, "{} batches acknowledged", acked.len());

    let stored = stored_ids(&store_dir);
    for ids in &acked {
        for id in ids {
            assert!(stored.contains(id), "acknowledged {id} lost");
        }
    }
    // Beyond the acknowledged: at most the batch in flight, and then all of it.
    let acked_ids: BTreeSet<String> = acked.iter().flatten().cloned().collect();
    let extra: BTreeSet<&String> = stored.difference(&acked_ids).collect();
    let (in_flight, _) = batch(attempted);
    if !extra.is_empty() {
        assert_eq!(extra, in_flight.iter().collect(), "a half batch is stored");
    }

    // Restarted, the agent serves the same store.
    let (mut child, addr) = start(&config);
    let s = rt.block_on(async { request(addr, "GET", "/v1/status", &[], b"").await.json() });
    assert_eq!(
        s["store"]["sessions"].as_u64().unwrap(),
        stored.len() as u64
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Posts batches `from..` one after another until the agent stops answering; returns the
/// acknowledged batches' ids and the number of the first batch without an answer.
async fn post_until_dead(addr: SocketAddr, from: usize) -> (Vec<Vec<String>>, usize) {
    let mut acked = Vec::new();
    for b in from.. {
        let (ids, body) = batch(b);
        let ok = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            request_or_none(addr, &body),
        )
        .await
        .ok()
        .flatten();
        match ok {
            Some(200) => acked.push(ids),
            _ => return (acked, b),
        }
    }
    unreachable!()
}

/// The session ids the store in `dir` holds.
fn stored_ids(dir: &std::path::Path) -> BTreeSet<String> {
    FeedbackStore::open(dir)
        .unwrap()
        .snapshot()
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.session_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_aborted_after_recording_a_dp_release_keeps_its_feedback_and_counts_it_once() {
    let fed = generate(&SynthConfig {
        sites: 1,
        total_sessions: 300,
        min_site_sessions: 250,
        seed: 9,
        ..SynthConfig::default()
    })
    .unwrap();
    let mut vocab_events = fed.event_names.clone();
    vocab_events.extend(["searched".to_string(), "opened_help".to_string()]);
    vocab_events.sort();
    vocab_events.dedup();
    let vocab = Vocab::from_events(vocab_events).unwrap();
    let c = coordinator(&vocab, 2, 1, 1).await;
    // Held until the agent has taken in feedback: the first round waits for the test.
    c.handle
        .operate(fedflow_coordinator::service::RunAction::Pause, "test")
        .await
        .unwrap();
    let dir = c.dir();
    let config = dir.join("site.toml");
    std::fs::write(
        &config,
        format!(
            "[site]\nid = \"site-a\"\ndata_dir = \"agent\"\nvocab = \"vocab.json\"\n\
             [coordinator]\nurl = \"{}\"\ninsecure_plaintext = true\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\
             [privacy]\ndir = \"privacy\"\nmax_epsilon = 100.0\n",
            c.url()
        ),
    )
    .unwrap();
    let backfill = dir.join("backfill.csv");
    write_sessions(&backfill, &fed.sites[0].records).unwrap();
    let import = Command::new(env!("CARGO_BIN_EXE_fedflow-client"))
        .args(["data", "import"])
        .arg(&backfill)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(import.status.success(), "{import:?}");
    let store_dir = dir.join("agent/feedback");
    let privacy_dir = dir.join("privacy");

    // First life: takes in feedback, then dies right after recording round 1's release.
    let (mut child, addr, _) = start_with(&config, Some("after-ledger-record"));
    let first = request_or_none(addr, &batch(0).1).await;
    assert_eq!(first, Some(200));
    let poster = tokio::spawn(post_until_dead(addr, 1));
    c.handle
        .operate(fedflow_coordinator::service::RunAction::Resume, "test")
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success(), "the failpoint must kill the agent");
    let (mut acked, attempted) = poster.await.unwrap();
    acked.insert(0, batch(0).0);
    let entries = Ledger::open(&privacy_dir).unwrap().entries().unwrap();
    assert_eq!(
        entries
            .iter()
            .map(|e| (e.round, e.released))
            .collect::<Vec<_>>(),
        vec![(1, false)],
        "the spend is on disk before anything is sent"
    );
    let stored = stored_ids(&store_dir);
    for id in acked.iter().flatten() {
        assert!(stored.contains(id), "acknowledged {id} lost");
    }
    let posted: BTreeSet<String> = (0..=attempted).flat_map(|b| batch(b).0).collect();
    let extra: BTreeSet<&String> = stored
        .iter()
        .filter(|id| posted.contains(*id))
        .filter(|id| !acked.iter().flatten().any(|a| a == *id))
        .collect();
    if !extra.is_empty() {
        assert_eq!(
            extra,
            batch(attempted).0.iter().collect(),
            "a half batch is stored"
        );
    }

    // Second life: re-sends the recorded update, trains round 2, keeps serving.
    let (mut child, addr, mut out) = start_with(&config, None);
    let ended = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                return None;
            }
            if line.contains("the federation's run ended") {
                return Some(line);
            }
        }
    })
    .await
    .unwrap();
    assert!(
        ended.is_some(),
        "the agent's output ended before the run did"
    );
    let s = request(addr, "GET", "/v1/status", &[], b"").await.json();
    assert_eq!(
        s["store"]["sessions"].as_u64().unwrap(),
        stored.len() as u64
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let entries = Ledger::open(&privacy_dir).unwrap().entries().unwrap();
    assert_eq!(
        entries
            .iter()
            .map(|e| (e.round, e.released))
            .collect::<Vec<_>>(),
        vec![(1, true), (2, true)],
        "each release recorded once"
    );
    assert_eq!(
        std::fs::read_dir(privacy_dir.join("pending"))
            .unwrap()
            .count(),
        0
    );
    // The coordinator received exactly the recorded updates.
    let states = round_states(&c.handle, 2).await;
    for e in &entries {
        let row = &states[e.round as usize - 1][0];
        assert_eq!(
            (row.1, row.3.as_deref()),
            (SiteState::Uploaded, Some(e.update_sha256.as_str()))
        );
    }
}

/// The status of a feedback post, or `None` when the connection failed (the agent died).
async fn request_or_none(addr: SocketAddr, body: &[u8]) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let head = format!(
        "POST /v1/feedback HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.ok()?;
    tcp.write_all(body).await.ok()?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw);
    text.split(' ').nth(1)?.parse().ok()
}
