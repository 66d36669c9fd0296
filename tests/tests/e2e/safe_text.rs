//! Text a site or an operator chose never acts on a terminal or forges a log line: the real
//! `fedflow-coordinator serve` binary over mutual TLS (its text log captured), a site that
//! declines its task with a reason holding a screen-clearing escape sequence and a forged
//! log line, and the real `fedflow-ctl` showing it. The bytes are checked: no ESC reaches
//! the operator's terminal or the log, and no line starts with the forged text. Operators'
//! reasons with control characters are refused, naming the field; long reasons are cut in
//! `fedflow-ctl revocations`.

use std::path::Path;
use std::process::Stdio;

use fedflow_common::data::Vocab;
use fedflow_proto::v1::{DeclineTaskRequest, EnrolRequest, RevokeRequest};
use fedflow_tests::bin::cargo_bin;
use fedflow_tests::site::next_task;
use fedflow_tests::{Pki, wait_serving};
use tokio::io::{AsyncBufReadExt, BufReader};

/// What follows the newline pretends to be a log line of the coordinator's own.
const FORGED: &str = "FORGED-LINE 2026-01-01T00:00:00.000000Z  INFO round 9 committed";

/// Two sites (the second never answers, so the round stays open with the first's decline
/// in view), long deadlines.
const RUN: &str = "[run]\nname = \"text\"\nseed = 4\nrounds = 1\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 4\nhidden_size = 4\nnum_layers = 1\n\
    [sampling]\nmin_selected = 2\nmin_available = 2\n\
    [rounds]\ndeadline_secs = 600\nmin_completed = 1\nheartbeat_timeout_secs = 300\n";

/// Runs `fedflow-ctl` as `who` (a bundle of `pki`) against `addr` with `args`; exit code,
/// stdout bytes, stderr bytes.
async fn ctl(pki: &Pki, addr: &str, who: &str, args: &[&str]) -> (i32, Vec<u8>, Vec<u8>) {
    let mut cmd = std::process::Command::new(cargo_bin("fedflow-coordinator", "fedflow-ctl"));
    cmd.arg("--coordinator")
        .arg(format!("https://{addr}"))
        .arg("--identity")
        .arg(pki.bundle(who))
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (out.status.code().unwrap_or(-1), out.stdout, out.stderr)
}

fn has_esc(bytes: &[u8]) -> bool {
    bytes.contains(&0x1b)
}

/// Whether any line of `bytes` starts with `text`.
fn a_line_starts_with(bytes: &[u8], text: &str) -> bool {
    String::from_utf8_lossy(bytes)
        .lines()
        .any(|l| l.trim_start().starts_with(text))
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_sequences_never_reach_a_terminal_or_a_log_line() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let vocab = Vocab::from_events(["open", "search", "click"]).unwrap();
    vocab.save(dir.path().join("vocab.json")).unwrap();
    std::fs::write(dir.path().join("run.toml"), RUN).unwrap();
    let log_path = dir.path().join("coordinator.log");
    let mut coordinator =
        tokio::process::Command::new(cargo_bin("fedflow-coordinator", "fedflow-coordinator"));
    coordinator
        .args(["serve", "--listen", "127.0.0.1:0", "--stay-up"])
        .arg("--config")
        .arg(dir.path().join("run.toml"))
        .arg("--data")
        .arg(dir.path().join("data"))
        .arg("--tls")
        .arg(pki.bundle("coordinator"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true);
    let mut child = coordinator.spawn().unwrap();
    // `serve` prints the address it bound; the rest of its output is not needed.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the coordinator exited before it served");
        if let Some((_, a)) = line.split_once("serving on ") {
            break a.trim().to_string();
        }
    };
    let sock = addr.parse().unwrap();
    wait_serving(pki.channel(sock, Some("val"), "val").await.unwrap()).await;

    // Site A enrols, gets its task and declines it with the attack as its reason.
    let vocab_sha256 = fedflow_common::model::vocab_sha256(&vocab);
    let mut a = pki.site(sock, "site-a").await;
    let mut b = pki.site(sock, "site-b").await;
    for site in [&mut a, &mut b] {
        site.enrol(EnrolRequest {
            vocab_sha256: vocab_sha256.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let task = next_task(&mut a, "").await;
    let attack = format!("\x1b[2J\x1b[Hall is well\n{FORGED}\r\x1b]0;owned\x07");
    a.decline_task(DeclineTaskRequest {
        task_id: task.task_id.clone(),
        run_id: task.run_id.clone(),
        round: task.round,
        nonce: task.nonce.clone(),
        reason: attack,
        ..Default::default()
    })
    .await
    .unwrap();

    // The operator's terminal: `status` as a table and as JSON.
    let (code, table, err) = ctl(&pki, &addr, "val", &["status"]).await;
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    let shown = String::from_utf8_lossy(&table).into_owned();
    assert!(
        !has_esc(&table),
        "an ESC byte reached the terminal: {shown:?}"
    );
    assert!(!a_line_starts_with(&table, "FORGED-LINE"), "{shown}");
    let row = shown
        .lines()
        .find(|l| l.starts_with("site-a"))
        .unwrap_or_else(|| panic!("no row for site-a: {shown}"));
    assert!(
        row.contains("declined") && row.contains("\\u{1b}[2J"),
        "the reason is shown, escaped: {row}"
    );
    let (code, json, err) = ctl(&pki, &addr, "val", &["status", "--json"]).await;
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    assert!(!has_esc(&json), "{}", String::from_utf8_lossy(&json));
    let status: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let reason = status["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["site_id"] == "site-a")
        .and_then(|s| s["reason"].as_str())
        .unwrap()
        .to_string();
    assert!(reason.contains(FORGED), "{reason:?}");
    assert!(
        !reason.chars().any(fedflow_common::text::is_unsafe),
        "stored made safe at the edge: {reason:?}"
    );

    // The coordinator's text log: the decline is logged, on one line, escaped.
    let log = read(&log_path);
    let text = String::from_utf8_lossy(&log).into_owned();
    assert!(!has_esc(&log), "an ESC byte reached the log: {text}");
    assert!(!a_line_starts_with(&log, "FORGED-LINE"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("declined its task") && l.contains(FORGED)),
        "{text}"
    );

    // An operator's reason with a control character is refused at the edge, naming the
    // field; the error printed holds no ESC either.
    let (code, _, err) = ctl(
        &pki,
        &addr,
        "ada",
        &["pause", "--reason", "\x1b[2Jmaintenance"],
    )
    .await;
    assert_eq!(code, 5, "{}", String::from_utf8_lossy(&err));
    assert!(!has_esc(&err), "{}", String::from_utf8_lossy(&err));
    assert!(
        String::from_utf8_lossy(&err).contains("reason: character 1 is \\u{1b}"),
        "{}",
        String::from_utf8_lossy(&err)
    );
    let (code, _, err) = ctl(&pki, &addr, "ada", &["pause", "--reason", &"x".repeat(201)]).await;
    assert_eq!(code, 5, "{}", String::from_utf8_lossy(&err));
    assert!(
        String::from_utf8_lossy(&err).contains("at most 200"),
        "{}",
        String::from_utf8_lossy(&err)
    );

    // A long (accepted) revocation reason is cut in the table, whole in the JSON.
    let long = format!("{} end", "compromised key ".repeat(12));
    assert!(long.chars().count() <= 200);
    pki.admin(sock, "ada")
        .await
        .revoke(RevokeRequest {
            role: "site".into(),
            name: "site-c".into(),
            reason: long.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (code, table, err) = ctl(&pki, &addr, "val", &["revocations"]).await;
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
    let table = String::from_utf8(table).unwrap();
    let row = table
        .lines()
        .find(|l| l.contains("site-c"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains('…') && !row.contains(" end"),
        "cut for the table: {row}"
    );
    assert!(row.chars().count() < 140, "{row}");
    let (_, json, _) = ctl(&pki, &addr, "val", &["revocations", "--json"]).await;
    let doc: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(doc["revocations"][0]["reason"], long.as_str());

    child.kill().await.unwrap();
}
