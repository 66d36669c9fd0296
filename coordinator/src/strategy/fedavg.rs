//! FedAvg and FedAvgM: the server-side optimisers a run's `run.strategy` names.

use fedflow_common::params::ParamSet;

use super::Strategy;
use crate::config::SamplingConfig;
use crate::{Error, Result};

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
    use crate::strategy::UpdateReport;
    use rand_chacha::ChaCha8Rng;

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
