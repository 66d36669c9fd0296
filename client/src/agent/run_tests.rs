//! The whole agent started from its configuration ([`super::run::start`]), its coordinator
//! away (a closed port; the federation loop retries in the background): the API over TLS and
//! mutual TLS, a version pinned and unpinned at the site, and personalisation of the
//! installed version.

use std::path::Path;

use candle_core::Device;
use fedflow_common::data::{SessionRecord, Vocab};
use fedflow_common::model::{AttentionFlowModel, ModelConfig, vocab_sha256};
use fedflow_common::params::ParamSet;
use fedflow_tests::Pki;
use fedflow_tests::http::{request, request_tls, tls_client};

use super::config::AgentConfig;
use super::run::{PUBLISHED_DIR, RunningAgent, start};
use super::store::FeedbackStore;
use crate::published::{PinTarget, PublishedSink};

/// A site folder with `site.toml` (its `[http]` and further sections from `extra`) and the
/// vocabulary; the coordinator's address is a closed port.
fn site(dir: &Path, http: &str, extra: &str) -> AgentConfig {
    Vocab::from_events(["a", "b", "c"])
        .unwrap()
        .save(dir.join("vocab.json"))
        .unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let away = closed.local_addr().unwrap();
    drop(closed);
    let text = format!(
        "[site]\nid = \"site-a\"\ndata_dir = \"data\"\nvocab = \"vocab.json\"\n\
         [coordinator]\nurl = \"http://{away}\"\ninsecure_plaintext = true\n\
         [http]\nlisten = \"127.0.0.1:0\"\n{http}\n{extra}"
    );
    AgentConfig::parse(&text, dir).unwrap()
}

/// Installs a version of round `round` (weights from seed `round`) in the site's folder.
fn install(cfg: &AgentConfig, round: u64) -> crate::published::Current {
    let vocab = Vocab::load(&cfg.site.vocab).unwrap();
    let config = ModelConfig {
        vocab_size: vocab.len(),
        embed_dim: 8,
        hidden_size: 8,
        num_layers: 1,
        ..ModelConfig::default()
    };
    let model = AttentionFlowModel::new(&config, &Device::Cpu, round).unwrap();
    let bytes = ParamSet::from_varmap(model.varmap())
        .unwrap()
        .to_safetensors_bytes()
        .unwrap();
    let sha = fedflow_common::hash::sha256_hex(&bytes);
    sink(cfg)
        .install(round, &sha, 0, &config, &vocab_sha256(&vocab), &bytes)
        .unwrap()
}

fn sink(cfg: &AgentConfig) -> PublishedSink {
    PublishedSink {
        dir: cfg.site.data_dir.join(PUBLISHED_DIR),
        vocab: Vocab::load(&cfg.site.vocab).unwrap(),
    }
}

/// Waits until the served model satisfies `ready`.
async fn wait_serving(agent: &RunningAgent, ready: impl Fn(&super::serving::Served) -> bool) {
    let mut changes = agent.state.served.changes();
    let served = agent.state.served.clone();
    changes.wait_for(|_| ready(&served)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_and_with_a_client_ca_only_callers_holding_its_certificates() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let server = pki.bundle("coordinator");
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        server.join("cert.pem").display(),
        server.join("key.pem").display()
    );
    let ca = server.join("ca.pem");

    // TLS only: any caller that trusts the certificate.
    let agent = start(&site(dir.path(), &tls, ""), None).await.unwrap();
    assert!(agent.https);
    let client = tls_client(&ca, None);
    let a = request_tls(&client, agent.http_addr, "GET", "/v1/status", &[], b"")
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["store"]["sessions"], 0);
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = tokio::net::TcpStream::connect(agent.http_addr)
        .await
        .unwrap();
    let mut plain = plain;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    plain
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = plain.read_to_end(&mut raw).await;
    assert!(!raw.starts_with(b"HTTP/1.1 200"), "plaintext answered");
    // A client that does not trust the certificate is refused in the handshake.
    let stranger = tls_client(&pki.bundle("impostor").join("ca.pem"), None);
    assert!(
        request_tls(&stranger, agent.http_addr, "GET", "/v1/status", &[], b"")
            .await
            .is_err()
    );
    agent.shutdown().await;

    // Mutual TLS: a certificate from the client CA is needed.
    let dir = tempfile::tempdir().unwrap();
    let mtls = format!("{tls}tls_client_ca = \"{}\"\n", ca.display());
    let agent = start(&site(dir.path(), &mtls, ""), None).await.unwrap();
    let anonymous = request_tls(&client, agent.http_addr, "GET", "/v1/status", &[], b"").await;
    assert!(anonymous.is_err(), "{anonymous:?}");
    let site_a = pki.bundle("site-a");
    let holder = tls_client(
        &ca,
        Some((&site_a.join("cert.pem"), &site_a.join("key.pem"))),
    );
    let a = request_tls(&holder, agent.http_addr, "GET", "/v1/status", &[], b"")
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    // A certificate from another CA is refused too.
    let stranger = pki.bundle("stranger");
    let outsider = tls_client(
        &ca,
        Some((&stranger.join("cert.pem"), &stranger.join("key.pem"))),
    );
    assert!(
        request_tls(&outsider, agent.http_addr, "GET", "/v1/status", &[], b"")
            .await
            .is_err()
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_version_is_served_over_newer_ones_until_unpinned() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(dir.path(), "", "");
    let v1 = install(&cfg, 1);
    let agent = start(&cfg, None).await.unwrap();
    let status = || async {
        request(agent.http_addr, "GET", "/v1/status", &[], b"")
            .await
            .json()["serving"]
            .clone()
    };
    assert_eq!(status().await["round"], 1);
    let v2 = install(&cfg, 2);
    wait_serving(&agent, |s| s.current().is_some_and(|m| m.round == 2)).await;
    // A rollback at the site: the previous version, pinned.
    assert_eq!(sink(&cfg).pin(PinTarget::Previous).unwrap(), v1);
    wait_serving(&agent, |s| s.current().is_some_and(|m| m.pinned)).await;
    let s = status().await;
    assert_eq!(
        (s["round"].as_u64(), s["pinned"].as_bool()),
        (Some(1), Some(true))
    );
    assert_eq!(s["model_sha256"], v1.model_sha256);
    // A newer publish does not move a pinned site; predictions say which version answered.
    install(&cfg, 3);
    let p = request(
        agent.http_addr,
        "POST",
        "/v1/predict",
        &[],
        br#"{"sessions": [{"events": ["a", "b"]}]}"#,
    )
    .await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.json()["version"]["round"], 1);
    assert!(sink(&cfg).unpin().unwrap());
    wait_serving(&agent, |s| {
        s.current().is_some_and(|m| m.round == 3 && !m.pinned)
    })
    .await;
    assert_ne!(status().await["model_sha256"], v2.model_sha256);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_personalisation_on_the_installed_version_is_fine_tuned_and_served_when_better() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = site(
        dir.path(),
        "",
        "[personalisation]\nepochs = 8\nlearning_rate = 0.02\nmin_sessions = 50\n",
    );
    // Feedback whose label the first event decides; the installed version is untrained.
    let store = FeedbackStore::open(cfg.site.data_dir.join(super::run::FEEDBACK_DIR)).unwrap();
    let records: Vec<SessionRecord> = (0..400)
        .map(|i| SessionRecord {
            session_id: format!("s{i}"),
            events: vec![if i % 2 == 0 { "a" } else { "b" }.into(), "c".into()],
            label: if i % 2 == 0 { 1 } else { 5 },
            user_id: None,
            timestamp: None,
        })
        .collect();
    store.append(&records, 0).unwrap().unwrap();
    drop(store);
    let v1 = install(&cfg, 1);
    let agent = start(&cfg, None).await.unwrap();
    wait_serving(&agent, |s| s.personalisation().is_some()).await;
    let s = request(agent.http_addr, "GET", "/v1/status", &[], b"")
        .await
        .json();
    let p = &s["personalisation"];
    assert_eq!(p["chosen"], true, "{s}");
    assert!(
        p["personalised"]["accuracy"].as_f64().unwrap()
            > p["published"]["accuracy"].as_f64().unwrap(),
        "{s}"
    );
    assert_eq!(
        (
            s["serving"]["round"].as_u64(),
            s["serving"]["personalised"].as_bool(),
            s["serving"]["model_sha256"].as_str()
        ),
        (Some(1), Some(true), Some(v1.model_sha256.as_str()))
    );
    // Its predictions follow the site's data: "a ..." is a 1, "b ..." a 5.
    let answer = request(
        agent.http_addr,
        "POST",
        "/v1/predict",
        &[],
        br#"{"sessions": [{"events": ["a", "c"]}, {"events": ["b", "c"]}]}"#,
    )
    .await
    .json();
    let predicted: Vec<u64> = answer["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_u64().unwrap())
        .collect();
    assert_eq!(predicted, [1, 5], "{answer}");
    assert_eq!(answer["version"]["personalised"], true);
    // A new version is served as published at once, then personalised again.
    let before = agent.state.served.personalisation();
    install(&cfg, 2);
    wait_serving(&agent, |s| {
        s.current().is_some_and(|m| m.round == 2 && m.personalised) && s.personalisation() != before
    })
    .await;
    agent.shutdown().await;
}
