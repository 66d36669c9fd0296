//! The `fedflow-client agent` binary killed with SIGKILL in the middle of a stream of
//! feedback posts: after a restart every acknowledged session is in the store, and the only
//! unacknowledged sessions present are whole batches (the one whose answer was lost), never
//! part of one. The coordinator is away (a closed port): the agent serves its API anyway.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use fedflow_client::agent::store::FeedbackStore;
use fedflow_tests::http::request;
use serde_json::json;

/// Starts the agent of `config`; returns it and its API address (from its first line).
fn start(config: &std::path::Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedflow-client"))
        .args(["agent", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no API address in {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
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
    let poster = rt.spawn(async move {
        let mut acked = Vec::new();
        for b in 0.. {
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
    });
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

    let store = FeedbackStore::open(&store_dir).unwrap();
    let stored: BTreeSet<String> = store
        .snapshot()
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.session_id)
        .collect();
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
    drop(store);

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
