//! The engine's side of the model registry: the publish gate after each committed round,
//! operators' publish and rollback, and retention.
//!
//! The gate runs once per committed round, after its evaluation when the schedule names one
//! (`[publish]`, see [`crate::config::PublishConfig`]). Under `rule = "evaluation"` with a
//! version already published, the published version is evaluated again by the sites that
//! evaluated the candidate (a *baseline evaluation*: the same sites, the same data, the same
//! moment), and the candidate is published when its weighted metric over the sites that
//! reported both is at least the published version's minus `tolerance`. The decision and the
//! publication it leads to are written in one transaction ([`Store::record_gate`]), so a
//! crash either keeps both or neither, and a restart decides again.
//!
//! [`Store::record_gate`]: crate::store::Store::record_gate

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{PublishMetric, PublishRule};
use crate::store::{EvaluationRecord, GateDecision, Publication, PublishAction};
use crate::{Error, Result};

use super::{Phase, RoundEngine};

/// A baseline evaluation waiting to start: the published version `baseline` measured again
/// by `sites`, next to the candidate `round`.
#[derive(Debug, Clone)]
pub(super) struct BaselineDue {
    pub(super) round: u64,
    pub(super) baseline: u64,
    pub(super) baseline_sha256: String,
    pub(super) sites: BTreeSet<String>,
}

/// Each site's weight (validation sessions, capped) and metric, from stored evaluations.
fn site_metrics(
    rows: &[EvaluationRecord],
    metric: PublishMetric,
    max_examples: u64,
) -> BTreeMap<String, (f64, f64)> {
    let key = match metric {
        PublishMetric::Accuracy => "validation_accuracy",
        PublishMetric::MacroF1 => "validation_macro_f1",
    };
    rows.iter()
        .filter_map(|r| {
            let v: serde_json::Value = serde_json::from_str(&r.metrics_json).ok()?;
            let m = v.get(key)?.as_f64().filter(|m| m.is_finite())?;
            let w = r.validation_examples.min(max_examples) as f64;
            (w > 0.0).then(|| (r.site_id.clone(), (w, m)))
        })
        .collect()
}

fn weighted(values: impl Iterator<Item = (f64, f64)>) -> Option<f64> {
    let (sum, weight) = values.fold((0.0, 0.0), |(s, t), (w, m)| (s + w * m, t + w));
    (weight > 0.0).then(|| sum / weight)
}

impl RoundEngine {
    /// The run's published version, if any.
    pub fn published(&self) -> Option<&Publication> {
        self.published.as_ref()
    }

    /// The committed model a site may download by its SHA-256: the current global model,
    /// the model of the open evaluation, or the published version; with its round and file.
    pub fn model_file(&self, sha256: &str) -> Option<(u64, std::path::PathBuf)> {
        let round = if sha256 == self.global_sha256 {
            self.committed
        } else if let Some(ev) = self.eval.as_ref().filter(|e| e.model_sha256 == sha256) {
            ev.round
        } else {
            self.published
                .as_ref()
                .filter(|p| p.model_sha256 == sha256)?
                .round
        };
        Some((round, self.store.model_checkpoint_path(&self.run_id, round)))
    }

    /// Decides about the committed round waiting for the gate, if any; starts a baseline
    /// evaluation when the rule needs one, and otherwise moves on
    /// ([`RoundEngine::after_round_done`]).
    pub(super) fn run_gate(&mut self, now_ms: i64) -> Result<()> {
        let Some(round) = self.gate_pending else {
            return Ok(());
        };
        let p = self.cfg.publish.clone();
        let decision = |published: bool, reason: String| GateDecision {
            round,
            decided_at_ms: now_ms,
            published,
            reason,
            candidate: None,
            baseline: None,
            baseline_round: None,
            sites: 0,
        };
        let decided = match p.rule {
            PublishRule::Manual => decision(false, "publish.rule is \"manual\"".into()),
            PublishRule::Every if round.is_multiple_of(p.every) => {
                decision(true, format!("publish.rule \"every\": round {round}"))
            }
            PublishRule::Every => decision(
                false,
                format!("publish.rule \"every\" publishes every {} rounds", p.every),
            ),
            PublishRule::Evaluation if !self.cfg.evaluates_after(round) => decision(
                false,
                "not evaluated (evaluation.every), so publish.rule \"evaluation\" cannot judge it"
                    .into(),
            ),
            PublishRule::Evaluation => {
                let rows = self.store.evaluations(&self.run_id, round)?;
                let candidate = site_metrics(&rows, p.metric, self.cfg.aggregation.max_examples);
                let metric = p.metric.as_str();
                match self.published.clone() {
                    Some(published) if published.round != round && !candidate.is_empty() => {
                        let due = BaselineDue {
                            round,
                            baseline: published.round,
                            baseline_sha256: published.model_sha256,
                            sites: candidate.keys().cloned().collect(),
                        };
                        tracing::info!(run = %self.run_id, round, baseline = due.baseline,
                            "evaluating the published version again next to round {round}");
                        self.baseline_due = Some(due);
                        self.phase = Phase::Evaluating;
                        return self.try_start_evaluation(now_ms);
                    }
                    Some(_) => decision(
                        false,
                        format!("no site reported a {metric} for this version"),
                    ),
                    None if candidate.len() < p.min_sites => decision(
                        false,
                        format!(
                            "{} site(s) reported a {metric}, publish.min_sites is {}{}",
                            candidate.len(),
                            p.min_sites,
                            if candidate.is_empty() {
                                " (sites that withhold metrics decline evaluations: publish \
                                 by hand or use publish.rule \"every\")"
                            } else {
                                ""
                            }
                        ),
                    ),
                    None => {
                        let value = weighted(candidate.values().copied());
                        GateDecision {
                            candidate: value,
                            sites: candidate.len() as u64,
                            ..decision(
                                true,
                                format!(
                                    "first version evaluated by {} site(s): {metric} {:.4}",
                                    candidate.len(),
                                    value.unwrap_or(f64::NAN)
                                ),
                            )
                        }
                    }
                }
            }
        };
        self.finish_gate(decided)
    }

    /// The baseline evaluation of `due` is complete: compare and decide.
    pub(super) fn decide_paired(&mut self, due: BaselineDue, now_ms: i64) -> Result<()> {
        let p = self.cfg.publish.clone();
        let cap = self.cfg.aggregation.max_examples;
        let candidate = site_metrics(
            &self.store.evaluations(&self.run_id, due.round)?,
            p.metric,
            cap,
        );
        let baseline = site_metrics(
            &self.store.baseline_evaluations(&self.run_id, due.round)?,
            p.metric,
            cap,
        );
        let paired: Vec<&String> = candidate
            .keys()
            .filter(|s| baseline.contains_key(*s))
            .collect();
        // Each side weighted by the same site weights (the candidate's validation counts).
        let c = weighted(paired.iter().map(|s| candidate[*s]));
        let b = weighted(paired.iter().map(|s| (candidate[*s].0, baseline[*s].1)));
        let metric = p.metric.as_str();
        let (published, reason) = match (c, b) {
            _ if paired.len() < p.min_sites => (
                false,
                format!(
                    "{} site(s) reported both versions, publish.min_sites is {}",
                    paired.len(),
                    p.min_sites
                ),
            ),
            (Some(c), Some(b)) if c >= b - p.tolerance => (
                true,
                format!(
                    "{metric} {c:.4} vs {b:.4} for round {} on {} site(s), tolerance {}",
                    due.baseline,
                    paired.len(),
                    p.tolerance
                ),
            ),
            (Some(c), Some(b)) => (
                false,
                format!(
                    "{metric} {c:.4} is worse than round {}'s {b:.4} on the same {} site(s) by \
                     more than the tolerance {}",
                    due.baseline,
                    paired.len(),
                    p.tolerance
                ),
            ),
            _ => (false, format!("no {metric} to compare")),
        };
        self.finish_gate(GateDecision {
            round: due.round,
            decided_at_ms: now_ms,
            published,
            reason,
            candidate: c,
            baseline: b,
            baseline_round: Some(due.baseline),
            sites: paired.len() as u64,
        })
    }

    fn finish_gate(&mut self, decision: GateDecision) -> Result<()> {
        let round = decision.round;
        let publication = self.store.record_gate(&self.run_id, &decision)?;
        crate::failpoint(&format!("after-gate-round-{round}"));
        match &publication {
            Some(p) => {
                tracing::info!(run = %self.run_id, round, "version {round} published: {}", p.reason)
            }
            None => tracing::info!(run = %self.run_id, round,
                "version {round} not published: {}", decision.reason),
        }
        if publication.is_some() {
            self.published = publication;
        }
        self.gate_pending = None;
        self.after_round_done()
    }

    /// An operator publishes a committed version whose checkpoint is kept.
    pub fn publish_version(
        &mut self,
        round: u64,
        by: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Publication> {
        let p = self.store.publish(
            &self.run_id,
            round,
            PublishAction::Publish,
            by,
            reason,
            now_ms,
        )?;
        tracing::info!(run = %self.run_id, round, %by, "version {round} published by an operator");
        self.published = Some(p.clone());
        Ok(p)
    }

    /// An operator undoes the last publication: the version published before the current
    /// one is published again. Publications form a stack (a publication pushes a version,
    /// a rollback pops one), so rolling back twice goes back two versions.
    pub fn rollback(&mut self, by: &str, reason: &str, now_ms: i64) -> Result<Publication> {
        let mut stack: Vec<u64> = Vec::new();
        for p in self.store.publications(&self.run_id)? {
            match p.action {
                PublishAction::Rollback => {
                    stack.pop();
                }
                PublishAction::Gate | PublishAction::Publish => stack.push(p.round),
            }
        }
        let Some(&current) = stack.last() else {
            return Err(Error::Refused(
                "cannot roll back: no version has been published".into(),
            ));
        };
        let Some(&target) = stack.iter().rev().nth(1) else {
            return Err(Error::Refused(format!(
                "cannot roll back: no version was published before version {current}"
            )));
        };
        let p = self.store.publish(
            &self.run_id,
            target,
            PublishAction::Rollback,
            by,
            reason,
            now_ms,
        )?;
        tracing::warn!(run = %self.run_id, round = target, %by,
            "rolled back to version {target} (was {current})");
        self.published = Some(p.clone());
        Ok(p)
    }

    /// Deletes the checkpoints the retention rule no longer keeps (see
    /// [`crate::config::RetentionConfig`]).
    pub(super) fn prune(&mut self, now_ms: i64) -> Result<()> {
        let Some(keep_last) = self.cfg.retention.keep_last(&self.cfg.schedule) else {
            return Ok(());
        };
        let first_kept = self.committed.saturating_sub(keep_last.saturating_sub(1));
        let mut keep: BTreeSet<u64> = (first_kept..=self.committed).collect();
        keep.insert(0);
        let files = self.store.prune_checkpoints(&self.run_id, &keep, now_ms)?;
        if files.is_empty() {
            return Ok(());
        }
        crate::failpoint("during-prune");
        for f in &files {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                // Already gone (a crash after an earlier removal): nothing to do.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(f, e)),
            }
        }
        tracing::info!(run = %self.run_id, files = files.len(), "retention deleted old checkpoints");
        Ok(())
    }

    /// Reads the published version at start and checks its checkpoint's bytes against the
    /// recorded hash.
    pub(super) fn load_published(&mut self) -> Result<()> {
        let Some(p) = self.store.published(&self.run_id)? else {
            return Ok(());
        };
        let path = self.store.model_checkpoint_path(&self.run_id, p.round);
        let (_, _, sha) = fedflow_common::params::ParamSet::load_hashed(&path).map_err(|e| {
            Error::Store(format!(
                "the published version {} of run {} cannot be read ({}): {e}; restore it \
                 from a backup",
                p.round,
                self.run_id,
                path.display()
            ))
        })?;
        if sha != p.model_sha256 {
            return Err(Error::Store(format!(
                "the published version {} of run {} is corrupt: {} has sha256 {sha}, the \
                 registry recorded {}; restore it from a backup",
                p.round,
                self.run_id,
                path.display(),
                p.model_sha256
            )));
        }
        self.published = Some(p);
        Ok(())
    }
}
