//! End to end on generated partner data: the pooled (centralised) sequence model learns the
//! order-dependent signal that a bag-of-events model cannot see, and gets close to the
//! generator's exact Bayes-optimal ceiling.
//!
//! This is a reduced version of `cargo bench -p fedflow-common --bench quality` (the full-size
//! figures are in BENCHMARKS.md); thresholds leave room for the smaller data.

use candle_core::Device;
use fedflow_common::baseline::{BagOfEvents, BaselineConfig};
use fedflow_common::data::{SiteDataset, Split, Vocab, split_of};
use fedflow_common::model::{AttentionFlowModel, ModelConfig};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_common::train::{TrainConfig, evaluate, train};

#[test]
fn pooled_lstm_beats_bag_of_events_and_nears_the_bayes_ceiling() {
    let fed = generate(&SynthConfig {
        sites: 6,
        total_sessions: 8_000,
        seed: 11,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let sites: Vec<SiteDataset> = fed
        .sites
        .iter()
        .map(|s| SiteDataset::from_records(&s.records, &vocab, 0.25).unwrap())
        .collect();
    let pooled = SiteDataset::pool(&sites);

    let mut bayes = 0.0;
    for site in &fed.sites {
        for (r, p) in site.records.iter().zip(&site.label_probs) {
            if split_of(&r.session_id, 0.25) == Split::Validation {
                bayes += p.iter().cloned().fold(0.0, f64::max);
            }
        }
    }
    let bayes = bayes / pooled.validation.len() as f64;

    let bag = BagOfEvents::fit(&pooled.train, vocab.len(), &BaselineConfig::default()).unwrap();
    let bag_acc = bag.accuracy(&pooled.validation);

    let cfg = ModelConfig {
        vocab_size: vocab.len(),
        ..ModelConfig::default()
    };
    let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 0).unwrap();
    let tc = TrainConfig {
        epochs: 12,
        patience: 3,
        ..TrainConfig::default()
    };
    train(&model, &pooled.train, &pooled.validation, &tc, &mut |_| {}).unwrap();
    let lstm = evaluate(&model, &pooled.validation, 256).unwrap().accuracy;
    eprintln!("bayes {bayes:.4} lstm {lstm:.4} bag {bag_acc:.4}");
    assert!(
        lstm >= bag_acc + 0.04,
        "lstm {lstm:.4} vs bag-of-events {bag_acc:.4}"
    );
    assert!(
        lstm >= bayes - 0.06,
        "lstm {lstm:.4} vs Bayes ceiling {bayes:.4}"
    );
    assert!(
        lstm <= bayes + 0.03,
        "lstm {lstm:.4} above the ceiling {bayes:.4}: the ceiling is wrong"
    );
}
