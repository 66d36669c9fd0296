//! Site-level DP (local mode) end to end, over real gRPC on loopback with a real
//! coordinator: sites that withhold their metrics and hold their own noise floor are
//! accepted and the run completes with nothing measured on their data reaching the
//! coordinator; a site whose floor is above the run's noise declines every round, saying why.
//!
//! Waits are on the coordinator's state or on the sites' loops ending, never on sleeps.

use std::sync::Arc;

use candle_core::Device;
use fedflow_client::federation::{SiteOptions, run_site};
use fedflow_client::site::SiteTrainer;
use fedflow_common::data::{SiteDataset, Vocab};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_coordinator::round::Phase;
use fedflow_coordinator::store::SiteState;
use fedflow_tests::TestCoordinator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_withholding_metrics_under_local_dp_are_accepted_and_floors_are_kept() {
    let fed = generate(&SynthConfig {
        sites: 3,
        total_sessions: 600,
        min_site_sessions: 150,
        seed: 12,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    // Local mode: each site adds N(0, (z C)^2) with z = 1, so its own multiplier is 1.
    let toml = "[run]\nname = \"local\"\nseed = 4\nrounds = 2\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\n\
         dropout = 0.0\n\
         [train]\nepochs = 1\nlearning_rate = 0.01\n\
         [sampling]\nfraction = 1.0\nmin_selected = 2\nmin_available = 3\n\
         [rounds]\ndeadline_secs = 300\nmin_completed = 2\nheartbeat_timeout_secs = 120\n\
         [site_dp]\nmode = \"local\"\nclip_norm = 1.0\nnoise_multiplier = 1.0\n\
         expected_sites = 3\ntarget_epsilon = 100.0\ntarget_delta = 1e-4\n";
    let c = TestCoordinator::builder(toml).vocab(&vocab).spawn().await;
    let mut tasks = Vec::new();
    for (i, s) in fed.sites.iter().enumerate() {
        let ds = SiteDataset::from_records(&s.records, &vocab, 0.2).unwrap();
        // Sites 0 and 1 need at least as much noise as the run adds; site 2 needs more.
        let floor = if i == 2 { 2.0 } else { 1.0 };
        let trainer = SiteTrainer::new(ds, &vocab, Device::Cpu)
            .withholding_metrics(true)
            .with_min_site_noise(floor)
            .unwrap();
        tasks.push(tokio::spawn(run_site(
            SiteOptions::new(c.url(), s.name.clone()),
            Arc::new(trainer),
        )));
    }
    let mut summaries = Vec::new();
    for t in tasks {
        summaries.push(t.await.unwrap().unwrap());
    }
    for (i, s) in summaries.iter().enumerate() {
        assert!(s.rejected.is_empty(), "site {i}: {s:?}");
        if i == 2 {
            assert!(s.rounds_contributed.is_empty(), "{s:?}");
            assert!(
                s.declined
                    .iter()
                    .filter(|(_, why)| why.contains("--min-site-noise"))
                    .count()
                    >= 2,
                "{s:?}"
            );
        } else {
            assert_eq!(s.rounds_contributed, vec![1, 2], "site {i}: {s:?}");
        }
    }
    let snap = c.handle.snapshot().await.unwrap();
    assert_eq!((snap.phase, snap.committed_round), (Phase::Finished, 2));
    // What the coordinator holds of the contributing sites' reports: counts of zero and
    // nothing measured (non-finite metrics are stored as absent).
    let rows = c
        .handle
        .inspect(|engine, _| {
            (1..=2)
                .map(|r| engine.store().round_sites("local", r))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .unwrap();
    let names: Vec<&str> = fed.sites.iter().map(|s| s.name.as_str()).collect();
    for round in &rows {
        for row in round.iter().filter(|r| r.site_id != names[2]) {
            assert_eq!(row.state, SiteState::Uploaded, "{row:?}");
            assert_eq!(row.train_examples, Some(0), "{row:?}");
            let m: serde_json::Value =
                serde_json::from_str(row.metrics_json.as_deref().unwrap_or("{}")).unwrap();
            for key in [
                "train_loss",
                "validation_loss",
                "validation_accuracy",
                "validation_macro_f1",
            ] {
                assert!(
                    m.get(key).is_none_or(|v| v.is_null()),
                    "{key} reached the coordinator: {m}"
                );
            }
            assert_eq!(
                m.get("validation_examples")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0),
                0
            );
        }
        let declined = round.iter().find(|r| r.site_id == names[2]).unwrap();
        assert_eq!(declined.state, SiteState::Declined, "{declined:?}");
    }
}
