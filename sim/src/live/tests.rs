//! The drift's premise, the feed and the settings' validation.

use super::world::{LiveFeed, build_world};
use super::*;
use fedflow_client::site::source::{SiteSource, TaskStart};
use fedflow_common::data::SiteDataset;
use fedflow_common::synth::{FlowFeatures, SynthConfig, generate};
use std::sync::{Arc, Mutex};

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

#[test]
fn a_feed_hands_out_each_periods_window_once_and_ends_after_the_last_round() {
    let world = build_world(&LiveConfig {
        sites: 1,
        sessions_per_period: 60,
        periods: 3,
        drift_period: 2,
        ..LiveConfig::default()
    })
    .unwrap();
    let vocab = &world.vocab;
    let windows: Vec<SiteDataset> = (0..3)
        .map(|p| SiteDataset::from_records(&world.chunks[0][p], vocab, 0.2).unwrap())
        .collect();
    let sizes: Vec<usize> = windows.iter().map(|w| w.train.len()).collect();
    let ended = Arc::new(tokio::sync::Notify::new());
    let feed = LiveFeed {
        windows,
        rounds_per_period: 2,
        last_round: 6,
        given: Mutex::new(0),
        ended: ended.clone(),
    };
    let got = |s| feed.poll(s).unwrap().map(|d| d.train.len());
    assert_eq!(
        got(TaskStart::Training(1)),
        None,
        "period 1 is held already"
    );
    assert_eq!(got(TaskStart::Training(2)), None);
    assert_eq!(got(TaskStart::Training(3)), Some(sizes[1]));
    assert_eq!(
        got(TaskStart::Evaluation(1)),
        None,
        "evaluations keep the data"
    );
    assert_eq!(
        got(TaskStart::Training(3)),
        None,
        "a retried round keeps it too"
    );
    assert_eq!(got(TaskStart::Training(6)), Some(sizes[2]));
    let err = feed.poll(TaskStart::Training(7)).unwrap_err().to_string();
    assert!(err.contains("ends after round 6"), "{err}");
    // The notification is kept for the simulation's loop to take.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(ended.notified());
    // Periods 2 and 3 follow the drifted label function; the test sets cover every
    // period and hold only validation sessions.
    assert_eq!(world.tests.len(), 3);
    for t in &world.tests {
        assert_eq!(t.sessions.len(), t.probs.len());
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
