//! What the store hands out: the closed sets of states it stores as text, and its rows.

use std::fmt;
use std::str::FromStr;

use fedflow_common::params::ParamSet;
use serde::Serialize;

use crate::{Error, Result};

// --- Status enums ---------------------------------------------------------------------------

/// Defines a closed set of states stored as lowercase text.
macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// The lowercase name stored in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(Error::Store(format!(
                        concat!("unknown ", $what, " {:?} in the database"),
                        other
                    ))),
                }
            }
        }
    };
}

text_enum! {
    /// Where a run stands.
    RunStatus, "run status" {
        /// Rounds are being run.
        Running => "running",
        /// Held by an operator; resumable.
        Paused => "paused",
        /// Reached its last round.
        Finished => "finished",
        /// Ended early (by an operator or an unrecoverable error); see the reason.
        Stopped => "stopped",
    }
}

text_enum! {
    /// Where a round stands.
    RoundStatus, "round status" {
        /// Begun, not committed: re-run from scratch after a crash.
        Open => "open",
        /// Its global model is checkpointed and recorded.
        Committed => "committed",
        /// Abandoned (e.g. too few updates); may be begun again.
        Failed => "failed",
    }
}

text_enum! {
    /// What became of a site in a round.
    SiteState, "site state" {
        /// Chosen and sent a task; nothing heard back yet.
        Selected => "selected",
        /// Its update arrived and was accepted into the aggregate.
        Uploaded => "uploaded",
        /// Its update arrived after the round's deadline and was not used.
        Late => "late",
        /// It went away (missed heartbeats, disconnected) before uploading.
        Dropped => "dropped",
        /// Its update was refused (wrong shape, non-finite, bad hash); see the reason.
        Rejected => "rejected",
        /// It declined the task (e.g. the model does not fit its data); see the reason.
        Declined => "declined",
    }
}

// --- Rows -----------------------------------------------------------------------------------

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRecord {
    /// The run's identifier.
    pub run_id: String,
    /// When it was created (Unix milliseconds).
    pub created_at_ms: i64,
    /// Its configuration as JSON.
    pub config_json: String,
    /// The strategy's name.
    pub strategy: String,
    /// Where it stands.
    pub status: RunStatus,
    /// Why it has that status, if anyone said.
    pub status_reason: Option<String>,
}

/// A round as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRecord {
    /// The round number (0 is the initial model).
    pub round: u64,
    /// Where it stands.
    pub status: RoundStatus,
    /// When it was (last) begun (Unix milliseconds).
    pub started_at_ms: i64,
    /// When it was committed (Unix milliseconds).
    pub committed_at_ms: Option<i64>,
    /// SHA-256 of the resulting global model's safetensors bytes, once committed.
    pub model_sha256: Option<String>,
    /// SHA-256 of the strategy state saved with it, if any.
    pub strategy_sha256: Option<String>,
    /// Why it failed.
    pub failure_reason: Option<String>,
    /// Aggregated training metrics as JSON.
    pub metrics_json: Option<String>,
    /// The federated evaluation of the committed model as JSON, once complete.
    pub evaluation_json: Option<String>,
}

/// One site's part in one round, as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundSiteRecord {
    /// The site.
    pub site_id: String,
    /// The task it was sent, if it was selected.
    pub task_id: Option<String>,
    /// What became of it.
    pub state: SiteState,
    /// Why (for `rejected`, `dropped`, `late`).
    pub reason: Option<String>,
    /// Training examples it reported.
    pub train_examples: Option<u64>,
    /// The weight its update got in the aggregate.
    pub weight: Option<f64>,
    /// Its reported metrics as JSON.
    pub metrics_json: Option<String>,
    /// SHA-256 of its uploaded delta.
    pub delta_sha256: Option<String>,
    /// The L2 norm of its update as received.
    pub update_norm: Option<f64>,
    /// Whether its update was clipped to the run's bound on update norms.
    pub clipped: Option<bool>,
    /// When this row last changed (Unix milliseconds).
    pub updated_at_ms: i64,
}

/// A site ever seen by the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteRecord {
    /// The site.
    pub site_id: String,
    /// First contact (Unix milliseconds).
    pub first_seen_ms: i64,
    /// Latest contact (Unix milliseconds).
    pub last_seen_ms: i64,
}

/// How many rounds ended in each state for one site (see
/// [`Store::site_outcome_counts`](super::Store::site_outcome_counts)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SiteCounts {
    /// Still `selected` (a round in progress, or abandoned by a crash or a failed round).
    pub selected: u32,
    /// Its update was part of the aggregate.
    pub uploaded: u32,
    /// It missed the deadline.
    pub late: u32,
    /// It went silent.
    pub dropped: u32,
    /// Its update was refused.
    pub rejected: u32,
    /// It declined the task.
    pub declined: u32,
}

/// An outcome to record for a site in an open round (see
/// [`Store::record_site`](super::Store::record_site)).
#[derive(Debug, Clone, PartialEq)]
pub struct SiteOutcome {
    /// The site.
    pub site_id: String,
    /// What became of it.
    pub state: SiteState,
    /// Why, for `rejected`, `dropped` or `late`.
    pub reason: Option<String>,
    /// Training examples it reported.
    pub train_examples: Option<u64>,
    /// The weight its update got in the aggregate.
    pub weight: Option<f64>,
    /// Its reported metrics as JSON (checked to parse).
    pub metrics_json: Option<String>,
    /// SHA-256 of its uploaded delta.
    pub delta_sha256: Option<String>,
    /// The L2 norm of its update as received.
    pub update_norm: Option<f64>,
    /// Whether its update was clipped to the run's bound on update norms.
    pub clipped: Option<bool>,
}

impl SiteOutcome {
    /// An outcome with only a state and an optional reason.
    pub fn new(site_id: impl Into<String>, state: SiteState, reason: Option<String>) -> Self {
        SiteOutcome {
            site_id: site_id.into(),
            state,
            reason,
            train_examples: None,
            weight: None,
            metrics_json: None,
            delta_sha256: None,
            update_norm: None,
            clipped: None,
        }
    }
}

/// Where a run resumes: its last committed round and the verified global model.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The last committed round (0 if only the initial model exists).
    pub round: u64,
    /// The global model after that round.
    pub model: ParamSet,
    /// Its SHA-256, as recorded and verified.
    pub model_sha256: String,
    /// The strategy state committed with that round, if any.
    pub strategy_state: Option<ParamSet>,
    /// A round begun after it but never committed (to be re-run), if any.
    pub open_round: Option<u64>,
}
