//! `fedflow-ctl`, the real binary, against a real coordinator over mutual TLS: `status
//! --json` follows a round (a site that goes silent shows as dropped), history commands
//! agree, admin actions change the run and are refused for a viewer, and the exit codes are
//! the documented ones. Waits poll observable state (the CLI's own output), bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use candle_core::Device;
use fedflow_common::data::Vocab;
use fedflow_common::hash::sha256_hex;
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::params::ParamSet;
use fedflow_coordinator::config::RunConfig;
use fedflow_coordinator::round::RoundEngine;
use fedflow_coordinator::security::pki::{Ca, Validity};
use fedflow_coordinator::security::{Role, Transport};
use fedflow_coordinator::service::{Coordinator, serve};
use fedflow_coordinator::store::Store;
use fedflow_proto::tls::{Bundle, connect};
use fedflow_proto::transfer::{MAX_MESSAGE_BYTES, update_chunks};
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_proto::v1::{
    DownloadModelRequest, EnrolRequest, Metrics, NextTaskRequest, Task, UpdateHeader,
    next_task_response,
};
use prost::bytes::Bytes;
use serde_json::Value;
use tonic::transport::Channel;

struct Ctl {
    addr: SocketAddr,
    pki: PathBuf,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ctl {
    /// Runs `fedflow-ctl` as `who` with `args` (on a blocking thread).
    async fn run(&self, who: &str, args: &[&str]) -> Out {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedflow-ctl"));
        cmd.arg("--coordinator")
            .arg(format!("https://{}", self.addr))
            .arg("--identity")
            .arg(self.pki.join(who))
            .args(args);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.run("val", &a).await;
        assert_eq!(out.code, 0, "{}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    }

    /// Polls `status --json` until `done` holds (bounded).
    async fn status_until(&self, done: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..300 {
            let s = self.json(&["status"]).await;
            if done(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("status never reached the expected state");
    }
}

fn site_state<'a>(s: &'a Value, site: &str) -> &'a str {
    s["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["site_id"] == site)
        .and_then(|x| x["state"].as_str())
        .unwrap_or("absent")
}

async fn site_client(pki: &Path, addr: SocketAddr, name: &str) -> FederationClient<Channel> {
    let bundle = Bundle::load(&pki.join(name)).unwrap();
    FederationClient::new(
        connect(&format!("https://{addr}"), Some(&bundle))
            .await
            .unwrap(),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

async fn task_for(c: &mut FederationClient<Channel>) -> Task {
    c.enrol(EnrolRequest::default()).await.unwrap();
    loop {
        let r = c
            .next_task(NextTaskRequest {
                site_id: String::new(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_follows_a_run_and_acts_on_it_with_the_right_role() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let ca = Ca::init(&pki.join("ca"), Validity::days(5)).unwrap();
    ca.issue_server(
        &["127.0.0.1".into()],
        Validity::days(5),
        &pki.join("coordinator"),
    )
    .unwrap();
    for (role, name) in [
        (Role::Site, "site-a"),
        (Role::Site, "site-b"),
        (Role::Viewer, "val"),
        (Role::Admin, "ada"),
    ] {
        ca.issue(role, name, Validity::days(5), &pki.join(name))
            .unwrap();
    }
    Vocab::from_events(["open", "search", "click"])
        .unwrap()
        .save(dir.path().join("vocab.json"))
        .unwrap();
    let toml = "[run]\nname = \"ops\"\nseed = 2\nrounds = 2\n\
        [model]\nvocab = \"vocab.json\"\nembed_dim = 4\nhidden_size = 4\nnum_layers = 1\n\
        [sampling]\nmin_selected = 2\nmin_available = 2\n\
        [rounds]\ndeadline_secs = 60\nmin_completed = 1\nheartbeat_timeout_secs = 2\n\
        [evaluation]\nevery = 0\nfinal_round = false\n";
    let cfg = RunConfig::from_toml_str(toml, dir.path()).unwrap();
    let model = AttentionFlowModel::new(&cfg.model_config().unwrap(), &Device::Cpu, 1).unwrap();
    let initial = ParamSet::from_varmap(model.varmap()).unwrap();
    let engine = RoundEngine::open(
        Store::open(dir.path().join("data")).unwrap(),
        cfg.clone(),
        initial,
    )
    .unwrap();
    let coordinator =
        Coordinator::spawn(engine, cfg, &Transport::MutualTls(pki.join("coordinator"))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    tokio::spawn(fedflow_coordinator::service::serve_metrics(
        metrics,
        coordinator.clone(),
        std::future::pending(),
    ));
    tokio::spawn(serve(listener, coordinator, std::future::pending()));
    let ctl = Ctl {
        addr,
        pki: pki.clone(),
    };

    // Ready (database open, run loaded) by gRPC health, once the probe has run.
    let health = tonic_health::pb::health_client::HealthClient::new(
        connect(
            &format!("https://{addr}"),
            Some(&Bundle::load(&pki.join("val")).unwrap()),
        )
        .await
        .unwrap(),
    );
    wait_serving(health).await;

    // Round 1 starts with both sites selected.
    let mut a = site_client(&pki, addr, "site-a").await;
    let mut b = site_client(&pki, addr, "site-b").await;
    let (ta, _tb) = tokio::join!(task_for(&mut a), task_for(&mut b));
    let s = ctl.json(&["status"]).await;
    assert_eq!(s["schema"], "fedflow.status/1");
    assert_eq!(
        (s["phase"].as_str(), s["round"]["current"].as_u64()),
        (Some("training"), Some(1))
    );
    assert_eq!(s["round"]["total"], 2);
    assert!(s["seconds_to_deadline"].as_f64().unwrap() > 0.0);
    assert_eq!(site_state(&s, "site-a"), "selected");
    assert_eq!(site_state(&s, "site-b"), "selected");
    let m = scrape(metrics_addr).await;
    assert_eq!(m["fedflow_current_round"], 1.0);
    assert_eq!(m["fedflow_sites_selected"], 2.0);
    assert_eq!(m["fedflow_phase{phase=training}"], 1.0);
    assert_eq!(m["fedflow_phase{phase=waiting}"], 0.0);

    // Site A uploads; site B goes silent and is dropped; the round commits without it.
    let sha = ta.model.as_ref().unwrap().sha256.clone();
    let mut stream = a
        .download_model(DownloadModelRequest {
            task_id: ta.task_id.clone(),
            run_id: ta.run_id.clone(),
            round: 1,
            sha256: sha.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut model_bytes = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        model_bytes.extend_from_slice(&c.data);
    }
    let delta = ParamSet::from_safetensors_bytes(&model_bytes)
        .unwrap()
        .scale(0.01)
        .unwrap();
    let bytes = Bytes::from(delta.to_safetensors_bytes().unwrap());
    let header = UpdateHeader {
        task_id: ta.task_id.clone(),
        run_id: ta.run_id.clone(),
        round: 1,
        nonce: ta.nonce.clone(),
        base_model_sha256: sha,
        delta_sha256: sha256_hex(&bytes),
        total_bytes: bytes.len() as u64,
        weight: 5.0,
        metrics: Some(Metrics {
            train_examples: 5,
            ..Default::default()
        }),
        ..Default::default()
    };
    a.upload_update(tokio_stream::iter(update_chunks(header, &bytes, 4096)))
        .await
        .unwrap();
    let s = ctl
        .status_until(|s| site_state(s, "site-a") == "uploaded")
        .await;
    assert_eq!(s["round"]["current"], 1);
    let s = ctl.status_until(|s| s["round"]["committed"] == 1).await;
    assert_eq!(site_state(&s, "site-b"), "dropped", "{s}");
    let rounds = ctl.json(&["rounds"]).await;
    let r1 = &rounds["rounds"][1];
    assert_eq!(
        (r1["round"].as_u64(), r1["status"].as_str()),
        (Some(1), Some("committed"))
    );
    assert_eq!(
        (r1["uploaded"].as_u64(), r1["dropped"].as_u64()),
        (Some(1), Some(1))
    );
    // The metrics agree with the database (as the admin service reports it).
    let m = scrape(metrics_addr).await;
    assert_eq!(m["fedflow_rounds_completed_total"], 1.0);
    assert_eq!(
        m["fedflow_updates_accepted_total"],
        r1["uploaded"].as_f64().unwrap()
    );
    assert_eq!(m["fedflow_committed_round"], 1.0);
    assert_eq!(m["fedflow_sites_dropped"], 1.0);
    assert_eq!(m["fedflow_round_duration_seconds_count"], 1.0);
    assert_eq!(m["fedflow_aggregations"], 1.0);
    assert!(m["fedflow_received_bytes_total"] >= bytes.len() as f64);
    assert!(m["fedflow_sent_bytes_total"] >= model_bytes.len() as f64);
    let sites = ctl.json(&["sites"]).await;
    assert_eq!(sites["sites"].as_array().unwrap().len(), 2);
    let runs = ctl.json(&["runs"]).await;
    assert_eq!(runs["runs"][0]["run_id"], "ops");
    let table = ctl.run("val", &["rounds"]).await;
    assert!(
        table.stdout.contains("committed") && table.stdout.contains("1/2"),
        "{}",
        table.stdout
    );

    // A viewer may look but not act; an admin acts.
    let refused = ctl.run("val", &["pause"]).await;
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    assert!(refused.stderr.contains("admin role"), "{}", refused.stderr);
    let paused = ctl.run("ada", &["pause", "--reason", "maintenance"]).await;
    assert_eq!(paused.code, 0, "{}", paused.stderr);
    assert!(paused.stdout.contains("paused"));
    let s = ctl.status_until(|s| s["phase"] == "paused").await;
    assert_eq!(
        s["status_reason"]
            .as_str()
            .map(|r| r.contains("maintenance")),
        Some(true)
    );
    assert_eq!(ctl.run("ada", &["resume"]).await.code, 0);
    let stopped = ctl.run("ada", &["stop", "--reason", "done"]).await;
    assert_eq!(stopped.code, 0, "{}", stopped.stderr);
    // Nothing left to do to a stopped run: refused as it stands (exit code 5).
    let again = ctl.run("ada", &["resume"]).await;
    assert_eq!(again.code, 5, "{}", again.stderr);
    // --watch ends when the run has.
    let watch = ctl.run("val", &["status", "--watch", "--json"]).await;
    assert_eq!(watch.code, 0, "{}", watch.stderr);
    let last: Value = serde_json::from_str(watch.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["phase"], "finished");

    // Nobody home: exit code 3 and a message that says what to check.
    let gone = Ctl {
        addr: "127.0.0.1:1".parse().unwrap(),
        pki,
    }
    .run("val", &["status"])
    .await;
    assert_eq!(gone.code, 3, "{}", gone.stderr);
    assert!(
        gone.stderr.contains("cannot reach the coordinator"),
        "{}",
        gone.stderr
    );
}

/// Polls gRPC health (bounded) until the coordinator reports SERVING.
async fn wait_serving(mut health: tonic_health::pb::health_client::HealthClient<Channel>) {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    for _ in 0..100 {
        let s = health
            .check(HealthCheckRequest {
                service: "fedflow.v1.Federation".into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .ok();
        if s == Some(ServingStatus::Serving as i32) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the coordinator never reported SERVING");
}

/// Scrapes `/metrics` (plain HTTP/1.0) and parses it with a Prometheus text-format parser;
/// samples by name, with labels as `name{k=v}`; histograms as `name_count`.
async fn scrape(addr: SocketAddr) -> std::collections::BTreeMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for s in scrape.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let name = if labels.is_empty() {
            s.metric.clone()
        } else {
            format!("{}{{{}}}", s.metric, labels.join(","))
        };
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => {
                out.insert(name, v);
            }
            prometheus_parse::Value::Histogram(h) => {
                let count = h.iter().map(|b| b.count).fold(0.0, f64::max);
                out.insert(format!("{}_count", s.metric), count);
            }
            prometheus_parse::Value::Summary(_) => {}
        }
    }
    out
}
