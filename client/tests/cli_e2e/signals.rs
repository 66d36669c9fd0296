//! SIGTERM, what Kubernetes and systemd send, stops the real `fedflow-client join` and
//! `agent` binaries gracefully: no new task, exit 0, saying the site left when asked. The
//! coordinator holds its run (paused), so the sites are waiting for a task when the signal
//! comes; waits are on the coordinator's view of the sites and on the processes' ends.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fedflow_common::data::{Vocab, write_sessions};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_coordinator::service::RunAction;
use fedflow_tests::TestCoordinator;

const RUN: &str = "[run]\nname = \"term\"\nseed = 1\nrounds = 2\n\
     [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\n\
     [sampling]\nmin_selected = 1\nmin_available = 1\n\
     [rounds]\ndeadline_secs = 300\nmin_completed = 1\n";

/// Sends SIGTERM to `child` once the coordinator has heard from `sites` sites (the child
/// among them); returns its exit status and what it printed.
async fn terminate_when_connected(
    c: &TestCoordinator,
    sites: usize,
    mut child: Child,
) -> (std::process::ExitStatus, String) {
    let mut connected = false;
    for _ in 0..600 {
        if c.handle.view().await.unwrap().sites_connected >= sites {
            connected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(connected, "the site never polled");
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let stdout = child.stdout.take().unwrap();
    // The bound only keeps a broken stop from hanging the test.
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let out: Vec<String> = BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect();
            (child.wait().unwrap(), out.join("\n"))
        }),
    )
    .await
    .expect("the process exits after SIGTERM")
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_agent_leave_on_sigterm_with_exit_0() {
    let fed = generate(&SynthConfig {
        sites: 1,
        total_sessions: 200,
        min_site_sessions: 150,
        seed: 3,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let c = TestCoordinator::builder(RUN).vocab(&vocab).spawn().await;
    c.handle.operate(RunAction::Pause, "test").await.unwrap();
    let data = c.dir().join("site.csv");
    write_sessions(&data, &fed.sites[0].records).unwrap();

    let join = Command::new(env!("CARGO_BIN_EXE_fedflow-client"))
        .args([
            "join",
            "--insecure-plaintext",
            "--site-id",
            "site-j",
            "--coordinator",
        ])
        .arg(c.url())
        .arg("--data")
        .arg(&data)
        .arg("--vocab")
        .arg(c.dir().join("vocab.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (status, out) = terminate_when_connected(&c, 1, join).await;
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("left when asked to stop"), "{out}");

    let config = c.dir().join("site.toml");
    std::fs::write(
        &config,
        format!(
            "[site]\nid = \"site-a\"\ndata_dir = \"agent\"\nvocab = \"vocab.json\"\n\
             [coordinator]\nurl = \"{}\"\ninsecure_plaintext = true\n\
             [http]\nlisten = \"127.0.0.1:0\"\n",
            c.url()
        ),
    )
    .unwrap();
    let agent = Command::new(env!("CARGO_BIN_EXE_fedflow-client"))
        .args(["agent", "--grace-secs", "5", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (status, out) = terminate_when_connected(&c, 2, agent).await;
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("agent: stopping"), "{out}");
    assert!(!out.contains("abandoned"), "nothing was in progress: {out}");
}
