//! Record-level DP end to end, over real gRPC on loopback with a real coordinator:
//!
//! - a site with a low limit declines exactly the first round that would take it past its
//!   limit by the smaller of its two valid bounds (PLD admits a round RDP would refuse),
//!   says why, and the run goes on with the others;
//! - the real `fedflow-client` binary, crashed (abort, like kill -9) right after recording a
//!   release and before uploading it, loses no ledger entry when restarted and counts
//!   nothing twice: it re-sends the recorded update.
//!
//! Waits are on the coordinator's state or on processes ending, never on sleeps.

use std::process::{Command, Stdio};
use std::sync::Arc;

use candle_core::Device;
use fedflow_client::federation::{SiteOptions, run_site};
use fedflow_client::ledger::Ledger;
use fedflow_client::privacy::{FAILPOINT_ENV, SitePrivacy};
use fedflow_client::report::site_report;
use fedflow_client::site::SiteTrainer;
use fedflow_common::data::{SiteDataset, Vocab, write_sessions};
use fedflow_common::privacy::SampledGaussian;
use fedflow_common::privacy::planner::epsilon;
use fedflow_common::privacy::pld::PldAccountant;
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_common::train::DpSgdConfig;
use fedflow_coordinator::round::Phase;
use fedflow_coordinator::service::Coordinator;
use fedflow_coordinator::store::SiteState;
use fedflow_tests::TestCoordinator;

const DP: &str = "[record_dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nexpected_batch_size = 16\n\
                  target_epsilon = 1000.0\ntarget_delta = 1e-5\n";

/// A coordinator for `rounds` rounds of record-level DP over `sites` sites, `quorum` of
/// them needed; `vocab.json` in its directory.
pub(crate) async fn coordinator(
    vocab: &Vocab,
    rounds: u64,
    sites: usize,
    quorum: usize,
) -> TestCoordinator {
    let toml = format!(
        "[run]\nname = \"dp\"\nseed = 3\nrounds = {rounds}\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
         [train]\nepochs = 1\nlearning_rate = 0.01\n\
         [sampling]\nfraction = 1.0\nmin_selected = {quorum}\nmin_available = {sites}\n\
         [rounds]\ndeadline_secs = 300\nmin_completed = {quorum}\nheartbeat_timeout_secs = 120\n{DP}"
    );
    TestCoordinator::builder(toml).vocab(vocab).spawn().await
}

/// Per-site state of every round, from the coordinator's store.
pub(crate) async fn round_states(
    c: &Coordinator,
    rounds: u64,
) -> Vec<Vec<(String, SiteState, Option<String>, Option<String>)>> {
    c.inspect(move |engine, _| {
        (1..=rounds)
            .map(|r| {
                let rows = engine.store().round_sites("dp", r)?;
                Ok(rows
                    .into_iter()
                    .map(|s| (s.site_id, s.state, s.reason, s.delta_sha256))
                    .collect())
            })
            .collect()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_at_its_limit_declines_and_the_run_goes_on() {
    let fed = generate(&SynthConfig {
        sites: 3,
        total_sessions: 900,
        min_site_sessions: 250,
        seed: 8,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let c = coordinator(&vocab, 4, 3, 2).await;
    let (dir, addr, coordinator) = (c.dir(), c.url(), &c.handle);

    let datasets: Vec<SiteDataset> = fed
        .sites
        .iter()
        .map(|s| SiteDataset::from_records(&s.records, &vocab, 0.2).unwrap())
        .collect();
    // The last site can afford exactly three rounds by the PLD accountant, and only two by
    // RDP: its limit lies between the PLD epsilon of three and of four rounds of its own
    // DP-SGD, and below the RDP epsilon of three. The site checks its limit against the
    // smaller valid bound, so it must take part in round 3 and decline round 4. The figures
    // come from the accountants the client itself uses (checked against dp_accounting in
    // common's tests), so this checks where the client stops, not the figures.
    let n = datasets[2].train.len();
    let round = DpSgdConfig {
        expected_batch_size: 16,
        ..DpSgdConfig::default()
    }
    .round_event(n, 1)
    .unwrap();
    let pld = |rounds: u64| {
        let mut acc = PldAccountant::default();
        acc.compose(&SampledGaussian {
            steps: round.steps * rounds,
            ..round
        })
        .unwrap();
        acc.epsilon(1e-5)
    };
    let rdp = |rounds: u64| epsilon(&[round], rounds, 1e-5).unwrap().epsilon;
    let (three, four) = (pld(3), pld(4));
    let limit = 0.5 * (three + four.min(rdp(3)));
    assert!(
        rdp(2) <= limit && limit < rdp(3) && three <= limit && limit < four,
        "RDP {} {}, PLD {three} {four}, limit {limit}",
        rdp(2),
        rdp(3)
    );
    let mut tasks = Vec::new();
    for (i, (s, ds)) in fed.sites.iter().zip(datasets).enumerate() {
        let max = if i == 2 { limit } else { 1000.0 };
        let privacy = SitePrivacy::open(&dir.join(&s.name), max, 1e-5, false).unwrap();
        let trainer =
            Arc::new(SiteTrainer::new(ds, &vocab, Device::Cpu).with_privacy(Arc::new(privacy)));
        tasks.push(tokio::spawn(run_site(
            SiteOptions::new(addr.clone(), s.name.clone()),
            trainer,
        )));
    }
    let mut summaries = Vec::new();
    for t in tasks {
        summaries.push(t.await.unwrap().unwrap());
    }
    for (i, s) in summaries.iter().enumerate() {
        let limited: Vec<u64> = s
            .declined
            .iter()
            .filter(|(_, why)| why.contains("limit"))
            .map(|(r, _)| *r)
            .collect();
        if i == 2 {
            assert_eq!(s.rounds_contributed, vec![1, 2, 3], "{s:?}");
            assert_eq!(limited, vec![4], "{s:?}");
            assert!(
                s.declined
                    .iter()
                    .any(|(_, w)| w.contains("this site's own limit")),
                "{s:?}"
            );
        } else {
            assert_eq!(s.rounds_contributed, vec![1, 2, 3, 4], "{s:?}");
            assert!(limited.is_empty(), "{s:?}");
        }
        assert!(s.rejected.is_empty(), "{s:?}");
        // Evaluation tasks are declined: metrics on site data are withheld by default.
        assert!(s.rounds_evaluated.is_empty(), "{s:?}");
    }
    let snap = coordinator.snapshot().await.unwrap();
    assert_eq!((snap.phase, snap.committed_round), (Phase::Finished, 4));
    // The coordinator recorded the declines with the site's reason, and the rounds went on.
    let states = round_states(coordinator, 4).await;
    let limited_site = &fed.sites[2].name;
    for (r, rows) in states.iter().enumerate() {
        let mine = rows.iter().find(|x| &x.0 == limited_site).unwrap();
        if r < 3 {
            assert_eq!(mine.1, SiteState::Uploaded, "round {}", r + 1);
        } else {
            assert_eq!(mine.1, SiteState::Declined, "round {}", r + 1);
            assert!(mine.2.as_deref().unwrap().contains("limit"), "{mine:?}");
        }
        assert_eq!(
            rows.iter().filter(|x| x.1 == SiteState::Uploaded).count(),
            if r < 3 { 3 } else { 2 }
        );
    }
    // Each ledger holds exactly the releases, and the limited site stayed within its limit.
    for (i, s) in fed.sites.iter().enumerate() {
        let ledger = Ledger::open(dir.join(&s.name)).unwrap();
        let entries = ledger.entries().unwrap();
        assert_eq!(entries.len(), if i == 2 { 3 } else { 4 }, "{}", s.name);
        assert!(entries.iter().all(|e| e.released && !e.metrics_released));
        let report = site_report(&dir.join(&s.name), 1e-5, Some(limit)).unwrap();
        assert!(
            report
                .caveats
                .iter()
                .any(|c| c.starts_with("Erasure refunds nothing")),
            "{:?}",
            report.caveats
        );
        let eps = report.cumulative.epsilon.unwrap();
        if i == 2 {
            // The report states the bound the limit was checked against, and RDP's beside it.
            assert_eq!((eps, report.cumulative.stated_by), (three, "pld"));
            let r3 = report.cumulative.epsilon_rdp.unwrap();
            assert!((r3 - rdp(3)).abs() < 1e-9 * r3, "{r3} vs {}", rdp(3));
            assert_eq!(report.cumulative.within_budget, Some(true));
        }
        // The hashes the coordinator received are the ones each ledger recorded.
        for e in &entries {
            let row = states[e.round as usize - 1]
                .iter()
                .find(|x| x.0 == s.name)
                .unwrap();
            assert_eq!(row.3.as_deref(), Some(e.update_sha256.as_str()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_crashed_between_recording_and_uploading_loses_and_double_counts_nothing() {
    let fed = generate(&SynthConfig {
        sites: 1,
        total_sessions: 300,
        min_site_sessions: 250,
        seed: 9,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let c = coordinator(&vocab, 2, 1, 1).await;
    let (dir, addr, coordinator) = (c.dir(), c.url(), &c.handle);
    let data = dir.join("site.csv");
    write_sessions(&data, &fed.sites[0].records).unwrap();
    let privacy_dir = dir.join("privacy");

    let client = |failpoint: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fedflow-client"));
        c.args([
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
        .arg(&privacy_dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        match failpoint {
            Some(f) => c.env(FAILPOINT_ENV, f),
            None => c.env_remove(FAILPOINT_ENV),
        };
        c
    };
    // First life: dies right after the round-1 release is recorded.
    let first = tokio::task::spawn_blocking({
        let mut c = client(Some("after-ledger-record"));
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        !first.status.success(),
        "the failpoint must kill the client"
    );
    let mut ledger = Ledger::open(&privacy_dir).unwrap();
    let entries = ledger.entries().unwrap();
    assert_eq!(
        entries.len(),
        1,
        "the spend is on disk before anything is sent"
    );
    assert_eq!((entries[0].round, entries[0].released), (1, false));
    let (_, kept) = ledger
        .find(&entries[0].run_id, 1, &entries[0].task_id)
        .unwrap()
        .unwrap();
    assert!(
        kept.is_some(),
        "the recorded update bytes are kept for the retry"
    );
    drop(ledger);

    // Second life: gets the same task again, re-sends the recorded update, trains round 2.
    let second = tokio::task::spawn_blocking({
        let mut c = client(None);
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    let log = String::from_utf8_lossy(&second.stderr).to_string()
        + &String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{log}");
    assert!(
        log.contains("re-sending the update recorded in ledger entry 1"),
        "{log}"
    );
    let entries = Ledger::open(&privacy_dir).unwrap().entries().unwrap();
    assert_eq!(
        entries
            .iter()
            .map(|e| (e.round, e.released))
            .collect::<Vec<_>>(),
        vec![(1, true), (2, true)]
    );
    assert_eq!(
        std::fs::read_dir(privacy_dir.join("pending"))
            .unwrap()
            .count(),
        0
    );
    // The coordinator received exactly the recorded updates.
    let states = round_states(coordinator, 2).await;
    for e in &entries {
        let row = &states[e.round as usize - 1][0];
        assert_eq!(
            (row.1, row.3.as_deref()),
            (SiteState::Uploaded, Some(e.update_sha256.as_str()))
        );
    }
    assert_eq!(coordinator.snapshot().await.unwrap().committed_round, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noisy_counts_are_what_the_coordinator_weights_the_updates_by() {
    let fed = generate(&SynthConfig {
        sites: 2,
        total_sessions: 500,
        min_site_sessions: 200,
        seed: 11,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let toml = format!(
        "[run]\nname = \"dp\"\nseed = 3\nrounds = 3\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
         [train]\nepochs = 1\nlearning_rate = 0.01\n\
         [sampling]\nfraction = 1.0\nmin_selected = 2\nmin_available = 2\n\
         [rounds]\ndeadline_secs = 300\nmin_completed = 2\nheartbeat_timeout_secs = 120\n\
         {DP}count_noise_multiplier = 3.0\n"
    );
    let c = TestCoordinator::builder(toml).vocab(&vocab).spawn().await;
    let (dir, addr) = (c.dir(), c.url());
    let mut tasks = Vec::new();
    let mut sizes = Vec::new();
    for s in &fed.sites {
        let ds = SiteDataset::from_records(&s.records, &vocab, 0.2).unwrap();
        sizes.push(ds.train.len() as u64);
        let privacy = SitePrivacy::open(&dir.join(&s.name), 1000.0, 1e-5, false).unwrap();
        let trainer =
            Arc::new(SiteTrainer::new(ds, &vocab, Device::Cpu).with_privacy(Arc::new(privacy)));
        tasks.push(tokio::spawn(run_site(
            SiteOptions::new(addr.clone(), s.name.clone()),
            trainer,
        )));
    }
    for t in tasks {
        let s = t.await.unwrap().unwrap();
        assert_eq!(s.rounds_contributed, vec![1, 2, 3], "{s:?}");
    }
    let states = c
        .handle
        .inspect(|engine, _| {
            (1..=3)
                .map(|r| engine.store().round_sites("dp", r))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .unwrap();
    let mut differs = false;
    for (r, rows) in states.iter().enumerate() {
        let mut counts = Vec::new();
        for (s, n) in fed.sites.iter().zip(&sizes) {
            let entry = Ledger::open(dir.join(&s.name))
                .unwrap()
                .entries()
                .unwrap()
                .into_iter()
                .find(|e| e.round == r as u64 + 1)
                .unwrap();
            let count = entry.count.expect("a noisy count was recorded").released;
            differs |= count != *n;
            let row = rows.iter().find(|x| x.site_id == s.name).unwrap();
            // The coordinator received the noisy count, never the true one ...
            assert_eq!(row.train_examples, Some(count), "round {}", r + 1);
            counts.push((count, row.weight.unwrap()));
        }
        // ... and FedAvg weighted the updates by it.
        let (a, b) = (counts[0], counts[1]);
        assert!(
            (a.1 / b.1 - a.0 as f64 / b.0 as f64).abs() < 1e-9,
            "round {}: {counts:?}",
            r + 1
        );
    }
    assert!(
        differs,
        "six noisy counts, all equal to the true ones: {sizes:?}"
    );
    // Each site's report covers the counts: its epsilon is that of the updates and counts.
    let s = &fed.sites[0];
    let report = site_report(&dir.join(&s.name), 1e-5, None).unwrap();
    assert!(report.caveats.iter().any(|c| c.contains("went out noisy")));
    // The coordinator's privacy-audit report says how counts were released.
    let audit = c
        .handle
        .inspect(|engine, _| fedflow_coordinator::audit::build(engine.store(), "dp", 0))
        .await
        .unwrap();
    let rec = audit.record_level.unwrap();
    assert!(
        rec.counts.starts_with("noisy") && rec.counts.contains("z = 3"),
        "{}",
        rec.counts
    );
    assert!(
        !audit
            .not_covered
            .iter()
            .any(|n| n.contains("number of training examples"))
    );
}
