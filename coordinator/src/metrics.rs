//! Metrics sites report and the per-round summaries the coordinator records.
//!
//! Training summaries weight each site's loss by its training examples and its validation
//! metrics by its validation examples; evaluation summaries weight by validation examples.
//! A metric a site did not measure is `None` (NaN on the wire) and is left out of the mean,
//! so one site without a validation split does not turn the round's figure into NaN.

use serde::{Deserialize, Serialize};

/// What a site reported with an update or an evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteReport {
    /// Sessions in the site's training split.
    pub train_examples: u64,
    /// Sessions in the site's validation split.
    pub validation_examples: u64,
    /// Mean training loss of the kept epoch.
    pub train_loss: Option<f64>,
    /// Validation loss (of the local model for an update, of the global model for an
    /// evaluation).
    pub validation_loss: Option<f64>,
    /// Validation accuracy, as above.
    pub validation_accuracy: Option<f64>,
    /// Validation macro-F1, as above.
    pub validation_macro_f1: Option<f64>,
    /// Local epochs trained.
    pub epochs_run: u32,
    /// Seconds of local training.
    pub train_seconds: f64,
}

impl SiteReport {
    /// The report as JSON, for the database.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a SiteReport always serialises")
    }
}

pub use fedflow_common::report::finite;

/// A running weighted mean that skips missing values.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WeightedMean {
    sum: f64,
    weight: f64,
}

impl WeightedMean {
    /// Adds `value` with `weight`; ignored when either is missing, non-finite or the weight
    /// is not positive.
    pub fn add(&mut self, value: Option<f64>, weight: f64) {
        if let Some(v) = value
            && v.is_finite()
            && weight.is_finite()
            && weight > 0.0
        {
            self.sum += v * weight;
            self.weight += weight;
        }
    }

    /// The mean, or `None` when nothing was added.
    pub fn get(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.sum / self.weight)
    }
}

/// The training metrics of a committed round (stored in `rounds.metrics_json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Updates folded into the aggregate.
    pub updates: u32,
    /// Training examples behind them.
    pub train_examples: u64,
    /// Mean training loss, weighted by training examples.
    pub train_loss: Option<f64>,
    /// The sites' local models on their validation splits, weighted by validation examples.
    pub local_validation_loss: Option<f64>,
    /// As above, accuracy.
    pub local_validation_accuracy: Option<f64>,
    /// As above, macro-F1.
    pub local_validation_macro_f1: Option<f64>,
    /// Why the round closed (every site answered, deadline passed).
    pub closed_because: String,
}

/// Folds site reports into a [`TrainingSummary`].
#[derive(Debug, Clone, Default)]
pub struct TrainingMeans {
    updates: u32,
    train_examples: u64,
    train_loss: WeightedMean,
    loss: WeightedMean,
    accuracy: WeightedMean,
    macro_f1: WeightedMean,
}

impl TrainingMeans {
    /// Adds one accepted update's report.
    pub fn add(&mut self, r: &SiteReport) {
        self.updates += 1;
        self.train_examples += r.train_examples;
        self.train_loss.add(r.train_loss, r.train_examples as f64);
        let v = r.validation_examples as f64;
        self.loss.add(r.validation_loss, v);
        self.accuracy.add(r.validation_accuracy, v);
        self.macro_f1.add(r.validation_macro_f1, v);
    }

    /// The summary so far.
    pub fn summary(&self, closed_because: &str) -> TrainingSummary {
        TrainingSummary {
            updates: self.updates,
            train_examples: self.train_examples,
            train_loss: self.train_loss.get(),
            local_validation_loss: self.loss.get(),
            local_validation_accuracy: self.accuracy.get(),
            local_validation_macro_f1: self.macro_f1.get(),
            closed_because: closed_because.to_string(),
        }
    }
}

/// The federated evaluation of a committed round's model (stored in
/// `rounds.evaluation_json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvaluationSummary {
    /// Sites that reported.
    pub sites: u32,
    /// Validation sessions behind the figures.
    pub examples: u64,
    /// Loss, weighted by validation examples.
    pub loss: Option<f64>,
    /// Accuracy, weighted by validation examples.
    pub accuracy: Option<f64>,
    /// Macro-F1 averaged over sites, weighted by validation examples (each site's macro-F1
    /// is over its own classes; this is not the macro-F1 of the pooled predictions).
    pub macro_f1: Option<f64>,
}

/// Folds site evaluations into an [`EvaluationSummary`].
#[derive(Debug, Clone, Default)]
pub struct EvaluationMeans {
    sites: u32,
    examples: u64,
    loss: WeightedMean,
    accuracy: WeightedMean,
    macro_f1: WeightedMean,
}

impl EvaluationMeans {
    /// Adds one site's evaluation.
    pub fn add(&mut self, r: &SiteReport) {
        self.sites += 1;
        self.examples += r.validation_examples;
        let v = r.validation_examples as f64;
        self.loss.add(r.validation_loss, v);
        self.accuracy.add(r.validation_accuracy, v);
        self.macro_f1.add(r.validation_macro_f1, v);
    }

    /// The summary so far.
    pub fn summary(&self) -> EvaluationSummary {
        EvaluationSummary {
            sites: self.sites,
            examples: self.examples,
            loss: self.loss.get(),
            accuracy: self.accuracy.get(),
            macro_f1: self.macro_f1.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(train: u64, val: u64, loss: f64, acc: f64) -> SiteReport {
        SiteReport {
            train_examples: train,
            validation_examples: val,
            train_loss: finite(loss + 1.0),
            validation_loss: finite(loss),
            validation_accuracy: finite(acc),
            validation_macro_f1: finite(acc / 2.0),
            ..SiteReport::default()
        }
    }

    #[test]
    fn training_means_weight_by_the_right_counts() {
        let mut m = TrainingMeans::default();
        m.add(&report(100, 10, 1.0, 0.5));
        m.add(&report(300, 30, 2.0, 0.9));
        let s = m.summary("x");
        assert_eq!((s.updates, s.train_examples), (2, 400));
        // Train loss weighted 100:300, validation figures 10:30 (the same ratio here).
        assert!((s.train_loss.unwrap() - (2.0 * 100.0 + 3.0 * 300.0) / 400.0).abs() < 1e-12);
        assert!(
            (s.local_validation_accuracy.unwrap() - (0.5 * 10.0 + 0.9 * 30.0) / 40.0).abs() < 1e-12
        );
        assert_eq!(s.closed_because, "x");
    }

    #[test]
    fn missing_values_are_left_out_not_propagated() {
        let mut m = EvaluationMeans::default();
        m.add(&report(0, 10, 1.0, 0.5));
        m.add(&report(0, 0, f64::NAN, f64::NAN)); // a site without a validation split
        m.add(&report(0, 30, f64::NAN, 0.7));
        let s = m.summary();
        assert_eq!((s.sites, s.examples), (3, 40));
        assert_eq!(s.loss, Some(1.0));
        assert!((s.accuracy.unwrap() - (0.5 * 10.0 + 0.7 * 30.0) / 40.0).abs() < 1e-12);
        assert_eq!(EvaluationMeans::default().summary().accuracy, None);
    }

    #[test]
    fn reports_round_trip_through_json_with_missing_values_as_null() {
        let r = report(5, 0, f64::NAN, 0.25);
        let json = r.to_json();
        assert!(json.contains("\"validation_loss\":null"), "{json}");
        let back: SiteReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }
}
