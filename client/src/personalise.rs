//! Personalisation: the published model fine-tuned on one site's own data, kept only when it
//! predicts that site's held-out sessions better.
//!
//! Partner sites are non-IID, so a site may be served better by the federation's model
//! adapted to its own sessions. The fine-tuning starts from the published weights and trains
//! a few epochs on the site's training split, early-stopping on a *tuning* part of that split
//! (every `1/tuning_fraction`-th training session); the decision compares the published and
//! the fine-tuned model on the site's validation split, which neither training nor early
//! stopping has seen. The fine-tuned model is kept only when its validation accuracy beats
//! the published one's by more than `min_gain`.
//!
//! Privacy: the fine-tuned model never leaves the site and spends nothing of the
//! federation's budgets; it is trained without DP, so its predictions can reveal the site's
//! own records to whoever may call the site's API (the same people who may read its store).

use fedflow_common::data::{EncodedSession, SiteDataset};
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::params::ParamSet;
use fedflow_common::train::{self, EvalMetrics, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How a site fine-tunes the published model (`[personalisation]` of `site.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersonaliseConfig {
    /// Most passes over the training split (default 5).
    pub epochs: usize,
    /// Stop after this many epochs without a tuning-loss improvement (default 2); the best
    /// epoch's weights are kept.
    pub patience: usize,
    /// AdamW learning rate (default 5e-4: below the federation's, the start is good).
    pub learning_rate: f64,
    /// Sessions per step (default 32).
    pub batch_size: usize,
    /// Fraction of the training split held out for early stopping (default 0.2).
    pub tuning_fraction: f64,
    /// The fine-tuned model is kept only when its validation accuracy exceeds the published
    /// model's by more than this (default 0.0).
    pub min_gain: f64,
    /// Fewer training or validation sessions than this: no fine-tuning (default 50), since
    /// the comparison would be noise.
    pub min_sessions: usize,
    /// Seed of shuffling and dropout (default 0).
    pub seed: u64,
}

impl Default for PersonaliseConfig {
    fn default() -> Self {
        PersonaliseConfig {
            epochs: 5,
            patience: 2,
            learning_rate: 5e-4,
            batch_size: 32,
            tuning_fraction: 0.2,
            min_gain: 0.0,
            min_sessions: 50,
            seed: 0,
        }
    }
}

impl PersonaliseConfig {
    /// Checks every field; the message names it under `prefix` (e.g. `personalisation.`).
    pub fn validate(&self, prefix: &str) -> std::result::Result<(), String> {
        let bad = |f: &str, why: String| Err(format!("{prefix}{f}: {why}"));
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "learning_rate",
                format!("{} is not a positive number", self.learning_rate),
            );
        }
        if !(self.tuning_fraction > 0.0 && self.tuning_fraction < 1.0) {
            return bad(
                "tuning_fraction",
                format!("{} is not in (0, 1)", self.tuning_fraction),
            );
        }
        if !(self.min_gain.is_finite() && (0.0..1.0).contains(&self.min_gain)) {
            return bad("min_gain", format!("{} is not in [0, 1)", self.min_gain));
        }
        if self.min_sessions == 0 {
            return bad("min_sessions", "must be at least 1".into());
        }
        Ok(())
    }
}

/// What one personalisation attempt found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PersonalisationReport {
    /// The published model on the site's validation split.
    pub published: Option<EvalMetrics>,
    /// The fine-tuned model on the same sessions.
    pub personalised: Option<EvalMetrics>,
    /// Whether the fine-tuned model is the one to serve.
    pub chosen: bool,
    /// Why not, when it was not tried or not chosen.
    pub reason: Option<String>,
    /// Sessions trained on, held out for early stopping, and compared on.
    pub train_sessions: usize,
    /// Sessions of the early-stopping part.
    pub tuning_sessions: usize,
    /// Sessions of the validation split.
    pub validation_sessions: usize,
    /// Epochs run, and the one whose weights were kept.
    pub epochs_run: usize,
    /// The epoch kept (1-based).
    pub best_epoch: usize,
}

/// The outcome: the fine-tuned model when it is the one to serve, and the report.
#[derive(Debug)]
pub struct Personalised {
    /// The fine-tuned model, when it beat the published one.
    pub model: Option<AttentionFlowModel>,
    /// The figures.
    pub report: PersonalisationReport,
}

/// A copy of `model` (same configuration, same weights, same device).
pub fn copy_model(model: &AttentionFlowModel) -> Result<AttentionFlowModel> {
    let copy = AttentionFlowModel::new(model.config(), model.device(), 0)?;
    ParamSet::from_varmap(model.varmap())?.load_into_varmap(copy.varmap())?;
    Ok(copy)
}

/// Fine-tunes a copy of `published` on `data` (see the module documentation); `published`
/// itself is left as it is.
pub fn personalise(
    published: &AttentionFlowModel,
    data: &SiteDataset,
    cfg: &PersonaliseConfig,
) -> Result<Personalised> {
    cfg.validate("")
        .map_err(|e| Error::Usage(format!("personalisation: {e}")))?;
    let every = (1.0 / cfg.tuning_fraction).round().max(2.0) as usize;
    let (mut fit, mut tuning): (Vec<EncodedSession>, Vec<EncodedSession>) = (vec![], vec![]);
    for (i, s) in data.train.iter().enumerate() {
        if i % every == every - 1 {
            tuning.push(s.clone());
        } else {
            fit.push(s.clone());
        }
    }
    let mut report = PersonalisationReport {
        published: None,
        personalised: None,
        chosen: false,
        reason: None,
        train_sessions: fit.len(),
        tuning_sessions: tuning.len(),
        validation_sessions: data.validation.len(),
        epochs_run: 0,
        best_epoch: 0,
    };
    if data.train.len() < cfg.min_sessions || data.validation.len() < cfg.min_sessions {
        report.reason = Some(format!(
            "too little data: {} training and {} validation sessions, {} of each needed",
            data.train.len(),
            data.validation.len(),
            cfg.min_sessions
        ));
        return Ok(Personalised {
            model: None,
            report,
        });
    }
    let before = train::evaluate(published, &data.validation, 256)?;
    let model = copy_model(published)?;
    let train_cfg = TrainConfig {
        epochs: cfg.epochs,
        batch_size: cfg.batch_size,
        learning_rate: cfg.learning_rate,
        patience: cfg.patience,
        seed: cfg.seed,
        ..TrainConfig::default()
    };
    let trained = train::train(&model, &fit, &tuning, &train_cfg, &mut |_| {})?;
    let after = train::evaluate(&model, &data.validation, 256)?;
    report.epochs_run = trained.epochs.len();
    report.best_epoch = trained.best_epoch;
    report.chosen = after.accuracy > before.accuracy + cfg.min_gain;
    if !report.chosen {
        report.reason = Some(format!(
            "validation accuracy {:.4} fine-tuned, {:.4} published: not better by more than {}",
            after.accuracy, before.accuracy, cfg.min_gain
        ));
    }
    report.published = Some(before);
    report.personalised = Some(after);
    Ok(Personalised {
        model: report.chosen.then_some(model),
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use fedflow_common::data::{SessionRecord, Vocab};
    use fedflow_common::model::ModelConfig;

    /// Sessions whose label is fixed by the first event: `a` -> 1, `b` -> 5.
    fn site(n: usize) -> (Vocab, SiteDataset) {
        let vocab = Vocab::from_events(["a", "b", "c"]).unwrap();
        let records: Vec<SessionRecord> = (0..n)
            .map(|i| {
                let first = if i % 2 == 0 { "a" } else { "b" };
                SessionRecord {
                    session_id: format!("s{i}"),
                    events: vec![first.into(), "c".into(), "c".into()],
                    label: if i % 2 == 0 { 1 } else { 5 },
                    user_id: None,
                    timestamp: None,
                }
            })
            .collect();
        let data = SiteDataset::from_records(&records, &vocab, 0.3).unwrap();
        (vocab, data)
    }

    fn model(vocab: &Vocab) -> AttentionFlowModel {
        let config = ModelConfig {
            vocab_size: vocab.len(),
            embed_dim: 8,
            hidden_size: 8,
            num_layers: 1,
            ..ModelConfig::default()
        };
        AttentionFlowModel::new(&config, &Device::Cpu, 7).unwrap()
    }

    #[test]
    fn fine_tuning_an_untrained_model_on_a_learnable_site_is_chosen_and_leaves_the_original() {
        let (vocab, data) = site(400);
        let published = model(&vocab);
        let before = ParamSet::from_varmap(published.varmap()).unwrap();
        let cfg = PersonaliseConfig {
            learning_rate: 2e-2,
            epochs: 8,
            ..PersonaliseConfig::default()
        };
        let out = personalise(&published, &data, &cfg).unwrap();
        let r = &out.report;
        assert!(r.chosen, "{r:?}");
        assert!(r.personalised.as_ref().unwrap().accuracy > 0.95, "{r:?}");
        assert!(r.published.as_ref().unwrap().accuracy < 0.9, "{r:?}");
        assert_eq!(r.train_sessions + r.tuning_sessions, data.train.len());
        assert_eq!(r.validation_sessions, data.validation.len());
        assert!(r.tuning_sessions > 0 && r.best_epoch >= 1 && r.best_epoch <= r.epochs_run);
        // The published model is untouched; the chosen one differs from it.
        let distance =
            |a: &ParamSet, b: &ParamSet| ParamSet::delta(a, b).unwrap().l2_norm().unwrap();
        let after = ParamSet::from_varmap(published.varmap()).unwrap();
        assert_eq!(distance(&after, &before), 0.0);
        let tuned = ParamSet::from_varmap(out.model.unwrap().varmap()).unwrap();
        assert!(distance(&tuned, &before) > 0.0);
    }

    #[test]
    fn a_model_that_cannot_gain_is_not_chosen_and_too_little_data_is_not_tried() {
        let (vocab, data) = site(400);
        let published = model(&vocab);
        // A gain of more than 0.99 is impossible from an accuracy near 0.5.
        let cfg = PersonaliseConfig {
            min_gain: 0.99,
            epochs: 1,
            ..PersonaliseConfig::default()
        };
        let out = personalise(&published, &data, &cfg).unwrap();
        assert!(!out.report.chosen && out.model.is_none());
        assert!(out.report.reason.as_ref().unwrap().contains("not better"));
        let (_, small) = site(40);
        let out = personalise(&published, &small, &PersonaliseConfig::default()).unwrap();
        assert!(out.model.is_none() && out.report.personalised.is_none());
        assert!(
            out.report
                .reason
                .as_ref()
                .unwrap()
                .contains("too little data"),
            "{:?}",
            out.report
        );
    }

    #[test]
    fn every_setting_is_checked_by_name() {
        for (cfg, field) in [
            (
                PersonaliseConfig {
                    epochs: 0,
                    ..Default::default()
                },
                "p.epochs",
            ),
            (
                PersonaliseConfig {
                    tuning_fraction: 1.0,
                    ..Default::default()
                },
                "p.tuning_fraction",
            ),
            (
                PersonaliseConfig {
                    learning_rate: f64::NAN,
                    ..Default::default()
                },
                "p.learning_rate",
            ),
            (
                PersonaliseConfig {
                    min_gain: -0.1,
                    ..Default::default()
                },
                "p.min_gain",
            ),
        ] {
            let err = cfg.validate("p.").unwrap_err();
            assert!(err.starts_with(field), "{err}");
        }
        assert!(PersonaliseConfig::default().validate("p.").is_ok());
    }
}
