//! The model registry: every committed round is a model version; the `publications` table
//! says which version is *published* (what the sites should serve), by whom and why; the
//! `gate_decisions` table why the publish gate published a version or not; the
//! `baseline_evaluations` table the published version's figures measured again next to a
//! candidate's; and retention, which deletes checkpoints nothing needs any more.
//!
//! Schema version 5:
//!
//! - `publications(seq PK, run_id, round, model_sha256, action, by, reason, published_at)`:
//!   append-only (triggers); the row with the highest `seq` of a run is its published
//!   version. `action` is `gate` (the publish gate), `publish` or `rollback` (an operator,
//!   named in `by`).
//! - `gate_decisions(run_id, round, decided_at, published, reason, candidate, baseline,
//!   baseline_round, sites)`, keyed by `(run_id, round)`: one per committed round the gate
//!   looked at, written in the same transaction as the publication it led to.
//! - `baseline_evaluations(run_id, round, baseline_round, site_id, task_id,
//!   validation_examples, metrics_json, updated_at)`, keyed by `(run_id, round, site_id)`:
//!   each site's evaluation of the published version `baseline_round`, measured right after
//!   its evaluation of the candidate `round`.
//! - `rounds.pruned_at`: when retention deleted the round's checkpoints (`NULL`: kept).
//! - `run_vocabularies(run_id PK, vocab_json, vocab_sha256)`: the vocabulary a run was
//!   created with, so its versions can be exported and warm-started from whatever happens
//!   to the file later.
//!
//! Pruning deletes the checkpoint rows in one transaction and the files afterwards; a crash
//! in between leaves files no row points to, which [`Store::open`] deletes. A published
//! version is never pruned: [`Store::prune_checkpoints`] refuses to, whatever it is asked.

use std::collections::BTreeSet;
use std::path::PathBuf;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::{EvaluationRecord, RoundStatus, Store, check_json, to_i64};
use crate::{Error, Result};

pub(super) const SCHEMA_V5: &str = "
CREATE TABLE publications (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id        TEXT NOT NULL REFERENCES runs(run_id),
    round         INTEGER NOT NULL CHECK (round >= 0),
    model_sha256  TEXT NOT NULL,
    action        TEXT NOT NULL CHECK (action IN ('gate', 'publish', 'rollback')),
    by            TEXT NOT NULL,
    reason        TEXT NOT NULL,
    published_at  INTEGER NOT NULL
);
CREATE INDEX publications_by_run ON publications (run_id, seq);
CREATE TRIGGER publications_no_update BEFORE UPDATE ON publications
BEGIN SELECT RAISE(ABORT, 'publications are append-only'); END;
CREATE TRIGGER publications_no_delete BEFORE DELETE ON publications
BEGIN SELECT RAISE(ABORT, 'publications are append-only'); END;
CREATE TABLE gate_decisions (
    run_id          TEXT NOT NULL REFERENCES runs(run_id),
    round           INTEGER NOT NULL,
    decided_at      INTEGER NOT NULL,
    published       INTEGER NOT NULL CHECK (published IN (0, 1)),
    reason          TEXT NOT NULL,
    candidate       REAL,
    baseline        REAL,
    baseline_round  INTEGER,
    sites           INTEGER NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE baseline_evaluations (
    run_id              TEXT NOT NULL REFERENCES runs(run_id),
    round               INTEGER NOT NULL,
    baseline_round      INTEGER NOT NULL,
    site_id             TEXT NOT NULL,
    task_id             TEXT NOT NULL,
    validation_examples INTEGER NOT NULL,
    metrics_json        TEXT NOT NULL,
    updated_at          INTEGER NOT NULL,
    PRIMARY KEY (run_id, round, site_id)
);
ALTER TABLE rounds ADD COLUMN pruned_at INTEGER;
CREATE TABLE run_vocabularies (
    run_id        TEXT PRIMARY KEY NOT NULL REFERENCES runs(run_id),
    vocab_json    TEXT NOT NULL,
    vocab_sha256  TEXT NOT NULL
);
";

/// Who changed the published version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishAction {
    /// The publish gate, after an evaluation or by the `every` rule.
    Gate,
    /// An operator published a version.
    Publish,
    /// An operator went back to the version published before the current one.
    Rollback,
}

impl PublishAction {
    /// The value stored in `publications.action`.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishAction::Gate => "gate",
            PublishAction::Publish => "publish",
            PublishAction::Rollback => "rollback",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        match s {
            "gate" => Ok(PublishAction::Gate),
            "publish" => Ok(PublishAction::Publish),
            "rollback" => Ok(PublishAction::Rollback),
            other => Err(Error::Store(format!(
                "publications.action holds {other:?}; the database is inconsistent"
            ))),
        }
    }
}

/// One change of a run's published version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Publication {
    /// Position in the run's history (increasing).
    pub seq: u64,
    /// The published round.
    pub round: u64,
    /// Its model's SHA-256.
    pub model_sha256: String,
    /// Who published it.
    pub action: PublishAction,
    /// `gate`, or the operator's identity.
    pub by: String,
    /// Why.
    pub reason: String,
    /// When (Unix milliseconds).
    pub published_at_ms: i64,
}

/// What the publish gate decided about one committed round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateDecision {
    /// The candidate round.
    pub round: u64,
    /// When (Unix milliseconds).
    pub decided_at_ms: i64,
    /// Whether it was published.
    pub published: bool,
    /// Why (or why not).
    pub reason: String,
    /// The candidate's metric over the compared sites.
    pub candidate: Option<f64>,
    /// The published version's metric over the same sites.
    pub baseline: Option<f64>,
    /// The published version it was compared with.
    pub baseline_round: Option<u64>,
    /// Sites the decision rests on.
    pub sites: u64,
}

impl Store {
    /// Records the vocabulary (canonical JSON) run `run_id` was created with; a second call
    /// must give the same one.
    pub fn record_vocabulary(&mut self, run_id: &str, vocab_json: &str) -> Result<()> {
        let sha = fedflow_common::hash::sha256_hex(vocab_json.as_bytes());
        if let Some((_, known)) = self.run_vocabulary(run_id)? {
            if known != sha {
                return Err(Error::ConfigMismatch(format!(
                    "run {run_id} was created with vocabulary {known}, not {sha}"
                )));
            }
            return Ok(());
        }
        self.conn.execute(
            "INSERT INTO run_vocabularies (run_id, vocab_json, vocab_sha256) VALUES (?1, ?2, ?3)",
            params![run_id, vocab_json, sha],
        )?;
        Ok(())
    }

    /// The vocabulary a run was created with (canonical JSON and its SHA-256), when it is
    /// recorded (runs created before schema version 5 have none).
    pub fn run_vocabulary(&self, run_id: &str) -> Result<Option<(String, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT vocab_json, vocab_sha256 FROM run_vocabularies WHERE run_id = ?1",
                [run_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// The run's published version, if any.
    pub fn published(&self, run_id: &str) -> Result<Option<Publication>> {
        self.require_run(run_id)?;
        Ok(self
            .select_publications(run_id, "ORDER BY seq DESC LIMIT 1")?
            .pop())
    }

    /// Every change of the run's published version, oldest first.
    pub fn publications(&self, run_id: &str) -> Result<Vec<Publication>> {
        self.require_run(run_id)?;
        self.select_publications(run_id, "ORDER BY seq")
    }

    fn select_publications(&self, run_id: &str, tail: &str) -> Result<Vec<Publication>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT seq, round, model_sha256, action, by, reason, published_at
             FROM publications WHERE run_id = ?1 {tail}"
        ))?;
        let rows = stmt.query_map([run_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, round, model_sha256, action, by, reason, at) = row?;
            out.push(Publication {
                seq: seq as u64,
                round: round as u64,
                model_sha256,
                action: PublishAction::parse(&action)?,
                by,
                reason,
                published_at_ms: at,
            });
        }
        Ok(out)
    }

    /// The model hash of a committed round whose checkpoint is still kept, or why it cannot
    /// be published.
    pub fn publishable(&self, run_id: &str, round: u64) -> Result<String> {
        match self.round_status(run_id, round)? {
            Some(RoundStatus::Committed) => {}
            Some(other) => {
                return Err(Error::Refused(format!(
                    "run {run_id} round {round} is {other}; only a committed round is a version"
                )));
            }
            None => {
                return Err(Error::Refused(format!("run {run_id} has no round {round}")));
            }
        }
        let (sha, pruned): (String, Option<i64>) = self.conn.query_row(
            "SELECT model_sha256, pruned_at FROM rounds WHERE run_id = ?1 AND round = ?2",
            params![run_id, to_i64(round)?],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if pruned.is_some() {
            return Err(Error::Refused(format!(
                "run {run_id} round {round}: its checkpoint was deleted by the retention rule \
                 ([retention] keep_last); publish a kept version"
            )));
        }
        Ok(sha)
    }

    /// Publishes a committed, kept round (an operator's action or a rollback) and returns the
    /// publication. With a gate decision, both are written in one transaction.
    pub fn publish(
        &mut self,
        run_id: &str,
        round: u64,
        action: PublishAction,
        by: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Publication> {
        let sha = self.publishable(run_id, round)?;
        let tx = self.conn.transaction()?;
        let seq = insert_publication(&tx, run_id, round, &sha, action, by, reason, now_ms)?;
        tx.commit()?;
        Ok(Publication {
            seq,
            round,
            model_sha256: sha,
            action,
            by: by.to_owned(),
            reason: reason.to_owned(),
            published_at_ms: now_ms,
        })
    }

    /// Records the gate's decision about a committed round and, when it published, the
    /// publication, in one transaction.
    pub fn record_gate(
        &mut self,
        run_id: &str,
        decision: &GateDecision,
    ) -> Result<Option<Publication>> {
        let sha = if decision.published {
            Some(self.publishable(run_id, decision.round)?)
        } else {
            None
        };
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO gate_decisions (run_id, round, decided_at, published, reason,
                                         candidate, baseline, baseline_round, sites)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (run_id, round) DO UPDATE SET
                 decided_at = excluded.decided_at, published = excluded.published,
                 reason = excluded.reason, candidate = excluded.candidate,
                 baseline = excluded.baseline, baseline_round = excluded.baseline_round,
                 sites = excluded.sites",
            params![
                run_id,
                to_i64(decision.round)?,
                decision.decided_at_ms,
                decision.published as i64,
                decision.reason,
                decision.candidate,
                decision.baseline,
                decision.baseline_round.map(to_i64).transpose()?,
                to_i64(decision.sites)?,
            ],
        )?;
        let publication = match sha {
            Some(sha) => {
                // Inside the transaction: a crash here keeps neither row.
                crate::failpoint(&format!("during-publish-round-{}", decision.round));
                let seq = insert_publication(
                    &tx,
                    run_id,
                    decision.round,
                    &sha,
                    PublishAction::Gate,
                    "gate",
                    &decision.reason,
                    decision.decided_at_ms,
                )?;
                Some(Publication {
                    seq,
                    round: decision.round,
                    model_sha256: sha,
                    action: PublishAction::Gate,
                    by: "gate".into(),
                    reason: decision.reason.clone(),
                    published_at_ms: decision.decided_at_ms,
                })
            }
            None => None,
        };
        tx.commit()?;
        Ok(publication)
    }

    /// The gate's decisions, by round.
    pub fn gate_decisions(&self, run_id: &str) -> Result<Vec<GateDecision>> {
        self.require_run(run_id)?;
        let mut stmt = self.conn.prepare(
            "SELECT round, decided_at, published, reason, candidate, baseline, baseline_round,
                    sites
             FROM gate_decisions WHERE run_id = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([run_id], |r| {
            Ok(GateDecision {
                round: r.get::<_, i64>(0)? as u64,
                decided_at_ms: r.get(1)?,
                published: r.get::<_, i64>(2)? != 0,
                reason: r.get(3)?,
                candidate: r.get(4)?,
                baseline: r.get(5)?,
                baseline_round: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
                sites: r.get::<_, i64>(7)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Whether the gate has decided about `round`.
    pub fn gate_decided(&self, run_id: &str, round: u64) -> Result<bool> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM gate_decisions WHERE run_id = ?1 AND round = ?2",
            params![run_id, to_i64(round)?],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    /// Starts (or restarts) the evaluation of the published version `baseline` next to the
    /// candidate `round`: forgets what an interrupted attempt recorded.
    pub fn begin_baseline_evaluation(&mut self, run_id: &str, round: u64) -> Result<()> {
        self.conn.execute(
            "DELETE FROM baseline_evaluations WHERE run_id = ?1 AND round = ?2",
            params![run_id, to_i64(round)?],
        )?;
        Ok(())
    }

    /// Records one site's evaluation of the published version `baseline_round`, measured
    /// next to the candidate `round`.
    pub fn record_baseline_evaluation(
        &mut self,
        run_id: &str,
        round: u64,
        baseline_round: u64,
        record: &EvaluationRecord,
    ) -> Result<()> {
        check_json("metrics_json", &record.metrics_json)?;
        self.conn.execute(
            "INSERT INTO baseline_evaluations (run_id, round, baseline_round, site_id, task_id,
                                               validation_examples, metrics_json, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (run_id, round, site_id) DO UPDATE SET
                 baseline_round = excluded.baseline_round, task_id = excluded.task_id,
                 validation_examples = excluded.validation_examples,
                 metrics_json = excluded.metrics_json, updated_at = excluded.updated_at",
            params![
                run_id,
                to_i64(round)?,
                to_i64(baseline_round)?,
                record.site_id,
                record.task_id,
                to_i64(record.validation_examples)?,
                record.metrics_json,
                record.updated_at_ms,
            ],
        )?;
        Ok(())
    }

    /// The sites' evaluations of the published version measured next to candidate `round`.
    pub fn baseline_evaluations(&self, run_id: &str, round: u64) -> Result<Vec<EvaluationRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT site_id, task_id, validation_examples, metrics_json, updated_at
             FROM baseline_evaluations WHERE run_id = ?1 AND round = ?2 ORDER BY site_id",
        )?;
        let rows = stmt.query_map(params![run_id, to_i64(round)?], |r| {
            Ok(EvaluationRecord {
                site_id: r.get(0)?,
                task_id: r.get(1)?,
                validation_examples: r.get::<_, i64>(2)? as u64,
                metrics_json: r.get(3)?,
                updated_at_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Committed rounds whose checkpoints are still kept, in order.
    pub fn kept_rounds(&self, run_id: &str) -> Result<Vec<u64>> {
        let mut stmt = self.conn.prepare(
            "SELECT round FROM rounds
             WHERE run_id = ?1 AND status = 'committed' AND pruned_at IS NULL ORDER BY round",
        )?;
        let rows = stmt.query_map([run_id], |r| r.get::<_, i64>(0))?;
        Ok(rows
            .map(|r| r.map(|v| v as u64))
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes the checkpoint rows of every kept committed round not in `keep` (never a
    /// published version's, never the last committed round's) and marks those rounds pruned,
    /// in one transaction; returns the files to delete next (see the module docs).
    pub fn prune_checkpoints(
        &mut self,
        run_id: &str,
        keep: &BTreeSet<u64>,
        now_ms: i64,
    ) -> Result<Vec<PathBuf>> {
        let mut keep = keep.clone();
        keep.insert(self.last_committed(run_id)?);
        keep.extend(self.publications(run_id)?.iter().map(|p| p.round));
        let doomed: Vec<u64> = self
            .kept_rounds(run_id)?
            .into_iter()
            .filter(|r| !keep.contains(r))
            .collect();
        if doomed.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.conn.transaction()?;
        let mut files = Vec::new();
        for round in doomed {
            let r = to_i64(round)?;
            {
                let mut stmt =
                    tx.prepare("SELECT path FROM checkpoints WHERE run_id = ?1 AND round = ?2")?;
                let paths = stmt.query_map(params![run_id, r], |row| row.get::<_, String>(0))?;
                for p in paths {
                    files.push(self.dir.join(p?));
                }
            }
            tx.execute(
                "DELETE FROM checkpoints WHERE run_id = ?1 AND round = ?2",
                params![run_id, r],
            )?;
            tx.execute(
                "UPDATE rounds SET pruned_at = ?3 WHERE run_id = ?1 AND round = ?2",
                params![run_id, r, now_ms],
            )?;
        }
        tx.commit()?;
        Ok(files)
    }

    /// Whether a committed round's checkpoint was deleted by retention.
    pub fn pruned(&self, run_id: &str, round: u64) -> Result<bool> {
        let at: Option<Option<i64>> = self
            .conn
            .query_row(
                "SELECT pruned_at FROM rounds WHERE run_id = ?1 AND round = ?2",
                params![run_id, to_i64(round)?],
                |r| r.get(0),
            )
            .optional()?;
        Ok(matches!(at, Some(Some(_))))
    }
}

#[allow(clippy::too_many_arguments)]
fn insert_publication(
    tx: &rusqlite::Transaction<'_>,
    run_id: &str,
    round: u64,
    sha: &str,
    action: PublishAction,
    by: &str,
    reason: &str,
    now_ms: i64,
) -> Result<u64> {
    tx.execute(
        "INSERT INTO publications (run_id, round, model_sha256, action, by, reason,
                                   published_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            run_id,
            to_i64(round)?,
            sha,
            action.as_str(),
            by,
            reason,
            now_ms
        ],
    )?;
    Ok(tx.last_insert_rowid() as u64)
}
