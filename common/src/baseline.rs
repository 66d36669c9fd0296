//! Bag-of-events baseline: multinomial logistic regression on normalised event counts.
//!
//! The baseline sees which events a session contains and how often, but not their order, so on
//! the synthetic data of [`crate::synth`] it stays clearly below the Bayes ceiling; a sequence
//! model should beat it. It is plain Rust (no candle), deterministic, and fits in well under a
//! second on tens of thousands of sessions.

use serde::{Deserialize, Serialize};

use crate::data::{EncodedSession, NUM_LABELS};
use crate::{Error, Result};

/// Settings of the full-batch Adam fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BaselineConfig {
    /// Number of full-batch Adam steps.
    pub iterations: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// L2 penalty on the weights (not on the intercepts), added to the mean cross-entropy.
    pub l2: f64,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        BaselineConfig {
            iterations: 300,
            learning_rate: 0.05,
            l2: 1e-4,
        }
    }
}

impl BaselineConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.iterations == 0 {
            return Err(Error::Config(
                "baseline: iterations must be at least 1".into(),
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::Config(format!(
                "baseline: learning_rate must be finite and > 0, got {}",
                self.learning_rate
            )));
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return Err(Error::Config(format!(
                "baseline: l2 must be finite and >= 0, got {}",
                self.l2
            )));
        }
        Ok(())
    }
}

/// A multinomial logistic regression on dense feature rows, with per-feature standardisation.
///
/// The last feature of each row is expected to be a constant 1 (the intercept); it is neither
/// standardised nor penalised.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Softmax {
    dim: usize,
    mean: Vec<f64>,
    scale: Vec<f64>,
    /// `NUM_LABELS x dim`, row-major, on standardised features.
    weights: Vec<f64>,
}

impl Softmax {
    /// Fits on `rows` (`n x dim`, row-major) with classes `classes` (each `< NUM_LABELS`).
    pub(crate) fn fit(
        rows: &[f64],
        dim: usize,
        classes: &[u32],
        cfg: &BaselineConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        let n = classes.len();
        if n == 0 {
            return Err(Error::Training("baseline: no training sessions".into()));
        }
        if dim == 0 || rows.len() != n * dim {
            return Err(Error::Training(format!(
                "baseline: {} feature values for {n} rows of {dim}",
                rows.len()
            )));
        }
        if let Some(c) = classes.iter().find(|&&c| c as usize >= NUM_LABELS) {
            return Err(Error::Training(format!(
                "baseline: class {c} out of range 0..{NUM_LABELS}"
            )));
        }
        // Standardise every feature but the intercept, so one learning rate suits all.
        let mut mean = vec![0.0; dim];
        let mut scale = vec![1.0; dim];
        for row in rows.chunks_exact(dim) {
            for (m, x) in mean.iter_mut().zip(row) {
                *m += x;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut var = vec![0.0; dim];
        for row in rows.chunks_exact(dim) {
            for ((v, x), m) in var.iter_mut().zip(row).zip(&mean) {
                *v += (x - m) * (x - m);
            }
        }
        for (s, v) in scale.iter_mut().zip(&var) {
            let sd = (v / n as f64).sqrt();
            *s = if sd > 1e-12 { 1.0 / sd } else { 0.0 };
        }
        mean[dim - 1] = 0.0;
        scale[dim - 1] = 1.0;
        let x: Vec<f64> = rows
            .chunks_exact(dim)
            .flat_map(|row| {
                row.iter()
                    .zip(&mean)
                    .zip(&scale)
                    .map(|((x, m), s)| (x - m) * s)
            })
            .collect();

        let k = NUM_LABELS;
        let mut w = vec![0.0; k * dim];
        let mut grad = vec![0.0; k * dim];
        let mut m1 = vec![0.0; k * dim];
        let mut m2 = vec![0.0; k * dim];
        let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8);
        let mut p = [0.0; NUM_LABELS];
        for step in 1..=cfg.iterations {
            grad.iter_mut().for_each(|g| *g = 0.0);
            for (row, &c) in x.chunks_exact(dim).zip(classes) {
                logits_into(&w, row, &mut p);
                softmax_in_place(&mut p);
                p[c as usize] -= 1.0;
                for (j, &pj) in p.iter().enumerate() {
                    let g = &mut grad[j * dim..(j + 1) * dim];
                    for (gi, xi) in g.iter_mut().zip(row) {
                        *gi += pj * xi;
                    }
                }
            }
            let t1 = 1.0 - beta1.powi(step as i32);
            let t2 = 1.0 - beta2.powi(step as i32);
            for (i, ((wi, gi), (a, b))) in w
                .iter_mut()
                .zip(&grad)
                .zip(m1.iter_mut().zip(m2.iter_mut()))
                .enumerate()
            {
                let penalty = if i % dim == dim - 1 {
                    0.0
                } else {
                    cfg.l2 * *wi
                };
                let g = gi / n as f64 + penalty;
                *a = beta1 * *a + (1.0 - beta1) * g;
                *b = beta2 * *b + (1.0 - beta2) * g * g;
                *wi -= cfg.learning_rate * (*a / t1) / ((*b / t2).sqrt() + eps);
            }
        }
        if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
            return Err(Error::Training(format!(
                "baseline: weights diverged ({bad}); lower the learning rate"
            )));
        }
        Ok(Softmax {
            dim,
            mean,
            scale,
            weights: w,
        })
    }

    /// Class with the highest score for one raw (unstandardised) feature row.
    pub(crate) fn predict(&self, row: &[f64]) -> u32 {
        let mut p = [0.0; NUM_LABELS];
        for (j, pj) in p.iter_mut().enumerate() {
            let w = &self.weights[j * self.dim..(j + 1) * self.dim];
            *pj = row
                .iter()
                .zip(&self.mean)
                .zip(&self.scale)
                .zip(w)
                .map(|(((x, m), s), wi)| (x - m) * s * wi)
                .sum();
        }
        let mut best = 0;
        for j in 1..NUM_LABELS {
            if p[j] > p[best] {
                best = j;
            }
        }
        best as u32
    }
}

fn logits_into(w: &[f64], row: &[f64], out: &mut [f64; NUM_LABELS]) {
    let dim = row.len();
    for (j, o) in out.iter_mut().enumerate() {
        *o = w[j * dim..(j + 1) * dim]
            .iter()
            .zip(row)
            .map(|(a, b)| a * b)
            .sum();
    }
}

fn softmax_in_place(p: &mut [f64; NUM_LABELS]) {
    let max = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut total = 0.0;
    for v in p.iter_mut() {
        *v = (*v - max).exp();
        total += *v;
    }
    p.iter_mut().for_each(|v| *v /= total);
}

/// Bag-of-events classifier: multinomial logistic regression on the per-event counts divided by
/// the session length, plus the log length and an intercept.
#[derive(Debug, Clone, PartialEq)]
pub struct BagOfEvents {
    vocab_size: usize,
    model: Softmax,
}

impl BagOfEvents {
    /// Fits on `train`; every event id must be below `vocab_size`.
    ///
    /// Full-batch Adam with L2 on standardised features; deterministic (weights start at zero).
    pub fn fit(train: &[EncodedSession], vocab_size: usize, cfg: &BaselineConfig) -> Result<Self> {
        if vocab_size == 0 {
            return Err(Error::Config(
                "baseline: vocab_size must be at least 1".into(),
            ));
        }
        if let Some(s) = train.iter().find(|s| s.events.is_empty()) {
            return Err(Error::Training(format!(
                "baseline: a training session of class {} has no events",
                s.class
            )));
        }
        if let Some(id) = train
            .iter()
            .flat_map(|s| &s.events)
            .find(|&&id| id as usize >= vocab_size)
        {
            return Err(Error::Training(format!(
                "baseline: event id {id} is not below vocab_size {vocab_size}"
            )));
        }
        let dim = vocab_size + 2;
        let mut rows = vec![0.0; train.len() * dim];
        for (s, row) in train.iter().zip(rows.chunks_exact_mut(dim)) {
            features_into(&s.events, row);
        }
        let classes: Vec<u32> = train.iter().map(|s| s.class).collect();
        let model = Softmax::fit(&rows, dim, &classes, cfg)?;
        Ok(BagOfEvents { vocab_size, model })
    }

    /// Vocabulary size the model was fitted with.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Most likely class (0..5) of a session; ids not below the vocabulary size are ignored
    /// (they count only towards the length).
    pub fn predict(&self, events: &[u32]) -> u32 {
        let mut row = vec![0.0; self.vocab_size + 2];
        features_into(events, &mut row);
        self.model.predict(&row)
    }

    /// Fraction of `data` whose class is predicted correctly (0 for empty data).
    pub fn accuracy(&self, data: &[EncodedSession]) -> f64 {
        if data.is_empty() {
            return 0.0;
        }
        let mut row = vec![0.0; self.vocab_size + 2];
        let correct = data
            .iter()
            .filter(|s| {
                row.iter_mut().for_each(|v| *v = 0.0);
                features_into(&s.events, &mut row);
                self.model.predict(&row) == s.class
            })
            .count();
        correct as f64 / data.len() as f64
    }
}

/// Writes the features of `events` into a zeroed `row` of length `vocab + 2`.
fn features_into(events: &[u32], row: &mut [f64]) {
    let vocab = row.len() - 2;
    let len = events.len().max(1) as f64;
    for &id in events {
        if (id as usize) < vocab {
            row[id as usize] += 1.0 / len;
        }
    }
    row[vocab] = len.ln();
    row[vocab + 1] = 1.0;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(events: &[u32], class: u32) -> EncodedSession {
        EncodedSession {
            events: events.to_vec(),
            class,
        }
    }

    #[test]
    fn learns_a_separable_rule() {
        // Class 0 sessions are mostly event 2, class 4 sessions mostly event 3.
        let mut train = Vec::new();
        for i in 0..200u32 {
            let n = 3 + i % 5;
            let mut a = vec![2; n as usize];
            a.push(3);
            let mut b = vec![3; n as usize];
            b.push(2);
            train.push(session(&a, 0));
            train.push(session(&b, 4));
        }
        let model = BagOfEvents::fit(&train, 4, &BaselineConfig::default()).unwrap();
        assert_eq!(model.accuracy(&train), 1.0);
        assert_eq!(model.predict(&[2, 2, 2]), 0);
        assert_eq!(model.predict(&[3, 3, 9]), 4);
        assert_eq!(model.vocab_size(), 4);
    }

    #[test]
    fn fit_is_deterministic() {
        let train: Vec<_> = (0..100u32)
            .map(|i| session(&[i % 5, (i * 7) % 5, 1], i % 5))
            .collect();
        let cfg = BaselineConfig::default();
        let a = BagOfEvents::fit(&train, 5, &cfg).unwrap();
        let b = BagOfEvents::fit(&train, 5, &cfg).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn rejects_bad_input() {
        let cfg = BaselineConfig::default();
        assert!(BagOfEvents::fit(&[], 5, &cfg).is_err());
        assert!(BagOfEvents::fit(&[session(&[7], 0)], 5, &cfg).is_err());
        assert!(BagOfEvents::fit(&[session(&[], 0)], 5, &cfg).is_err());
        assert!(BagOfEvents::fit(&[session(&[1], 5)], 5, &cfg).is_err());
        assert!(BagOfEvents::fit(&[session(&[1], 0)], 0, &cfg).is_err());
        let bad = BaselineConfig {
            learning_rate: 0.0,
            ..cfg
        };
        assert!(BagOfEvents::fit(&[session(&[1], 0)], 5, &bad).is_err());
        assert_eq!(
            BagOfEvents::fit(&[session(&[1], 0)], 5, &BaselineConfig::default())
                .unwrap()
                .accuracy(&[]),
            0.0
        );
    }
}
