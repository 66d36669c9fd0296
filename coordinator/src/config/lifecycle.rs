//! The run's life beyond one round: `[schedule]` (a fixed number of rounds, or continuous),
//! `[publish]` (which committed versions the sites should serve) and `[retention]` (which
//! checkpoints are kept).

use serde::{Deserialize, Serialize};

/// How rounds follow one another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleMode {
    /// `"rounds"` (default): `run.rounds` rounds, then the run is finished.
    #[default]
    Rounds,
    /// `"continuous"`: rounds keep starting until an operator stops the run or its privacy
    /// budget ends it; `run.rounds` is not used.
    Continuous,
}

/// `[schedule]`: a fixed number of rounds (default) or a run that never ends on its own.
///
/// Sites train each round on the data they hold when the round starts, so feedback that
/// arrived since the last round is used by the next one. There is deliberately no "start only
/// when K sites have new data" condition: a site would have to tell the coordinator when its
/// data changed, which reveals the arrival of records (under record-level DP that timing is
/// not covered by any ε); rounds are paced by `interval_secs` alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// `"rounds"` or `"continuous"`.
    pub mode: ScheduleMode,
    /// Least time between the starts of two consecutive training rounds, in seconds (0: the
    /// next round starts as soon as enough sites are available). Default 0.
    pub interval_secs: u64,
}

impl ScheduleConfig {
    /// Whether the run goes on until it is stopped.
    pub fn continuous(&self) -> bool {
        self.mode == ScheduleMode::Continuous
    }

    /// Checks the fields, naming the first bad one.
    pub fn validate(&self) -> std::result::Result<(), String> {
        // Milliseconds must fit an i64 next to a Unix time.
        if self.interval_secs > 100 * 365 * 86_400 {
            return Err(format!(
                "schedule.interval_secs: {} is more than a century",
                self.interval_secs
            ));
        }
        Ok(())
    }
}

/// Which committed versions are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PublishRule {
    /// `"evaluation"` (default): a version is published when its federated evaluation is
    /// not worse than the published version's, measured on the same sites in the same
    /// evaluation phase, by more than `tolerance`, with at least `min_sites` sites
    /// reporting both.
    #[default]
    Evaluation,
    /// `"every"`: every `every`-th committed round is published.
    Every,
    /// `"manual"`: only an operator publishes (`fedflow-ctl publish`).
    Manual,
}

/// The evaluation metric the gate compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PublishMetric {
    /// Validation accuracy, weighted by the sites' validation sessions (default).
    #[default]
    Accuracy,
    /// Validation macro-F1, weighted the same way.
    MacroF1,
}

impl PublishMetric {
    /// The metric's name in reasons and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishMetric::Accuracy => "accuracy",
            PublishMetric::MacroF1 => "macro_f1",
        }
    }
}

/// `[publish]`: the gate that decides which committed versions the sites should serve.
///
/// Every committed round is a model version; a published version is what sites serve. With
/// `rule = "evaluation"` the version is compared with the published one after its
/// evaluation: the published version is evaluated again by the same sites on the same data
/// (so a world that changed since it was published is measured fairly), and the candidate
/// is published when `candidate ≥ published − tolerance` over the sites that reported both.
/// The first version evaluated by at least `min_sites` sites is published when nothing is.
/// A round the evaluation schedule skips is never published by this rule. When sites
/// withhold their metrics (record-level DP without `--release-metrics`) they decline
/// evaluations, so no version reaches `min_sites` and the gate publishes nothing by itself:
/// the status says so, and an operator publishes (`fedflow-ctl publish`) or the run uses
/// `rule = "every"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishConfig {
    /// `"evaluation"`, `"every"` or `"manual"`.
    pub rule: PublishRule,
    /// `"accuracy"` or `"macro_f1"` (rule `"evaluation"`).
    pub metric: PublishMetric,
    /// How much worse than the published version a candidate may be, in [0, 1]. Default 0.
    pub tolerance: f64,
    /// Sites that must report both models' figures (or, for the first version, its own).
    /// Default 1.
    pub min_sites: usize,
    /// Rule `"every"`: publish every N-th committed round, N ≥ 1. Default 1.
    pub every: u64,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            rule: PublishRule::Evaluation,
            metric: PublishMetric::Accuracy,
            tolerance: 0.0,
            min_sites: 1,
            every: 1,
        }
    }
}

impl PublishConfig {
    /// Checks the fields, naming the first bad one.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(0.0..=1.0).contains(&self.tolerance) {
            return Err(format!(
                "publish.tolerance: {} is outside [0, 1]",
                self.tolerance
            ));
        }
        if self.min_sites == 0 {
            return Err("publish.min_sites: must be at least 1".into());
        }
        if self.every == 0 {
            return Err("publish.every: must be at least 1".into());
        }
        Ok(())
    }
}

/// Default `retention.keep_last` of a continuous run.
pub const DEFAULT_KEEP_LAST: u64 = 20;

/// `[retention]`: which checkpoints a run keeps.
///
/// Always kept: the last `keep_last` committed rounds, every version that was ever
/// published (so a rollback and an export always find it), round 0 (the run's initial
/// model, which sets the default update bound) and the last committed round with its
/// strategy state (what a resume needs). Everything else is deleted right after a commit:
/// the rows in one transaction, then the files, so a crash in between leaves files no row
/// points to, which the next start deletes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Committed rounds kept besides the always-kept ones; 0 keeps every checkpoint.
    /// Default: every checkpoint for a fixed number of rounds, [`DEFAULT_KEEP_LAST`] for a
    /// continuous run.
    pub keep_last: Option<u64>,
}

impl RetentionConfig {
    /// How many recent rounds are kept (`None`: all of them) under `schedule`.
    pub fn keep_last(&self, schedule: &ScheduleConfig) -> Option<u64> {
        match self.keep_last {
            Some(0) => None,
            Some(k) => Some(k),
            None if schedule.continuous() => Some(DEFAULT_KEEP_LAST),
            None => None,
        }
    }
}
