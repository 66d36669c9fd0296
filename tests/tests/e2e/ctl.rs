//! `fedflow-ctl`, the real binary, against a real coordinator over mutual TLS: `status
//! --json` follows a round (a site that goes silent shows as dropped), history commands
//! agree, admin actions change the run and are refused for a viewer, and the exit codes are
//! the documented ones. Waits poll observable state (the CLI's own output), bounded.
//!
//! The binary is another package's, found (and built when stale) by
//! [`fedflow_tests::bin::cargo_bin`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use fedflow_common::data::Vocab;
use fedflow_common::params::ParamSet;
use fedflow_tests::bin::cargo_bin;
use fedflow_tests::site::{download_bytes, header, heartbeat, task_for_with, upload_bytes};
use fedflow_tests::{Pki, TestCoordinator, wait_serving};
use prost::bytes::Bytes;
use serde_json::Value;

struct Ctl {
    exe: PathBuf,
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
        let mut cmd = Command::new(&self.exe);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_follows_a_run_and_acts_on_it_with_the_right_role() {
    let pki = Pki::new();
    // Site B's silence is what drops it: five seconds of it, while both sites heartbeat
    // until the test stops B's heartbeats.
    let toml = "[run]\nname = \"ops\"\nseed = 2\nrounds = 2\n\
        [model]\nvocab = \"vocab.json\"\nembed_dim = 4\nhidden_size = 4\nnum_layers = 1\n\
        [sampling]\nmin_selected = 2\nmin_available = 2\n\
        [rounds]\ndeadline_secs = 60\nmin_completed = 1\nheartbeat_timeout_secs = 5\n\
        [evaluation]\nevery = 0\nfinal_round = false\n";
    let c = TestCoordinator::builder(toml)
        .vocab(&Vocab::from_events(["open", "search", "click"]).unwrap())
        .mutual_tls(pki.bundle("coordinator"))
        .metrics()
        .spawn()
        .await;
    let (addr, metrics_addr) = (c.addr, c.metrics_addr.unwrap());
    let ctl = Ctl {
        exe: cargo_bin("fedflow-coordinator", "fedflow-ctl"),
        addr,
        pki: pki.root().to_path_buf(),
    };

    // Ready (database open, run loaded) by gRPC health, once the probe has run.
    wait_serving(pki.channel(addr, Some("val"), "val").await.unwrap()).await;

    // Round 1 starts with both sites selected.
    let mut a = pki.site(addr, "site-a").await;
    let mut b = pki.site(addr, "site-b").await;
    let (ta, tb) = tokio::join!(
        task_for_with(&mut a, "", &c.vocab_sha256),
        task_for_with(&mut b, "", &c.vocab_sha256)
    );
    // Both heartbeat (saying they train) until the test lets site B go silent.
    let _a_alive = heartbeat(&a, "", &ta).await;
    let b_alive = heartbeat(&b, "", &tb).await;
    let s = ctl.json(&["status"]).await;
    assert_eq!(s["schema"], "fedflow.status/1");
    assert_eq!(
        (s["phase"].as_str(), s["round"]["current"].as_u64()),
        (Some("training"), Some(1))
    );
    assert_eq!(s["round"]["total"], 2);
    assert!(s["seconds_to_deadline"].as_f64().unwrap() > 0.0);
    assert_eq!(site_state(&s, "site-a"), "training", "{s}");
    assert_eq!(site_state(&s, "site-b"), "training", "{s}");
    let m = scrape(metrics_addr).await;
    assert_eq!(m["fedflow_current_round"], 1.0);
    assert_eq!(m["fedflow_sites_selected"], 2.0);
    assert_eq!(m["fedflow_phase{phase=training}"], 1.0);
    assert_eq!(m["fedflow_phase{phase=waiting}"], 0.0);

    // Site A uploads; site B goes silent and is dropped; the round commits without it.
    b_alive.stop();
    let model_bytes = download_bytes(&mut a, "", &ta).await;
    let delta = ParamSet::from_safetensors_bytes(&model_bytes)
        .unwrap()
        .scale(0.01)
        .unwrap();
    let bytes = Bytes::from(delta.to_safetensors_bytes().unwrap());
    upload_bytes(&mut a, header("", &ta, &bytes), &bytes)
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

    // An admin does not revoke itself by accident: refused as it stands without --force.
    let own = ctl.run("ada", &["revoke", "--admin", "ada"]).await;
    assert_eq!(own.code, 5, "{}", own.stderr);
    assert!(own.stderr.contains("--force"), "{}", own.stderr);
    assert_eq!(ctl.run("ada", &["status"]).await.code, 0);
    let forced = ctl
        .run(
            "ada",
            &["revoke", "--admin", "ada", "--force", "--reason", "left"],
        )
        .await;
    assert_eq!(forced.code, 0, "{}", forced.stderr);
    let locked_out = ctl.run("ada", &["status"]).await;
    assert_eq!(locked_out.code, 4, "{}", locked_out.stderr);

    // Nobody home: exit code 3 and a message that says what to check.
    let gone = Ctl {
        addr: "127.0.0.1:1".parse().unwrap(),
        ..ctl
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

/// Scrapes `/metrics` (plain HTTP/1.0) and parses it with a Prometheus text-format parser;
/// samples by name, with labels as `name{k=v}`; histograms as `name_count`.
pub(crate) async fn scrape(addr: SocketAddr) -> std::collections::BTreeMap<String, f64> {
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
