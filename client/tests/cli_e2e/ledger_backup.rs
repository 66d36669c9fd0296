//! The site's privacy ledger backed up mid-run and restored after the ledger's disk is lost,
//! with the real `fedflow-client` against a real coordinator: journal, backup, a release
//! after the backup, the loss, the restore, and a site that goes on. The restored ledger
//! holds every release (the one made after the backup comes from the journal), its spend is
//! exactly the lost ledger's, no task is released twice, and the report says it was
//! restored.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use fedflow_client::ledger::Ledger;
use fedflow_client::privacy::FAILPOINT_ENV;
use fedflow_client::report::site_report;
use fedflow_common::data::{Vocab, write_sessions};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_tests::TestCoordinator;

fn ledger_cli(args: &[&str], paths: &[&Path]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedflow-client"));
    c.arg("ledger").args(args);
    for p in paths {
        c.arg(p);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn epsilon(dir: &Path) -> f64 {
    Ledger::open(dir)
        .unwrap()
        .accountant()
        .unwrap()
        .epsilon(1e-5)
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_lost_after_a_mid_run_backup_is_restored_whole_and_the_site_goes_on() {
    let fed = generate(&SynthConfig {
        sites: 1,
        total_sessions: 300,
        min_site_sessions: 250,
        seed: 11,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let toml = "[run]\nname = \"dp\"\nseed = 3\nrounds = 3\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
         [train]\nepochs = 1\nlearning_rate = 0.01\n\
         [sampling]\nfraction = 1.0\nmin_selected = 1\nmin_available = 1\n\
         [rounds]\ndeadline_secs = 300\nmin_completed = 1\nheartbeat_timeout_secs = 120\n\
         [record_dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nexpected_batch_size = 16\n\
         target_epsilon = 1000.0\ntarget_delta = 1e-5\n";
    let c = TestCoordinator::builder(toml).vocab(&vocab).spawn().await;
    let dir = c.dir().to_path_buf();
    let data = dir.join("site.csv");
    write_sessions(&data, &fed.sites[0].records).unwrap();
    let privacy = dir.join("privacy");
    let journal = dir.join("other-disk").join("ledger.jsonl");
    std::fs::create_dir_all(journal.parent().unwrap()).unwrap();

    let out = ledger_cli(
        &["journal", "--ledger"],
        &[&privacy, Path::new("--to"), &journal],
    );
    assert!(out.status.success(), "{}", text(&out));

    let addr = c.url();
    let join = |failpoint: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedflow-client"));
        cmd.args([
            "join",
            "--insecure-plaintext",
            "--coordinator",
            &addr,
            "--site-id",
            "site-a",
            "--max-epsilon",
            "100",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--vocab")
        .arg(dir.join("vocab.json"))
        .arg("--privacy-dir")
        .arg(&privacy)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        match failpoint {
            Some(f) => cmd.env(FAILPOINT_ENV, f),
            None => cmd.env_remove(FAILPOINT_ENV),
        };
        cmd
    };
    let run = |mut cmd: Command| async move {
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    };

    // Life 1 dies right after recording round 1's release; the backup is taken then.
    let first = run(join(Some("after-ledger-record"))).await;
    assert!(!first.status.success());
    let backup = dir.join("backup-1");
    let out = ledger_cli(
        &["backup", "--ledger"],
        &[&privacy, Path::new("--out"), &backup],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("1 entries and 1 unacknowledged"),
        "{}",
        text(&out)
    );

    // Life 2 re-sends round 1 and dies right after recording round 2's release, which the
    // backup does not hold.
    let second = run(join(Some("after-ledger-record"))).await;
    assert!(!second.status.success(), "{}", text(&second));
    let lost = Ledger::open(&privacy).unwrap().entries().unwrap();
    assert_eq!(
        lost.iter()
            .map(|e| (e.round, e.released))
            .collect::<Vec<_>>(),
        [(1, true), (2, false)]
    );
    let spent = epsilon(&privacy);

    // The ledger's disk is lost. A restore into it from the backup alone is refused only if
    // no journal is known; this backup names its journal, so the restore uses it.
    std::fs::remove_dir_all(&privacy).unwrap();
    let out = ledger_cli(
        &["restore", "--from"],
        &[&backup, Path::new("--ledger"), &privacy],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("1 entries from the backup and 1 from the journal"),
        "{}",
        text(&out)
    );
    let restored = Ledger::open(&privacy).unwrap().entries().unwrap();
    assert_eq!(
        restored
            .iter()
            .map(|e| (e.round, e.task_id.clone(), e.update_sha256.clone()))
            .collect::<Vec<_>>(),
        lost.iter()
            .map(|e| (e.round, e.task_id.clone(), e.update_sha256.clone()))
            .collect::<Vec<_>>()
    );
    assert_eq!(epsilon(&privacy), spent);

    // Life 3 goes on: round 2's recorded update is gone with the disk, so that task is
    // declined rather than answered with a second release; the run finishes.
    let third = run(join(None)).await;
    let log = text(&third);
    assert!(third.status.success(), "{log}");
    assert!(log.contains("its bytes are no longer held"), "{log}");
    let entries = Ledger::open(&privacy).unwrap().entries().unwrap();
    let mut tasks: Vec<_> = entries
        .iter()
        .map(|e| (e.run_id.clone(), e.round, e.task_id.clone()))
        .collect();
    tasks.sort();
    tasks.dedup();
    assert_eq!(tasks.len(), entries.len(), "a task released twice");
    assert!(entries.iter().any(|e| e.round == 3));
    // Every entry is in the journal, and the report says the ledger was restored whole.
    let journalled = fedflow_client::ledger::backup::read_journal(&journal).unwrap();
    assert_eq!(journalled.len(), entries.len());
    let report = site_report(&privacy, 1e-5, Some(100.0)).unwrap();
    assert_eq!(report.restores.len(), 1);
    assert!(
        report
            .caveats
            .iter()
            .any(|c| c.contains("every release is counted")),
        "{:?}",
        report.caveats
    );
}
