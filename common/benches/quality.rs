//! Model quality on generated partner data: the centralised (pooled) model against the
//! generator's Bayes-optimal ceiling and the bag-of-events baseline.
//!
//! Run: `cargo bench -p fedflow-common --bench quality` (optionally
//! `-- --sites 20 --sessions 40000 --encoder lstm --epochs 30 --seed 42`). Prints a JSON
//! report: Bayes accuracy on the held-out split, the model's accuracy and macro-F1, the
//! bag-of-events accuracy, and training time.

use std::time::Instant;

use candle_core::Device;
use fedflow_common::baseline::{BagOfEvents, BaselineConfig};
use fedflow_common::data::{SiteDataset, Split, Vocab, split_of};
use fedflow_common::model::{AttentionFlowModel, EncoderKind, ModelConfig};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_common::train::{TrainConfig, evaluate, train};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VAL_FRACTION: f64 = 0.2;

fn main() {
    let mut synth = SynthConfig::default();
    let mut encoder = EncoderKind::Lstm;
    let mut tc = TrainConfig {
        epochs: 30,
        patience: 4,
        ..TrainConfig::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--sites" => synth.sites = val().parse().expect("--sites N"),
            "--sessions" => synth.total_sessions = val().parse().expect("--sessions N"),
            "--seed" => synth.seed = val().parse().expect("--seed N"),
            "--encoder" => encoder = val().parse().expect("--encoder lstm|gru|transformer"),
            "--epochs" => tc.epochs = val().parse().expect("--epochs N"),
            "--lr" => tc.learning_rate = val().parse().expect("--lr X"),
            "--batch" => tc.batch_size = val().parse().expect("--batch N"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let fed = generate(&synth).expect("generate");
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).expect("vocab");
    let sites: Vec<SiteDataset> = fed
        .sites
        .iter()
        .map(|s| SiteDataset::from_records(&s.records, &vocab, VAL_FRACTION).expect("dataset"))
        .collect();
    let pooled = SiteDataset::pool(&sites);

    // The ceiling on exactly the held-out sessions: mean of max_y p(y | events).
    let (mut bayes_sum, mut n_val) = (0.0, 0usize);
    for site in &fed.sites {
        for (rec, p) in site.records.iter().zip(&site.label_probs) {
            if split_of(&rec.session_id, VAL_FRACTION) == Split::Validation {
                bayes_sum += p.iter().cloned().fold(0.0, f64::max);
                n_val += 1;
            }
        }
    }
    assert_eq!(n_val, pooled.validation.len());
    let bayes = bayes_sum / n_val as f64;

    let bag =
        BagOfEvents::fit(&pooled.train, vocab.len(), &BaselineConfig::default()).expect("bag");
    let bag_acc = bag.accuracy(&pooled.validation);

    let cfg = ModelConfig {
        vocab_size: vocab.len(),
        encoder,
        ..ModelConfig::default()
    };
    let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 0).expect("model");
    let started = Instant::now();
    let report = train(&model, &pooled.train, &pooled.validation, &tc, &mut |e| {
        let v = e.validation.as_ref().expect("validation");
        eprintln!(
            "epoch {:>2}: train loss {:.4} acc {:.4} | val loss {:.4} acc {:.4} f1 {:.4} | {:.0} samples/s",
            e.epoch, e.train_loss, e.train_accuracy, v.loss, v.accuracy, v.macro_f1, e.samples_per_sec
        );
    })
    .expect("train");
    let secs = started.elapsed().as_secs_f64();
    let m = evaluate(&model, &pooled.validation, 256).expect("evaluate");
    println!(
        "{}",
        serde_json::json!({
            "sites": synth.sites,
            "sessions": fed.total_sessions(),
            "train_sessions": pooled.train.len(),
            "validation_sessions": n_val,
            "encoder": format!("{encoder:?}").to_lowercase(),
            "bayes_accuracy": bayes,
            "model_accuracy": m.accuracy,
            "model_macro_f1": m.macro_f1,
            "model_val_loss": m.loss,
            "bag_of_events_accuracy": bag_acc,
            "gap_to_bayes_points": 100.0 * (bayes - m.accuracy),
            "margin_over_bag_points": 100.0 * (m.accuracy - bag_acc),
            "epochs_run": report.epochs.len(),
            "best_epoch": report.best_epoch,
            "train_seconds": secs,
        })
    );
}
