//! A site whose data file grows between rounds: re-read before each task, splits kept, the
//! new sessions trained on, and record-level DP charged round by round with that round's
//! number of units (q = B/n_r), as Google's `dp_accounting` composes the same rounds.

use std::collections::BTreeSet;

use fedflow_common::data::{LoadOptions, SessionRecord, write_sessions};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_common::train::DpSgdConfig;

use super::source::{DataSource, TaskStart};
use super::tests::support::{fixture, model_config};
use super::*;
use crate::ledger::Ledger;
use crate::privacy::RecordDp;

fn records() -> Vec<SessionRecord> {
    generate(&SynthConfig {
        sites: 1,
        total_sessions: 600,
        min_site_sessions: 600,
        max_len: 20,
        with_user_ids: false,
        with_timestamps: false,
        seed: 11,
        ..SynthConfig::default()
    })
    .unwrap()
    .sites
    .remove(0)
    .records
}

fn sessions(s: &[fedflow_common::data::EncodedSession]) -> BTreeSet<(Vec<u32>, u32)> {
    s.iter().map(|e| (e.events.clone(), e.class)).collect()
}

/// The reference: `client/tests/privacy/make_growing_fixture.py` (dp_accounting 0.6.0).
const FIXTURE: &str = include_str!("../../tests/privacy/growing_fixture.json");

#[test]
fn a_growing_file_is_read_again_before_each_task_and_each_round_is_charged_its_own_q() {
    let dir = tempfile::tempdir().unwrap();
    let all = records();
    let f = fixture();
    let vocab = f.vocab.clone();
    let file = dir.path().join("site.csv");
    write_sessions(&file, &all[..200]).unwrap();
    let (dataset, source) = DataSource::open(&file, &vocab, LoadOptions::default(), 0.2).unwrap();
    let privacy = SitePrivacy::open(&dir.path().join("ledger"), 1e6, 1e-5, false).unwrap();
    let site = SiteTrainer::new(dataset, &vocab, Device::Cpu)
        .with_source(source)
        .with_privacy(Arc::new(privacy));
    assert_eq!(
        site.refresh(TaskStart::Training(1)).unwrap(),
        None,
        "nothing changed yet"
    );
    let cfg = model_config(vocab.len());
    let global_model = AttentionFlowModel::new(&cfg, &Device::Cpu, 5).unwrap();
    let global_bytes = ParamSet::from_varmap(global_model.varmap())
        .unwrap()
        .to_safetensors_bytes()
        .unwrap();
    let task = |round: u64| TaskSpec {
        round,
        task_id: format!("task-{round}"),
        model: cfg.clone(),
        expected_model_sha256: sha256_hex(&global_bytes),
        record_dp: Some(RecordDp {
            sgd: DpSgdConfig {
                expected_batch_size: 16,
                noise_multiplier: 1.1,
                ..DpSgdConfig::default()
            },
            target_epsilon: 1e6,
            target_delta: 1e-5,
            count_noise_multiplier: 0.0,
        }),
        ..f.task.clone()
    };
    let mut trained = Vec::new();
    let mut previous = site.dataset();
    for (round, upto) in [(1, 200), (2, 400), (3, 600)] {
        if upto > 200 {
            write_sessions(&file, &all[..upto]).unwrap();
            let change = site.refresh(TaskStart::Training(round)).unwrap().unwrap();
            assert_eq!(
                (change.before, change.after),
                (upto - 200, upto),
                "200 new sessions"
            );
            let now = site.dataset();
            // Sessions keep their split as the file grows.
            assert!(sessions(&previous.train).is_subset(&sessions(&now.train)));
            assert!(sessions(&previous.validation).is_subset(&sessions(&now.validation)));
            previous = now;
        }
        let out = site
            .train_task(&task(round), &global_bytes, &mut |_| {})
            .unwrap();
        trained.push(out.metrics.train_examples);
    }
    assert!(trained.windows(2).all(|w| w[0] < w[1]), "{trained:?}");

    // Each entry carries its round's n and q = B/n; the ledger composes them all.
    let ledger = Ledger::open(dir.path().join("ledger")).unwrap();
    let entries = ledger.entries().unwrap();
    let units: Vec<u64> = entries.iter().map(|e| e.units).collect();
    assert_eq!(units, trained.iter().map(|&n| n as u64).collect::<Vec<_>>());
    for e in &entries {
        assert_eq!(e.q, 16.0 / e.units as f64);
    }
    let reference: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let rounds: Vec<(u64, u64)> = reference["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["units"].as_u64().unwrap(), r["steps"].as_u64().unwrap()))
        .collect();
    let ours: Vec<(u64, u64)> = entries.iter().map(|e| (e.units, e.steps)).collect();
    assert_eq!(ours, rounds, "the fixture was made for these rounds");
    let (epsilon, _) = ledger.accountant().unwrap().epsilon(1e-5).unwrap();
    let want = reference["epsilon"].as_f64().unwrap();
    assert!(
        (epsilon - want).abs() <= 1e-6 * want,
        "ledger epsilon {epsilon}, dp_accounting {want}"
    );

    // The site's report states the RDP figure with the same epsilon, and the smaller PLD
    // bound of the same rounds as the one it uses.
    let report = crate::report::site_report(&dir.path().join("ledger"), 1e-5, None).unwrap();
    assert!((report.cumulative.epsilon_rdp.unwrap() - want).abs() <= 1e-6 * want);
    let pld = ledger.spend().unwrap().pld_epsilon(1e-5).unwrap();
    assert!(pld < want);
    assert_eq!(report.cumulative.epsilon, Some(pld));
    let caveat = report
        .caveats
        .iter()
        .find(|c| c.contains("changed between rounds"))
        .expect("the growing-data caveat");
    assert!(caveat.contains("162 to 484 sessions"), "{caveat}");

    // A bad row appended: the next task is refused with the file and line, and the data
    // trained on so far stays.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("broken,,9\n");
    std::fs::write(&file, text).unwrap();
    let err = site
        .refresh(TaskStart::Evaluation(3))
        .unwrap_err()
        .to_string();
    assert!(err.contains("site.csv:602"), "{err}");
    assert_eq!(site.dataset().train.len(), previous.train.len());
}
