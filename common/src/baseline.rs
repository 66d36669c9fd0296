//! Bag-of-events baseline: multinomial logistic regression on normalised event counts.
//!
//! The baseline sees which events a session contains and how often, but not their order, so on
//! the synthetic data of [`crate::synth`] it stays clearly below the Bayes ceiling; a sequence
//! model should beat it. It is plain Rust (no candle), deterministic, and fits in well under a
//! second on tens of thousands of sessions.
//!
//! [`FlowOracle`] is the order-aware counterpart for synthetic data: the same regression on the
//! generator's own order-dependent features, which gets within sampling error of the ceiling.

use serde::{Deserialize, Serialize};

use crate::data::{EncodedSession, NUM_LABELS, SessionRecord};
use crate::synth::{FlowFeatures, ORACLE_DIM};
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

/// Feature rows in compressed sparse row form: row `i` is the pairs
/// `(indices[k], values[k])` for `k` in `starts[i]..starts[i + 1]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct SparseRows {
    starts: Vec<usize>,
    indices: Vec<u32>,
    values: Vec<f64>,
}

impl SparseRows {
    /// No rows yet.
    pub(crate) fn new() -> Self {
        SparseRows {
            starts: vec![0],
            ..SparseRows::default()
        }
    }

    /// Appends one row given as `(feature, value)` pairs (each feature at most once).
    pub(crate) fn push(&mut self, row: impl IntoIterator<Item = (usize, f64)>) {
        for (j, v) in row {
            self.indices.push(j as u32);
            self.values.push(v);
        }
        self.starts.push(self.indices.len());
    }

    /// Number of rows.
    pub(crate) fn len(&self) -> usize {
        self.starts.len() - 1
    }
}

/// A multinomial logistic regression on sparse feature rows.
///
/// Training standardises every feature (zero mean, unit standard deviation) so that one
/// learning rate and one L2 penalty suit all, but never materialises the centred rows, which
/// would be dense: centring only shifts each class score by a constant, which is subtracted
/// once per step. The fitted weights are mapped back to raw features.
///
/// Feature `dim - 1` is the intercept: every row should hold it with value 1; it is neither
/// standardised nor penalised.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Softmax {
    dim: usize,
    /// `dim x NUM_LABELS`, row-major (the class scores of a feature are contiguous), on raw
    /// features.
    weights: Vec<f64>,
}

impl Softmax {
    /// Fits on `rows` (features `< dim`) with classes `classes` (each `< NUM_LABELS`).
    pub(crate) fn fit(
        rows: &SparseRows,
        dim: usize,
        classes: &[u32],
        cfg: &BaselineConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        let n = classes.len();
        if n == 0 {
            return Err(Error::Training("baseline: no training sessions".into()));
        }
        if dim == 0 || rows.len() != n {
            return Err(Error::Training(format!(
                "baseline: {} feature rows for {n} classes",
                rows.len()
            )));
        }
        if let Some(j) = rows.indices.iter().find(|&&j| j as usize >= dim) {
            return Err(Error::Training(format!(
                "baseline: feature {j} out of range 0..{dim}"
            )));
        }
        if let Some(c) = classes.iter().find(|&&c| c as usize >= NUM_LABELS) {
            return Err(Error::Training(format!(
                "baseline: class {c} out of range 0..{NUM_LABELS}"
            )));
        }
        let (mut sum, mut sum_sq) = (vec![0.0; dim], vec![0.0; dim]);
        for (&j, &v) in rows.indices.iter().zip(&rows.values) {
            sum[j as usize] += v;
            sum_sq[j as usize] += v * v;
        }
        // Per feature: scale to unit standard deviation, and the mean after scaling.
        let mut scale = vec![1.0; dim];
        let mut mean = vec![0.0; dim];
        for j in 0..dim - 1 {
            let m = sum[j] / n as f64;
            let sd = (sum_sq[j] / n as f64 - m * m).max(0.0).sqrt();
            if sd > 1e-12 {
                scale[j] = 1.0 / sd;
                mean[j] = m / sd;
            } else {
                scale[j] = 0.0;
            }
        }
        let x: Vec<f64> = rows
            .indices
            .iter()
            .zip(&rows.values)
            .map(|(&j, v)| v * scale[j as usize])
            .collect();

        let k = NUM_LABELS;
        let mut w = vec![0.0; dim * k];
        let mut grad = vec![0.0; dim * k];
        let mut m1 = vec![0.0; dim * k];
        let mut m2 = vec![0.0; dim * k];
        let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8);
        for step in 1..=cfg.iterations {
            // Shift of each class score caused by centring.
            let shift = centring_shift(&w, &mean);
            grad.iter_mut().for_each(|g| *g = 0.0);
            let mut total = [0.0; NUM_LABELS];
            for (i, &c) in classes.iter().enumerate() {
                let r = rows.starts[i]..rows.starts[i + 1];
                let (idx, val) = (&rows.indices[r.clone()], &x[r]);
                let mut p = shift.map(|s| -s);
                for (&j, &v) in idx.iter().zip(val) {
                    let wj = &w[j as usize * k..(j as usize + 1) * k];
                    for (pc, wc) in p.iter_mut().zip(wj) {
                        *pc += wc * v;
                    }
                }
                softmax_in_place(&mut p);
                p[c as usize] -= 1.0;
                for (t, pc) in total.iter_mut().zip(&p) {
                    *t += pc;
                }
                for (&j, &v) in idx.iter().zip(val) {
                    let gj = &mut grad[j as usize * k..(j as usize + 1) * k];
                    for (gc, pc) in gj.iter_mut().zip(&p) {
                        *gc += pc * v;
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
                let (j, c) = (i / k, i % k);
                let penalty = if j == dim - 1 { 0.0 } else { cfg.l2 * *wi };
                let g = (gi - mean[j] * total[c]) / n as f64 + penalty;
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
        // Back to raw features: w' = w * scale, and the centring shift moves into the intercept.
        let shift = centring_shift(&w, &mean);
        for (i, wi) in w.iter_mut().enumerate() {
            *wi *= scale[i / k];
        }
        for (wc, s) in w[(dim - 1) * k..].iter_mut().zip(shift) {
            *wc -= s;
        }
        Ok(Softmax { dim, weights: w })
    }

    /// Class with the highest score for one row of `(feature, value)` pairs;
    /// features not below `dim` are ignored. Ties go to the lower class.
    pub(crate) fn predict(&self, row: impl IntoIterator<Item = (usize, f64)>) -> u32 {
        let k = NUM_LABELS;
        let mut p = [0.0; NUM_LABELS];
        for (j, v) in row {
            if j < self.dim {
                for (pc, wc) in p.iter_mut().zip(&self.weights[j * k..(j + 1) * k]) {
                    *pc += wc * v;
                }
            }
        }
        let mut best = 0;
        for c in 1..NUM_LABELS {
            if p[c] > p[best] {
                best = c;
            }
        }
        best as u32
    }
}

/// `sum_j w[j][c] * mean[j]` for each class `c`.
fn centring_shift(w: &[f64], mean: &[f64]) -> [f64; NUM_LABELS] {
    let mut shift = [0.0; NUM_LABELS];
    for (wj, m) in w.chunks_exact(NUM_LABELS).zip(mean) {
        for (s, wc) in shift.iter_mut().zip(wj) {
            *s += wc * m;
        }
    }
    shift
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
        let mut rows = SparseRows::new();
        let mut counts = vec![0u32; vocab_size];
        let mut seen = Vec::new();
        for s in train {
            rows.push(bag_features(&s.events, &mut counts, &mut seen));
        }
        let classes: Vec<u32> = train.iter().map(|s| s.class).collect();
        let model = Softmax::fit(&rows, vocab_size + 2, &classes, cfg)?;
        Ok(BagOfEvents { vocab_size, model })
    }

    /// Vocabulary size the model was fitted with.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Most likely class (0..5) of a session; ids not below the vocabulary size are ignored
    /// (they count only towards the length).
    pub fn predict(&self, events: &[u32]) -> u32 {
        let mut counts = vec![0u32; self.vocab_size];
        self.model
            .predict(bag_features(events, &mut counts, &mut Vec::new()))
    }

    /// Fraction of `data` whose class is predicted correctly (0 for empty data).
    pub fn accuracy(&self, data: &[EncodedSession]) -> f64 {
        if data.is_empty() {
            return 0.0;
        }
        let mut counts = vec![0u32; self.vocab_size];
        let mut seen = Vec::new();
        let correct = data
            .iter()
            .filter(|s| {
                self.model
                    .predict(bag_features(&s.events, &mut counts, &mut seen))
                    == s.class
            })
            .count();
        correct as f64 / data.len() as f64
    }
}

/// Order-aware reference classifier for synthetic data: multinomial logistic regression on the
/// generator's own order-dependent features ([`FlowFeatures::oracle_vector`]) plus a one-hot
/// encoding of the satisfaction score they imply ([`FlowFeatures::score`]).
///
/// The label distribution depends on the events only through that score, so this regression
/// can represent `p(label | events)` exactly and its held-out accuracy approaches the Bayes
/// ceiling up to estimation error. (On the raw features alone, a linear model is slightly
/// misspecified because of the uniform label noise mixture, and loses about two points.)
#[derive(Debug, Clone, PartialEq)]
pub struct FlowOracle {
    model: Softmax,
}

/// Lowest score with its own one-hot bin in [`FlowOracle`]'s features (lower ones share it).
const ORACLE_MIN_SCORE: i32 = -6;
/// Number of one-hot score bins, `ORACLE_MIN_SCORE..=4`.
const ORACLE_SCORE_BINS: usize = 11;
/// Dimension of [`FlowOracle`]'s features: the raw terms (without their intercept), the score
/// bins and the intercept.
const ORACLE_FEATURES: usize = ORACLE_DIM - 1 + ORACLE_SCORE_BINS + 1;

impl FlowOracle {
    /// Fits on `train` (labels 1..=5).
    pub fn fit(train: &[SessionRecord], cfg: &BaselineConfig) -> Result<Self> {
        if let Some(r) = train.iter().find(|r| !(1..=5).contains(&r.label)) {
            return Err(Error::Training(format!(
                "oracle: label {} out of range 1..=5",
                r.label
            )));
        }
        let mut rows = SparseRows::new();
        for r in train {
            rows.push(oracle_row(&r.events));
        }
        let classes: Vec<u32> = train.iter().map(|r| u32::from(r.label) - 1).collect();
        Ok(FlowOracle {
            model: Softmax::fit(&rows, ORACLE_FEATURES, &classes, cfg)?,
        })
    }

    /// Most likely class (0..5) of a session's events.
    pub fn predict<S: AsRef<str>>(&self, events: &[S]) -> u32 {
        self.model.predict(oracle_row(events))
    }

    /// Fraction of `data` whose label is predicted correctly (0 for empty data).
    pub fn accuracy(&self, data: &[SessionRecord]) -> f64 {
        if data.is_empty() {
            return 0.0;
        }
        let correct = data
            .iter()
            .filter(|r| self.predict(&r.events) + 1 == u32::from(r.label))
            .count();
        correct as f64 / data.len() as f64
    }
}

fn oracle_row<S: AsRef<str>>(events: &[S]) -> impl Iterator<Item = (usize, f64)> {
    let f = FlowFeatures::from_events(events);
    let raw = f.oracle_vector();
    let bin = (f.score().round() as i32).clamp(ORACLE_MIN_SCORE, 4) - ORACLE_MIN_SCORE;
    raw.into_iter().take(ORACLE_DIM - 1).enumerate().chain([
        (ORACLE_DIM - 1 + bin as usize, 1.0),
        (ORACLE_FEATURES - 1, 1.0),
    ])
}

/// The sparse features of `events` over a vocabulary of `counts.len()` ids: each present id's
/// count divided by the length, then the log length (feature `V`) and the intercept (`V + 1`).
///
/// `counts` must be all zero and is left all zero; `seen` is scratch space.
fn bag_features(events: &[u32], counts: &mut [u32], seen: &mut Vec<usize>) -> Vec<(usize, f64)> {
    let vocab = counts.len();
    let len = events.len().max(1) as f64;
    seen.clear();
    for &id in events {
        let id = id as usize;
        if id < vocab {
            if counts[id] == 0 {
                seen.push(id);
            }
            counts[id] += 1;
        }
    }
    seen.sort_unstable();
    let mut row: Vec<(usize, f64)> = seen
        .iter()
        .map(|&id| (id, f64::from(std::mem::take(&mut counts[id])) / len))
        .collect();
    row.push((vocab, len.ln()));
    row.push((vocab + 1, 1.0));
    row
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
