//! Classification metrics: loss, accuracy, macro-F1, confusion matrix.

use serde::{Deserialize, Serialize};

/// Metrics of a model on a set of sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Number of sessions evaluated.
    pub examples: usize,
    /// Mean cross-entropy loss.
    pub loss: f64,
    /// Fraction of sessions whose arg-max class equals the label.
    pub accuracy: f64,
    /// Unweighted mean of per-class F1 over the classes present in the labels or the
    /// predictions: scikit-learn's `f1_score(average="macro")` with default `labels`.
    pub macro_f1: f64,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
    /// Number of sessions per true class.
    pub class_counts: Vec<u64>,
}

/// Accumulates predictions batch by batch.
#[derive(Debug, Clone)]
pub struct MetricsAccumulator {
    confusion: Vec<Vec<u64>>,
    loss_sum: f64,
    examples: usize,
}

impl MetricsAccumulator {
    /// An empty accumulator for `classes` classes.
    pub fn new(classes: usize) -> Self {
        MetricsAccumulator {
            confusion: vec![vec![0; classes]; classes],
            loss_sum: 0.0,
            examples: 0,
        }
    }

    /// Adds one batch: its mean loss, true classes and predicted classes.
    pub fn add(&mut self, mean_loss: f64, truth: &[u32], predicted: &[u32]) {
        for (&t, &p) in truth.iter().zip(predicted) {
            self.confusion[t as usize][p as usize] += 1;
        }
        self.loss_sum += mean_loss * truth.len() as f64;
        self.examples += truth.len();
    }

    /// Adds metrics computed elsewhere (e.g. another site's split): their confusion matrix
    /// and loss sum, so [`MetricsAccumulator::finish`] gives the metrics of the pooled
    /// predictions. Fails if the class counts differ.
    pub fn merge(&mut self, m: &EvalMetrics) -> crate::Result<()> {
        if m.confusion.len() != self.confusion.len() {
            return Err(crate::Error::Training(format!(
                "cannot merge metrics over {} classes into {} classes",
                m.confusion.len(),
                self.confusion.len()
            )));
        }
        for (row, other) in self.confusion.iter_mut().zip(&m.confusion) {
            for (c, o) in row.iter_mut().zip(other) {
                *c += o;
            }
        }
        if m.examples > 0 {
            self.loss_sum += m.loss * m.examples as f64;
        }
        self.examples += m.examples;
        Ok(())
    }

    /// Final metrics.
    pub fn finish(self) -> EvalMetrics {
        let k = self.confusion.len();
        let n = self.examples;
        let correct: u64 = (0..k).map(|c| self.confusion[c][c]).sum();
        let class_counts: Vec<u64> = self.confusion.iter().map(|row| row.iter().sum()).collect();
        let mut f1s = Vec::with_capacity(k);
        for (c, &actual) in class_counts.iter().enumerate() {
            let tp = self.confusion[c][c] as f64;
            let actual = actual as f64;
            let predicted: f64 = (0..k).map(|r| self.confusion[r][c] as f64).sum();
            if actual + predicted == 0.0 {
                continue;
            }
            f1s.push(2.0 * tp / (actual + predicted));
        }
        EvalMetrics {
            examples: n,
            loss: if n > 0 {
                self.loss_sum / n as f64
            } else {
                f64::NAN
            },
            accuracy: if n > 0 {
                correct as f64 / n as f64
            } else {
                f64::NAN
            },
            macro_f1: if f1s.is_empty() {
                f64::NAN
            } else {
                f1s.iter().sum::<f64>() / f1s.len() as f64
            },
            confusion: self.confusion,
            class_counts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_metrics_equal_those_of_the_pooled_predictions() {
        let mut a = MetricsAccumulator::new(3);
        a.add(0.5, &[0, 1, 2], &[0, 1, 1]);
        let mut b = MetricsAccumulator::new(3);
        b.add(1.5, &[2, 2], &[2, 0]);
        let mut pooled = MetricsAccumulator::new(3);
        pooled.add(0.5, &[0, 1, 2], &[0, 1, 1]);
        pooled.add(1.5, &[2, 2], &[2, 0]);
        let mut merged = MetricsAccumulator::new(3);
        merged.merge(&a.finish()).unwrap();
        merged.merge(&b.finish()).unwrap();
        let (m, p) = (merged.finish(), pooled.finish());
        assert_eq!(m.confusion, p.confusion);
        assert_eq!(
            (m.examples, m.accuracy, m.macro_f1),
            (p.examples, p.accuracy, p.macro_f1)
        );
        assert!((m.loss - p.loss).abs() < 1e-12);
        assert!(MetricsAccumulator::new(2).merge(&p).is_err());
    }

    #[test]
    fn macro_f1_matches_hand_computed_example() {
        // truth:     0 0 1 1 2
        // predicted: 0 1 1 1 0
        // class 0: tp 1, actual 2, predicted 2 -> F1 0.5
        // class 1: tp 2, actual 2, predicted 3 -> F1 0.8
        // class 2: tp 0, actual 1, predicted 0 -> F1 0.0
        // class 3,4 absent from both -> excluded
        let mut m = MetricsAccumulator::new(5);
        m.add(1.0, &[0, 0, 1], &[0, 1, 1]);
        m.add(2.0, &[1, 2], &[1, 0]);
        let r = m.finish();
        assert_eq!(r.examples, 5);
        assert!((r.accuracy - 0.6).abs() < 1e-12);
        assert!((r.macro_f1 - (0.5 + 0.8 + 0.0) / 3.0).abs() < 1e-12);
        assert!((r.loss - (3.0 + 4.0) / 5.0).abs() < 1e-12);
        assert_eq!(r.class_counts, vec![2, 2, 1, 0, 0]);
        assert_eq!(r.confusion[2][0], 1);
    }
}
