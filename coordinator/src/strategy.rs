//! Strategies: which sites train in a round, how much each update weighs, and how the
//! round's averaged delta becomes the next global model.
//!
//! The split follows Flower's strategy API (`configure_train` / `aggregate_train`), adapted
//! to streaming aggregation: the framework owns the round loop and a
//! [`FedAvgAccumulator`](fedflow_common::fedavg::FedAvgAccumulator) that averages deltas as
//! they arrive, weighted by [`Strategy::update_weight`]; the strategy only decides. So memory
//! stays one model's worth whatever the number of sites, and a strategy never sees more than
//! one update at a time. Differential-privacy wrappers (clipping, noise) wrap a strategy.

use fedflow_common::params::ParamSet;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How many of the available sites a round selects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// Fraction of the available sites to select (rounded up); ignored when `count` is set.
    pub fraction: f64,
    /// Exact number of sites to select (capped at the number available).
    pub count: Option<usize>,
    /// Never select fewer than this many sites (unless fewer are available).
    pub min_selected: usize,
    /// Do not start a round with fewer sites available than this.
    pub min_available: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            fraction: 1.0,
            count: None,
            min_selected: 1,
            min_available: 1,
        }
    }
}

impl SamplingConfig {
    /// Checks the fields, naming the first bad one.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(format!(
                "sampling.fraction: {} is outside (0, 1]",
                self.fraction
            ));
        }
        if self.count == Some(0) {
            return Err("sampling.count: must be at least 1".into());
        }
        if self.min_selected == 0 {
            return Err("sampling.min_selected: must be at least 1".into());
        }
        if self.min_available < self.min_selected {
            return Err(format!(
                "sampling.min_available: {} is below min_selected {}",
                self.min_available, self.min_selected
            ));
        }
        Ok(())
    }

    /// How many of `available` sites to select.
    pub fn target(&self, available: usize) -> usize {
        let wanted = match self.count {
            Some(c) => c,
            None => (self.fraction * available as f64).ceil() as usize,
        };
        wanted.max(self.min_selected).min(available)
    }
}

/// What a site reported with its update, as the strategy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateReport {
    /// Training examples the site used.
    pub train_examples: u64,
    /// The weight the site claims (its example count in plain FedAvg).
    pub claimed_weight: f64,
}

/// A federated-learning strategy.
pub trait Strategy: Send + std::fmt::Debug {
    /// A short name for logs and the database.
    fn name(&self) -> &'static str;

    /// How many sites a round samples.
    fn sampling(&self) -> &SamplingConfig;

    /// Chooses which of the `available` sites train in `round` (deterministic given `rng`).
    /// Errs when too few sites are available to start the round. By default a uniform
    /// sample of [`SamplingConfig::target`] sites.
    fn configure_train(
        &mut self,
        _round: u64,
        available: &[String],
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<String>> {
        select(self.sampling(), available, rng)
    }

    /// The weight of one update in the round's weighted mean of deltas. By default its
    /// training example count (FedAvg's weighting).
    fn update_weight(&self, report: &UpdateReport) -> Result<f64> {
        examples_weight(report)
    }

    /// Turns the round's weighted mean delta into the next global model.
    fn aggregate_train(
        &mut self,
        round: u64,
        global: &ParamSet,
        mean_delta: &ParamSet,
    ) -> Result<ParamSet>;

    /// Server-side state to checkpoint with the global model (e.g. momentum), if any.
    fn state(&self) -> Option<&ParamSet> {
        None
    }

    /// Restores state saved by [`Strategy::state`] after a restart.
    fn restore_state(&mut self, _state: Option<ParamSet>) {}
}

fn select(
    sampling: &SamplingConfig,
    available: &[String],
    rng: &mut ChaCha8Rng,
) -> Result<Vec<String>> {
    if available.len() < sampling.min_available {
        return Err(Error::Strategy(format!(
            "{} site(s) available, the round needs at least {} (sampling.min_available)",
            available.len(),
            sampling.min_available
        )));
    }
    Ok(sample_sorted(
        available,
        sampling.target(available.len()),
        rng,
    ))
}

/// A uniform sample of `k` of `available` (all of them if fewer), sorted. The sites are
/// sorted before drawing, so the choice depends only on the set of sites and the random
/// stream, not on the order in which sites happened to connect.
pub fn sample_sorted<R: rand::Rng + ?Sized>(
    available: &[String],
    k: usize,
    rng: &mut R,
) -> Vec<String> {
    let mut sorted: Vec<&String> = available.iter().collect();
    sorted.sort();
    let mut chosen: Vec<String> = sorted
        .choose_multiple(rng, k)
        .map(|s| (*s).clone())
        .collect();
    chosen.sort();
    chosen
}

fn examples_weight(report: &UpdateReport) -> Result<f64> {
    if report.train_examples == 0 {
        return Err(Error::Strategy(
            "an update trained on 0 examples has no weight".into(),
        ));
    }
    Ok(report.train_examples as f64)
}

/// FedAvg (McMahan et al. 2017): sample sites, weight updates by their example counts, and
/// add the weighted mean delta to the global model.
#[derive(Debug, Clone)]
pub struct FedAvg {
    sampling: SamplingConfig,
}

impl FedAvg {
    /// FedAvg with the given sampling.
    pub fn new(sampling: SamplingConfig) -> Self {
        FedAvg { sampling }
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn sampling(&self) -> &SamplingConfig {
        &self.sampling
    }

    fn aggregate_train(
        &mut self,
        _round: u64,
        global: &ParamSet,
        mean_delta: &ParamSet,
    ) -> Result<ParamSet> {
        Ok(ParamSet::apply_delta(global, mean_delta, 1.0)?)
    }
}

/// FedAvgM (Hsu et al. 2019, "Measuring the effects of non-identical data distribution"):
/// FedAvg with server momentum, `v ← β·v + Δ̄`, `w ← w + η·v`. With β = 0 and η = 1 it is
/// FedAvg.
#[derive(Debug, Clone)]
pub struct FedAvgM {
    sampling: SamplingConfig,
    server_lr: f32,
    momentum: f32,
    velocity: Option<ParamSet>,
}

impl FedAvgM {
    /// FedAvgM with server learning rate η and momentum β.
    pub fn new(sampling: SamplingConfig, server_lr: f32, momentum: f32) -> Result<Self> {
        if !(server_lr.is_finite() && server_lr > 0.0) {
            return Err(Error::Strategy(format!(
                "server_lr {server_lr} must be > 0"
            )));
        }
        if !(0.0..1.0).contains(&momentum) {
            return Err(Error::Strategy(format!(
                "server momentum {momentum} is outside [0, 1)"
            )));
        }
        Ok(FedAvgM {
            sampling,
            server_lr,
            momentum,
            velocity: None,
        })
    }
}

impl Strategy for FedAvgM {
    fn name(&self) -> &'static str {
        "fedavgm"
    }

    fn sampling(&self) -> &SamplingConfig {
        &self.sampling
    }

    fn aggregate_train(
        &mut self,
        _round: u64,
        global: &ParamSet,
        mean_delta: &ParamSet,
    ) -> Result<ParamSet> {
        let velocity = match &self.velocity {
            Some(v) => ParamSet::apply_delta(mean_delta, v, self.momentum)?,
            None => mean_delta.clone(),
        };
        let next = ParamSet::apply_delta(global, &velocity, self.server_lr)?;
        self.velocity = Some(velocity);
        Ok(next)
    }

    fn state(&self) -> Option<&ParamSet> {
        self.velocity.as_ref()
    }

    fn restore_state(&mut self, state: Option<ParamSet>) {
        self.velocity = state;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{Device, Tensor};
    use rand::SeedableRng;

    use super::*;

    fn sites(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("site-{i:03}")).collect()
    }

    fn one(v: &[f32]) -> ParamSet {
        let mut m = BTreeMap::new();
        m.insert("w".to_string(), Tensor::new(v, &Device::Cpu).unwrap());
        ParamSet::from_tensors(m).unwrap()
    }

    fn values(p: &ParamSet) -> Vec<f32> {
        p.get("w").unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn sampling_counts_follow_fraction_count_and_minimums() {
        let s = |fraction, count, min_selected| SamplingConfig {
            fraction,
            count,
            min_selected,
            min_available: min_selected,
        };
        assert_eq!(s(0.1, None, 1).target(25), 3);
        assert_eq!(s(0.1, None, 5).target(25), 5);
        assert_eq!(s(1.0, Some(7), 1).target(25), 7);
        assert_eq!(s(1.0, Some(70), 1).target(25), 25);
        assert!(
            s(0.0, None, 1)
                .validate()
                .unwrap_err()
                .contains("sampling.fraction")
        );
        let bad = SamplingConfig {
            min_available: 1,
            min_selected: 3,
            ..SamplingConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("min_available"));
    }

    #[test]
    fn selection_is_seeded_and_independent_of_arrival_order() {
        let cfg = SamplingConfig {
            fraction: 0.3,
            ..SamplingConfig::default()
        };
        let mut fedavg = FedAvg::new(cfg);
        let a = fedavg
            .configure_train(1, &sites(20), &mut ChaCha8Rng::seed_from_u64(5))
            .unwrap();
        let mut shuffled = sites(20);
        shuffled.reverse();
        let b = fedavg
            .configure_train(1, &shuffled, &mut ChaCha8Rng::seed_from_u64(5))
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 6);
        let c = fedavg
            .configure_train(1, &sites(20), &mut ChaCha8Rng::seed_from_u64(6))
            .unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn too_few_available_sites_is_an_error_naming_the_setting() {
        let cfg = SamplingConfig {
            min_available: 4,
            min_selected: 2,
            ..SamplingConfig::default()
        };
        let err = FedAvg::new(cfg)
            .configure_train(1, &sites(3), &mut ChaCha8Rng::seed_from_u64(0))
            .unwrap_err();
        assert!(err.to_string().contains("min_available"), "{err}");
    }

    #[test]
    fn fedavg_adds_the_mean_delta_and_weights_by_examples() {
        let mut s = FedAvg::new(SamplingConfig::default());
        let next = s
            .aggregate_train(1, &one(&[1.0, 2.0]), &one(&[0.5, -1.0]))
            .unwrap();
        assert_eq!(values(&next), vec![1.5, 1.0]);
        let w = s
            .update_weight(&UpdateReport {
                train_examples: 40,
                claimed_weight: 1e9,
            })
            .unwrap();
        assert_eq!(
            w, 40.0,
            "the weight comes from the example count, not the claim"
        );
        assert!(
            s.update_weight(&UpdateReport {
                train_examples: 0,
                claimed_weight: 1.0
            })
            .is_err()
        );
    }

    #[test]
    fn fedavgm_applies_server_momentum() {
        // β = 0.5, η = 2: round 1: v = d1 = 1, w = 0 + 2·1 = 2;
        // round 2: v = 0.5·1 + d2(= 3) = 3.5, w = 2 + 2·3.5 = 9.
        let mut s = FedAvgM::new(SamplingConfig::default(), 2.0, 0.5).unwrap();
        let w1 = s.aggregate_train(1, &one(&[0.0]), &one(&[1.0])).unwrap();
        assert_eq!(values(&w1), vec![2.0]);
        let saved = s.state().cloned();
        let w2 = s.aggregate_train(2, &w1, &one(&[3.0])).unwrap();
        assert_eq!(values(&w2), vec![9.0]);
        // Restoring the saved velocity reproduces round 2 exactly (resume after a crash).
        let mut resumed = FedAvgM::new(SamplingConfig::default(), 2.0, 0.5).unwrap();
        resumed.restore_state(saved);
        assert_eq!(
            values(&resumed.aggregate_train(2, &w1, &one(&[3.0])).unwrap()),
            vec![9.0]
        );
        assert!(FedAvgM::new(SamplingConfig::default(), 1.0, 1.0).is_err());
    }
}
