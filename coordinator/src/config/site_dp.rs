//! `[site_dp]`: site-level differential privacy (DP-FedAvg), the unit protected being a
//! whole site's contribution. The mechanism and its accounting are in
//! [`fedflow_common::privacy::dpfedavg`]; this is the run's configuration of it.

use fedflow_common::privacy::SampledGaussian;
use fedflow_common::privacy::dpfedavg::{AdaptiveClipping, SiteDp, SiteSampling, TrustMode};
use fedflow_common::privacy::planner;
use serde::{Deserialize, Serialize};

use super::{SamplingConfig, common_reason};
use crate::Result;

/// `[site_dp]`: DP-FedAvg with the fixed-denominator estimator (McMahan et al. 2018).
///
/// Under it every update weighs the same (example counts are ignored, so one site's influence
/// is bounded by its clip), the round's sum is divided by `expected_sites` rather than by the
/// number of updates (unbiased for the sum's expectation; with fewer contributions than
/// expected the step is shorter, with more it is longer — the price of a bounded
/// sensitivity), and every round that closes is released whatever the number of
/// contributions: `rounds.min_completed` and `rounds.on_quorum_failure` do not apply, since a
/// retry decided by the number of contributions would reveal it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteDpSection {
    /// Who adds the noise: `"central"` (default), `"distributed"` or `"local"`.
    #[serde(default)]
    pub mode: TrustMode,
    /// L2 bound C on each site's delta, > 0 (the initial C with adaptive clipping).
    pub clip_norm: f64,
    /// Noise multiplier z, >= 0: the released sum carries N(0, (z·C)²) per coordinate.
    pub noise_multiplier: f64,
    /// Poisson site sampling: every available site takes part in a round independently with
    /// probability q, drawn from the coordinator's CSPRNG; in central mode the accountant
    /// uses amplification by subsampling. Absent: sites are chosen by `[sampling]` and no
    /// amplification is claimed (a sample of the size `[sampling]` sets, drawn from the
    /// CSPRNG; with fewer than all sites, central mode is charged z/2: a site can displace
    /// another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_rate: Option<f64>,
    /// The fixed denominator: the expected number of contributions per round (q times the
    /// number of sites with Poisson sampling, the selected count otherwise), >= 1.
    pub expected_sites: f64,
    /// The run's site-level target ε, > 0: no round starts that would pass it.
    pub target_epsilon: f64,
    /// The δ of the target, in (0, 1); choose it below 1 / the number of sites.
    pub target_delta: f64,
    /// `[site_dp.adaptive_clipping]`: track a quantile of the update norms (Andrew et al.
    /// 2021; central mode only). Absent: the clip stays `clip_norm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_clipping: Option<AdaptiveClipping>,
}

impl SiteDpSection {
    /// The mechanism's parameters.
    pub fn site_dp(&self) -> SiteDp {
        SiteDp {
            mode: self.mode,
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
            expected_sites: self.expected_sites,
            adaptive: self.adaptive_clipping.clone(),
        }
    }

    /// How the run's rounds choose sites: Poisson with `sampling_rate`, otherwise everyone
    /// available or a fixed-size sample, as `[sampling]` says.
    pub fn sampling(&self, sampling: &SamplingConfig) -> SiteSampling {
        match self.sampling_rate {
            Some(q) => SiteSampling::Poisson(q),
            None if sampling.count.is_none() && sampling.fraction >= 1.0 => SiteSampling::All,
            None => SiteSampling::FixedSize,
        }
    }

    /// Every round's privacy event downstream (the same for every round; see
    /// [`SiteDp::downstream_event`]).
    pub fn round_event(&self, sampling: &SamplingConfig) -> SampledGaussian {
        self.site_dp().downstream_event(self.sampling(sampling))
    }

    /// How many rounds fit within the target ([`planner::UNLIMITED_ROUNDS`] without cost),
    /// by the PLD accountant, which the run's budget is enforced with wherever it is the
    /// smaller bound.
    pub fn rounds_within_target(&self, sampling: &SamplingConfig) -> Result<u64> {
        Ok(planner::rounds_for_epsilon_by(
            planner::Accounting::Pld,
            &[self.round_event(sampling)],
            self.target_delta,
            self.target_epsilon,
        )?)
    }

    /// ε of one round at the target δ: the smaller of the RDP and PLD bounds.
    fn one_round_epsilon(&self, sampling: &SamplingConfig) -> Result<f64> {
        let round = [self.round_event(sampling)];
        let rdp = planner::epsilon(&round, 1, self.target_delta)?.epsilon;
        let pld = planner::epsilon_by(planner::Accounting::Pld, &round, 1, self.target_delta)?;
        Ok(rdp.min(pld))
    }

    pub(super) fn validate(&self, sampling: &SamplingConfig) -> std::result::Result<(), String> {
        self.site_dp()
            .validate()
            .map_err(|e| common_reason(e).replace("site-level DP: ", "site_dp: "))?;
        if let Some(q) = self.sampling_rate
            && !(q > 0.0 && q <= 1.0)
        {
            return Err(format!("site_dp.sampling_rate: {q} is outside (0, 1]"));
        }
        if !(self.target_epsilon.is_finite() && self.target_epsilon > 0.0) {
            return Err(format!(
                "site_dp.target_epsilon: {} must be a positive number",
                self.target_epsilon
            ));
        }
        if !(self.target_delta > 0.0 && self.target_delta < 1.0) {
            return Err(format!(
                "site_dp.target_delta: {} must be in (0, 1)",
                self.target_delta
            ));
        }
        // At least one round must fit (checked on one round only: counting them all with PLD
        // takes a while, and loading a configuration should not).
        let eps = self
            .one_round_epsilon(sampling)
            .map_err(|e| e.to_string())?;
        if eps > self.target_epsilon {
            return Err(format!(
                "site_dp.target_epsilon: one round already costs epsilon {eps:.4} at delta {:e}, \
                 above the target {}; raise noise_multiplier (0 gives no privacy) or lower \
                 sampling_rate",
                self.target_delta, self.target_epsilon
            ));
        }
        Ok(())
    }
}
