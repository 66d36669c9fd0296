//! Collecting and closing a training round: submissions (validated and folded into the
//! round's accumulator), declines, time ticks that drop silent sites, and the close path
//! (quorum check, aggregation, commit) that ends the round.

use crate::config::QuorumFailure;
use crate::store::{RunStatus, SiteOutcome, SiteState};
use crate::{Error, Result};

use super::{
    Accepted, DeltaSource, Phase, Rejection, RoundEngine, Submission, TaskState, accumulator,
    all_answered, drop_silent,
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
    pub(super) fn after_round_done(&mut self) -> Result<()> {
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
