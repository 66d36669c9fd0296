//! Claims the README and `--help` texts make about the binaries, each checked by running
//! the real binary: plaintext refused off loopback, JSON log lines carrying run and round
//! ids, `audit-log verify`'s exit status and message, and `fedflow-ctl`'s exit code for a
//! certificate from another CA.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use candle_core::Device;
use fedflow_client::federation::{SiteOptions, run_site};
use fedflow_client::site::SiteTrainer;
use fedflow_common::data::{SiteDataset, Vocab};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_coordinator::security::audit_log::AuditLog;
use fedflow_tests::bin::cargo_bin;
use fedflow_tests::{Pki, TestCoordinator};
use serde_json::Value;

fn coordinator_exe() -> std::path::PathBuf {
    cargo_bin("fedflow-coordinator", "fedflow-coordinator")
}

/// Runs `fedflow-coordinator` with `args`: exit code, stdout, stderr.
fn coordinator(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(coordinator_exe()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `serve --insecure-plaintext` on a non-loopback address stops before it binds anything,
/// and `--allow-insecure-remote` is what lets it past that check (here on to the missing
/// config file, so nothing is ever bound).
#[test]
fn plaintext_serve_is_refused_off_loopback_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("absent.toml");
    let data = dir.path().join("data");
    let (config, data) = (config.to_str().unwrap(), data.to_str().unwrap());
    let serve = [
        "serve",
        "--config",
        config,
        "--data",
        data,
        "--insecure-plaintext",
    ];

    let (code, _, stderr) = coordinator(&[&serve[..], &["--listen", "0.0.0.0:0"]].concat());
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("refusing plaintext on 0.0.0.0:0")
            && stderr.contains("--allow-insecure-remote"),
        "{stderr}"
    );
    assert!(
        !Path::new(data).exists(),
        "nothing was created before the refusal"
    );

    let (code, _, stderr) = coordinator(
        &[
            &serve[..],
            &["--listen", "0.0.0.0:0", "--allow-insecure-remote"],
        ]
        .concat(),
    );
    assert_ne!(code, 0, "{stderr}");
    assert!(!stderr.contains("refusing plaintext"), "{stderr}");
    assert!(
        stderr.contains("absent.toml"),
        "it went on to the config: {stderr}"
    );

    // Loopback needs no permission: it too gets as far as the config.
    let (code, _, stderr) = coordinator(&[&serve[..], &["--listen", "127.0.0.1:0"]].concat());
    assert_ne!(code, 0, "{stderr}");
    assert!(!stderr.contains("refusing plaintext"), "{stderr}");

    // And the permission means nothing without --insecure-plaintext (a usage error).
    let (code, _, stderr) = coordinator(&[
        "serve",
        "--config",
        config,
        "--data",
        data,
        "--allow-insecure-remote",
    ]);
    assert_eq!(code, 2, "{stderr}");
}

/// `audit-log verify` exits 0 with the event count and last hash for an intact log, and 1
/// naming the line for one with a line deleted.
#[test]
fn audit_log_verify_reports_the_first_broken_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("security-audit.jsonl");
    let mut log = AuditLog::open(&path).unwrap();
    for i in 0..4 {
        log.append("event", serde_json::json!({ "i": i })).unwrap();
    }
    let head = log.head().to_string();
    drop(log);
    let file = path.to_str().unwrap();

    let (code, stdout, stderr) = coordinator(&["audit-log", "verify", file]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("4 event(s), chain intact") && stdout.contains(&head),
        "{stdout}"
    );

    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
    lines.remove(1);
    std::fs::write(&path, lines.concat()).unwrap();
    let (code, stdout, stderr) = coordinator(&["audit-log", "verify", file]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("tampered or damaged at line 2"), "{stderr}");
}

/// `fedflow-ctl` with an operator bundle issued by another CA exits 4 (refused), with a
/// message pointing at the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exits_4_on_a_certificate_from_another_ca() {
    let pki = Pki::new();
    let toml = "[run]\nname = \"certs\"\nseed = 2\nrounds = 1\n\
        [model]\nvocab = \"vocab.json\"\nembed_dim = 4\nhidden_size = 4\nnum_layers = 1\n\
        [sampling]\nmin_selected = 1\nmin_available = 1\n\
        [rounds]\ndeadline_secs = 120\nmin_completed = 1\n";
    let c = TestCoordinator::builder(toml)
        .mutual_tls(pki.bundle("coordinator"))
        .spawn()
        .await;
    let ctl = cargo_bin("fedflow-coordinator", "fedflow-ctl");
    let run = |who: &str| {
        let mut cmd = Command::new(&ctl);
        cmd.arg("--coordinator")
            .arg(format!("https://{}", c.addr))
            .arg("--identity")
            .arg(pki.bundle(who))
            .arg("status");
        async move {
            let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    // The federation's own viewer gets through, so the refusal below is the certificate's.
    let (code, stderr) = run("val").await;
    assert_eq!(code, 0, "{stderr}");
    // `stranger` trusts the other CA and presents a certificate the coordinator's CA did
    // not sign.
    let (code, stderr) = run("stranger").await;
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("TLS") && stderr.contains("--identity"),
        "{stderr}"
    );
}

/// `serve --log-format json`: every log line is one JSON object, and the lines about a round
/// carry the run id and the round number as fields. One site runs a one-round federation
/// against the real binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_run_and_round_ids() {
    let dir = tempfile::tempdir().unwrap();
    let fed = generate(&SynthConfig {
        sites: 1,
        total_sessions: 120,
        min_site_sessions: 60,
        seed: 4,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    vocab.save(dir.path().join("vocab.json")).unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        "[run]\nname = \"jsonlogs\"\nseed = 2\nrounds = 1\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 4\nhidden_size = 4\nnum_layers = 1\n\
         [train]\nepochs = 1\nbatch_size = 16\n\
         [sampling]\nmin_selected = 1\nmin_available = 1\n\
         [rounds]\ndeadline_secs = 120\nmin_completed = 1\n\
         [evaluation]\nevery = 0\nfinal_round = false\n",
    )
    .unwrap();
    let mut child = Command::new(coordinator_exe())
        .args(["--log-format", "json", "serve", "--insecure-plaintext"])
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain stderr on a thread so the child never blocks on a full pipe.
    let mut stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let addr = first
        .trim()
        .rsplit_once("serving on ")
        .map(|(_, a)| a.to_string())
        .unwrap_or_else(|| panic!("no address in {first:?}"));

    let site = &fed.sites[0];
    let ds = SiteDataset::from_records(&site.records, &vocab, 0.2).unwrap();
    let trainer = Arc::new(SiteTrainer::new(ds, &vocab, Device::Cpu));
    let summary = run_site(
        SiteOptions::new(format!("http://{addr}"), site.name.clone()),
        trainer,
    )
    .await
    .unwrap();
    drop(summary);
    // The run finished, so `serve` exits on its own (after telling sites).
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let logs = logs.join().unwrap();
    assert!(status.success(), "{status:?}\n{logs}");

    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty());
    let committed = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("round 1 committed"))
        })
        .unwrap_or_else(|| panic!("no commit line in\n{logs}"));
    assert_eq!(committed["run"], "jsonlogs", "{committed}");
    assert_eq!(committed["round"], 1, "{committed}");
    assert!(committed["level"].is_string() && committed["timestamp"].is_string());
}

/// The `fedflow.v1.Federation` health status, or `None` if the check itself failed.
async fn federation_health(channel: tonic::transport::Channel) -> Option<i32> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "fedflow.v1.Federation".into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .ok()
}

/// Polls health (every 100 ms, at most 30 s) until it reports `want`.
async fn health_becomes(channel: &tonic::transport::Channel, want: i32) {
    for _ in 0..300 {
        if federation_health(channel.clone()).await == Some(want) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("health never became {want}");
}

/// gRPC health goes NOT_SERVING while the round engine does not answer (here: its thread
/// held inside an inspection the test controls), and back to SERVING once it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_goes_not_serving_while_the_engine_does_not_answer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let toml = "[run]\nname = \"health\"\nseed = 2\nrounds = 1\n\
        [model]\nvocab = \"vocab.json\"\nembed_dim = 4\nhidden_size = 4\nnum_layers = 1\n\
        [sampling]\nmin_selected = 1\nmin_available = 1\n\
        [rounds]\ndeadline_secs = 120\nmin_completed = 1\n";
    let c = TestCoordinator::builder(toml).spawn().await;
    let channel = tonic::transport::Endpoint::from_shared(c.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    health_becomes(&channel, ServingStatus::Serving as i32).await;

    let (release, held) = std::sync::mpsc::channel::<()>();
    let (entered_tx, entered) = tokio::sync::oneshot::channel::<()>();
    let stuck = c.handle.clone();
    let blocked = tokio::spawn(async move {
        stuck
            .inspect(move |_, _| {
                let _ = entered_tx.send(());
                // The engine thread waits here until the test lets it go.
                let _ = held.recv();
                Ok(())
            })
            .await
    });
    entered.await.unwrap();
    health_becomes(&channel, ServingStatus::NotServing as i32).await;

    release.send(()).unwrap();
    blocked.await.unwrap().unwrap();
    health_becomes(&channel, ServingStatus::Serving as i32).await;
}

/// Every `[train]` field of the run config reaches a remote site's trainer unchanged: the
/// coordinator's task message, read by the site client's own conversion, gives exactly the
/// training configuration the coordinator computes for that site and round.
#[tokio::test]
async fn a_run_configs_train_section_reaches_a_remote_sites_trainer_unchanged() {
    let toml = "[run]\nname = \"train-fields\"\nseed = 11\nrounds = 1\n\
                [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\n\
                [train]\nepochs = 4\nbatch_size = 8\nlearning_rate = 0.02\noptimizer = \"sgd\"\n\
                momentum = 0.3\nweight_decay = 0.002\npatience = 2\nmin_delta = 0.01\n\
                length_bucketing = false\nfedprox_mu = 0.05\nseed_policy = \"per_round\"\n\
                [sampling]\nfraction = 1.0\nmin_selected = 1\nmin_available = 1\n\
                [rounds]\ndeadline_secs = 300\nmin_completed = 1\nheartbeat_timeout_secs = 120\n";
    let c = fedflow_tests::TestCoordinator::builder(toml).spawn().await;
    let mut client = fedflow_tests::site::federation_client(c.addr).await;
    fedflow_tests::site::enrol(&mut client, "site-a").await;
    let task = fedflow_tests::site::task_for(&mut client, "site-a").await;
    let spec = fedflow_client::wire::task_spec(&task).expect("the site accepts its task");
    let want = c.cfg.local_train_config(task.round, "site-a");
    assert_eq!(spec.train, want);
    // And the values are the file's, not defaults that happen to agree.
    assert_eq!(
        (
            spec.train.patience,
            spec.train.min_delta,
            spec.train.length_bucketing
        ),
        (2, 0.01, false)
    );
    assert_eq!(spec.train.epochs, 4);
    assert_eq!(spec.train.fedprox_mu, 0.05);
}
