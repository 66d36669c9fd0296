//! The tables about what happens in each round: `[train]` (local training at the sites),
//! `[rounds]` (deadlines, quorum and retries), `[evaluation]` (when the global model is
//! evaluated) and `[transport]` (model transfer sizes).

use fedflow_common::train::{OptimizerKind, TrainConfig};
use serde::{Deserialize, Serialize};

use super::{DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MODEL_BYTES};

/// How each site's local-training seed is derived (`train.seed_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SeedPolicy {
    /// `"per_site_round"` (default): from `run.seed`, the round and the site id, so every
    /// site shuffles and drops out differently in every round, reproducibly.
    #[default]
    PerSiteRound,
    /// `"per_round"`: from `run.seed` and the round; all sites of a round share it.
    PerRound,
    /// `"fixed"`: `run.seed` itself, for every site and round (for debugging).
    Fixed,
}

/// `[train]`: what every selected site does locally in a round.
///
/// These become a [`TrainConfig`] for the site ([`super::RunConfig::local_train_config`]), with the
/// seed derived by `seed_policy`. Early stopping is off by default (`patience = 0`): a site's
/// validation split is small and local, and stopping early would make sites train for
/// different lengths; the federated evaluation is the run's measure of progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Local passes over the site's training data per round, at least 1. Default 1.
    pub epochs: usize,
    /// Sessions per optimisation step, at least 1. Default 64.
    pub batch_size: usize,
    /// Local learning rate, > 0. Default 0.002.
    pub learning_rate: f64,
    /// Local optimiser: `"adamw"` (default) or `"sgd"`.
    pub optimizer: OptimizerKind,
    /// Momentum in [0, 1) (SGD only). Default 0.9.
    pub momentum: f64,
    /// Weight decay, >= 0: decoupled for AdamW, L2 for SGD. Default 0.01.
    pub weight_decay: f64,
    /// Site-local early stopping after this many epochs without validation improvement;
    /// 0 (default) disables it.
    pub patience: usize,
    /// Minimum decrease of validation loss that counts as an improvement, >= 0. Default 0.
    pub min_delta: f64,
    /// Batch sessions of similar length together (less padding). Default true.
    pub length_bucketing: bool,
    /// FedProx proximal term μ (`μ/2·‖w − w_global‖²` added to the local loss), >= 0; absent
    /// (default) means plain FedAvg local training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fedprox_mu: Option<f64>,
    /// How the sites' training seeds are derived: `"per_site_round"` (default),
    /// `"per_round"` or `"fixed"`; see [`SeedPolicy`].
    pub seed_policy: SeedPolicy,
}

impl Default for TrainSection {
    fn default() -> Self {
        let d = TrainConfig::default();
        TrainSection {
            epochs: 1,
            batch_size: d.batch_size,
            learning_rate: d.learning_rate,
            optimizer: d.optimizer,
            momentum: d.momentum,
            weight_decay: d.weight_decay,
            patience: 0,
            min_delta: d.min_delta,
            length_bucketing: d.length_bucketing,
            fedprox_mu: None,
            seed_policy: SeedPolicy::PerSiteRound,
        }
    }
}

impl TrainSection {
    /// The local training configuration with the given seed.
    pub fn train_config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            optimizer: self.optimizer,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            patience: self.patience,
            min_delta: self.min_delta,
            seed,
            length_bucketing: self.length_bucketing,
            fedprox_mu: self.fedprox_mu.unwrap_or(0.0),
        }
    }
}

/// What happens when a round ends without its quorum (`rounds.on_quorum_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuorumFailure {
    /// `"retry"` (default): the round is run again with a fresh sample, up to
    /// `rounds.max_retries` times in a row; then the run pauses.
    #[default]
    Retry,
    /// `"pause"`: the run pauses at once and waits for an operator.
    Pause,
}

/// `[rounds]`: deadlines, quorum and what happens when a round misses its quorum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundsSection {
    /// Seconds a round waits for updates after it starts, at least 1. Default 600.
    pub deadline_secs: u64,
    /// Quorum: the round completes with the valid updates that arrived by the deadline (or
    /// as soon as every selected site replied) if there are at least this many. At least 1,
    /// and at most `sampling.min_selected` and `sampling.count`, or the quorum could never be
    /// met. Default 1.
    pub min_completed: usize,
    /// What to do when a round misses its quorum: `"retry"` (default) or `"pause"`.
    pub on_quorum_failure: QuorumFailure,
    /// With `retry`: how many times in a row a round is retried before the run pauses.
    /// Default 3.
    pub max_retries: u32,
    /// A selected site silent for longer than this many seconds is considered gone (its
    /// update is no longer awaited). At least 1 and less than `deadline_secs`. Default 60.
    pub heartbeat_timeout_secs: u64,
}

impl Default for RoundsSection {
    fn default() -> Self {
        RoundsSection {
            deadline_secs: 600,
            min_completed: 1,
            on_quorum_failure: QuorumFailure::Retry,
            max_retries: 3,
            heartbeat_timeout_secs: 60,
        }
    }
}

/// `[evaluation]`: when the sites evaluate the global model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluationSection {
    /// Evaluate after every `every`-th round (rounds `every`, `2·every`, ...); 0 means only
    /// after the final round if `final_round`, and never otherwise (e.g. runs with record-level
    /// DP, whose sites withhold metrics by default). Default 1.
    pub every: u64,
    /// Also evaluate after the last round even when it is not a multiple of `every`.
    /// Default true.
    pub final_round: bool,
}

impl Default for EvaluationSection {
    fn default() -> Self {
        EvaluationSection {
            every: 1,
            final_round: true,
        }
    }
}

/// `[transport]`: sizes of model transfers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportSection {
    /// Payload bytes per transfer chunk, 4096 (4 KiB) to 1048576 (1 MiB). Default 1048576
    /// (1 MiB). Both ends' gRPC message limits must admit a chunk plus its headers.
    pub chunk_bytes: usize,
    /// Largest model or update (safetensors bytes) accepted, at least `chunk_bytes`.
    /// Default 1073741824 (1 GiB).
    pub max_model_bytes: u64,
}

impl Default for TransportSection {
    fn default() -> Self {
        TransportSection {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_model_bytes: DEFAULT_MAX_MODEL_BYTES,
        }
    }
}
