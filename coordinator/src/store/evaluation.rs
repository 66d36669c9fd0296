//! Federated evaluation records: each site's metrics for a committed round's global model,
//! and the round's summary once the evaluation is complete.
//!
//! An evaluation only reads a committed model, so it never touches the training state: a
//! crash during one loses at most the evaluation itself, which is re-run on restart for a
//! round whose `evaluation_json` is still `NULL` (see [`Store::evaluation_pending`]).

use rusqlite::params;
use serde::Serialize;

use fedflow_common::clock::now_ms;

use super::{RoundStatus, Store, check_json, to_i64};
use crate::{Error, Result};

/// One site's evaluation of a committed round's global model, as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvaluationRecord {
    /// The site.
    pub site_id: String,
    /// The evaluation task it was sent.
    pub task_id: String,
    /// Sessions in its validation split.
    pub validation_examples: u64,
    /// The metrics it reported, as JSON.
    pub metrics_json: String,
    /// When it was recorded (Unix milliseconds).
    pub updated_at_ms: i64,
}

impl Store {
    fn require_committed(&self, run_id: &str, round: u64) -> Result<()> {
        match self.round_status(run_id, round)? {
            Some(RoundStatus::Committed) => Ok(()),
            Some(other) => Err(Error::Store(format!(
                "run {run_id} round {round} is {other}; only a committed round's model is evaluated"
            ))),
            None => Err(Error::Store(format!(
                "run {run_id} has no round {round} to evaluate"
            ))),
        }
    }

    /// Starts (or restarts) the evaluation of a committed round: forgets any site results
    /// and summary recorded by an earlier, interrupted attempt.
    pub fn begin_evaluation(&mut self, run_id: &str, round: u64) -> Result<()> {
        self.require_committed(run_id, round)?;
        let r = to_i64(round)?;
        let tx = self.conn.transaction()?;
        tx.execute(
            "DELETE FROM evaluations WHERE run_id = ?1 AND round = ?2",
            params![run_id, r],
        )?;
        tx.execute(
            "UPDATE rounds SET evaluation_json = NULL WHERE run_id = ?1 AND round = ?2",
            params![run_id, r],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records one site's evaluation of a committed round (replacing an earlier one).
    pub fn record_evaluation(
        &mut self,
        run_id: &str,
        round: u64,
        record: &EvaluationRecord,
    ) -> Result<()> {
        self.require_committed(run_id, round)?;
        check_json("metrics_json", &record.metrics_json)?;
        self.conn.execute(
            "INSERT INTO evaluations (run_id, round, site_id, task_id, validation_examples,
                                      metrics_json, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (run_id, round, site_id) DO UPDATE SET
                 task_id = excluded.task_id,
                 validation_examples = excluded.validation_examples,
                 metrics_json = excluded.metrics_json, updated_at = excluded.updated_at",
            params![
                run_id,
                to_i64(round)?,
                record.site_id,
                record.task_id,
                to_i64(record.validation_examples)?,
                record.metrics_json,
                now_ms()
            ],
        )?;
        Ok(())
    }

    /// Records the completed evaluation's summary of a committed round.
    pub fn finish_evaluation(
        &mut self,
        run_id: &str,
        round: u64,
        summary_json: &str,
    ) -> Result<()> {
        self.require_committed(run_id, round)?;
        check_json("evaluation_json", summary_json)?;
        self.conn.execute(
            "UPDATE rounds SET evaluation_json = ?3 WHERE run_id = ?1 AND round = ?2",
            params![run_id, to_i64(round)?, summary_json],
        )?;
        Ok(())
    }

    /// Whether a committed round's evaluation has not completed (never run, or interrupted).
    pub fn evaluation_pending(&self, run_id: &str, round: u64) -> Result<bool> {
        self.require_committed(run_id, round)?;
        let summary: Option<String> = self.conn.query_row(
            "SELECT evaluation_json FROM rounds WHERE run_id = ?1 AND round = ?2",
            params![run_id, to_i64(round)?],
            |r| r.get(0),
        )?;
        Ok(summary.is_none())
    }

    /// The site evaluations of one round, by site id (an error for an unknown run).
    pub fn evaluations(&self, run_id: &str, round: u64) -> Result<Vec<EvaluationRecord>> {
        self.require_run(run_id)?;
        let mut stmt = self.conn.prepare(
            "SELECT site_id, task_id, validation_examples, metrics_json, updated_at
             FROM evaluations WHERE run_id = ?1 AND round = ?2 ORDER BY site_id",
        )?;
        let rows = stmt.query_map(params![run_id, to_i64(round)?], |row| {
            Ok(EvaluationRecord {
                site_id: row.get(0)?,
                task_id: row.get(1)?,
                validation_examples: row.get::<_, i64>(2)? as u64,
                metrics_json: row.get(3)?,
                updated_at_ms: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedflow_common::params::ParamSet;

    fn store_with_round_one() -> (tempfile::TempDir, Store, ParamSet) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let t = candle_core::Tensor::new(&[1.0f32, 2.0], &candle_core::Device::Cpu).unwrap();
        let model = ParamSet::from_tensors([("w".to_string(), t)].into()).unwrap();
        store.create_run("r", "{}", "fedavg", &model).unwrap();
        (dir, store, model)
    }

    fn record(site: &str, examples: u64) -> EvaluationRecord {
        EvaluationRecord {
            site_id: site.into(),
            task_id: format!("task-{site}"),
            validation_examples: examples,
            metrics_json: format!("{{\"validation_examples\":{examples}}}"),
            updated_at_ms: 0,
        }
    }

    #[test]
    fn evaluations_are_recorded_summarised_and_restarted() {
        let (_dir, mut store, _) = store_with_round_one();
        assert!(store.evaluation_pending("r", 0).unwrap());
        store.begin_evaluation("r", 0).unwrap();
        store.record_evaluation("r", 0, &record("b", 7)).unwrap();
        store.record_evaluation("r", 0, &record("a", 3)).unwrap();
        // A resend replaces the row instead of adding one.
        store.record_evaluation("r", 0, &record("a", 4)).unwrap();
        let rows = store.evaluations("r", 0).unwrap();
        let got: Vec<(&str, u64)> = rows
            .iter()
            .map(|r| (r.site_id.as_str(), r.validation_examples))
            .collect();
        assert_eq!(got, [("a", 4), ("b", 7)]);
        assert!(store.evaluation_pending("r", 0).unwrap());

        store.finish_evaluation("r", 0, "{\"sites\":2}").unwrap();
        assert!(!store.evaluation_pending("r", 0).unwrap());
        let round0 = &store.rounds("r").unwrap()[0];
        assert_eq!(round0.evaluation_json.as_deref(), Some("{\"sites\":2}"));

        // Restarting (after a crash) forgets the earlier attempt.
        store.begin_evaluation("r", 0).unwrap();
        assert!(store.evaluations("r", 0).unwrap().is_empty());
        assert!(store.evaluation_pending("r", 0).unwrap());
    }

    #[test]
    fn only_committed_rounds_are_evaluated() {
        let (_dir, mut store, _) = store_with_round_one();
        store
            .begin_round("r", 1, &[("a".into(), "t".into())])
            .unwrap();
        let err = store.begin_evaluation("r", 1).unwrap_err().to_string();
        assert!(err.contains("is open"), "{err}");
        let err = store
            .record_evaluation("r", 5, &record("a", 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no round 5"), "{err}");
        let mut bad = record("a", 1);
        bad.metrics_json = "not json".into();
        assert!(store.record_evaluation("r", 0, &bad).is_err());
        assert!(store.evaluations("r", 0).unwrap().is_empty());
    }
}
