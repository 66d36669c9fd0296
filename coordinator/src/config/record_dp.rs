//! `[record_dp]`: record-level differential privacy at the sites (DP-SGD).

use serde::{Deserialize, Serialize};

use super::common_reason;
use crate::Result;

/// `[record_dp]`: record-level differential privacy at the sites (DP-SGD), as dictated by the
/// run. Local epochs and the learning rate come from `[train]`; `train.batch_size` and
/// early stopping do not apply under DP-SGD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordDpSection {
    /// L2 bound C on each unit's gradient, > 0.
    pub clip_norm: f64,
    /// Noise multiplier z, >= 0 (noise std z·C on each batch's gradient sum).
    pub noise_multiplier: f64,
    /// Expected batch size B in units (Poisson sampling rate B / n at a site with n units,
    /// so smaller sites spend more ε). Exactly one of this and `sampling_rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_batch_size: Option<usize>,
    /// Sampling rate q in (0, 1] shared by all sites (expected batch q·n at a site with n
    /// units; every site spends the same ε). Exactly one of this and `expected_batch_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_rate: Option<f64>,
    /// The privacy unit: `"session"` (default) or `"user"`.
    #[serde(default)]
    pub unit: fedflow_common::train::PrivacyUnit,
    /// With `unit = "user"`: sessions of one user used at most. Default 8.
    #[serde(default = "default_max_sessions_per_user")]
    pub max_sessions_per_user: usize,
    /// The run's record-level target ε, > 0: no site goes past it.
    pub target_epsilon: f64,
    /// The δ of the target, in (0, 1); choose it below 1/n for the smallest site's n.
    pub target_delta: f64,
    /// How a site's count of privacy units (its FedAvg weight) is released: 0 (the default)
    /// sends it in the clear, outside the guarantee, and the reports say so; z > 0 sends
    /// `round(n + N(0, z²))`, charged to the site's ledger as a Gaussian mechanism with
    /// sensitivity 1 composed with the round's DP-SGD, so the guarantee covers it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub count_noise_multiplier: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn default_max_sessions_per_user() -> usize {
    fedflow_common::train::DpSgdConfig::default().max_sessions_per_user
}

impl RecordDpSection {
    /// The DP-SGD parameters sites apply.
    pub fn dp_sgd(&self) -> fedflow_common::train::DpSgdConfig {
        fedflow_common::train::DpSgdConfig {
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
            expected_batch_size: self.expected_batch_size.unwrap_or(0),
            sampling_rate: self.sampling_rate,
            unit: self.unit,
            max_sessions_per_user: self.max_sessions_per_user,
        }
    }

    /// The record-level ε at `target_delta` a site with `units` privacy units spends over
    /// `rounds` rounds of `epochs` local epochs: the same computation the site's ledger does,
    /// the smaller of the RDP and PLD bounds.
    pub fn site_epsilon(&self, units: usize, epochs: usize, rounds: u64) -> Result<f64> {
        use fedflow_common::privacy::planner::{Accounting, epsilon_by};
        let rdp = self.site_epsilon_rdp(units, epochs, rounds)?;
        let round = self.round_events(units, epochs)?;
        Ok(epsilon_by(Accounting::Pld, &round, rounds, self.target_delta)?.min(rdp))
    }

    /// What a site with `units` units releases per round: its DP-SGD and, with
    /// `count_noise_multiplier` > 0, its noisy count (a Gaussian mechanism: q = 1, 1 step).
    pub fn round_events(
        &self,
        units: usize,
        epochs: usize,
    ) -> Result<Vec<fedflow_common::privacy::SampledGaussian>> {
        let mut events = vec![self.dp_sgd().round_event(units, epochs)?];
        if self.count_noise_multiplier > 0.0 {
            events.push(fedflow_common::privacy::SampledGaussian {
                q: 1.0,
                z: self.count_noise_multiplier,
                steps: 1,
            });
        }
        Ok(events)
    }

    /// [`Self::site_epsilon`] by the RDP accountant alone (an upper bound on it, and fast).
    fn site_epsilon_rdp(&self, units: usize, epochs: usize, rounds: u64) -> Result<f64> {
        let round = self.round_events(units, epochs)?;
        Ok(fedflow_common::privacy::planner::epsilon(&round, rounds, self.target_delta)?.epsilon)
    }

    /// The fewest privacy units a site needs to take part in all `rounds` rounds within
    /// `target_epsilon` (ε falls as n grows, since q = B / n does); `None` if even 10⁹ units
    /// are not enough.
    pub fn min_units_within_target(&self, epochs: usize, rounds: u64) -> Result<Option<usize>> {
        let within = |n: usize| -> Result<bool> {
            Ok(self.site_epsilon(n, epochs, rounds)? <= self.target_epsilon)
        };
        if self.sampling_rate.is_some() {
            // The same ε for every size.
            return Ok(within(1)?.then_some(1));
        }
        // The RDP bound is never below the stated one, so the size RDP needs is enough: find
        // it with the fast accountant, then search below it with the stated one.
        let within_rdp = |n: usize| -> Result<bool> {
            Ok(self.site_epsilon_rdp(n, epochs, rounds)? <= self.target_epsilon)
        };
        let mut hi = self.expected_batch_size.unwrap_or(1).max(1);
        while !within_rdp(hi)? {
            if hi > 1_000_000_000 {
                return Ok(None);
            }
            hi *= 2;
        }
        let mut lo = 0; // not within (or no data)
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if mid > 0 && within(mid)? {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Ok(Some(hi))
    }

    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        if self.expected_batch_size.is_some() == self.sampling_rate.is_some() {
            return Err(
                "record_dp: set exactly one of expected_batch_size and sampling_rate".into(),
            );
        }
        self.dp_sgd()
            .validate()
            .map_err(|e| common_reason(e).replace("dp_sgd.", "record_dp."))?;
        if !(self.target_epsilon.is_finite() && self.target_epsilon > 0.0) {
            return Err(format!(
                "record_dp.target_epsilon: {} must be a positive number",
                self.target_epsilon
            ));
        }
        if !(self.target_delta > 0.0 && self.target_delta < 1.0) {
            return Err(format!(
                "record_dp.target_delta: {} must be in (0, 1)",
                self.target_delta
            ));
        }
        if !(self.count_noise_multiplier.is_finite() && self.count_noise_multiplier >= 0.0) {
            return Err(format!(
                "record_dp.count_noise_multiplier: {} must be a number >= 0 (0: counts in the \
                 clear)",
                self.count_noise_multiplier
            ));
        }
        Ok(())
    }
}
