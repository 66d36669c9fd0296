//! The drift's premise, the gate in front of the agents' stores and the settings'
//! validation.

use super::agents::{Gate, RoundClock};
use super::world::build_world;
use super::*;
use fedflow_client::agent::source::StoreSource;
use fedflow_client::agent::store::FeedbackStore;
use fedflow_client::site::source::{SiteSource, TaskStart};
use fedflow_common::synth::{FlowFeatures, SynthConfig, generate};
use std::sync::Arc;

/// The drift is real: the old Bayes decision is much worse under the new label function,
/// and the new ceiling is about as high as the old one.
#[test]
fn the_drift_moves_the_bayes_decision_and_keeps_the_labels_predictable() {
    let fed = generate(&SynthConfig {
        sites: 4,
        total_sessions: 8_000,
        seed: 5,
        ..SynthConfig::default()
    })
    .unwrap();
    let (mut old_ceiling, mut new_ceiling, mut old_on_new, mut n) = (0.0, 0.0, 0.0, 0.0);
    for s in &fed.sites {
        for (r, old) in s.records.iter().zip(&s.label_probs) {
            let new = FlowFeatures::from_events(&r.events)
                .label_probs_with(&DRIFTED_WEIGHTS, fed.label_noise);
            let argmax = fedflow_common::synth::argmax;
            old_ceiling += old[argmax(old)];
            new_ceiling += new[argmax(&new)];
            old_on_new += new[argmax(old)];
            n += 1.0;
        }
    }
    let (old_ceiling, new_ceiling, old_on_new) = (old_ceiling / n, new_ceiling / n, old_on_new / n);
    assert!((old_ceiling - fed.bayes_accuracy).abs() < 1e-9);
    assert!(
        (new_ceiling - old_ceiling).abs() < 0.08,
        "{old_ceiling} -> {new_ceiling}"
    );
    assert!(
        new_ceiling - old_on_new > 0.15,
        "the old decision on new labels: {old_on_new}, ceiling {new_ceiling}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_holds_training_until_its_round_is_released_and_ends_after_the_last_round() {
    let world = build_world(&LiveConfig {
        sites: 1,
        sessions_per_period: 60,
        periods: 3,
        drift_period: 2,
        ..LiveConfig::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FeedbackStore::open(dir.path()).unwrap());
    let periods = &world.chunks[0];
    store.append(&periods[0], 0).unwrap().unwrap();
    let (first, inner) = StoreSource::open(store.clone(), &world.vocab, 0.2).unwrap();
    let ended = Arc::new(tokio::sync::Notify::new());
    let clock = RoundClock::new(6, ended.clone());
    let gate = Arc::new(Gate::new(inner, clock.clone()));
    let poll = |start| {
        let gate = gate.clone();
        tokio::task::spawn_blocking(move || gate.poll(start).map(|d| d.map(|d| d.train.len())))
    };
    // Round 1 waits; the simulation sees that it was asked for.
    let round1 = poll(TaskStart::Training(1));
    clock.asked(1).await.unwrap();
    // Feedback that arrives before the release is in the round's data.
    store.append(&periods[1], 0).unwrap().unwrap();
    clock.release(1);
    let grown = round1.await.unwrap().unwrap().unwrap();
    assert!(
        grown > first.train.len(),
        "{grown} <= {}",
        first.train.len()
    );
    // Released rounds go through; evaluations keep the data whatever the store holds.
    store.append(&periods[2], 0).unwrap().unwrap();
    assert_eq!(poll(TaskStart::Evaluation(1)).await.unwrap().unwrap(), None);
    let round2 = poll(TaskStart::Training(2));
    clock.asked(2).await.unwrap();
    clock.release(6);
    assert!(round2.await.unwrap().unwrap().unwrap() > grown);
    // Beyond the last round the site declines and the simulation is told.
    let err = poll(TaskStart::Training(7))
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("ends after round 6"), "{err}");
    ended.notified().await;
    // Periods 2 and 3 follow the drifted label function; the test sets cover every
    // period and hold only validation sessions, with their event names.
    assert_eq!(world.tests.len(), 3);
    for t in &world.tests {
        assert_eq!(t.sessions.len(), t.probs.len());
        assert_eq!(t.sessions.len(), t.events.len());
        assert!(!t.sessions.is_empty());
        assert!((0.0..=1.0).contains(&t.ceiling()));
    }
}

#[test]
fn bad_settings_are_refused_naming_the_field() {
    for (cfg, field) in [
        (
            LiveConfig {
                drift_period: 1,
                ..LiveConfig::default()
            },
            "drift_period",
        ),
        (
            LiveConfig {
                window: 0,
                ..LiveConfig::default()
            },
            "window",
        ),
        (
            LiveConfig {
                rounds_per_period: 0,
                ..LiveConfig::default()
            },
            "rounds_per_period",
        ),
        (
            LiveConfig {
                sessions_per_period: 10,
                ..LiveConfig::default()
            },
            "sessions_per_period",
        ),
    ] {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
}
