//! Metrics sites report and the per-round summaries the coordinator records.
//!
//! Training summaries weight each site's loss by its training examples and its validation
//! metrics by its validation examples; evaluation summaries weight by validation examples.
//! Every count used as a weight is capped at `aggregation.max_examples`, so a site claiming
//! a huge count cannot own the figure; and evaluation summaries also carry, per metric, the
//! spread over sites (unweighted minimum, median and maximum), which no single site can move
//! past its neighbours: the median is what a gate should trust. A metric a site did not
//! measure is `None` (NaN on the wire) and is left out, so one site without a validation
//! split does not turn the round's figure into NaN.

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
    /// Training examples behind them (each site's count capped at `aggregation.max_examples`).
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
    /// Bytes of the updates folded in (as sent: compressed when the run compresses).
    #[serde(default)]
    pub upload_bytes: u64,
    /// Bytes of the global model times the sites given a training task: what the round's
    /// downloads move when each site fetches the model once (resumed or repeated downloads
    /// not counted).
    #[serde(default)]
    pub download_bytes: u64,
}

/// The spread of one metric over the sites that reported it, unweighted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// The smallest site value.
    pub min: f64,
    /// The median of the site values (the mean of the middle two for an even count): robust
    /// to any minority of sites, whatever counts they claim.
    pub median: f64,
    /// The largest site value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (non-finite ones left out), `None` when none is left.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            min: v[0],
            median,
            max: v[n - 1],
        })
    }
}

/// Folds site reports into a [`TrainingSummary`].
#[derive(Debug, Clone)]
pub struct TrainingMeans {
    max_examples: u64,
    updates: u32,
    train_examples: u64,
    train_loss: WeightedMean,
    loss: WeightedMean,
    accuracy: WeightedMean,
    macro_f1: WeightedMean,
    upload_bytes: u64,
    download_bytes: u64,
}

impl TrainingMeans {
    /// Empty means, every count weighing at most `max_examples`.
    pub fn new(max_examples: u64) -> Self {
        TrainingMeans {
            max_examples,
            updates: 0,
            train_examples: 0,
            train_loss: WeightedMean::default(),
            loss: WeightedMean::default(),
            accuracy: WeightedMean::default(),
            macro_f1: WeightedMean::default(),
            upload_bytes: 0,
            download_bytes: 0,
        }
    }

    /// Counts the bytes of one accepted update.
    pub fn add_upload_bytes(&mut self, bytes: u64) {
        self.upload_bytes += bytes;
    }

    /// Sets the round's download volume (see [`TrainingSummary::download_bytes`]).
    pub fn set_download_bytes(&mut self, bytes: u64) {
        self.download_bytes = bytes;
    }

    /// Adds one accepted update's report.
    pub fn add(&mut self, r: &SiteReport) {
        let train = r.train_examples.min(self.max_examples);
        self.updates += 1;
        self.train_examples += train;
        self.train_loss.add(r.train_loss, train as f64);
        let v = r.validation_examples.min(self.max_examples) as f64;
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
            upload_bytes: self.upload_bytes,
            download_bytes: self.download_bytes,
        }
    }
}

/// The federated evaluation of a committed round's model (stored in
/// `rounds.evaluation_json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvaluationSummary {
    /// Sites that reported.
    pub sites: u32,
    /// Validation sessions behind the figures (each site's count capped at
    /// `aggregation.max_examples`).
    pub examples: u64,
    /// Loss, weighted by validation examples.
    pub loss: Option<f64>,
    /// Accuracy, weighted by validation examples.
    pub accuracy: Option<f64>,
    /// Macro-F1 averaged over sites, weighted by validation examples (each site's macro-F1
    /// is over its own classes; this is not the macro-F1 of the pooled predictions).
    pub macro_f1: Option<f64>,
    /// Loss over the sites: minimum, median, maximum (absent in rows written before it).
    #[serde(default)]
    pub loss_spread: Option<Spread>,
    /// Accuracy over the sites.
    #[serde(default)]
    pub accuracy_spread: Option<Spread>,
    /// Macro-F1 over the sites.
    #[serde(default)]
    pub macro_f1_spread: Option<Spread>,
}

/// Folds site evaluations into an [`EvaluationSummary`].
#[derive(Debug, Clone)]
pub struct EvaluationMeans {
    max_examples: u64,
    sites: u32,
    examples: u64,
    loss: WeightedMean,
    accuracy: WeightedMean,
    macro_f1: WeightedMean,
    /// Every site's (loss, accuracy, macro-F1), NaN where not measured.
    per_site: Vec<[f64; 3]>,
}

impl EvaluationMeans {
    /// Empty means, every count weighing at most `max_examples`.
    pub fn new(max_examples: u64) -> Self {
        EvaluationMeans {
            max_examples,
            sites: 0,
            examples: 0,
            loss: WeightedMean::default(),
            accuracy: WeightedMean::default(),
            macro_f1: WeightedMean::default(),
            per_site: Vec::new(),
        }
    }

    /// Adds one site's evaluation.
    pub fn add(&mut self, r: &SiteReport) {
        let examples = r.validation_examples.min(self.max_examples);
        self.sites += 1;
        self.examples += examples;
        let v = examples as f64;
        self.loss.add(r.validation_loss, v);
        self.accuracy.add(r.validation_accuracy, v);
        self.macro_f1.add(r.validation_macro_f1, v);
        // A site without a validation split measured nothing: it has no place in the spread.
        if r.validation_examples > 0 {
            let nan = f64::NAN;
            self.per_site.push([
                r.validation_loss.unwrap_or(nan),
                r.validation_accuracy.unwrap_or(nan),
                r.validation_macro_f1.unwrap_or(nan),
            ]);
        }
    }

    /// The summary so far.
    pub fn summary(&self) -> EvaluationSummary {
        let column = |i: usize| Spread::of(&self.per_site.iter().map(|m| m[i]).collect::<Vec<_>>());
        EvaluationSummary {
            sites: self.sites,
            examples: self.examples,
            loss: self.loss.get(),
            accuracy: self.accuracy.get(),
            macro_f1: self.macro_f1.get(),
            loss_spread: column(0),
            accuracy_spread: column(1),
            macro_f1_spread: column(2),
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
        let mut m = TrainingMeans::new(1_000);
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
        let mut m = EvaluationMeans::new(1_000);
        m.add(&report(0, 10, 1.0, 0.5));
        m.add(&report(0, 0, f64::NAN, f64::NAN)); // a site without a validation split
        m.add(&report(0, 30, f64::NAN, 0.7));
        let s = m.summary();
        assert_eq!((s.sites, s.examples), (3, 40));
        assert_eq!(s.loss, Some(1.0));
        assert!((s.accuracy.unwrap() - (0.5 * 10.0 + 0.7 * 30.0) / 40.0).abs() < 1e-12);
        assert_eq!(EvaluationMeans::new(1).summary().accuracy, None);
        // The spreads leave out the site without a validation split and unmeasured values.
        assert_eq!(
            s.accuracy_spread,
            Some(Spread {
                min: 0.5,
                median: 0.6,
                max: 0.7
            })
        );
        assert_eq!(
            s.loss_spread,
            Some(Spread {
                min: 1.0,
                median: 1.0,
                max: 1.0
            })
        );
    }

    #[test]
    fn one_site_claiming_a_huge_count_is_capped_and_cannot_move_the_median() {
        let honest = [(40, 0.55), (60, 0.60), (50, 0.58), (45, 0.52)];
        let mut without = EvaluationMeans::new(100);
        let mut with = EvaluationMeans::new(100);
        for (n, acc) in honest {
            without.add(&report(0, n, 1.0, acc));
            with.add(&report(0, n, 1.0, acc));
        }
        // A fifth site claims 10^12 validation examples and a perfect score.
        with.add(&report(0, 1_000_000_000_000, 0.0, 1.0));
        let (a, b) = (without.summary(), with.summary());
        // Weighted: capped at 100 against the others' 195.
        let weighted = (0.55 * 40.0 + 0.60 * 60.0 + 0.58 * 50.0 + 0.52 * 45.0 + 100.0) / 295.0;
        assert!((b.accuracy.unwrap() - weighted).abs() < 1e-12, "{b:?}");
        assert_eq!(b.examples, 195 + 100);
        // The median moves only to the next honest value: among five sites it is the third.
        assert_eq!(a.accuracy_spread.unwrap().median, (0.55 + 0.58) / 2.0);
        assert_eq!(b.accuracy_spread.unwrap().median, 0.58);
        assert_eq!(b.accuracy_spread.unwrap().max, 1.0);
        // Training figures are capped the same way.
        let mut t = TrainingMeans::new(100);
        t.add(&report(50, 10, 1.0, 0.5));
        t.add(&report(1_000_000_000_000, 1_000_000_000_000, 0.0, 1.0));
        let s = t.summary("x");
        assert_eq!(s.train_examples, 150);
        assert!(
            (s.local_validation_accuracy.unwrap() - (0.5 * 10.0 + 100.0) / 110.0).abs() < 1e-12
        );
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
