//! Federated evaluation: after a round the evaluation schedule names is committed, every
//! available site evaluates the new global model on its validation split and reports its
//! metrics; the coordinator records each site's figures and their weighted mean, then goes
//! on with the next round (or finishes the run).
//!
//! An evaluation has the same shape as a training round (tasks with nonces, a deadline,
//! silent sites dropped) but no quorum: it completes with whatever arrived, because it only
//! measures a model that is already committed. It is persisted separately from training
//! state, so a crash during it re-runs only the evaluation.

use crate::metrics::{EvaluationMeans, SiteReport};
use crate::store::EvaluationRecord;

use super::{
    Accepted, Phase, Rejection, RoundEngine, Task, TaskState, all_answered, drop_silent, new_tasks,
};
use crate::Result;
use std::collections::BTreeMap;

/// An evaluation in progress.
#[derive(Debug)]
pub(super) struct OpenEvaluation {
    /// The committed round whose model is evaluated.
    pub(super) round: u64,
    /// The evaluated model's SHA-256.
    pub(super) model_sha256: String,
    /// When this evaluates the published version again: what the gate compares it with.
    baseline_for: Option<super::registry::BaselineDue>,
    pub(super) deadline_ms: i64,
    pub(super) tasks: BTreeMap<String, Task>,
    means: EvaluationMeans,
}

/// A site's evaluation report, as the engine needs it.
#[derive(Debug, Clone)]
pub struct EvaluationSubmission {
    /// The reporting site.
    pub site_id: String,
    /// The round whose model was evaluated.
    pub round: u64,
    /// Task id from the ticket.
    pub task_id: String,
    /// Nonce from the ticket.
    pub nonce: Vec<u8>,
    /// SHA-256 of the model that was evaluated.
    pub model_sha256: String,
    /// The site's metrics (validation fields).
    pub metrics: SiteReport,
}

/// Checks the figures are plausible: losses non-negative, accuracy and F1 in [0, 1].
fn check_metrics(m: &SiteReport) -> std::result::Result<(), String> {
    if let Some(l) = m.validation_loss
        && l < 0.0
    {
        return Err(format!("validation loss {l} is negative"));
    }
    for (name, v) in [
        ("validation accuracy", m.validation_accuracy),
        ("validation macro-F1", m.validation_macro_f1),
    ] {
        if let Some(v) = v
            && !(0.0..=1.0).contains(&v)
        {
            return Err(format!("{name} {v} is outside [0, 1]"));
        }
    }
    Ok(())
}

impl RoundEngine {
    /// Opens the due evaluation once enough sites are available: a quorum's worth
    /// (`rounds.min_completed`, or `sampling.min_available` if lower), so that a site lost
    /// in the round just committed cannot stall the run; every available site gets a task.
    pub(super) fn try_start_evaluation(&mut self, now_ms: i64) -> Result<()> {
        if self.eval.is_some() {
            return Ok(());
        }
        let (round, baseline_for) = match (self.eval_due, &self.baseline_due) {
            (Some(round), _) => (round, None),
            (None, Some(due)) => (due.baseline, Some(due.clone())),
            (None, None) => return Ok(()),
        };
        if self.held && self.phase != Phase::Finished {
            self.phase = Phase::Paused;
            return Ok(());
        }
        let available = self.available(now_ms);
        let needed = self
            .cfg
            .sampling
            .min_available
            .min(self.cfg.rounds.min_completed)
            .max(1);
        if available.len() < needed {
            return Ok(());
        }
        let run_id = &self.run_id;
        let (tasks, model_sha256) = match &baseline_for {
            None => {
                self.store.begin_evaluation(run_id, round)?;
                let tasks = new_tasks(
                    &available,
                    |site| format!("{run_id}-e{round}-{site}"),
                    &mut self.rng,
                );
                (tasks, self.global_sha256.clone())
            }
            Some(due) => {
                self.store.begin_baseline_evaluation(run_id, due.round)?;
                // Only the sites that evaluated the candidate can be compared.
                let sites: Vec<String> = available
                    .into_iter()
                    .filter(|s| due.sites.contains(s))
                    .collect();
                let candidate = due.round;
                let tasks = new_tasks(
                    &sites,
                    |site| format!("{run_id}-b{candidate}-{site}"),
                    &mut self.rng,
                );
                (tasks, due.baseline_sha256.clone())
            }
        };
        tracing::info!(run = %self.run_id, round, sites = tasks.len(), "evaluating the model of round {round}");
        self.eval = Some(OpenEvaluation {
            round,
            model_sha256,
            baseline_for,
            deadline_ms: now_ms + (self.cfg.rounds.deadline_secs as i64) * 1000,
            tasks,
            means: EvaluationMeans::new(self.cfg.aggregation.max_examples),
        });
        self.live.round_started();
        self.phase = Phase::Evaluating;
        Ok(())
    }

    /// Validates an evaluation report and records it. Nothing changes on rejection. The
    /// evaluation closes as soon as every site has answered.
    pub fn submit_evaluation(
        &mut self,
        s: EvaluationSubmission,
        now_ms: i64,
    ) -> Result<std::result::Result<Accepted, Rejection>> {
        self.last_seen.insert(s.site_id.to_string(), now_ms);
        let verdict = self.check_and_record_evaluation(&s, now_ms)?;
        match &verdict {
            Ok(Accepted::New) => {
                if self.eval.as_ref().is_some_and(|e| all_answered(&e.tasks)) {
                    self.close_evaluation("every site answered", now_ms)?;
                }
            }
            Ok(Accepted::Duplicate) => {}
            Err(r) => self.live.rejected(&s.site_id, r),
        }
        Ok(verdict)
    }

    fn check_and_record_evaluation(
        &mut self,
        s: &EvaluationSubmission,
        now_ms: i64,
    ) -> Result<std::result::Result<Accepted, Rejection>> {
        let Some(ev) = self.eval.as_mut() else {
            return Ok(Err(Rejection::NoOpenEvaluation));
        };
        if s.round != ev.round {
            return Ok(Err(Rejection::WrongRound {
                open: ev.round,
                got: s.round,
            }));
        }
        let Some(task) = ev.tasks.get_mut(&s.site_id) else {
            return Ok(Err(Rejection::NotSelected(ev.round)));
        };
        if task.task_id != s.task_id || task.nonce != s.nonce {
            return Ok(Err(Rejection::WrongTask));
        }
        let fingerprint = s.metrics.to_json();
        match &task.state {
            TaskState::Uploaded { fingerprint: f } if *f == fingerprint => {
                return Ok(Ok(Accepted::Duplicate));
            }
            TaskState::Uploaded { .. } => return Ok(Err(Rejection::Conflicting)),
            TaskState::Dropped => return Ok(Err(Rejection::Withdrawn)),
            TaskState::Late => return Ok(Err(Rejection::Late(ev.round))),
            TaskState::Declined { .. } => return Ok(Err(Rejection::Declined)),
            TaskState::Pending => {}
        }
        if now_ms > ev.deadline_ms {
            return Ok(Err(Rejection::Late(ev.round)));
        }
        if s.model_sha256 != ev.model_sha256 {
            return Ok(Err(Rejection::WrongBase {
                want: ev.model_sha256.clone(),
                got: s.model_sha256.to_string(),
            }));
        }
        if let Err(e) = check_metrics(&s.metrics) {
            return Ok(Err(Rejection::Invalid(e)));
        }
        let record = EvaluationRecord {
            site_id: s.site_id.to_string(),
            task_id: s.task_id.to_string(),
            validation_examples: s.metrics.validation_examples,
            metrics_json: fingerprint.clone(),
            updated_at_ms: now_ms,
        };
        match &ev.baseline_for {
            None => self
                .store
                .record_evaluation(&self.run_id, ev.round, &record)?,
            Some(due) => {
                self.store
                    .record_baseline_evaluation(&self.run_id, due.round, ev.round, &record)?
            }
        }
        task.state = TaskState::Uploaded { fingerprint };
        ev.means.add(&s.metrics);
        Ok(Ok(Accepted::New))
    }

    /// Drops silent sites and closes the evaluation at its deadline or once everyone has
    /// answered.
    pub(super) fn tick_evaluation(&mut self, now_ms: i64) -> Result<()> {
        let timeout = self.heartbeat_timeout_ms();
        let Some(ev) = self.eval.as_mut() else {
            return Ok(());
        };
        for site in drop_silent(&mut ev.tasks, &self.last_seen, now_ms, timeout) {
            tracing::warn!(run = %self.run_id, round = ev.round, %site, "a site went silent during the evaluation");
        }
        if now_ms > ev.deadline_ms {
            self.close_evaluation("deadline passed", now_ms)
        } else if all_answered(&ev.tasks) {
            self.close_evaluation("every site answered", now_ms)
        } else {
            Ok(())
        }
    }

    fn close_evaluation(&mut self, why: &str, now_ms: i64) -> Result<()> {
        let Some(mut ev) = self.eval.take() else {
            return Ok(());
        };
        for task in ev.tasks.values_mut() {
            if task.state == TaskState::Pending {
                task.state = TaskState::Late;
            }
        }
        self.live.round_closed(ev.round, &ev.tasks, &self.last_seen);
        let summary = ev.means.summary();
        if let Some(due) = ev.baseline_for.take() {
            tracing::info!(run = %self.run_id, round = ev.round, candidate = due.round,
                sites = summary.sites, "published version evaluated again ({why})");
            self.baseline_due = None;
            return self.decide_paired(due, now_ms);
        }
        let json = serde_json::to_string(&summary)?;
        self.store
            .finish_evaluation(&self.run_id, ev.round, &json)?;
        tracing::info!(
            run = %self.run_id,
            round = ev.round,
            sites = summary.sites,
            accuracy = summary.accuracy,
            macro_f1 = summary.macro_f1,
            "evaluation of round {} done ({why})", ev.round
        );
        self.eval_due = None;
        self.gate_pending = Some(ev.round);
        self.run_gate(now_ms)
    }
}
