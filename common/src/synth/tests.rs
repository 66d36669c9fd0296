//! Tests of the generator and the label function.

use std::collections::HashSet;
use std::sync::OnceLock;

use rand::seq::SliceRandom;

use super::process::EPOCH_2026;
use super::*;
use crate::baseline::{BagOfEvents, BaselineConfig, FlowOracle};
use crate::clock::rfc3339;
use crate::data::EncodedSession;

/// A small federation for the fast tests.
fn small(seed: u64) -> SynthConfig {
    SynthConfig {
        sites: 6,
        total_sessions: 3_000,
        seed,
        ..SynthConfig::default()
    }
}

/// Encodes records with ids 2.. in `event_names` order (0 = padding, 1 = unknown).
fn encode(fed: &SynthFederation) -> Vec<EncodedSession> {
    let ids = event_ids(2);
    fed.sites
        .iter()
        .flat_map(|s| &s.records)
        .map(|r| EncodedSession {
            events: r
                .events
                .iter()
                .map(|e| ids.get(e.as_str()).copied().unwrap_or(1))
                .collect(),
            class: u32::from(r.label - 1),
        })
        .collect()
}

/// Held-out accuracies (Bayes classifier, bag-of-events, oracle) with every 4th session
/// held out.
fn accuracies(fed: &SynthFederation) -> (f64, f64, f64) {
    let records: Vec<&SessionRecord> = fed.sites.iter().flat_map(|s| &s.records).collect();
    let probs: Vec<&[f64; NUM_LABELS]> = fed.sites.iter().flat_map(|s| &s.label_probs).collect();
    let encoded = encode(fed);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    let (mut train_records, mut test_records) = (Vec::new(), Vec::new());
    let mut bayes_hits = 0usize;
    for (i, ((r, e), p)) in records.iter().zip(encoded).zip(&probs).enumerate() {
        if i % 4 == 0 {
            test.push(e);
            test_records.push((*r).clone());
            bayes_hits += usize::from(argmax(p) + 1 == r.label as usize);
        } else {
            train.push(e);
            train_records.push((*r).clone());
        }
    }
    let cfg = BaselineConfig::default();
    let bag = BagOfEvents::fit(&train, fed.event_names.len() + 2, &cfg).unwrap();
    let oracle = FlowOracle::fit(&train_records, &cfg).unwrap();
    (
        bayes_hits as f64 / test.len() as f64,
        bag.accuracy(&test),
        oracle.accuracy(&test_records),
    )
}

/// A moderately sized federation shared by the statistical tests.
fn moderate() -> &'static SynthFederation {
    static FED: OnceLock<SynthFederation> = OnceLock::new();
    FED.get_or_init(|| {
        generate(&SynthConfig {
            total_sessions: 16_000,
            seed: 7,
            ..SynthConfig::default()
        })
        .unwrap()
    })
}

#[test]
fn same_seed_same_federation_other_seed_differs() {
    let a = generate(&small(1)).unwrap();
    let b = generate(&small(1)).unwrap();
    let c = generate(&small(2)).unwrap();
    assert_eq!(a, b);
    assert_ne!(a.sites[0].records, c.sites[0].records);
    assert_ne!(a.bayes_accuracy, c.bayes_accuracy);
}

#[test]
fn site_sizes_are_skewed_and_sum_to_total() {
    let cfg = SynthConfig::default();
    let sizes = site_sizes(&cfg, &mut ChaCha8Rng::seed_from_u64(cfg.seed));
    assert_eq!(sizes.len(), cfg.sites);
    assert_eq!(sizes.iter().sum::<usize>(), cfg.total_sessions);
    let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
    assert!(*min >= cfg.min_site_sessions);
    assert!(max / min >= 10, "sizes not skewed: {sizes:?}");
    // No skew: equal sizes up to rounding.
    let flat = SynthConfig {
        size_skew: 0.0,
        total_sessions: 40_010,
        ..cfg
    };
    let sizes = site_sizes(&flat, &mut ChaCha8Rng::seed_from_u64(1));
    assert_eq!(sizes.iter().sum::<usize>(), 40_010);
    assert!(sizes.iter().all(|&s| s == 2_000 || s == 2_001), "{sizes:?}");
    // Through `generate` as well.
    let fed = generate(&small(3)).unwrap();
    assert_eq!(fed.total_sessions(), 3_000);
}

#[test]
fn label_mixes_differ_across_sites() {
    let fed = moderate();
    for site in &fed.sites {
        assert!((site.label_mix.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
    // The largest gap between two sites' share of a journey type is large.
    let spread = (0..NUM_LABELS)
        .map(|k| {
            let shares = fed.sites.iter().map(|s| s.label_mix[k]);
            let max = shares.clone().fold(0.0, f64::max);
            let min = shares.fold(1.0, f64::min);
            max - min
        })
        .fold(0.0, f64::max);
    assert!(spread > 0.3, "label mixes too similar: spread {spread}");
    // And so do the observed label distributions of the two largest sites.
    let mut by_size: Vec<&SynthSite> = fed.sites.iter().collect();
    by_size.sort_by_key(|s| std::cmp::Reverse(s.records.len()));
    let hist = |s: &SynthSite| {
        let mut h = [0.0; NUM_LABELS];
        for r in &s.records {
            h[r.label as usize - 1] += 1.0 / s.records.len() as f64;
        }
        h
    };
    let (h0, h1) = (hist(by_size[0]), hist(by_size[1]));
    let tv: f64 = h0.iter().zip(&h1).map(|(a, b)| (a - b).abs()).sum::<f64>() / 2.0;
    assert!(
        tv > 0.05,
        "label distributions too similar: {h0:?} vs {h1:?}"
    );
}

#[test]
fn records_are_valid() {
    let cfg = small(4);
    let fed = generate(&cfg).unwrap();
    assert_eq!(fed.event_names, EVENT_NAMES.map(String::from).to_vec());
    let mut ids = HashSet::new();
    for site in &fed.sites {
        assert_eq!(site.records.len(), site.label_probs.len());
        let mut last_time = String::new();
        for (r, p) in site.records.iter().zip(&site.label_probs) {
            assert!((1..=5).contains(&r.label), "{r:?}");
            assert!(
                (cfg.min_len..=cfg.max_len).contains(&r.events.len()),
                "{r:?}"
            );
            assert!(r.events.iter().all(|e| EVENT_NAMES.contains(&e.as_str())));
            assert!(
                ids.insert(r.session_id.clone()),
                "duplicate {}",
                r.session_id
            );
            assert!(r.user_id.as_deref().unwrap().starts_with(&site.name));
            let t = r.timestamp.clone().unwrap();
            assert!(t.len() == 20 && t > last_time, "{t} after {last_time}");
            last_time = t;
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            assert_eq!(*p, label_probs(&r.events, cfg.label_noise));
        }
    }
    // Several sessions per user.
    let users: HashSet<_> = fed.sites[0].records.iter().map(|r| &r.user_id).collect();
    assert!(users.len() * 2 < fed.sites[0].records.len());
    // Without user ids and timestamps.
    let bare = generate(&SynthConfig {
        with_user_ids: false,
        with_timestamps: false,
        ..cfg
    })
    .unwrap();
    let r = &bare.sites[0].records[0];
    assert!(r.user_id.is_none() && r.timestamp.is_none());
}

#[test]
fn rejects_bad_configs() {
    let ok = SynthConfig::default();
    ok.validate().unwrap();
    let bad = [
        SynthConfig {
            sites: 0,
            ..ok.clone()
        },
        SynthConfig {
            total_sessions: 1_999,
            ..ok.clone()
        },
        SynthConfig {
            size_skew: -1.0,
            ..ok.clone()
        },
        SynthConfig {
            label_alpha: 0.0,
            ..ok.clone()
        },
        SynthConfig {
            label_noise: 1.5,
            ..ok.clone()
        },
        SynthConfig {
            min_len: 0,
            ..ok.clone()
        },
        SynthConfig {
            min_len: 9,
            max_len: 8,
            ..ok.clone()
        },
        SynthConfig {
            min_site_sessions: 0,
            ..ok.clone()
        },
    ];
    for cfg in bad {
        assert!(matches!(generate(&cfg), Err(Error::Config(_))), "{cfg:?}");
    }
    let parsed: SynthConfig = serde_json::from_str(r#"{"sites": 3}"#).unwrap();
    assert_eq!(parsed, SynthConfig { sites: 3, ..ok });
    assert!(serde_json::from_str::<SynthConfig>(r#"{"site": 3}"#).is_err());
}

#[test]
fn timestamps_are_rfc3339() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(EPOCH_2026), "2026-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_825_599), "2000-02-29T11:59:59Z");
}

/// Checks the features and the score of a sequence of event names.
fn check(events: &[&str], expect: FlowFeatures, score: f64) {
    let f = FlowFeatures::from_events(events);
    assert_eq!(f, expect, "{events:?}");
    assert_eq!(f.score(), score, "{events:?}");
}

#[test]
fn label_function_reads_order() {
    let feats = |max, last, resolved, relapsed, late, early, len| FlowFeatures {
        len,
        max_fail_streak: max,
        final_fail_streak: last,
        ends_resolved: resolved,
        relapsed,
        late_escalation: late,
        early_escalation: early,
    };
    let fail = "search_no_results";
    // Three failures, then a solution: ends resolved after prolonged frustration.
    check(
        &[
            "opened_help",
            fail,
            "viewed_faq",
            fail,
            fail,
            "copied_solution",
        ],
        feats(3, 0, true, false, false, false, 6),
        2.0,
    );
    // The same events, solution first: a relapse that ends frustrated.
    check(
        &[
            "opened_help",
            "copied_solution",
            fail,
            "viewed_faq",
            fail,
            fail,
        ],
        feats(3, 3, false, true, false, false, 6),
        -2.0,
    );
    // Progress breaks the streak.
    check(
        &[
            "opened_help",
            fail,
            "clicked_answer",
            fail,
            "viewed_faq",
            fail,
            "rated_article_up",
        ],
        feats(2, 0, true, false, false, false, 7),
        3.0,
    );
    // Escalating after three failures is late, escalating first is early.
    check(
        &[
            fail,
            fail,
            "error_page",
            "escalated_to_agent",
            "agent_resolved",
        ],
        feats(3, 0, true, false, true, false, 5),
        0.0,
    );
    check(
        &[
            "escalated_to_agent",
            fail,
            fail,
            "error_page",
            "agent_resolved",
        ],
        feats(3, 0, true, false, false, true, 5),
        2.0,
    );
    // Smooth and short: the best score. Unknown names are neutral.
    check(
        &["opened_help", "no_such_event", "copied_solution"],
        feats(0, 0, true, false, false, false, 3),
        4.0,
    );
    let p = label_probs(&["opened_help", "copied_solution"], 0.1);
    assert_eq!(argmax(&p), 4);
    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    assert!(p.iter().all(|&x| x >= 0.02));
}

#[test]
fn empirical_bayes_accuracy_matches_the_reported_one() {
    let fed = moderate();
    let (mut hits, mut var, mut n) = (0.0, 0.0, 0.0);
    for site in &fed.sites {
        for (r, p) in site.records.iter().zip(&site.label_probs) {
            let best = argmax(p);
            hits += f64::from(u8::from(best + 1 == r.label as usize));
            var += p[best] * (1.0 - p[best]);
            n += 1.0;
        }
    }
    let empirical = hits / n;
    let tolerance = 4.0 * var.sqrt() / n;
    assert!(
        (empirical - fed.bayes_accuracy).abs() < tolerance,
        "empirical {empirical} vs reported {} (tolerance {tolerance})",
        fed.bayes_accuracy
    );
    assert!(
        (0.7..0.85).contains(&fed.bayes_accuracy),
        "{}",
        fed.bayes_accuracy
    );
    for site in &fed.sites {
        assert!((0.6..0.95).contains(&site.bayes_accuracy), "{}", site.name);
    }
}

#[test]
fn shuffling_events_changes_the_label_distribution() {
    let fed = moderate();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut changed, mut total) = (0usize, 0usize);
    for r in fed.sites.iter().flat_map(|s| &s.records).take(4_000) {
        let mut shuffled = r.events.clone();
        shuffled.shuffle(&mut rng);
        let (p, q) = (label_probs(&r.events, 0.1), label_probs(&shuffled, 0.1));
        let tv: f64 = p.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum::<f64>() / 2.0;
        changed += usize::from(tv > 0.1);
        total += 1;
    }
    let fraction = changed as f64 / total as f64;
    eprintln!("shuffle changes p for {fraction:.3} of sessions");
    assert!(
        fraction > 0.25,
        "only {fraction} of sessions depend on order"
    );
}

#[test]
fn bag_of_events_is_clearly_below_bayes_and_an_oracle_is_close() {
    let fed = moderate();
    let (bayes, bag, oracle) = accuracies(fed);
    eprintln!(
        "held out: bayes {bayes:.4} (mean max p {:.4}), bag {bag:.4}, oracle {oracle:.4}",
        fed.bayes_accuracy
    );
    assert!(bag < bayes - 0.05, "bag {bag} vs bayes {bayes}");
    assert!(oracle > bayes - 0.015, "oracle {oracle} vs bayes {bayes}");
}
