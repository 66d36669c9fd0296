//! The run configuration: one TOML file describing a federated run, and its validation.
//!
//! A run is described by a TOML file with the tables `[run]`, `[model]`, `[train]`,
//! `[sampling]`, `[rounds]`, `[evaluation]`, `[transport]`, `[limits]`, `[aggregation]`,
//! `[record_dp]`, `[site_dp]` and `[compression]`. The types here and in the submodules (`rounds.rs` holds
//! `[train]`, `[rounds]`, `[evaluation]` and `[transport]`; `sampling.rs`, `hardening.rs`,
//! `record_dp.rs`, `site_dp.rs` and `compression.rs` the others) mirror the file one to one, so their docs
//! are the reference of every key. Only `run.name` and `model.vocab` are required;
//! everything else has a default, so this is a complete file:
//!
//! ```toml
//! [run]
//! name = "pilot-1"
//!
//! [model]
//! vocab = "vocab.json"
//! ```
//!
//! `coordinator/examples/run.toml` is a commented example listing every key (it is also the
//! configuration of the one-command demo, see [`RunConfig::demo`]).
//!
//! Every table rejects unknown keys, naming the key and its line. [`RunConfig::load`] and
//! [`RunConfig::from_toml_str`] resolve the vocabulary path, read the vocabulary (which fixes
//! `model.vocab_size`) and check every value and every combination of values before the
//! coordinator starts, so a bad value fails at once with a message naming its field, e.g.
//! `run config run.toml: rounds.deadline_secs: 0 must be at least 1`.

use std::path::{Path, PathBuf};

use fedflow_common::compress::Compression;
use fedflow_common::data::Vocab;
use fedflow_common::model::{EncoderKind, ModelConfig};
use fedflow_common::train::TrainConfig;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

mod compression;
mod hardening;
mod init;
mod lifecycle;
mod record_dp;
mod rounds;
mod sampling;
mod site_dp;

pub use compression::CompressionSection;
pub use hardening::{
    AggregationRule, AggregationSection, DEFAULT_MAX_EXAMPLES, LargeUpdate, LimitsSection,
};
pub use init::InitConfig;
pub use lifecycle::{
    DEFAULT_KEEP_LAST, PublishConfig, PublishMetric, PublishRule, RetentionConfig, ScheduleConfig,
    ScheduleMode,
};
pub use record_dp::RecordDpSection;
pub use rounds::{
    EvaluationSection, QuorumFailure, RoundsSection, SeedPolicy, TrainSection, TransportSection,
};
pub use sampling::SamplingConfig;
pub use site_dp::SiteDpSection;

/// The path named in errors about configurations that did not come from a file.
const MEMORY: &str = "<memory>";

/// The commented example configuration, which is also the demo's configuration.
/// The text of `coordinator/examples/run.toml`: the demo's configuration, every key documented.
pub const EXAMPLE_TOML: &str = include_str!("../../examples/run.toml");

/// Longest accepted `run.name` (fedflow's one naming rule, shared with site names).
pub const MAX_NAME_LEN: usize = fedflow_common::names::MAX_NAME_LEN;
/// Smallest accepted `transport.chunk_bytes` (4 KiB).
pub const MIN_CHUNK_BYTES: usize = 4 << 10;
/// Largest accepted `transport.chunk_bytes` (1 MiB): the gRPC layers accept messages of one
/// full chunk plus headers (`fedflow_proto::transfer::MAX_MESSAGE_BYTES`), no more.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// Default `transport.chunk_bytes` (1 MiB).
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default `transport.max_model_bytes` (1 GiB).
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 1 << 30;

/// A whole federated run, as read from its TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// `[run]`: identity, seed, length and server-side strategy of the run (required).
    pub run: RunSection,
    /// `[model]`: the vocabulary and the architecture of the global model (required, for
    /// `vocab`).
    pub model: ModelSection,
    /// `[train]`: what every selected site does locally in a round.
    #[serde(default)]
    pub train: TrainSection,
    /// `[sampling]`: how many of the available sites a round selects (see
    /// [`SamplingConfig`]: `fraction`, `count`, `min_selected`, `min_available`).
    #[serde(default)]
    pub sampling: SamplingConfig,
    /// `[rounds]`: deadlines, quorum and what happens when a round misses its quorum.
    #[serde(default)]
    pub rounds: RoundsSection,
    /// `[evaluation]`: when the global model is evaluated by the sites.
    #[serde(default)]
    pub evaluation: EvaluationSection,
    /// `[transport]`: sizes of model transfers.
    #[serde(default)]
    pub transport: TransportSection,
    /// `[limits]`: what one caller may use (concurrent calls, request rate, upload size
    /// and time).
    #[serde(default)]
    pub limits: LimitsSection,
    /// `[aggregation]`: the mean (default) or a robust rule (median, trimmed mean).
    #[serde(default)]
    pub aggregation: AggregationSection,
    /// `[schedule]`: a fixed number of rounds (default) or a continuous run.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// `[publish]`: which committed versions are published for the sites to serve.
    #[serde(default)]
    pub publish: PublishConfig,
    /// `[retention]`: which checkpoints are kept.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// `[init]`: start a new run from a previous version instead of a fresh model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitConfig>,
    /// `[record_dp]`: DP-SGD every site applies to its own records; absent (default) means
    /// no record-level differential privacy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_dp: Option<RecordDpSection>,
    /// `[site_dp]`: site-level DP-FedAvg (each site's whole contribution protected); absent
    /// (default) means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_dp: Option<SiteDpSection>,
    /// `[compression]`: how sites compress their updates; absent (default) means plain f32
    /// updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionSection>,
}

/// The server-side aggregation strategy (`run.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    /// `"fedavg"`: the weighted mean delta is added to the global model as it is.
    #[default]
    Fedavg,
    /// `"fedavgm"`: FedAvg with server momentum (`run.server_learning_rate`,
    /// `run.server_momentum`).
    Fedavgm,
}

/// `[run]`: identity, seed, length and strategy of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Name of the run, used in ids, logs and directory names (required): 1 to 128
    /// characters from `A-Z a-z 0-9 . _ -`, not starting with `.`
    /// ([`fedflow_common::names`]).
    pub name: String,
    /// Seed of everything random on the coordinator (site sampling) and, through
    /// `train.seed_policy`, of the sites' local training. At most 2^63 - 1, because TOML
    /// integers are signed 64-bit. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Number of federated rounds, at least 1. Default 10. Not used by a continuous run
    /// (`[schedule] mode = "continuous"`).
    #[serde(default = "default_rounds")]
    pub rounds: u64,
    /// Aggregation strategy: `"fedavg"` (default) or `"fedavgm"`.
    #[serde(default)]
    pub strategy: StrategyKind,
    /// FedAvgM's server learning rate η (`w ← w + η·v`), > 0; only allowed with
    /// `strategy = "fedavgm"`. Default 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_learning_rate: Option<f64>,
    /// FedAvgM's server momentum β (`v ← β·v + Δ̄`), in [0, 1); only allowed with
    /// `strategy = "fedavgm"`. Default 0.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_momentum: Option<f64>,
}

fn default_rounds() -> u64 {
    10
}

impl RunSection {
    /// The effective server learning rate (1.0 unless FedAvgM sets another).
    pub fn server_learning_rate(&self) -> f64 {
        self.server_learning_rate.unwrap_or(1.0)
    }

    /// The effective server momentum (0 for FedAvg, 0.9 for FedAvgM unless set).
    pub fn server_momentum(&self) -> f64 {
        match self.strategy {
            StrategyKind::Fedavg => 0.0,
            StrategyKind::Fedavgm => self.server_momentum.unwrap_or(0.9),
        }
    }
}

/// `[model]`: the vocabulary and the architecture of the global model.
///
/// The architecture keys are those of [`ModelConfig`], written directly in `[model]` (the
/// table is flat: `encoder = "gru"`, not `[model.config]`), with the same defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Path of the federation's vocabulary JSON file (required). A relative path is resolved
    /// against the directory of the configuration file; after loading this holds the
    /// resolved, absolute path.
    pub vocab: PathBuf,
    /// Number of event ids, including padding and unknown. Taken from the vocabulary; leave it
    /// out. If given it must equal the vocabulary's size (it is written out by
    /// [`RunConfig::to_toml_string`] as a record of the model's shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
    /// Width of the event embedding (also the Transformer's model width). Default 64.
    #[serde(default = "d_embed_dim")]
    pub embed_dim: usize,
    /// Sequence encoder: `"lstm"` (default), `"gru"` or `"transformer"`.
    #[serde(default)]
    pub encoder: EncoderKind,
    /// Hidden size of each recurrent layer (ignored by the Transformer). Default 64.
    #[serde(default = "d_hidden_size")]
    pub hidden_size: usize,
    /// Number of stacked encoder layers. Default 2.
    #[serde(default = "d_num_layers")]
    pub num_layers: usize,
    /// Dropout probability in [0, 1), in local training only. Default 0.2.
    #[serde(default = "d_dropout")]
    pub dropout: f64,
    /// Number of output classes. Default 5 (the satisfaction levels).
    #[serde(default = "d_num_classes")]
    pub num_classes: usize,
    /// Longest sequence the model reads; longer sessions keep their most recent events.
    /// Default 100.
    #[serde(default = "d_max_seq_len")]
    pub max_seq_len: usize,
    /// Attention heads (Transformer only); must divide `embed_dim`. Default 4.
    #[serde(default = "d_num_heads")]
    pub num_heads: usize,
    /// Feed-forward width (Transformer only). Default 128.
    #[serde(default = "d_ffn_dim")]
    pub ffn_dim: usize,
}

fn d_embed_dim() -> usize {
    ModelConfig::default().embed_dim
}
fn d_hidden_size() -> usize {
    ModelConfig::default().hidden_size
}
fn d_num_layers() -> usize {
    ModelConfig::default().num_layers
}
fn d_dropout() -> f64 {
    ModelConfig::default().dropout
}
fn d_num_classes() -> usize {
    ModelConfig::default().num_classes
}
fn d_max_seq_len() -> usize {
    ModelConfig::default().max_seq_len
}
fn d_num_heads() -> usize {
    ModelConfig::default().num_heads
}
fn d_ffn_dim() -> usize {
    ModelConfig::default().ffn_dim
}

impl ModelSection {
    /// A section with the default architecture and the given vocabulary path.
    pub fn new(vocab: impl Into<PathBuf>) -> Self {
        let d = ModelConfig::default();
        ModelSection {
            vocab: vocab.into(),
            vocab_size: None,
            embed_dim: d.embed_dim,
            encoder: d.encoder,
            hidden_size: d.hidden_size,
            num_layers: d.num_layers,
            dropout: d.dropout,
            num_classes: d.num_classes,
            max_seq_len: d.max_seq_len,
            num_heads: d.num_heads,
            ffn_dim: d.ffn_dim,
        }
    }

    /// The model's configuration. Errs while `vocab_size` is unknown (before the vocabulary
    /// was read by [`RunConfig::load`] or [`RunConfig::from_toml_str`]).
    pub fn model_config(&self) -> std::result::Result<ModelConfig, String> {
        let vocab_size = self.vocab_size.ok_or_else(|| {
            "model.vocab_size: unknown until the vocabulary is read; load the configuration \
             with RunConfig::load"
                .to_owned()
        })?;
        Ok(ModelConfig {
            vocab_size,
            embed_dim: self.embed_dim,
            encoder: self.encoder,
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            dropout: self.dropout,
            num_classes: self.num_classes,
            max_seq_len: self.max_seq_len,
            num_heads: self.num_heads,
            ffn_dim: self.ffn_dim,
        })
    }
}

impl RunConfig {
    /// Reads a run configuration file: parses it (rejecting unknown keys), resolves the
    /// vocabulary path against the file's directory, reads the vocabulary to set
    /// `model.vocab_size`, and validates everything. Errors name the file and the field.
    pub fn load(path: impl AsRef<Path>) -> Result<RunConfig> {
        let path = path.as_ref();
        let err = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Self::parse(&text).and_then(|c| c.finish(base)).map_err(err)
    }

    /// Like [`RunConfig::load`] for a configuration held in memory; relative paths resolve
    /// against `base_dir`. Errors name the file as `<memory>`.
    pub fn from_toml_str(text: &str, base_dir: impl AsRef<Path>) -> Result<RunConfig> {
        Self::parse(text)
            .and_then(|c| c.finish(base_dir.as_ref()))
            .map_err(memory_err)
    }

    /// The configuration of the one-command demo (the file `coordinator/examples/run.toml`:
    /// 20 sites, 10 rounds, every available site trains 2 local epochs per round), with the
    /// vocabulary at `vocab_path` (relative to the working directory if relative).
    pub fn demo(vocab_path: impl AsRef<Path>) -> Result<RunConfig> {
        Self::with_vocab(EXAMPLE_TOML, vocab_path)
    }

    /// A configuration from TOML text whose `model.vocab` is replaced by `vocab_path` (and
    /// `model.vocab_size` taken from it): for runs on generated data, like the demo's.
    pub fn with_vocab(text: &str, vocab_path: impl AsRef<Path>) -> Result<RunConfig> {
        let mut config = Self::parse(text).map_err(memory_err)?;
        config.model.vocab = vocab_path.as_ref().to_path_buf();
        config.model.vocab_size = None;
        config.finish(Path::new(".")).map_err(memory_err)
    }

    /// The configuration as TOML; [`RunConfig::from_toml_str`] reads it back to an equal
    /// value (the vocabulary path is absolute after loading, so any base directory works).
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| memory_err(format!("cannot write as TOML: {e}")))
    }

    /// Parses TOML without touching the file system or validating.
    fn parse(text: &str) -> std::result::Result<RunConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Resolves the vocabulary path, reads the vocabulary and validates.
    fn finish(mut self, base_dir: &Path) -> std::result::Result<RunConfig, String> {
        if self.model.vocab.as_os_str().is_empty() {
            return Err("model.vocab: is empty; give the path of the vocabulary JSON".into());
        }
        let joined = base_dir.join(&self.model.vocab);
        self.model.vocab = std::path::absolute(&joined)
            .map_err(|e| format!("model.vocab: cannot resolve {}: {e}", joined.display()))?;
        let vocab = Vocab::load(&self.model.vocab).map_err(|e| format!("model.vocab: {e}"))?;
        match self.model.vocab_size {
            Some(n) if n != vocab.len() => {
                return Err(format!(
                    "model.vocab_size: {n} conflicts with the vocabulary {}, which has {} ids \
                     ({} events plus padding and unknown); remove model.vocab_size, it is \
                     taken from the vocabulary",
                    self.model.vocab.display(),
                    vocab.len(),
                    vocab.num_events()
                ));
            }
            _ => self.model.vocab_size = Some(vocab.len()),
        }
        if let Some(dir) = self.init.as_mut().and_then(|i| i.model_dir.as_mut()) {
            let joined = base_dir.join(&*dir);
            *dir = std::path::absolute(&joined)
                .map_err(|e| format!("init.model_dir: cannot resolve {}: {e}", joined.display()))?;
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks every field and every combination of fields, naming the first bad one
    /// (`section.key: what is wrong`). [`RunConfig::load`] calls it; call it again after
    /// changing a loaded configuration.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.validate_run()?;
        let model = self.model.model_config()?;
        model.validate().map_err(common_reason)?;
        self.train
            .train_config(0)
            .validate()
            .map_err(common_reason)?;
        if let Some(mu) = self.train.fedprox_mu
            && !(mu.is_finite() && mu >= 0.0)
        {
            return Err(format!("train.fedprox_mu: {mu} must be >= 0"));
        }
        self.sampling.validate()?;
        self.validate_rounds()?;
        self.validate_evaluation()?;
        self.schedule.validate()?;
        self.publish.validate()?;
        if let Some(init) = &self.init {
            init.validate()?;
        }
        if let Some(dp) = &self.record_dp {
            dp.validate()?;
        }
        if let Some(dp) = &self.site_dp {
            dp.validate(&self.sampling)?;
        }
        self.limits.validate()?;
        self.aggregation.validate(self.site_dp.is_some())?;
        if let Some(c) = &self.compression {
            c.validate(self.site_dp.as_ref(), &self.aggregation)?;
        }
        self.validate_transport()
    }

    /// How sites compress their updates ([`Compression::NONE`] without `[compression]`).
    pub fn compression(&self) -> Compression {
        self.compression
            .as_ref()
            .map_or(Compression::NONE, CompressionSection::compression)
    }

    fn validate_run(&self) -> std::result::Result<(), String> {
        let run = &self.run;
        let name = &run.name;
        fedflow_common::names::check_name(name).map_err(|e| format!("run.name: {e}"))?;
        if run.seed > i64::MAX as u64 {
            return Err(format!(
                "run.seed: {} exceeds 2^63 - 1, the largest TOML integer",
                run.seed
            ));
        }
        if run.rounds == 0 {
            return Err("run.rounds: 0 must be at least 1".into());
        }
        match run.strategy {
            StrategyKind::Fedavg => {
                for (field, value) in [
                    ("server_learning_rate", run.server_learning_rate),
                    ("server_momentum", run.server_momentum),
                ] {
                    if value.is_some() {
                        return Err(format!(
                            "run.{field}: only used by strategy \"fedavgm\"; remove it or set \
                             run.strategy = \"fedavgm\""
                        ));
                    }
                }
            }
            StrategyKind::Fedavgm => {
                // The strategy computes in f32: check the values it will actually see.
                let lr = run.server_learning_rate();
                if !((lr as f32).is_finite() && lr as f32 > 0.0) {
                    return Err(format!("run.server_learning_rate: {lr} must be > 0"));
                }
                let m = run.server_momentum();
                if !(0.0..1.0).contains(&(m as f32)) {
                    return Err(format!("run.server_momentum: {m} is outside [0, 1)"));
                }
            }
        }
        Ok(())
    }

    fn validate_rounds(&self) -> std::result::Result<(), String> {
        let r = &self.rounds;
        if r.deadline_secs == 0 {
            return Err("rounds.deadline_secs: 0 must be at least 1".into());
        }
        if r.heartbeat_timeout_secs == 0 {
            return Err("rounds.heartbeat_timeout_secs: 0 must be at least 1".into());
        }
        if r.heartbeat_timeout_secs >= r.deadline_secs {
            return Err(format!(
                "rounds.heartbeat_timeout_secs: {} must be less than rounds.deadline_secs {}",
                r.heartbeat_timeout_secs, r.deadline_secs
            ));
        }
        if r.min_completed == 0 {
            return Err("rounds.min_completed: 0 must be at least 1".into());
        }
        if r.min_completed > self.sampling.min_selected {
            return Err(format!(
                "rounds.min_completed: {} exceeds sampling.min_selected {}: a round may select \
                 only {} site(s), so its quorum could never be met; lower min_completed or \
                 raise min_selected",
                r.min_completed, self.sampling.min_selected, self.sampling.min_selected
            ));
        }
        if let Some(count) = self.sampling.count
            && r.min_completed > count
        {
            return Err(format!(
                "rounds.min_completed: {} exceeds sampling.count {count}: a round selects \
                 {count} site(s), so its quorum could never be met",
                r.min_completed
            ));
        }
        Ok(())
    }

    fn validate_evaluation(&self) -> std::result::Result<(), String> {
        let e = &self.evaluation;
        if self.schedule.continuous() {
            if self.publish.rule == PublishRule::Evaluation && e.every == 0 {
                return Err(
                    "evaluation.every: 0 in a continuous run never evaluates, so publish.rule                      \"evaluation\" could never publish; evaluate every N rounds or choose                      another publish.rule"
                        .into(),
                );
            }
            return Ok(());
        }
        if e.every > self.run.rounds && !e.final_round {
            return Err(format!(
                "evaluation.every: {} exceeds run.rounds {} and evaluation.final_round is \
                 false, so the run would never evaluate; set every = 0 if that is meant",
                e.every, self.run.rounds
            ));
        }
        Ok(())
    }

    fn validate_transport(&self) -> std::result::Result<(), String> {
        let t = &self.transport;
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&t.chunk_bytes) {
            return Err(format!(
                "transport.chunk_bytes: {} is outside {MIN_CHUNK_BYTES}..={MAX_CHUNK_BYTES} \
                 (4 KiB to 1 MiB)",
                t.chunk_bytes
            ));
        }
        if t.max_model_bytes < t.chunk_bytes as u64 {
            return Err(format!(
                "transport.max_model_bytes: {} is below transport.chunk_bytes {}",
                t.max_model_bytes, t.chunk_bytes
            ));
        }
        if t.max_model_bytes > i64::MAX as u64 {
            return Err(format!(
                "transport.max_model_bytes: {} exceeds 2^63 - 1, the largest TOML integer",
                t.max_model_bytes
            ));
        }
        Ok(())
    }

    /// The model's configuration (`vocab_size` from the vocabulary).
    pub fn model_config(&self) -> Result<ModelConfig> {
        self.model.model_config().map_err(memory_err)
    }

    /// The local training configuration `site` uses in `round`, its seed derived from
    /// `run.seed` by `train.seed_policy`. The derivation is fixed (FNV-1a of the site id,
    /// mixed with SplitMix64), so it is the same on every platform and release.
    pub fn local_train_config(&self, round: u64, site: &str) -> TrainConfig {
        let seed = match self.train.seed_policy {
            SeedPolicy::Fixed => self.run.seed,
            SeedPolicy::PerRound => splitmix64(self.run.seed ^ splitmix64(round)),
            SeedPolicy::PerSiteRound => {
                splitmix64(self.run.seed ^ splitmix64(round) ^ splitmix64(fnv1a(site)))
            }
        };
        self.train.train_config(seed)
    }

    /// Whether the sites evaluate the global model after `round` (1-based).
    pub fn evaluates_after(&self, round: u64) -> bool {
        let e = &self.evaluation;
        (e.every > 0 && round.is_multiple_of(e.every))
            || (e.final_round && !self.schedule.continuous() && round == self.run.rounds)
    }

    /// Whether the run is finished after `committed` rounds (never, for a continuous run).
    pub fn finished_after(&self, committed: u64) -> bool {
        !self.schedule.continuous() && committed >= self.run.rounds
    }
}

fn memory_err(reason: String) -> Error {
    Error::Config {
        path: PathBuf::from(MEMORY),
        reason,
    }
}

/// The reason inside a `fedflow_common` config error (which already names the field).
fn common_reason(e: fedflow_common::Error) -> String {
    match e {
        fedflow_common::Error::Config(reason) => reason,
        other => other.to_string(),
    }
}

/// SplitMix64's finaliser: a fixed, well-mixing bijection of 64-bit values.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64-bit FNV-1a of a string.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests;
