//! Operator actions on the run: pause, resume, stop. Each is stored with its reason before
//! the engine acts on it, so a restart keeps the run where the operator put it.

use super::{Phase, RoundEngine};
use crate::store::RunStatus;
use crate::{Error, Result};

/// Why an operator action cannot be taken.
fn refuse(what: &str, why: &str) -> Error {
    Error::Refused(format!("cannot {what} the run: {why}"))
}

impl RoundEngine {
    /// Pauses the run: a round or evaluation already open completes, and no new one starts
    /// until [`RoundEngine::resume`]. Pausing a paused run changes nothing.
    pub fn pause(&mut self, reason: &str) -> Result<Phase> {
        match self.phase {
            Phase::Finished => return Err(refuse("pause", "it has ended")),
            Phase::Paused if self.held => return Ok(self.phase),
            _ => {}
        }
        self.store
            .set_run_status(&self.run_id, RunStatus::Paused, Some(reason))?;
        self.held = true;
        if self.open.is_none() && self.eval.is_none() {
            self.phase = Phase::Paused;
        }
        tracing::info!(run = %self.run_id, "run paused: {reason}");
        Ok(self.phase)
    }

    /// Resumes a run paused by an operator or by quorum failures (which start counting
    /// again). Resuming a running run changes nothing.
    pub fn resume(&mut self, reason: &str) -> Result<Phase> {
        if self.phase == Phase::Finished {
            return Err(refuse("resume", "it has ended"));
        }
        if !self.held && self.phase != Phase::Paused {
            return Ok(self.phase);
        }
        self.store
            .set_run_status(&self.run_id, RunStatus::Running, None)?;
        self.held = false;
        self.failures = 0;
        if self.open.is_some() {
            self.phase = Phase::Training;
        } else if self.eval.is_some() || self.eval_due.is_some() || self.baseline_due.is_some() {
            self.phase = Phase::Evaluating;
        } else if self.cfg.finished_after(self.committed) {
            self.store
                .set_run_status(&self.run_id, RunStatus::Finished, None)?;
            self.phase = Phase::Finished;
        } else {
            self.phase = Phase::Waiting;
        }
        tracing::info!(run = %self.run_id, "run resumed: {reason}");
        Ok(self.phase)
    }

    /// Stops the run for good: an open round is discarded (recorded as failed with the
    /// reason; nothing from it is applied), an open evaluation abandoned, and the sites are
    /// told the run is over.
    pub fn stop(&mut self, reason: &str) -> Result<Phase> {
        if self.phase == Phase::Finished {
            return Err(refuse("stop", "it has ended"));
        }
        // Stored first: if a write fails, the engine is left as it was.
        if let Some(open) = &self.open {
            self.store
                .fail_round(&self.run_id, open.round, &format!("stopped: {reason}"))?;
        }
        self.store
            .set_run_status(&self.run_id, RunStatus::Stopped, Some(reason))?;
        if let Some(open) = self.open.take() {
            self.last_closed = Some(open.round);
        }
        self.eval = None;
        self.eval_due = None;
        self.baseline_due = None;
        self.held = false;
        self.phase = Phase::Finished;
        tracing::info!(run = %self.run_id, "run stopped: {reason}");
        Ok(self.phase)
    }

    /// Forgets a revoked site: it is no longer available for selection, and a task it holds
    /// in the open round is withdrawn (recorded as dropped, with the reason), so the round
    /// does not wait for it.
    pub fn forget_site(&mut self, site: &str, reason: &str) -> Result<()> {
        self.last_seen.remove(site);
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        let round = open.round;
        if let Some(task) = open.tasks.get_mut(site)
            && task.state == super::TaskState::Pending
        {
            task.state = super::TaskState::Dropped;
            self.store.record_site(
                &self.run_id,
                round,
                &crate::store::SiteOutcome::new(
                    site.to_string(),
                    crate::store::SiteState::Dropped,
                    Some(reason.to_string()),
                ),
            )?;
        }
        Ok(())
    }

    /// Whether an operator has paused the run (it may still be finishing an open round).
    pub fn held(&self) -> bool {
        self.held
    }
}
