//! `[limits]` (what one caller may use) and `[aggregation]` (how updates are combined,
//! including the robust rules for hostile sites).

use serde::{Deserialize, Serialize};

use crate::security::limits::CallLimits;

/// `[limits]`: per-caller limits on the coordinator's gRPC services. A caller over a
/// limit gets `RESOURCE_EXHAUSTED` (or `DEADLINE_EXCEEDED` for a slow upload), the refusal
/// is logged and recorded in the security audit log, and everyone else is served as usual.
/// A refusal for calling too fast or too often at once carries a pushback (when the call
/// would be admitted), which fedflow sites wait out before calling again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Calls one caller (a site, or an operator) may have in flight at once, long polls
    /// and transfers included. Default 8 (a site uses at most 3: a poll or a transfer, a
    /// heartbeat and a report).
    pub max_concurrent_calls: usize,
    /// Sustained calls per second per caller. Default 20.
    pub requests_per_second: f64,
    /// Calls a caller may start at once after being idle. Default 40.
    pub request_burst: u32,
    /// Longest an upload may take, in seconds; 0 (default) means the round deadline.
    pub upload_timeout_secs: u64,
    /// Largest update accepted, in bytes; 0 (default) means exactly the size of the
    /// global model's safetensors file (an update has the model's names, shapes and
    /// dtype, so it is never larger), or under `[compression]` exactly the size of a
    /// compressed update (fixed by the model and the codec). Never above
    /// `transport.max_model_bytes`.
    pub max_upload_bytes: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_concurrent_calls: 8,
            requests_per_second: 20.0,
            request_burst: 40,
            upload_timeout_secs: 0,
            max_upload_bytes: 0,
        }
    }
}

impl LimitsSection {
    /// The limiter's settings.
    pub fn call_limits(&self) -> CallLimits {
        CallLimits {
            max_concurrent: self.max_concurrent_calls,
            rate_per_sec: self.requests_per_second,
            burst: f64::from(self.request_burst),
        }
    }

    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        if self.max_concurrent_calls == 0 {
            return Err(
                "limits.max_concurrent_calls: 0 would refuse every call; use at least 3".into(),
            );
        }
        if !(self.requests_per_second.is_finite() && self.requests_per_second > 0.0) {
            return Err(format!(
                "limits.requests_per_second: {} must be a positive number",
                self.requests_per_second
            ));
        }
        if self.request_burst == 0 {
            return Err("limits.request_burst: 0 would refuse every call; use at least 1".into());
        }
        Ok(())
    }
}

/// `[aggregation]`: how the round's updates are combined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregationSection {
    /// `"mean"` (default): FedAvg's weighted mean, streamed (memory independent of the
    /// number of sites). `"median"`: the coordinate-wise median (Flower's FedMedian);
    /// `"trimmed_mean"`: the coordinate-wise mean after dropping the `trim_fraction`
    /// largest and smallest values (Flower's FedTrimmedAvg). Both robust rules are
    /// unweighted, bound the influence of a minority of hostile sites (Yin et al. 2018),
    /// and keep every update of the round on disk until it closes (memory: one block per
    /// update). They are refused together with `[site_dp]`: its guarantee is for a noisy
    /// *sum* with a known sensitivity, which a median is not.
    pub rule: AggregationRule,
    /// For `"trimmed_mean"`: the fraction of values dropped at each end, in [0, 0.5).
    /// Default 0.1.
    pub trim_fraction: f64,
    /// The bound B on every update's L2 norm, > 0, whatever the rule: one site moves the
    /// round's aggregate by a bounded amount (see [`AggregationSection::max_update_norm`]
    /// for the bound each rule implies). Absent (default): the L2 norm of the run's initial
    /// model (round 0), an update as large as the whole model. Under `[site_dp]` the
    /// mechanism's own bound applies instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_update_norm: Option<f64>,
    /// What happens to an update above the bound: `"clip"` (default: scaled down to B,
    /// keeping its direction; recorded with the site's outcome) or `"refuse"` (rejected,
    /// the site told why).
    pub on_large_update: LargeUpdate,
    /// The most training (and validation) examples one update (or evaluation report) is
    /// weighted by, >= 1 (default 100000): a site claiming more counts as this many, so no
    /// site's self-reported count buys it the round. Recorded as the update's weight.
    pub max_examples: u64,
}

impl Default for AggregationSection {
    fn default() -> Self {
        AggregationSection {
            rule: AggregationRule::Mean,
            trim_fraction: 0.1,
            max_update_norm: None,
            on_large_update: LargeUpdate::Clip,
            max_examples: DEFAULT_MAX_EXAMPLES,
        }
    }
}

/// Default `aggregation.max_examples`.
pub const DEFAULT_MAX_EXAMPLES: u64 = 100_000;

/// `aggregation.on_large_update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LargeUpdate {
    /// Scale the update down to the bound.
    #[default]
    Clip,
    /// Refuse the update.
    Refuse,
}

/// `aggregation.rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AggregationRule {
    /// Weighted mean (FedAvg).
    #[default]
    Mean,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean,
}

impl AggregationSection {
    /// The bound on every update's norm: `max_update_norm`, or `initial_norm` (the L2 norm
    /// of the run's round-0 model) when absent.
    ///
    /// What it implies for the round's aggregate is
    /// [`RoundAccumulator::aggregate_bound`](crate::strategy::RoundAccumulator::aggregate_bound).
    pub fn max_update_norm(&self, initial_norm: f64) -> f64 {
        self.max_update_norm.unwrap_or(initial_norm)
    }

    pub(super) fn validate(&self, site_dp: bool) -> std::result::Result<(), String> {
        if !(0.0..0.5).contains(&self.trim_fraction) {
            return Err(format!(
                "aggregation.trim_fraction: {} must be in [0, 0.5)",
                self.trim_fraction
            ));
        }
        if let Some(b) = self.max_update_norm
            && !(b.is_finite() && b > 0.0)
        {
            return Err(format!(
                "aggregation.max_update_norm: {b} must be a positive number"
            ));
        }
        if self.max_examples == 0 {
            return Err(
                "aggregation.max_examples: 0 would give every update no weight; use at least 1"
                    .into(),
            );
        }
        if site_dp && self.rule != AggregationRule::Mean {
            return Err(format!(
                "aggregation.rule: {:?} cannot be combined with [site_dp]: site-level DP \
                 protects a noisy sum with a known sensitivity, and a robust rule is not one; \
                 use rule = \"mean\" or remove [site_dp]",
                self.rule
            ));
        }
        Ok(())
    }
}
