//! What the round tables overwrite, kept: every failed attempt of a round (a retry reuses
//! the round's row in `rounds`), and a count of refused updates per round and site (a
//! refused update changes nothing else: the count is all that is kept of it, never the
//! update).

use rusqlite::params;
use serde::Serialize;

use fedflow_common::clock::now_ms;

use super::{Store, to_i64};
use crate::Result;

/// Version 4 of the history tables.
pub(super) const SCHEMA_V4: &str = "
CREATE TABLE round_attempts (
    run_id     TEXT NOT NULL REFERENCES runs(run_id),
    round      INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    failed_at  INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    PRIMARY KEY (run_id, round, attempt)
);
CREATE TABLE update_rejections (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    round       INTEGER NOT NULL,
    site_id     TEXT NOT NULL,
    count       INTEGER NOT NULL,
    last_reason TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (run_id, round, site_id)
);
";

/// A failed attempt of a round, as recorded when it failed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailedAttempt {
    /// The round.
    pub round: u64,
    /// 1 for the round's first attempt, and so on.
    pub attempt: u32,
    /// When the attempt began (Unix milliseconds).
    pub started_at_ms: i64,
    /// When it failed (Unix milliseconds).
    pub failed_at_ms: i64,
    /// Why.
    pub reason: String,
}

/// Records the failure of `round`'s open attempt (inside the transaction that marks it
/// failed).
pub(super) fn record_failed_attempt(
    tx: &rusqlite::Transaction<'_>,
    run_id: &str,
    round: u64,
    reason: &str,
) -> Result<()> {
    tx.execute(
        "INSERT INTO round_attempts (run_id, round, attempt, started_at, failed_at, reason)
         SELECT ?1, ?2,
                (SELECT count(*) + 1 FROM round_attempts WHERE run_id = ?1 AND round = ?2),
                started_at, ?3, ?4
         FROM rounds WHERE run_id = ?1 AND round = ?2",
        params![run_id, to_i64(round)?, now_ms(), reason],
    )?;
    Ok(())
}

impl Store {
    /// Counts a refused update from `site` in `round` (the round the engine was working on),
    /// with its reason.
    pub fn count_rejection(
        &mut self,
        run_id: &str,
        round: u64,
        site: &str,
        reason: &str,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO update_rejections (run_id, round, site_id, count, last_reason, updated_at)
             VALUES (?1, ?2, ?3, 1, ?4, ?5)
             ON CONFLICT (run_id, round, site_id) DO UPDATE SET
                 count = count + 1, last_reason = excluded.last_reason,
                 updated_at = excluded.updated_at",
            params![run_id, to_i64(round)?, site, reason, now_ms()],
        )?;
        Ok(())
    }

    /// The refused updates of a run: per round, how many.
    pub fn rejections_by_round(
        &self,
        run_id: &str,
    ) -> Result<std::collections::BTreeMap<u64, u32>> {
        let mut stmt = self.conn.prepare(
            "SELECT round, sum(count) FROM update_rejections WHERE run_id = ?1 GROUP BY round",
        )?;
        let rows = stmt.query_map([run_id], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u32))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The refused updates of every run: per site, how many.
    pub fn rejections_by_site(&self) -> Result<std::collections::BTreeMap<String, u32>> {
        let mut stmt = self
            .conn
            .prepare("SELECT site_id, sum(count) FROM update_rejections GROUP BY site_id")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u32))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every failed attempt of a run's rounds, by round and attempt.
    pub fn failed_attempts(&self, run_id: &str) -> Result<Vec<FailedAttempt>> {
        self.require_run(run_id)?;
        let mut stmt = self.conn.prepare(
            "SELECT round, attempt, started_at, failed_at, reason FROM round_attempts
             WHERE run_id = ?1 ORDER BY round, attempt",
        )?;
        let rows = stmt.query_map([run_id], |r| {
            Ok(FailedAttempt {
                round: r.get::<_, i64>(0)? as u64,
                attempt: r.get::<_, i64>(1)? as u32,
                started_at_ms: r.get(2)?,
                failed_at_ms: r.get(3)?,
                reason: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
