//! `kill -9` of the real coordinator binary in the middle of a run, SIGTERM (a graceful
//! stop that exits 0 within its grace period), and a backup taken while it serves then
//! restored into a new data directory: restarted, it resumes at its last committed round
//! (the backup's) with the identical global model (same SHA-256), the sites reconnect on
//! their own, and the run finishes.
//!
//! Waits are on observable state (the admin service), never on sleeps.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use fedflow_client::federation::{SiteOptions, run_site};
use fedflow_client::site::SiteTrainer;
use fedflow_common::data::{SiteDataset, Vocab};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::{GetStatusRequest, ListRoundsRequest, RoundSummary, RunPhase, RunStatus};

/// Starts `fedflow-coordinator serve` and returns it with the address it is serving on.
fn start(config: &Path, data: &Path, listen: &str) -> (Child, String) {
    start_with(config, data, listen, None)
}

/// [`start`] with a failpoint ([`fedflow_coordinator::FAILPOINT_ENV`]).
fn start_with(
    config: &Path,
    data: &Path,
    listen: &str,
    failpoint: Option<&str>,
) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fedflow-coordinator"));
    if let Some(f) = failpoint {
        command.env(fedflow_coordinator::FAILPOINT_ENV, f);
    }
    let mut child = command
        .args([
            "serve",
            "--insecure-plaintext",
            "--grace-secs",
            "2",
            "--listen",
            listen,
        ])
        .arg("--config")
        .arg(config)
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start fedflow-coordinator");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = lines
        .next()
        .expect("the coordinator prints where it serves")
        .unwrap();
    let addr = first
        .split("serving on ")
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .trim()
        .to_string();
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

async fn status(addr: &str) -> Option<(RunStatus, Vec<RoundSummary>)> {
    let mut admin = AdminClient::connect(format!("http://{addr}")).await.ok()?;
    let status = admin
        .get_status(GetStatusRequest {})
        .await
        .ok()?
        .into_inner();
    let rounds = admin
        .list_rounds(ListRoundsRequest::default())
        .await
        .ok()?
        .into_inner()
        .rounds;
    Some((status, rounds))
}

/// Polls the admin service until `done`; panics after a generous limit.
async fn wait_until(
    addr: &str,
    what: &str,
    done: impl Fn(&RunStatus, &[RoundSummary]) -> bool,
) -> (RunStatus, Vec<RoundSummary>) {
    for _ in 0..1200 {
        if let Some((s, r)) = status(addr).await
            && done(&s, &r)
        {
            return (s, r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the coordinator at {addr} never reached: {what}");
}

/// One in-process site per generated site, training against the coordinator at `addr`
/// and reconnecting quickly when it is away.
fn spawn_sites(
    fed: &fedflow_common::synth::SynthFederation,
    vocab: &Vocab,
    addr: &str,
) -> Vec<tokio::task::JoinHandle<fedflow_client::Result<fedflow_client::federation::SiteSummary>>> {
    fed.sites
        .iter()
        .map(|s| {
            let ds = SiteDataset::from_records(&s.records, vocab, 0.2).unwrap();
            let trainer = Arc::new(SiteTrainer::new(ds, vocab, Device::Cpu));
            let mut o = SiteOptions::new(format!("http://{addr}"), s.name.clone());
            o.poll_wait = Duration::from_secs(1);
            o.max_backoff = Duration::from_millis(500);
            tokio::spawn(run_site(o, trainer))
        })
        .collect()
}

/// Copies the directory tree `from` to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn committed(rounds: &[RoundSummary]) -> Vec<(u64, String)> {
    rounds
        .iter()
        .filter(|r| r.status == "committed")
        .map(|r| (r.round, r.model_sha256.clone()))
        .collect()
}

/// How the first coordinator is stopped.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    /// SIGKILL: no shutdown code runs.
    Kill,
    /// SIGTERM: a graceful stop.
    Term,
    /// A backup taken while it serves, then SIGKILL; the second coordinator runs on the
    /// backup restored into a new data directory.
    BackupThenKill,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_run_resumes_with_the_identical_model_and_finishes() {
    stopped_mid_run_resumes(Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_sent_sigterm_exits_0_in_its_grace_period_and_resumes() {
    stopped_mid_run_resumes(Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_serving_restores_to_a_coordinator_that_resumes_the_run() {
    stopped_mid_run_resumes(Stop::BackupThenKill).await;
}

/// Runs `fedflow-coordinator` with `args`; its success and output.
fn coordinator_command(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedflow-coordinator"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

async fn stopped_mid_run_resumes(how: Stop) {
    let dir = tempfile::tempdir().unwrap();
    let fed = generate(&SynthConfig {
        sites: 3,
        total_sessions: 900,
        min_site_sessions: 200,
        seed: 11,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    vocab.save(dir.path().join("vocab.json")).unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        "[run]\nname = \"resume\"\nseed = 5\nrounds = 3\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
         [train]\nepochs = 1\nlearning_rate = 0.01\n\
         [sampling]\nmin_selected = 3\nmin_available = 3\n\
         [rounds]\ndeadline_secs = 300\nmin_completed = 3\nheartbeat_timeout_secs = 30\n",
    )
    .unwrap();
    let mut data = dir.path().join("coordinator");

    let (mut first, addr) = start(&config, &data, "127.0.0.1:0");
    let sites = spawn_sites(&fed, &vocab, &addr);

    // Let round 1 commit, then stop it.
    let (_, before) = wait_until(&addr, "round 1 committed", |_, r| {
        committed(r).iter().any(|(n, _)| *n == 1)
    })
    .await;
    let mut backed_up = None;
    match how {
        Stop::Kill => {
            first.kill().unwrap();
            first.wait().unwrap();
        }
        Stop::BackupThenKill => {
            let backup = dir.path().join("backup");
            let (ok, out) = coordinator_command(&[
                "backup".as_ref(),
                "--data".as_ref(),
                data.as_os_str(),
                "--out".as_ref(),
                backup.as_os_str(),
            ]);
            assert!(ok, "{out}");
            first.kill().unwrap();
            first.wait().unwrap();
            let manifest: fedflow_coordinator::backup::Manifest =
                serde_json::from_slice(&std::fs::read(backup.join("backup.json")).unwrap())
                    .unwrap();
            // A damaged backup is refused, and leaves nothing to start from.
            let damaged = dir.path().join("damaged");
            copy_tree(&backup, &damaged);
            let checkpoint = std::fs::read_dir(damaged.join("checkpoints/resume"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.to_string_lossy().ends_with("round-000001.safetensors"))
                .unwrap();
            let mut bytes = std::fs::read(&checkpoint).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 1;
            std::fs::write(&checkpoint, bytes).unwrap();
            let refused = dir.path().join("refused");
            let (ok, out) = coordinator_command(&[
                "restore".as_ref(),
                "--from".as_ref(),
                damaged.as_os_str(),
                "--data".as_ref(),
                refused.as_os_str(),
            ]);
            assert!(!ok && out.contains("the backup is damaged"), "{out}");
            assert!(!refused.join("fedflow.sqlite").exists());
            // Restored into a new directory, with a verifying audit log.
            let restored = dir.path().join("restored");
            let (ok, out) = coordinator_command(&[
                "restore".as_ref(),
                "--from".as_ref(),
                backup.as_os_str(),
                "--data".as_ref(),
                restored.as_os_str(),
            ]);
            assert!(ok, "{out}");
            let (ok, out) = coordinator_command(&[
                "audit-log".as_ref(),
                "verify".as_ref(),
                restored.join("security-audit.jsonl").as_os_str(),
            ]);
            assert!(ok, "{out}");
            // Not over an existing directory.
            let (ok, out) = coordinator_command(&[
                "restore".as_ref(),
                "--from".as_ref(),
                backup.as_os_str(),
                "--data".as_ref(),
                restored.as_os_str(),
            ]);
            assert!(!ok && out.contains("is not empty"), "{out}");
            backed_up = Some(manifest);
            data = restored;
        }
        Stop::Term => {
            let sent = Command::new("kill")
                .args(["-TERM", &first.id().to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
            // The grace period is 2 s; the bound here only keeps a broken stop from
            // hanging the test.
            let exit = tokio::time::timeout(
                Duration::from_secs(60),
                tokio::task::spawn_blocking(move || first.wait().unwrap()),
            )
            .await
            .expect("serve exits after SIGTERM")
            .unwrap();
            assert_eq!(exit.code(), Some(0), "a graceful stop exits 0: {exit:?}");
        }
    }
    let before = committed(&before);

    // Restarted on the same directory and port, it resumes where the database says.
    let (mut second, addr2) = start(&config, &data, &addr);
    assert_eq!(addr2, addr);
    let (status, after) = wait_until(&addr, "the restarted coordinator answers", |_, _| true).await;
    let after = committed(&after);
    for (round, sha) in &before {
        let again = after.iter().find(|(r, _)| r == round).map(|(_, s)| s);
        assert_eq!(again, Some(sha), "round {round} changed across the crash");
    }
    let (last_round, last_sha) = after.last().unwrap().clone();
    assert!(last_round >= 1);
    assert_eq!(status.committed_round, last_round);
    if let Some(m) = &backed_up {
        // The restored coordinator stands where the backup did.
        assert_eq!(
            (m.runs[0].committed_round, m.runs[0].model_sha256.as_str()),
            (last_round, last_sha.as_str())
        );
    }
    assert_eq!(
        status.global_model_sha256, last_sha,
        "the resumed global model is the last committed one"
    );

    // The sites reconnect on their own and the run finishes.
    let (status, rounds) = wait_until(&addr, "the run finished", |s, _| {
        s.phase == RunPhase::Finished as i32
    })
    .await;
    assert_eq!(status.committed_round, 3);
    assert_eq!(committed(&rounds).len(), 4, "rounds 0 to 3");
    // Every site ends cleanly (an update computed for a task the crash abandoned is refused,
    // which the site records and moves on from).
    for s in sites {
        let summary = s.await.unwrap().unwrap();
        assert!(summary.rounds_contributed.contains(&3), "{summary:?}");
    }
    second.kill().unwrap();
    second.wait().unwrap();
}

/// Site-level DP: the real binary aborts (as `kill -9` would) right after committing round 2,
/// between recording the round in its privacy ledger and handing the model out. Restarted,
/// its ledger holds exactly rounds 1 and 2, and the run goes on until the round that would
/// pass the budget, which it refuses with the reason recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_dp_run_killed_after_recording_keeps_every_spend_and_stops_at_the_budget() {
    use fedflow_common::privacy::{SampledGaussian, planner};
    use fedflow_coordinator::store::Store;

    let dir = tempfile::tempdir().unwrap();
    let fed = generate(&SynthConfig {
        sites: 3,
        total_sessions: 600,
        min_site_sessions: 150,
        seed: 12,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    vocab.save(dir.path().join("vocab.json")).unwrap();
    // Every site every round (no amplification: q = 1), z = 3: a target between the cost of
    // three and four rounds by PLD, the smaller bound the budget is enforced on.
    let event = SampledGaussian {
        q: 1.0,
        z: 3.0,
        steps: 1,
    };
    let eps = |rounds: u64| planner::epsilon(&[event], rounds, 1e-5).unwrap().epsilon;
    let pld = |rounds: u64| {
        planner::epsilon_by(planner::Accounting::Pld, &[event], rounds, 1e-5).unwrap()
    };
    let target = (pld(3) + pld(4)) / 2.0;
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"budget\"\nseed = 5\nrounds = 6\n\
             [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
             [train]\nepochs = 1\nlearning_rate = 0.01\n\
             [sampling]\nmin_selected = 3\nmin_available = 3\n\
             [rounds]\ndeadline_secs = 300\nmin_completed = 1\nheartbeat_timeout_secs = 30\n\
             [evaluation]\nevery = 0\nfinal_round = false\n\
             [site_dp]\nmode = \"central\"\nclip_norm = 1.0\nnoise_multiplier = 3.0\n\
             expected_sites = 3\ntarget_epsilon = {target}\ntarget_delta = 1e-5\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("coordinator");

    let (mut first, addr) = start_with(&config, &data, "127.0.0.1:0", Some("after-commit-round-2"));
    let sites = spawn_sites(&fed, &vocab, &addr);
    let exit = tokio::task::spawn_blocking(move || first.wait().unwrap())
        .await
        .unwrap();
    assert!(
        !exit.success(),
        "the failpoint aborts the coordinator: {exit:?}"
    );
    {
        let store = Store::open(&data).unwrap();
        let ledger = store.site_dp_rounds("budget").unwrap();
        assert_eq!(
            ledger.iter().map(|r| r.round).collect::<Vec<_>>(),
            [1, 2],
            "round 2 was recorded before the crash"
        );
        assert_eq!(store.resume_point("budget").unwrap().round, 2);
    }

    let (mut second, _) = start(&config, &data, &addr);
    let (status, rounds) = wait_until(&addr, "the run finished", |s, _| {
        s.phase == RunPhase::Finished as i32
    })
    .await;
    assert_eq!(
        status.committed_round, 3,
        "rounds 1-3 fit the budget, 4 does not"
    );
    assert_eq!(committed(&rounds).len(), 4, "rounds 0 to 3");
    assert!(
        status
            .status_reason
            .contains("site-level privacy budget: round 4 would take epsilon"),
        "{}",
        status.status_reason
    );
    for s in sites {
        s.await.unwrap().unwrap();
    }
    second.kill().unwrap();
    second.wait().unwrap();

    let store = Store::open(&data).unwrap();
    let ledger = store.site_dp_rounds("budget").unwrap();
    assert_eq!(
        ledger.iter().map(|r| r.round).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for r in &ledger {
        assert!((r.epsilon - eps(r.round)).abs() < 1e-9, "{r:?}");
        assert_eq!((r.sampling.as_str(), r.sampling_rate), ("all", 1.0));
        assert!(r.contributions <= 3 && r.server_noise_std == 3.0);
    }
    assert!(ledger[2].epsilon_pld.unwrap() <= target);
    assert_eq!(ledger[2].epsilon_pld, Some(pld(3)));
    // Every update the coordinator saw is in the uploads ledger: at least one per site and
    // committed round.
    assert!(store.site_dp_uploads("budget").unwrap().len() >= 9);
    drop(store);

    // The privacy-audit command writes the report where it says, with the ledger's ε.
    let out = Command::new(env!("CARGO_BIN_EXE_fedflow-coordinator"))
        .args(["privacy-report", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(data.join("reports/budget/privacy-audit.json")).unwrap(),
    )
    .unwrap();
    let stated = json["site_level"]["cumulative"][0]["epsilon"]
        .as_f64()
        .unwrap();
    assert_eq!(stated, pld(3), "the smaller bound is stated");
    let rdp = json["site_level"]["cumulative_rdp"][0]["epsilon"]
        .as_f64()
        .unwrap();
    assert!((rdp - eps(3)).abs() < 1e-9, "{rdp}");
    assert!(
        json["run"]["status_reason"]
            .as_str()
            .unwrap()
            .contains("site-level privacy budget")
    );
    assert!(data.join("reports/budget/privacy-audit.html").is_file());
    // The command prints the summary and every warning the report has.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(json["summary"].as_str().unwrap()),
        "{stdout}"
    );
    for w in json["warnings"].as_array().unwrap() {
        let line = format!("warning: {}", w.as_str().unwrap());
        assert!(stdout.contains(&line), "{line} not in {stdout}");
    }
}

/// The model registry across crashes of the real binary in a continuous run (no-op sites,
/// every second round published, one recent checkpoint kept): aborted while pruning (after
/// the rows are gone, before the files are), and aborted inside the transaction that
/// publishes a version. Each restart finds a consistent registry: the published version
/// present and hash-verified, every kept checkpoint there and nothing else, and the gate
/// decides again about a round whose publication never committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_survives_crashes_while_pruning_and_while_publishing() {
    use fedflow_proto::v1::{ListModelsRequest, RunActionRequest};

    let dir = tempfile::tempdir().unwrap();
    let vocab = Vocab::from_events(["open", "search", "escalate"]).unwrap();
    vocab.save(dir.path().join("vocab.json")).unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        "[run]\nname = \"live\"\nseed = 5\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\n\
         [sampling]\nmin_selected = 2\nmin_available = 2\n\
         [rounds]\ndeadline_secs = 300\nmin_completed = 2\nheartbeat_timeout_secs = 30\n\
         [evaluation]\nevery = 0\n\
         [schedule]\nmode = \"continuous\"\n\
         [publish]\nrule = \"every\"\nevery = 2\n\
         [retention]\nkeep_last = 1\n",
    )
    .unwrap();
    let data = dir.path().join("coordinator");
    let checkpoints = data.join("checkpoints/live");
    let files = || -> Vec<u64> {
        let mut rounds: Vec<u64> = std::fs::read_dir(&checkpoints)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_prefix("round-")?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()
            })
            .collect();
        rounds.sort();
        rounds
    };
    let sites = |addr: &str| -> Vec<_> {
        ["site-a", "site-b"]
            .iter()
            .map(|name| {
                let trainer = Arc::new(fedflow_client::noop::NoopTrainer::new(10));
                let mut o = SiteOptions::new(format!("http://{addr}"), *name);
                o.poll_wait = Duration::from_secs(1);
                o.max_backoff = Duration::from_millis(200);
                tokio::spawn(run_site(o, trainer))
            })
            .collect()
    };
    let aborted = |mut child: Child| async move {
        let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert!(
            !exit.success(),
            "the failpoint aborts the coordinator: {exit:?}"
        );
    };

    // 1. Round 2's commit prunes round 1; the abort comes after the rows are deleted and
    // before the file is.
    let (first, addr) = start_with(&config, &data, "127.0.0.1:0", Some("during-prune"));
    let clients = sites(&addr);
    aborted(first).await;
    assert_eq!(files(), [0, 1, 2], "the crash left round 1's file behind");
    // 2. Restarted: the orphan goes, the gate decides about round 2 and publishes it; the
    // run goes on until the transaction publishing round 6 is aborted.
    let (second, _) = start_with(&config, &data, &addr, Some("during-publish-round-6"));
    aborted(second).await;
    {
        let store = fedflow_coordinator::store::Store::open(&data).unwrap();
        let published: Vec<u64> = store
            .publications("live")
            .unwrap()
            .iter()
            .map(|p| p.round)
            .collect();
        assert_eq!(published, [2, 4], "round 6's publication never committed");
        assert!(!store.gate_decided("live", 6).unwrap());
        assert_eq!(store.kept_rounds("live").unwrap(), [0, 2, 4, 6]);
    }
    assert_eq!(
        files(),
        [0, 2, 4, 6],
        "round 6's commit pruned round 5 before the gate ran"
    );
    // 3. Restarted again: round 6 is published now, and the run goes on.
    let (mut third, _) = start(&config, &data, &addr);
    wait_until(&addr, "round 8 committed", |s, _| s.committed_round >= 8).await;
    let mut admin = AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    admin
        .stop_run(RunActionRequest {
            reason: "test over".into(),
        })
        .await
        .unwrap();
    let models = admin
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let status = admin
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    third.kill().unwrap();
    third.wait().unwrap();
    for c in clients {
        c.abort();
    }
    let published: Vec<u64> = models.publications.iter().map(|p| p.round).collect();
    let last = status.committed_round;
    let expected: Vec<u64> = (2..=last).step_by(2).collect();
    assert_eq!(published, expected, "each even round once, none twice");
    assert_eq!(status.published.unwrap().round, *expected.last().unwrap());
    let kept: Vec<u64> = models
        .versions
        .iter()
        .filter(|v| v.kept)
        .map(|v| v.round)
        .collect();
    let mut want: Vec<u64> = [0, last]
        .into_iter()
        .chain(expected.iter().copied())
        .collect();
    want.sort();
    want.dedup();
    assert_eq!(kept, want);
    assert_eq!(files(), want, "exactly the kept checkpoints are on disk");
    // A resumed engine verified the published version's bytes against the registry.
    let store = fedflow_coordinator::store::Store::open(&data).unwrap();
    let p = store.published("live").unwrap().unwrap();
    let (_, _, sha) =
        fedflow_common::params::ParamSet::load_hashed(store.model_checkpoint_path("live", p.round))
            .unwrap();
    assert_eq!(sha, p.model_sha256);
}
