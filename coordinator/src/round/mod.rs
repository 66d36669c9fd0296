//! The round engine: the state machine of a federated run, driven by explicit events and
//! explicit times so that it can be owned by one task and tested without clocks.
//!
//! A run goes round by round: *select* sites (the strategy samples the available ones) →
//! hand out *tasks* (a task id and a random nonce per selected site) → *collect* updates, each
//! validated and folded into the round's accumulator (FedAvg's streaming sum, or a robust
//! rule) as it arrives → *close* the round when every selected site has answered or been
//! dropped, or at the deadline → if the strategy's quorum is met, *release* and *aggregate*
//! (the strategy turns the released delta into the next global model) and *commit*
//! (checkpoint file, then database row, with the release's ledger row); otherwise retry the
//! round or pause the run, as configured, recording why. Every decision is the strategy's
//! ([`crate::strategy::Strategy`]): site-level DP is a strategy wrapper, not a mode of the
//! engine. After a commit that the
//! evaluation schedule names, the available sites *evaluate* the new global model on their
//! validation splits (see `evaluation.rs`) before the next round starts.
//!
//! Every state change that matters after a crash goes through the [`Store`] first, and the
//! engine can be rebuilt from it: [`RoundEngine::open`] resumes at the last committed round
//! with the identical global model, and a round that was open at the crash is run again.
//! The engine is synchronous; its owner calls it from a blocking context (aggregation and
//! commits do real work).
//!
//! This file holds the engine's lifecycle (opening, starting rounds, handing out tasks); the
//! public data types are in `types.rs`, and collecting and closing a round in `close.rs`.

use std::collections::BTreeMap;

use fedflow_common::fedavg::NormBound;
use fedflow_common::params::{ParamSet, ParamSpec};
use fedflow_common::privacy::dpfedavg::SiteDpTask;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::RunConfig;
use crate::metrics::TrainingMeans;
use crate::store::{RunStatus, Store};
use crate::strategy::{RoundAccumulator, Strategy};
use crate::{Error, Result};
// The test modules import this module with `use super::*` and rely on these names.
#[cfg(test)]
use crate::{store::SiteState, strategy::UpdateReport};

mod close;
mod evaluation;
mod operator;
mod registry;
pub mod rejection;
mod types;
mod view;

pub use evaluation::EvaluationSubmission;
pub use rejection::Rejection;
pub use types::{Accepted, DeltaSource, Phase, Submission, TaskKind, TaskTicket};
pub use view::{Heartbeat, LiveState, RunView, SiteView, WorkState};

/// How stale a site's `last_seen` in the database may be (milliseconds).
const SEEN_PERSIST_MS: i64 = 5_000;

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
    acc: RoundAccumulator,
    means: TrainingMeans,
    /// The clip and noise the round's tasks dictate (site-level DP).
    site_dp: Option<SiteDpTask>,
    /// Contributions whose sites reported an unclipped delta (site-level DP's bit).
    unclipped: u64,
}

/// See [`RoundEngine::work_key`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkKey {
    phase: Option<Phase>,
    held: bool,
    /// The id of the open round's first task (ids name the round and the attempt).
    round_tasks: Option<String>,
    /// The id of the open evaluation's first task.
    evaluation_tasks: Option<String>,
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
    /// Paused by an operator: nothing new starts until resumed.
    held: bool,
    /// The bound on every update's norm (`aggregation.max_update_norm`, resolved).
    update_bound: NormBound,
    /// Where refusals that concern the run's security are recorded, if anywhere.
    security_log: Option<crate::security::SecurityLog>,
    /// Seconds spent aggregating and committing rounds since the engine opened, and how many.
    aggregation: (f64, u64),
    /// The published version (what the sites should serve), verified at start.
    published: Option<crate::store::Publication>,
    /// A committed round the publish gate has not decided about yet.
    gate_pending: Option<u64>,
    /// A baseline evaluation of the published version the gate waits for.
    baseline_due: Option<registry::BaselineDue>,
    /// When the last training round started (`schedule.interval_secs` counts from it).
    last_round_started_ms: Option<i64>,
}

impl RoundEngine {
    /// Opens the run `cfg.run.name` in `store`: creates it with `initial` as round 0, or
    /// resumes it at its last committed round (ignoring `initial`).
    pub fn open(mut store: Store, cfg: RunConfig, initial: ParamSet) -> Result<Self> {
        let run_id = cfg.run.name.clone();
        check_privacy_unchanged(&store, &run_id, &cfg)?;
        let mut strategy = crate::strategy::build(&cfg, &store.site_dp_rounds(&run_id)?)?;
        if store.run(&run_id)?.is_none() {
            let config_json = serde_json::to_string(&cfg)?;
            store.create_run(&run_id, &config_json, strategy.name(), &initial)?;
            // Kept with the run: its versions are exported and warm-started with it. (A crash
            // between the two leaves a run without one, which export treats as an old run.)
            let vocab = fedflow_common::data::Vocab::load(&cfg.model.vocab)?;
            store.record_vocabulary(&run_id, &vocab.to_json_string())?;
        }
        // The model is read back from its checkpoint below; don't hold two copies.
        drop(initial);
        let resume = store.resume_point(&run_id)?;
        let update_bound = update_bound(&cfg, &store, &run_id, &resume)?;
        strategy.restore_state(resume.strategy_state);
        let status = store.run(&run_id)?.map(|r| r.status);
        // A committed round whose scheduled evaluation never completed is evaluated first.
        let eval_due = (resume.round > 0
            && cfg.evaluates_after(resume.round)
            && store.evaluation_pending(&run_id, resume.round)?)
        .then_some(resume.round);
        // A committed round the gate never decided about (a crash in between) is decided
        // after its evaluation, or at the first occasion.
        let gate_pending = (resume.round > 0
            && eval_due.is_none()
            && !store.gate_decided(&run_id, resume.round)?)
        .then_some(resume.round);
        let phase = match status {
            Some(RunStatus::Paused) => Phase::Paused,
            Some(RunStatus::Finished) | Some(RunStatus::Stopped) => Phase::Finished,
            _ if eval_due.is_some() => Phase::Evaluating,
            _ if gate_pending.is_some() => Phase::Waiting,
            _ if cfg.finished_after(resume.round) => Phase::Finished,
            _ => Phase::Waiting,
        };
        let last_round_started_ms = store
            .rounds(&run_id)?
            .iter()
            .filter(|r| r.round > 0)
            .map(|r| r.started_at_ms)
            .max();
        if let Some(r) = resume.open_round {
            tracing::info!(run = %run_id, round = r, "round {r} was open at shutdown: it will be run again");
        }
        // Seeded from the run seed and the round, so a resumed run samples like a fresh one.
        let rng = ChaCha8Rng::seed_from_u64(
            cfg.run.seed ^ resume.round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        crate::memtrace::probe(format_args!("engine-open round={}", resume.round));
        crate::strategy::reset_aggregation_dir(store.dir())?;
        let mut engine = RoundEngine {
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
            held: phase == Phase::Paused,
            update_bound,
            security_log: None,
            aggregation: (0.0, 0),
            published: None,
            gate_pending,
            baseline_due: None,
            last_round_started_ms,
        };
        engine.load_published()?;
        Ok(engine)
    }

    /// Seeds the coordinator's site-level DP randomness (site sampling and noise), which is
    /// otherwise drawn from the operating system. For statistical tests and simulations
    /// only: noise an observer can predict protects nobody.
    pub fn seed_site_dp_randomness(&mut self, seed: u64) {
        self.strategy.seed_privacy_randomness(seed);
    }

    /// The site-level ε spent so far at the run's target δ, when the run has `[site_dp]`.
    pub fn site_dp_spent(&self) -> Result<Option<f64>> {
        self.strategy.privacy_spent()
    }

    /// Records refused aggregates (naming the round's updates) in the security audit log.
    pub fn set_security_log(&mut self, log: crate::security::SecurityLog) {
        self.security_log = Some(log);
    }

    /// The bound every update's L2 norm is held to (clipped or refused above it).
    pub fn update_bound(&self) -> NormBound {
        self.update_bound
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

    /// What a waiting site's next poll could be handed: it changes whenever the phase does
    /// or the open round's or evaluation's tasks are replaced (a new round, attempt or
    /// evaluation), and only then, so the service wakes waiting polls on a change instead
    /// of asking again and again.
    pub fn work_key(&self) -> WorkKey {
        let first =
            |tasks: &BTreeMap<String, Task>| tasks.values().next().map(|t| t.task_id.clone());
        WorkKey {
            phase: Some(self.phase),
            held: self.held,
            round_tasks: self.open.as_ref().and_then(|o| first(&o.tasks)),
            evaluation_tasks: self.eval.as_ref().and_then(|e| first(&e.tasks)),
        }
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
        let (tasks, round, deadline_ms, kind, site_dp, model) = if let Some(open) = &self.open {
            (
                &open.tasks,
                open.round,
                open.deadline_ms,
                TaskKind::Train,
                open.site_dp,
                &self.global_sha256,
            )
        } else if let Some(eval) = &self.eval {
            (
                &eval.tasks,
                eval.round,
                eval.deadline_ms,
                TaskKind::Evaluate,
                None,
                &eval.model_sha256,
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
                model_sha256: model.clone(),
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
        if self.gate_pending.is_some() && self.baseline_due.is_none() && self.eval_due.is_none() {
            self.run_gate(now_ms)?;
            if self.eval.is_some() {
                return Ok(());
            }
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
        let interval_ms = (self.cfg.schedule.interval_secs as i64) * 1000;
        if interval_ms > 0
            && self
                .last_round_started_ms
                .is_some_and(|t| now_ms < t + interval_ms)
        {
            return Ok(());
        }
        let round = self.committed + 1;
        if let Some(reason) = self.strategy.refuse_round(round)? {
            tracing::warn!(run = %self.run_id, round, "{reason}; the run ends");
            self.store
                .set_run_status(&self.run_id, RunStatus::Finished, Some(&reason))?;
            self.phase = Phase::Finished;
            return Ok(());
        }
        let selected = self
            .strategy
            .configure_train(round, &available, &mut self.rng)?;
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
        self.last_round_started_ms = Some(now_ms);
        tracing::info!(run = %self.run_id, round, selected = selected.len(), "round {round} started");
        let acc = self
            .strategy
            .accumulator(
                &self.spec,
                &self.cfg.aggregation,
                self.store.dir(),
                self.update_bound,
            )?
            .with_compression(self.cfg.compression())?;
        let site_dp = self.strategy.task_privacy()?;
        let mut means = TrainingMeans::new(self.cfg.aggregation.max_examples);
        let model = self
            .store
            .model_checkpoint_path(&self.run_id, self.committed_round());
        means.set_download_bytes(
            std::fs::metadata(&model).map_or(0, |m| m.len()) * tasks.len() as u64,
        );
        self.open = Some(OpenRound {
            round,
            deadline_ms: now_ms + (self.cfg.rounds.deadline_secs as i64) * 1000,
            tasks,
            acc,
            means,
            site_dp,
            unclipped: 0,
        });
        self.live.round_started();
        self.phase = Phase::Training;
        crate::memtrace::probe(format_args!("round-start round={round}"));
        Ok(())
    }
}

/// The run's bound on every update's norm: `aggregation.max_update_norm`, or the L2 norm of
/// its round-0 model when that is absent (read back from its checkpoint after round 0).
fn update_bound(
    cfg: &RunConfig,
    store: &Store,
    run_id: &str,
    resume: &crate::store::Resume,
) -> Result<NormBound> {
    let a = &cfg.aggregation;
    let limit = match a.max_update_norm {
        Some(b) => b,
        None if resume.round == 0 => resume.model.l2_norm()?,
        None => ParamSet::load(store.model_checkpoint_path(run_id, 0))?.l2_norm()?,
    };
    if !(limit.is_finite() && limit > 0.0) {
        return Err(Error::Strategy(format!(
            "the initial model's L2 norm is {limit}, which bounds nothing; set \
             aggregation.max_update_norm"
        )));
    }
    Ok(match a.on_large_update {
        crate::config::LargeUpdate::Clip => NormBound::Clip(limit),
        crate::config::LargeUpdate::Refuse => NormBound::Refuse(limit),
    })
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
mod influence_tests;
#[cfg(test)]
mod registry_tests;
#[cfg(test)]
mod site_dp_tests;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod work_key_tests;
