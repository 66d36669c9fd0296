//! Live views of the run for operators: where each site of the current round (or
//! evaluation) stands, fed by heartbeats. Kept in memory only; the durable record of what
//! happened is the [`Store`](crate::store::Store).

use std::collections::BTreeMap;

use super::{Phase, Rejection, RoundEngine, Task, TaskState};
use crate::Result;

/// What a site says it is doing (from its heartbeats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkState {
    /// Nothing in particular (waiting for a task).
    #[default]
    Idle,
    /// Fetching the global model.
    Downloading,
    /// Training locally.
    Training,
    /// Sending its update.
    Uploading,
    /// Evaluating the global model.
    Evaluating,
}

/// Where a site stands in the current (or last) round or evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveState {
    /// Sent a task; no progress reported yet.
    Selected,
    /// Fetching the global model.
    Downloading,
    /// Training (see the epoch fields).
    Training,
    /// Sending its update.
    Uploading,
    /// Evaluating the global model.
    Evaluating,
    /// Its update or evaluation was accepted.
    Uploaded,
    /// It did not answer before the deadline.
    Late,
    /// It went silent past the heartbeat timeout.
    Dropped,
    /// Its last answer was refused (see the reason); it may still send a valid one.
    Rejected,
    /// It declined the task (see the reason).
    Declined,
}

/// One site's line in a [`RunView`].
#[derive(Debug, Clone, PartialEq)]
pub struct SiteView {
    /// The site.
    pub site_id: String,
    /// Where it stands.
    pub state: LiveState,
    /// Why, for rejected, late and dropped.
    pub reason: Option<String>,
    /// Training progress: epoch `epoch` of `epochs` (0 of 0 when unknown).
    pub epoch: u32,
    /// See `epoch`.
    pub epochs: u32,
    /// Bytes of the current transfer done, as last reported.
    pub bytes_done: u64,
    /// When it was last heard from (Unix ms).
    pub last_seen_ms: Option<i64>,
}

/// Where the run stands, for status displays.
#[derive(Debug, Clone, PartialEq)]
pub struct RunView {
    /// The run.
    pub run_id: String,
    /// Its phase.
    pub phase: Phase,
    /// Rounds the run will commit in all.
    pub total_rounds: u64,
    /// Last committed round.
    pub committed_round: u64,
    /// The round being trained, or whose model is being evaluated.
    pub current_round: Option<u64>,
    /// When the current round or evaluation stops accepting answers (Unix ms).
    pub deadline_ms: Option<i64>,
    /// SHA-256 of the current global model.
    pub global_sha256: String,
    /// The sites of the current round or evaluation (else of the last one), by site id.
    pub sites: Vec<SiteView>,
    /// Sites heard from within the heartbeat timeout.
    pub sites_connected: usize,
}

/// A heartbeat, as the engine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The site.
    pub site_id: String,
    /// The task it works on (empty when idle).
    pub task_id: String,
    /// What it is doing.
    pub work: WorkState,
    /// Training progress: epoch `epoch` of `epochs`.
    pub epoch: u32,
    /// See `epoch`.
    pub epochs: u32,
    /// Bytes of the current transfer done.
    pub bytes_done: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    work: WorkState,
    epoch: u32,
    epochs: u32,
    bytes_done: u64,
}

/// The engine's in-memory notes for views.
#[derive(Debug, Default)]
pub(super) struct Live {
    progress: BTreeMap<String, Progress>,
    rejections: BTreeMap<String, String>,
    /// The final view of the last closed round or evaluation.
    last: Vec<SiteView>,
}

impl Live {
    pub(super) fn round_started(&mut self) {
        self.progress.clear();
        self.rejections.clear();
    }

    pub(super) fn rejected(&mut self, site: &str, r: &Rejection) {
        self.rejections.insert(site.to_string(), r.to_string());
    }

    pub(super) fn round_closed(
        &mut self,
        _round: u64,
        tasks: &BTreeMap<String, Task>,
        last_seen: &BTreeMap<String, i64>,
    ) {
        self.last = self.views(tasks, last_seen);
        self.progress.clear();
        self.rejections.clear();
    }

    fn views(
        &self,
        tasks: &BTreeMap<String, Task>,
        last_seen: &BTreeMap<String, i64>,
    ) -> Vec<SiteView> {
        tasks
            .iter()
            .map(|(site, task)| {
                let p = self.progress.get(site).copied().unwrap_or_default();
                let rejection = self.rejections.get(site);
                let (state, reason) = match &task.state {
                    TaskState::Uploaded { .. } => (LiveState::Uploaded, None),
                    TaskState::Declined { reason } => (LiveState::Declined, Some(reason.clone())),
                    TaskState::Late => (
                        LiveState::Late,
                        Some("no answer before the deadline".to_string()),
                    ),
                    TaskState::Dropped => (
                        LiveState::Dropped,
                        Some("silent past the heartbeat timeout".to_string()),
                    ),
                    TaskState::Pending => match (rejection, p.work) {
                        (Some(r), _) => (LiveState::Rejected, Some(r.clone())),
                        (None, WorkState::Idle) => (LiveState::Selected, None),
                        (None, WorkState::Downloading) => (LiveState::Downloading, None),
                        (None, WorkState::Training) => (LiveState::Training, None),
                        (None, WorkState::Uploading) => (LiveState::Uploading, None),
                        (None, WorkState::Evaluating) => (LiveState::Evaluating, None),
                    },
                };
                SiteView {
                    site_id: site.clone(),
                    state,
                    reason,
                    epoch: p.epoch,
                    epochs: p.epochs,
                    bytes_done: p.bytes_done,
                    last_seen_ms: last_seen.get(site).copied(),
                }
            })
            .collect()
    }
}

impl RoundEngine {
    /// Records a heartbeat; returns whether the site should abandon the task it names
    /// (the round closed, the site was dropped, or the task is not its current one).
    pub fn heartbeat(&mut self, hb: Heartbeat, now_ms: i64) -> Result<bool> {
        self.site_seen(&hb.site_id, now_ms)?;
        if hb.task_id.is_empty() {
            return Ok(false);
        }
        let pending = self.pending_task(&hb.site_id) == Some(hb.task_id.as_str());
        if pending {
            self.live.progress.insert(
                hb.site_id.to_string(),
                Progress {
                    work: hb.work,
                    epoch: hb.epoch,
                    epochs: hb.epochs,
                    bytes_done: hb.bytes_done,
                },
            );
        }
        Ok(!pending)
    }

    /// The id of the site's unanswered task in the open round or evaluation.
    fn pending_task(&self, site: &str) -> Option<&str> {
        let tasks = match (&self.open, &self.eval) {
            (Some(open), _) => &open.tasks,
            (None, Some(ev)) => &ev.tasks,
            (None, None) => return None,
        };
        tasks
            .get(site)
            .filter(|t| t.state == TaskState::Pending)
            .map(|t| t.task_id.as_str())
    }

    /// Where the run stands at `now_ms`.
    pub fn view(&self, now_ms: i64) -> RunView {
        let (current, sites) = match (&self.open, &self.eval) {
            (Some(open), _) => (
                Some((open.round, open.deadline_ms)),
                self.live.views(&open.tasks, &self.last_seen),
            ),
            (None, Some(ev)) => (
                Some((ev.round, ev.deadline_ms)),
                self.live.views(&ev.tasks, &self.last_seen),
            ),
            (None, None) => (None, self.live.last.clone()),
        };
        RunView {
            run_id: self.run_id.clone(),
            phase: self.phase,
            total_rounds: self.cfg.run.rounds,
            committed_round: self.committed,
            current_round: current.map(|c| c.0),
            deadline_ms: current.map(|c| c.1),
            global_sha256: self.global_sha256.clone(),
            sites,
            sites_connected: self.available(now_ms).len(),
        }
    }
}
