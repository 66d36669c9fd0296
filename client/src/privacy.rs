//! Record-level differential privacy at the site: the run's DP-SGD instructions, and the
//! site's own limits and ledger. The DP-SGD training path itself is in `site::private`,
//! beside the rest of the trainer.
//!
//! What a site promises its end users: every update it releases is the output of DP-SGD
//! ([`fedflow_common::train::dpsgd`]) on its records, and the composition of all its releases,
//! in every run, stays within the site's own ε at its δ (and within each run's target). The
//! protocol of [`crate::ledger`] makes that hold across crashes and retries.
//!
//! Not covered (the site report says so): metrics computed on the site's data, which are
//! withheld unless the site opts in with `release_metrics`; the number of training sessions,
//! when the run sends counts in the clear (`count_noise_multiplier` = 0: it is the FedAvg
//! weight and sets the sampling rate, so the report states the replace-one bound, which is
//! what holds with n public, beside the add/remove one; with a noisy count, its Gaussian
//! mechanism is charged to the ledger with each update and covered); the fact
//! that the site takes part at all, when it answers, and whether it declines (the reason
//! names the limit, without epsilon figures).

use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::ledger::Ledger;
use crate::{Error, Result};

pub use fedflow_common::failpoint::FAILPOINT_ENV;

/// Record-level DP as a run dictates it (from the task's `DpSgdInstructions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordDp {
    /// The DP-SGD parameters.
    pub sgd: fedflow_common::train::DpSgdConfig,
    /// The run's target ε per site ...
    pub target_epsilon: f64,
    /// ... at this δ.
    pub target_delta: f64,
    /// 0: the site's count of privacy units goes out in the clear (outside the guarantee);
    /// z > 0: a noisy count with this multiplier, charged to the ledger
    /// ([`crate::ledger::CountRelease`]).
    #[serde(default)]
    pub count_noise_multiplier: f64,
}

/// A site's own privacy settings and its ledger.
#[derive(Debug)]
pub struct SitePrivacy {
    ledger: Mutex<Ledger>,
    /// The most ε (at [`SitePrivacy::delta`]) the site's ledger may ever reach.
    pub max_epsilon: f64,
    /// The δ at which the site's limit is checked.
    pub delta: f64,
    /// Whether metrics computed on the site's data are sent with updates and evaluations
    /// (outside the DP guarantee). Off by default: only counts are sent.
    pub release_metrics: bool,
}

impl SitePrivacy {
    /// Opens the ledger in `dir` with the site's limit `max_epsilon` at `delta`.
    pub fn open(dir: &Path, max_epsilon: f64, delta: f64, release_metrics: bool) -> Result<Self> {
        if !(max_epsilon.is_finite() && max_epsilon > 0.0) {
            return Err(Error::Usage(format!(
                "the site's maximum epsilon must be a positive number, got {max_epsilon}"
            )));
        }
        if !(delta > 0.0 && delta < 1.0) {
            return Err(Error::Usage(format!(
                "the site's delta must be in (0, 1), got {delta}"
            )));
        }
        Ok(SitePrivacy {
            ledger: Mutex::new(Ledger::open(dir)?),
            max_epsilon,
            delta,
            release_metrics,
        })
    }

    /// The ledger (locked).
    pub fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("ledger lock poisoned")
    }
}
