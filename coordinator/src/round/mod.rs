//! The round engine: the state machine of a federated run, driven by explicit events and
//! explicit times so that it can be owned by one task and tested without clocks.
//!
//! A run goes round by round: *select* sites (the strategy samples the available ones) →
//! hand out *tasks* (a task id and a random nonce per selected site) → *collect* updates, each
//! validated and folded into the round's accumulator (FedAvg's streaming sum, or a robust
//! rule) as it arrives → *close* the round when every selected site has answered or been
//! dropped, or at the deadline → if the quorum (`rounds.min_completed`) is met, *aggregate* (the strategy turns the mean delta into
//! the next global model) and *commit* (checkpoint file, then database row); otherwise retry
//! the round or pause the run, as configured, recording why. After a commit that the
//! evaluation schedule names, the available sites *evaluate* the new global model on their
//! validation splits (see `evaluation.rs`) before the next round starts.
//!
//! Every state change that matters after a crash goes through the [`Store`] first, and the
//! engine can be rebuilt from it: [`RoundEngine::open`] resumes at the last committed round
//! with the identical global model, and a round that was open at the crash is run again.
//! The engine is synchronous; its owner calls it from a blocking context (aggregation and
//! commits do real work).

use std::collections::BTreeMap;

use fedflow_common::params::{ParamSet, ParamSpec};
use fedflow_common::privacy::dpfedavg::SiteDpTask;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{QuorumFailure, RunConfig};
use crate::metrics::{SiteReport, TrainingMeans};
use crate::store::{RunStatus, SiteOutcome, SiteState, Store};
use crate::strategy::{Strategy, UpdateReport};
use crate::{Error, Result};

mod accumulator;
pub mod rejection;
mod evaluation;
mod operator;
mod site_dp;
mod view;

pub use evaluation::EvaluationSubmission;
pub use rejection::Rejection;
pub use view::{Heartbeat, LiveState, RunView, SiteView, WorkState};

/// How stale a site's `last_seen` in the database may be (milliseconds).
const SEEN_PERSIST_MS: i64 = 5_000;

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
    /// SHA-256 of the global model to train from.
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

impl From<ParamSet> for DeltaSource {
    fn from(p: ParamSet) -> Self {
        DeltaSource::Params(p)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum TaskState {
    Pending,
    /// Answered; `fingerprint` tells a resend (same) from a conflicting answer.
    Uploaded {
        fingerprint: String,
    },
    Dropped,
    Late,
    /// The site said it cannot do the task.
    Declined {
        reason: String,
    },
}

#[derive(Debug)]
struct Task {
    task_id: String,
    nonce: Vec<u8>,
    state: TaskState,
}

/// One task per site, with a fresh nonce each.
fn new_tasks(
    sites: &[String],
    task_id: impl Fn(&str) -> String,
    rng: &mut ChaCha8Rng,
) -> BTreeMap<String, Task> {
    sites
        .iter()
        .map(|site| {
            let mut nonce = vec![0u8; 16];
            rng.fill_bytes(&mut nonce);
            let task = Task {
                task_id: task_id(site),
                nonce,
                state: TaskState::Pending,
            };
            (site.clone(), task)
        })
        .collect()
}

/// Marks pending tasks of sites silent for longer than `timeout_ms` dropped; returns them.
fn drop_silent(
    tasks: &mut BTreeMap<String, Task>,
    last_seen: &BTreeMap<String, i64>,
    now_ms: i64,
    timeout_ms: i64,
) -> Vec<String> {
    let mut dropped = Vec::new();
    for (site, task) in tasks.iter_mut() {
        let silent = last_seen.get(site).is_none_or(|&t| now_ms - t > timeout_ms);
        if task.state == TaskState::Pending && silent {
            task.state = TaskState::Dropped;
            dropped.push(site.clone());
        }
    }
    dropped
}

fn all_answered(tasks: &BTreeMap<String, Task>) -> bool {
    tasks.values().all(|t| t.state != TaskState::Pending)
}

#[derive(Debug)]
struct OpenRound {
    round: u64,
    deadline_ms: i64,
    tasks: BTreeMap<String, Task>,
    acc: accumulator::RoundAccumulator,
    means: TrainingMeans,
    /// Site-level DP: what the round's tasks dictate.
    site_dp: Option<SiteDpTask>,
    /// Site-level DP: contributions whose sites reported an unclipped delta.
    unclipped: u64,
}

/// The state machine of one run.
#[derive(Debug)]
pub struct RoundEngine {
    run_id: String,
    cfg: RunConfig,
    store: Store,
    strategy: Box<dyn Strategy>,
    rng: ChaCha8Rng,
    global: ParamSet,
    global_sha256: String,
    spec: ParamSpec,
    /// Last committed round.
    committed: u64,
    phase: Phase,
    open: Option<OpenRound>,
    /// The evaluation in progress, if any.
    eval: Option<evaluation::OpenEvaluation>,
    /// A committed round whose model must be evaluated before the run goes on.
    eval_due: Option<u64>,
    /// The round closed last (its late updates are told they are late).
    last_closed: Option<u64>,
    /// Consecutive quorum failures of the next round.
    failures: u32,
    /// Sites seen, with the time they were last heard from.
    last_seen: BTreeMap<String, i64>,
    /// Live progress and notes for status views (not persisted).
    live: view::Live,
    /// Site-level DP-FedAvg, when the run has `[site_dp]`.
    site_dp: Option<site_dp::SiteDpState>,
    /// Paused by an operator: nothing new starts until resumed.
    held: bool,
    /// Seconds spent aggregating and committing rounds since the engine opened, and how many.
    aggregation: (f64, u64),
}

impl RoundEngine {
    /// Opens the run `cfg.run.name` in `store`: creates it with `initial` as round 0, or
    /// resumes it at its last committed round (ignoring `initial`).
    pub fn open(mut store: Store, cfg: RunConfig, initial: ParamSet) -> Result<Self> {
        let run_id = cfg.run.name.clone();
        let mut strategy = cfg.build_strategy()?;
        if store.run(&run_id)?.is_none() {
            let config_json = serde_json::to_string(&cfg)?;
            store.create_run(&run_id, &config_json, strategy.name(), &initial)?;
        }
        // The model is read back from its checkpoint below; don't hold two copies.
        drop(initial);
        let resume = store.resume_point(&run_id)?;
        strategy.restore_state(resume.strategy_state);
        let status = store.run(&run_id)?.map(|r| r.status);
        // A committed round whose scheduled evaluation never completed is evaluated first.
        let eval_due = (resume.round > 0
            && cfg.evaluates_after(resume.round)
            && store.evaluation_pending(&run_id, resume.round)?)
        .then_some(resume.round);
        let phase = match status {
            Some(RunStatus::Paused) => Phase::Paused,
            Some(RunStatus::Finished) | Some(RunStatus::Stopped) => Phase::Finished,
            _ if eval_due.is_some() => Phase::Evaluating,
            _ if resume.round >= cfg.run.rounds => Phase::Finished,
            _ => Phase::Waiting,
        };
        if let Some(r) = resume.open_round {
            tracing::info!(run = %run_id, round = r, "round {r} was open at shutdown: it will be run again");
        }
        // Seeded from the run seed and the round, so a resumed run samples like a fresh one.
        let rng = ChaCha8Rng::seed_from_u64(
            cfg.run.seed ^ resume.round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        crate::memtrace::probe(format_args!("engine-open round={}", resume.round));
        check_privacy_unchanged(&store, &run_id, &cfg)?;
        accumulator::reset_aggregation_dir(store.dir())?;
        let site_dp = cfg
            .site_dp
            .clone()
            .map(|s| site_dp::SiteDpState::open(s, &cfg.sampling, &store, &run_id))
            .transpose()?;
        if site_dp.is_some() {
            tracing::info!(run = %run_id, "site-level DP: uniform weights, fixed denominator; rounds.min_completed does not apply");
        }
        Ok(RoundEngine {
            spec: resume.model.spec(),
            run_id,
            cfg,
            store,
            strategy,
            rng,
            global_sha256: resume.model_sha256,
            global: resume.model,
            committed: resume.round,
            phase,
            open: None,
            eval: None,
            eval_due,
            last_closed: None,
            failures: 0,
            last_seen: BTreeMap::new(),
            live: view::Live::default(),
            site_dp,
            held: phase == Phase::Paused,
            aggregation: (0.0, 0),
        })
    }

    /// Seeds the coordinator's site-level DP randomness (site sampling and noise), which is
    /// otherwise drawn from the operating system. For statistical tests and simulations
    /// only: noise an observer can predict protects nobody.
    pub fn seed_site_dp_randomness(&mut self, seed: u64) {
        if let Some(dp) = &mut self.site_dp {
            dp.seed_noise(seed);
        }
    }

    /// The site-level ε spent so far at the run's target δ, when the run has `[site_dp]`.
    pub fn site_dp_spent(&self) -> Result<Option<f64>> {
        self.site_dp.as_ref().map(|d| d.spent()).transpose()
    }

    /// Seconds spent aggregating and committing rounds since the engine opened, and how
    /// many rounds that was.
    pub fn aggregation_seconds(&self) -> (f64, u64) {
        self.aggregation
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Where the run stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The last committed round (0 before the first).
    pub fn committed_round(&self) -> u64 {
        self.committed
    }

    /// The open round, if any.
    pub fn open_round(&self) -> Option<u64> {
        self.open.as_ref().map(|o| o.round)
    }

    /// The run's configuration.
    pub fn config(&self) -> &RunConfig {
        &self.cfg
    }

    /// The current global model and its SHA-256.
    pub fn global(&self) -> (&ParamSet, &str) {
        (&self.global, &self.global_sha256)
    }

    /// The store (read access for status views).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store, for writes that are not about rounds (revocations).
    pub(crate) fn store_mut(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Records that `site` was heard from (enrolment, poll, heartbeat).
    pub fn site_seen(&mut self, site: &str, now_ms: i64) -> Result<()> {
        let previous = self.last_seen.insert(site.to_string(), now_ms);
        // Liveness uses the in-memory map; the database copy is for status displays. Writing
        // it on every poll would cost one durable transaction per poll (ten a second per
        // waiting site), so it is refreshed once per SEEN_PERSIST_MS window at most.
        if previous.is_some_and(|p| p / SEEN_PERSIST_MS == now_ms / SEEN_PERSIST_MS) {
            return Ok(());
        }
        self.store.touch_site(site, now_ms)
    }

    /// The task for `site`, if it is selected in the open round and has not answered yet.
    /// Starts a round first when none is open and enough sites have been seen recently.
    pub fn poll_task(&mut self, site: &str, now_ms: i64) -> Result<Option<TaskTicket>> {
        self.site_seen(site, now_ms)?;
        self.start_due_work(now_ms)?;
        let (tasks, round, deadline_ms, kind, site_dp) = if let Some(open) = &self.open {
            (
                &open.tasks,
                open.round,
                open.deadline_ms,
                TaskKind::Train,
                open.site_dp,
            )
        } else if let Some(eval) = &self.eval {
            (
                &eval.tasks,
                eval.round,
                eval.deadline_ms,
                TaskKind::Evaluate,
                None,
            )
        } else {
            return Ok(None);
        };
        Ok(tasks.get(site).and_then(|t| match t.state {
            TaskState::Pending => Some(TaskTicket {
                task_id: t.task_id.clone(),
                round,
                kind,
                nonce: t.nonce.clone(),
                model_sha256: self.global_sha256.clone(),
                deadline_ms,
                site_dp,
            }),
            _ => None,
        }))
    }

    /// Starts the due evaluation, or the next round, when enough sites are available.
    fn start_due_work(&mut self, now_ms: i64) -> Result<()> {
        if self.open.is_some() || self.eval.is_some() {
            return Ok(());
        }
        if self.held && self.phase != Phase::Finished {
            self.phase = Phase::Paused;
            return Ok(());
        }
        match self.phase {
            Phase::Evaluating => self.try_start_evaluation(now_ms),
            Phase::Waiting => self.try_start_round(now_ms),
            _ => Ok(()),
        }
    }

    fn available(&self, now_ms: i64) -> Vec<String> {
        let horizon = now_ms - (self.cfg.rounds.heartbeat_timeout_secs as i64) * 1000;
        self.last_seen
            .iter()
            .filter(|(_, t)| **t >= horizon)
            .map(|(s, _)| s.clone())
            .collect()
    }

    fn try_start_round(&mut self, now_ms: i64) -> Result<()> {
        let available = self.available(now_ms);
        if available.len() < self.cfg.sampling.min_available {
            return Ok(());
        }
        let round = self.committed + 1;
        if let Some(dp) = &self.site_dp
            && let Some(reason) = dp.over_budget(round)?
        {
            tracing::warn!(run = %self.run_id, round, "{reason}; the run ends");
            self.store
                .set_run_status(&self.run_id, RunStatus::Finished, Some(&reason))?;
            self.phase = Phase::Finished;
            return Ok(());
        }
        let selected = match &mut self.site_dp {
            Some(dp) => dp.sample(&available, &self.cfg.sampling),
            None => self
                .strategy
                .configure_train(round, &available, &mut self.rng)?,
        };
        let attempt = self.failures;
        let run_id = &self.run_id;
        let tasks = new_tasks(
            &selected,
            |site| format!("{run_id}-r{round}-{site}-{attempt}"),
            &mut self.rng,
        );
        let pairs: Vec<(String, String)> = tasks
            .iter()
            .map(|(s, t)| (s.clone(), t.task_id.clone()))
            .collect();
        self.store.begin_round(&self.run_id, round, &pairs)?;
        tracing::info!(run = %self.run_id, round, selected = selected.len(), "round {round} started");
        let (acc, site_dp) = match &self.site_dp {
            Some(dp) => (
                accumulator::RoundAccumulator::Mean(dp.accumulator(&self.spec)?),
                Some(dp.task()?),
            ),
            None => (
                accumulator::RoundAccumulator::new(
                    &self.spec,
                    &self.cfg.aggregation,
                    self.store.dir(),
                )?,
                None,
            ),
        };
        self.open = Some(OpenRound {
            round,
            deadline_ms: now_ms + (self.cfg.rounds.deadline_secs as i64) * 1000,
            tasks,
            acc,
            means: TrainingMeans::default(),
            site_dp,
            unclipped: 0,
        });
        self.live.round_started();
        self.phase = Phase::Training;
        crate::memtrace::probe(format_args!("round-start round={round}"));
        Ok(())
    }

    /// Validates an update and folds it into the open round. Nothing changes on rejection.
    /// The round closes (and may commit) as soon as every selected site has answered.
    pub fn submit(
        &mut self,
        s: Submission,
        now_ms: i64,
    ) -> Result<std::result::Result<Accepted, Rejection>> {
        self.last_seen.insert(s.site_id.to_string(), now_ms);
        let verdict = self.check_and_add(&s, now_ms)?;
        match &verdict {
            Ok(Accepted::New) => self.close_if_complete(now_ms)?,
            Ok(Accepted::Duplicate) => {}
            Err(r) => self.live.rejected(&s.site_id, r),
        }
        Ok(verdict)
    }

    fn check_and_add(
        &mut self,
        s: &Submission,
        now_ms: i64,
    ) -> Result<std::result::Result<Accepted, Rejection>> {
        if let Some(dp) = &self.site_dp {
            // Whatever becomes of it (late, for a task a restart abandoned, invalid, ...),
            // the coordinator has seen this update: it counts against the site's guarantee
            // towards the coordinator.
            let task = dp.task()?;
            self.store.record_site_dp_upload(
                &self.run_id,
                &crate::store::SiteDpUpload {
                    round: s.round,
                    site_id: s.site_id.to_string(),
                    task_id: s.task_id.to_string(),
                    delta_sha256: s.delta_sha256.to_string(),
                    site_noise_std: task.noise_std,
                    clip_norm: task.clip_norm,
                },
            )?;
        }
        // An update for the round that just closed missed its deadline (or the round ended
        // without it): say so rather than "no round is open".
        if self.last_closed == Some(s.round)
            && self.open.as_ref().is_none_or(|o| o.round != s.round)
        {
            return Ok(Err(Rejection::Late(s.round)));
        }
        let Some(open) = self.open.as_mut() else {
            return Ok(Err(Rejection::NoOpenRound));
        };
        if s.round != open.round {
            return Ok(Err(Rejection::WrongRound {
                open: open.round,
                got: s.round,
            }));
        }
        let Some(task) = open.tasks.get_mut(&s.site_id) else {
            return Ok(Err(Rejection::NotSelected(open.round)));
        };
        if task.task_id != s.task_id || task.nonce != s.nonce {
            return Ok(Err(Rejection::WrongTask));
        }
        match &task.state {
            TaskState::Uploaded { fingerprint } if *fingerprint == s.delta_sha256 => {
                return Ok(Ok(Accepted::Duplicate));
            }
            TaskState::Uploaded { .. } => return Ok(Err(Rejection::Conflicting)),
            TaskState::Dropped => return Ok(Err(Rejection::Withdrawn)),
            TaskState::Late => return Ok(Err(Rejection::Late(open.round))),
            TaskState::Declined { .. } => return Ok(Err(Rejection::Declined)),
            TaskState::Pending => {}
        }
        if now_ms > open.deadline_ms {
            return Ok(Err(Rejection::Late(open.round)));
        }
        if s.base_model_sha256 != self.global_sha256 {
            return Ok(Err(Rejection::WrongBase {
                want: self.global_sha256.clone(),
                got: s.base_model_sha256.to_string(),
            }));
        }
        // Site-level DP weighs every update the same, so one site's influence is its clip.
        let weight = match &open.site_dp {
            Some(_) => Ok(1.0),
            None => self.strategy.update_weight(&s.report),
        };
        let weight = match weight {
            Ok(w) => w,
            Err(e) => return Ok(Err(Rejection::Invalid(e.to_string()))),
        };
        // The accumulator validates names, shapes, dtype, finiteness and the weight before it
        // changes anything.
        let added = match &s.delta {
            DeltaSource::Params(p) => open.acc.add(p, weight),
            DeltaSource::File(path) => open.acc.add_safetensors_file(path, weight),
        };
        match added {
            Ok(()) => {}
            // The coordinator's own disk failing (spill copy, full disk) is not the site's
            // fault: an internal error, and the site may retry.
            Err(e @ Error::Common(fedflow_common::Error::Io { .. })) => return Err(e),
            Err(e) => return Ok(Err(Rejection::Invalid(e.to_string()))),
        }
        task.state = TaskState::Uploaded {
            fingerprint: s.delta_sha256.to_string(),
        };
        open.means.add(&s.metrics);
        open.unclipped += u64::from(s.unclipped);
        let outcome = SiteOutcome {
            train_examples: Some(s.report.train_examples),
            weight: Some(weight),
            metrics_json: Some(s.metrics.to_json()),
            delta_sha256: Some(s.delta_sha256.to_string()),
            ..SiteOutcome::new(&s.site_id, SiteState::Uploaded, None)
        };
        let round = open.round;
        let count = open.acc.count();
        self.store.record_site(&self.run_id, round, &outcome)?;
        crate::memtrace::probe(format_args!("accepted round={round} count={count}"));
        Ok(Ok(Accepted::New))
    }

    /// Records that a site declined its task in the open round or evaluation (e.g. its data
    /// does not fit the model), with its reason; the round stops waiting for it.
    pub fn decline(
        &mut self,
        site: &str,
        round: u64,
        task_id: &str,
        nonce: &[u8],
        reason: &str,
        now_ms: i64,
    ) -> Result<std::result::Result<(), Rejection>> {
        self.last_seen.insert(site.to_string(), now_ms);
        let reason: String = reason.chars().take(1000).collect();
        let (tasks, open_round, training) = match (&mut self.open, &mut self.eval) {
            (Some(o), _) => (&mut o.tasks, o.round, true),
            (None, Some(e)) => (&mut e.tasks, e.round, false),
            (None, None) => return Ok(Err(Rejection::NoOpenRound)),
        };
        if round != open_round {
            return Ok(Err(Rejection::WrongRound {
                open: open_round,
                got: round,
            }));
        }
        let Some(task) = tasks.get_mut(site) else {
            return Ok(Err(Rejection::NotSelected(open_round)));
        };
        if task.task_id != task_id || task.nonce != nonce {
            return Ok(Err(Rejection::WrongTask));
        }
        if task.state != TaskState::Pending {
            // Already answered, dropped or declined: nothing to change.
            return Ok(Ok(()));
        }
        task.state = TaskState::Declined {
            reason: reason.clone(),
        };
        tracing::warn!(run = %self.run_id, round, %site, "the site declined its task: {reason}");
        if training {
            let outcome = SiteOutcome::new(site, SiteState::Declined, Some(reason));
            self.store.record_site(&self.run_id, round, &outcome)?;
        }
        self.tick(now_ms)?;
        Ok(Ok(()))
    }

    /// Advances time: drops sites silent past the heartbeat timeout, and closes the round at
    /// its deadline (or earlier, once nobody is left to wait for).
    pub fn tick(&mut self, now_ms: i64) -> Result<()> {
        if self.eval.is_some() {
            return self.tick_evaluation(now_ms);
        }
        let timeout = self.heartbeat_timeout_ms();
        let Some(open) = self.open.as_mut() else {
            return self.start_due_work(now_ms);
        };
        let dropped = drop_silent(&mut open.tasks, &self.last_seen, now_ms, timeout);
        let round = open.round;
        let deadline = open.deadline_ms;
        for site in dropped {
            tracing::warn!(run = %self.run_id, round, "a site went silent and was dropped from round {round}");
            let reason = Some(format!(
                "no heartbeat for more than {}s",
                self.cfg.rounds.heartbeat_timeout_secs
            ));
            self.store.record_site(
                &self.run_id,
                round,
                &SiteOutcome::new(site, SiteState::Dropped, reason),
            )?;
        }
        if now_ms > deadline {
            self.close_round(now_ms, "deadline passed")?;
        } else {
            self.close_if_complete(now_ms)?;
        }
        Ok(())
    }

    fn heartbeat_timeout_ms(&self) -> i64 {
        (self.cfg.rounds.heartbeat_timeout_secs as i64) * 1000
    }

    fn close_if_complete(&mut self, now_ms: i64) -> Result<()> {
        let Some(open) = &self.open else {
            return Ok(());
        };
        if all_answered(&open.tasks) {
            self.close_round(now_ms, "every selected site answered")?;
        }
        Ok(())
    }

    fn close_round(&mut self, now_ms: i64, why: &str) -> Result<()> {
        let Some(mut open) = self.open.take() else {
            return Ok(());
        };
        let round = open.round;
        self.last_closed = Some(round);
        for (site, task) in open.tasks.iter_mut() {
            if task.state == TaskState::Pending {
                task.state = TaskState::Late;
                let reason = Some("no update before the deadline".to_string());
                self.store.record_site(
                    &self.run_id,
                    round,
                    &SiteOutcome::new(site.clone(), SiteState::Late, reason),
                )?;
            }
        }
        self.live.round_closed(round, &open.tasks, &self.last_seen);
        let quorum = self.cfg.rounds.min_completed;
        let completed = open.acc.count();
        // Under site-level DP every round that closes is released (see `SiteDpSection`).
        if completed < quorum && self.site_dp.is_none() {
            let reason = format!("{completed} of the {quorum} updates needed arrived ({why})");
            self.store.fail_round(&self.run_id, round, &reason)?;
            self.failures += 1;
            let pause = match self.cfg.rounds.on_quorum_failure {
                QuorumFailure::Pause => true,
                QuorumFailure::Retry => self.failures > self.cfg.rounds.max_retries,
            };
            tracing::warn!(run = %self.run_id, round, "round {round} failed: {reason}");
            if pause {
                self.store.set_run_status(
                    &self.run_id,
                    RunStatus::Paused,
                    Some(&format!("round {round}: {reason}")),
                )?;
                self.phase = Phase::Paused;
                self.held = true;
            } else {
                self.phase = Phase::Waiting;
            }
            return Ok(());
        }
        crate::memtrace::probe(format_args!("close round={round}"));
        let aggregating = std::time::Instant::now();
        let selected = open.tasks.len() as u64;
        let (mean, dp_record) = match (&mut self.site_dp, open.acc) {
            (Some(dp), accumulator::RoundAccumulator::Mean(acc)) => {
                let (mean, record) = dp.release(round, acc, selected, open.unclipped)?;
                (mean, Some(record))
            }
            (Some(_), accumulator::RoundAccumulator::Robust(_)) => {
                return Err(Error::Strategy(
                    "site-level DP needs the mean (the config refuses a robust rule with it)"
                        .into(),
                ));
            }
            (None, acc) => (acc.finish()?, None),
        };
        crate::memtrace::probe(format_args!("finished-mean round={round}"));
        let next = self.strategy.aggregate_train(round, &self.global, &mean)?;
        crate::memtrace::probe(format_args!("aggregated round={round}"));
        // Not needed any more: free it before the commit serialises `next`.
        drop(mean);
        let metrics = serde_json::to_string(&open.means.summary(why))?;
        let sha = self.store.commit_round(
            &self.run_id,
            round,
            &next,
            self.strategy.state(),
            Some(&metrics),
            dp_record.as_ref(),
        )?;
        if let (Some(dp), Some(record)) = (&mut self.site_dp, &dp_record) {
            dp.committed(record)?;
            tracing::info!(
                run = %self.run_id,
                round,
                "site-level DP: {} contribution(s), server noise std {:.4e}, epsilon {:.4} at delta {:e}",
                record.contributions,
                record.server_noise_std,
                record.epsilon,
                record.target_delta
            );
        }
        crate::memtrace::probe(format_args!("committed round={round}"));
        self.aggregation.0 += aggregating.elapsed().as_secs_f64();
        self.aggregation.1 += 1;
        crate::failpoint(&format!("after-commit-round-{round}"));
        tracing::info!(run = %self.run_id, round, completed, "round {round} committed");
        self.global = next;
        self.global_sha256 = sha;
        crate::memtrace::probe(format_args!("global-replaced round={round}"));
        self.committed = round;
        self.failures = 0;
        if self.cfg.evaluates_after(round) {
            self.eval_due = Some(round);
            self.phase = Phase::Evaluating;
            self.try_start_evaluation(now_ms)
        } else {
            self.after_round_done()
        }
    }

    /// The committed round needs nothing more: finish the run or wait for the next round.
    fn after_round_done(&mut self) -> Result<()> {
        if self.committed >= self.cfg.run.rounds {
            self.store
                .set_run_status(&self.run_id, RunStatus::Finished, None)?;
            self.phase = Phase::Finished;
            self.held = false;
        } else {
            self.phase = Phase::Waiting;
        }
        Ok(())
    }
}

/// Refuses to resume a run whose `[site_dp]` (or, under it, `[sampling]`) differs from the
/// configuration it was created with: its ledger and privacy report are about that one.
fn check_privacy_unchanged(store: &Store, run_id: &str, cfg: &RunConfig) -> Result<()> {
    let Some(run) = store.run(run_id)? else {
        return Ok(());
    };
    let saved: serde_json::Value = serde_json::from_str(&run.config_json)?;
    let now = serde_json::to_value(cfg)?;
    let null = serde_json::Value::Null;
    let mut sections = vec!["site_dp"];
    if cfg.site_dp.is_some() || saved.get("site_dp").is_some_and(|v| !v.is_null()) {
        sections.push("sampling");
    }
    for section in sections {
        let (before, after) = (
            saved.get(section).unwrap_or(&null),
            now.get(section).unwrap_or(&null),
        );
        if before != after {
            return Err(Error::ConfigMismatch(format!(
                "run {run_id} was created with [{section}] = {before} and is being resumed with \
                 {after}: its privacy ledger and report are about the first; restore it or start \
                 a new run (another run.name)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod hardening_tests;
#[cfg(test)]
pub(crate) mod tests;
