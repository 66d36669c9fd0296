//! Collecting and closing a training round: submissions (validated and folded into the
//! round's accumulator), declines, time ticks that drop silent sites, and the close path
//! (quorum check, aggregation, commit) that ends the round.

use crate::config::QuorumFailure;
use crate::store::{RunStatus, SiteOutcome, SiteState};
use crate::{Error, Result};

use super::{
    Accepted, DeltaSource, Phase, Rejection, RoundEngine, Submission, TaskState, all_answered,
    drop_silent,
};

impl RoundEngine {
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
            Err(r) => {
                self.live.rejected(&s.site_id, r);
                // Counted under the round the engine is working on (a site's claimed round
                // number may be anything).
                let round = s.round.min(self.committed + 1);
                self.store
                    .count_rejection(&self.run_id, round, &s.site_id, &r.to_string())?;
            }
        }
        Ok(verdict)
    }

    fn check_and_add(
        &mut self,
        s: &Submission,
        now_ms: i64,
    ) -> Result<std::result::Result<Accepted, Rejection>> {
        // Before anything is decided about it: a ledger of what the coordinator saw.
        let received = crate::strategy::Received {
            round: s.round,
            site_id: &s.site_id,
            task_id: &s.task_id,
            delta_sha256: &s.delta_sha256,
        };
        if let Some(row) = self.strategy.received(received)? {
            self.store.record_site_dp_upload(&self.run_id, &row)?;
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
        // No site's claimed count buys it the round: the weight is capped.
        let weight = match self.strategy.update_weight(&s.report) {
            Ok(w) => w.min(self.cfg.aggregation.max_examples as f64),
            Err(e) => return Ok(Err(Rejection::Invalid(e.to_string()))),
        };
        // The accumulator validates names, shapes, dtype, finiteness and the weight before it
        // changes anything.
        let added = match &s.delta {
            DeltaSource::Params(p) => open.acc.add(p, weight),
            DeltaSource::File(path) => open.acc.add_safetensors_file(path, weight),
        };
        let added = match added {
            Ok(added) => added,
            // The coordinator's own disk failing (spill copy, full disk) is not the site's
            // fault: an internal error, and the site may retry.
            Err(e @ Error::Common(fedflow_common::Error::Io { .. })) => return Err(e),
            Err(e) => return Ok(Err(Rejection::Invalid(e.to_string()))),
        };
        if added.clipped() {
            tracing::warn!(
                run = %self.run_id,
                round = open.round,
                site = %s.site_id,
                "update L2 norm {:.4e} above the bound {:.4e}: clipped to it",
                added.norm,
                self.update_bound.limit()
            );
        }
        task.state = TaskState::Uploaded {
            fingerprint: s.delta_sha256.to_string(),
        };
        open.means.add(&s.metrics);
        open.means.add_upload_bytes(s.delta.len_bytes());
        open.unclipped += u64::from(s.unclipped);
        let outcome = SiteOutcome {
            train_examples: Some(s.report.train_examples),
            weight: Some(weight),
            metrics_json: Some(s.metrics.to_json()),
            delta_sha256: Some(s.delta_sha256.to_string()),
            update_norm: Some(added.norm),
            clipped: Some(added.clipped()),
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

    pub(super) fn heartbeat_timeout_ms(&self) -> i64 {
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
        let quorum = self.strategy.quorum(self.cfg.rounds.min_completed);
        let completed = open.acc.count();
        if completed < quorum {
            let reason = format!("{completed} of the {quorum} updates needed arrived ({why})");
            let pause = self.cfg.rounds.on_quorum_failure == QuorumFailure::Pause;
            return self.fail_attempt(round, &reason, pause);
        }
        crate::memtrace::probe(format_args!("close round={round}"));
        let aggregating = std::time::Instant::now();
        let tally = crate::strategy::RoundTally {
            selected: open.tasks.len() as u64,
            unclipped: open.unclipped,
        };
        let release = self.strategy.release(round, open.acc, tally);
        crate::memtrace::probe(format_args!("finished-mean round={round}"));
        // The strategy's state (momentum) before this round, restored if the round's model
        // is refused: a refused round must leave no trace.
        let prior_state = self.strategy.state().cloned();
        let next = release.and_then(|r| {
            let next = check_release(&r)
                .and_then(|()| self.strategy.aggregate_train(round, &self.global, &r.mean))
                .and_then(check_finite_model);
            next.map(|next| (next, r))
        });
        let (next, crate::strategy::Release { mean, ledger, .. }) = match next {
            Ok(done) => done,
            Err(
                e @ (Error::Common(fedflow_common::Error::Aggregation(_))
                | Error::Common(fedflow_common::Error::NonFinite { .. })
                | Error::Refused(_)),
            ) => {
                self.strategy.restore_state(prior_state);
                return self.refuse_aggregate(round, &e.to_string());
            }
            Err(e) => return Err(e),
        };
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
            ledger.as_ref(),
        )?;
        self.strategy.committed(ledger.as_ref())?;
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
        self.prune(now_ms)?;
        if self.cfg.evaluates_after(round) {
            self.eval_due = Some(round);
            self.phase = Phase::Evaluating;
            self.try_start_evaluation(now_ms)
        } else {
            self.gate_pending = Some(round);
            self.run_gate(now_ms)
        }
    }

    /// Ends the open round's attempt as failed with `reason`: the next attempt follows, or
    /// the run pauses when `pause` is set or the retries (`rounds.max_retries`) are spent.
    fn fail_attempt(&mut self, round: u64, reason: &str, pause: bool) -> Result<()> {
        self.store.fail_round(&self.run_id, round, reason)?;
        self.failures += 1;
        let pause = pause || self.failures > self.cfg.rounds.max_retries;
        tracing::warn!(run = %self.run_id, round, "round {round} failed: {reason:?}");
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
        Ok(())
    }

    /// The round's aggregate is not fit to commit (not finite, or outside the bound its
    /// updates' bound implies): nothing is committed, the attempt fails with the reason, the
    /// round is tried again, and the updates it was made of are named in the security log.
    fn refuse_aggregate(&mut self, round: u64, why: &str) -> Result<()> {
        let reason = format!("the aggregate was refused: {why}");
        tracing::error!(run = %self.run_id, round, "{reason:?}");
        if let Some(log) = &self.security_log {
            // The round's accepted updates, as recorded with each site's outcome.
            let updates: Vec<serde_json::Value> = self
                .store
                .round_sites(&self.run_id, round)?
                .into_iter()
                .filter(|s| s.state == SiteState::Uploaded)
                .map(|s| {
                    serde_json::json!({
                        "site": s.site_id,
                        "norm": s.update_norm,
                        "weight": s.weight,
                    })
                })
                .collect();
            log.record(
                "aggregate_refused",
                serde_json::json!({
                    "run": self.run_id,
                    "round": round,
                    "reason": why,
                    "updates": updates,
                }),
            );
        }
        self.fail_attempt(round, &reason, false)
    }

    /// The committed round needs nothing more: finish the run or wait for the next round.
    pub(super) fn after_round_done(&mut self) -> Result<()> {
        if self.cfg.finished_after(self.committed) {
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

/// Refuses a release whose mean is not finite or exceeds the bound its updates imply.
fn check_release(release: &crate::strategy::Release) -> Result<()> {
    // One pass: the squares of finite f32 values cannot overflow their f64 sum, so the
    // norm is finite exactly when every value is.
    let norm = release.mean.l2_norm()?;
    if !norm.is_finite() {
        return Err(Error::Refused("its values are not all finite".into()));
    }
    if let Some(bound) = release.bound {
        // The bound holds exactly in real arithmetic; allow for the f64 sums and the one
        // rounding to f32.
        if norm > bound * (1.0 + 1e-5) {
            return Err(Error::Refused(format!(
                "its L2 norm {norm:.6e} exceeds {bound:.6e}, the most the round's bounded \
                 updates can give"
            )));
        }
    }
    Ok(())
}

/// The next model, refused unless every value is finite.
fn check_finite_model(
    next: fedflow_common::params::ParamSet,
) -> Result<fedflow_common::params::ParamSet> {
    next.check_finite()?;
    Ok(next)
}
