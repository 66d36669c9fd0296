//! The round engine's public data types: the run's phase, the tasks it hands out, the
//! submissions it receives and the verdicts it returns.

use fedflow_common::params::ParamSet;
use fedflow_common::privacy::dpfedavg::SiteDpTask;

use crate::metrics::SiteReport;
use crate::strategy::UpdateReport;

/// Where the run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for enough sites to start the next round.
    Waiting,
    /// A round is open: tasks handed out, updates being collected.
    Training,
    /// The latest committed model is being (or is about to be) evaluated by the sites.
    Evaluating,
    /// Paused (quorum failures or an operator); no new round starts.
    Paused,
    /// All rounds committed.
    Finished,
}

/// What a task asks of a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// Train from the global model and upload the delta.
    Train,
    /// Evaluate the global model on the validation split and report metrics.
    Evaluate,
}

/// A task handed to a site.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskTicket {
    /// The task's id.
    pub task_id: String,
    /// The round it belongs to (for an evaluation: the round whose model is evaluated).
    pub round: u64,
    /// Train or evaluate.
    pub kind: TaskKind,
    /// The nonce the update must echo.
    pub nonce: Vec<u8>,
    /// SHA-256 of the model to train from or evaluate: the current global model, except in
    /// the publish gate's baseline evaluation, whose tasks (round = the published version's
    /// round) evaluate the published version (`RoundEngine::model_file` finds its file).
    pub model_sha256: String,
    /// When updates stop being accepted (Unix ms).
    pub deadline_ms: i64,
    /// Site-level DP: the clip and noise the site applies to its delta (training tasks).
    pub site_dp: Option<SiteDpTask>,
}

/// An accepted update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Folded into the round.
    New,
    /// The same update had already been accepted (a resend after a network error).
    Duplicate,
}

/// What a site sent, as the engine needs it.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The sending site.
    pub site_id: String,
    /// The round the update is for.
    pub round: u64,
    /// Task id from the ticket.
    pub task_id: String,
    /// Nonce from the ticket.
    pub nonce: Vec<u8>,
    /// SHA-256 of the model the delta was computed against.
    pub base_model_sha256: String,
    /// The delta.
    pub delta: DeltaSource,
    /// SHA-256 of the delta's bytes.
    pub delta_sha256: String,
    /// Example count and claimed weight.
    pub report: UpdateReport,
    /// The site's metrics.
    pub metrics: SiteReport,
    /// Site-level DP, central mode: the site's delta was within the clip before clipping
    /// (adaptive clipping's bit).
    pub unclipped: bool,
}

/// Where a submitted delta is.
#[derive(Debug, Clone)]
pub enum DeltaSource {
    /// Parsed, in memory.
    Params(ParamSet),
    /// A safetensors file (an upload spilled to disk), folded in tensor by tensor without
    /// loading it whole.
    File(std::path::PathBuf),
}

impl DeltaSource {
    /// The update's size in bytes: the file's, or the parsed tensors' data (0 when the file
    /// cannot be read; only the round's byte count uses it).
    pub fn len_bytes(&self) -> u64 {
        match self {
            DeltaSource::Params(p) => p
                .iter()
                .map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
                .sum(),
            DeltaSource::File(path) => std::fs::metadata(path).map_or(0, |m| m.len()),
        }
    }
}

impl From<ParamSet> for DeltaSource {
    fn from(p: ParamSet) -> Self {
        DeltaSource::Params(p)
    }
}
