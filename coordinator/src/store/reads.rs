//! The store's read queries: runs, rounds, per-site outcomes and sites, for status views,
//! reports and resumption.

use rusqlite::{OptionalExtension, params};

use super::{
    RoundRecord, RoundSiteRecord, RoundStatus, RunRecord, RunStatus, SiteCounts, SiteRecord,
    SiteState, Store, to_i64,
};
use crate::Result;

impl Store {
    /// One run, if it exists.
    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        self.conn
            .query_row(
                &format!("{RUN_SELECT} WHERE run_id = ?1"),
                [run_id],
                run_row,
            )
            .optional()?
            .transpose()
    }

    /// All runs, oldest first.
    pub fn runs(&self) -> Result<Vec<RunRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!("{RUN_SELECT} ORDER BY created_at, run_id"))?;
        let rows = stmt.query_map([], run_row)?;
        rows.map(|r| r?).collect()
    }

    /// A run's rounds in order (an error for an unknown run).
    pub fn rounds(&self, run_id: &str) -> Result<Vec<RoundRecord>> {
        self.require_run(run_id)?;
        let mut stmt = self.conn.prepare(
            "SELECT round, status, started_at, committed_at, model_sha256, strategy_sha256,
                    failure_reason, metrics_json, evaluation_json
             FROM rounds WHERE run_id = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([run_id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                RoundRecord {
                    round: 0,
                    status: RoundStatus::Open,
                    started_at_ms: row.get(2)?,
                    committed_at_ms: row.get(3)?,
                    model_sha256: row.get(4)?,
                    strategy_sha256: row.get(5)?,
                    failure_reason: row.get(6)?,
                    metrics_json: row.get(7)?,
                    evaluation_json: row.get(8)?,
                },
            ))
        })?;
        rows.map(|r| {
            let (round, status, rec) = r?;
            Ok(RoundRecord {
                round: round as u64,
                status: status.parse()?,
                ..rec
            })
        })
        .collect()
    }

    /// The sites of one round, by site id (an error for an unknown run).
    pub fn round_sites(&self, run_id: &str, round: u64) -> Result<Vec<RoundSiteRecord>> {
        self.require_run(run_id)?;
        let mut stmt = self.conn.prepare(
            "SELECT site_id, task_id, state, reason, train_examples, weight, metrics_json,
                    delta_sha256, updated_at, update_norm, clipped
             FROM round_sites WHERE run_id = ?1 AND round = ?2 ORDER BY site_id",
        )?;
        let rows = stmt.query_map(params![run_id, to_i64(round)?], |row| {
            Ok((
                row.get::<_, String>(2)?,
                row.get::<_, Option<i64>>(4)?,
                RoundSiteRecord {
                    site_id: row.get(0)?,
                    task_id: row.get(1)?,
                    state: SiteState::Selected,
                    reason: row.get(3)?,
                    train_examples: None,
                    weight: row.get(5)?,
                    metrics_json: row.get(6)?,
                    delta_sha256: row.get(7)?,
                    update_norm: row.get(9)?,
                    clipped: row.get(10)?,
                    updated_at_ms: row.get(8)?,
                },
            ))
        })?;
        rows.map(|r| {
            let (state, examples, rec) = r?;
            Ok(RoundSiteRecord {
                state: state.parse()?,
                train_examples: examples.map(|e| e as u64),
                ..rec
            })
        })
        .collect()
    }

    /// All sites ever seen, by site id.
    pub fn sites(&self) -> Result<Vec<SiteRecord>> {
        let mut stmt = self
            .conn
            .prepare("SELECT site_id, first_seen, last_seen FROM sites ORDER BY site_id")?;
        let rows = stmt.query_map([], |row| {
            Ok(SiteRecord {
                site_id: row.get(0)?,
                first_seen_ms: row.get(1)?,
                last_seen_ms: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// For every site, how many rounds ended in each state for it (across all runs).
    pub fn site_outcome_counts(&self) -> Result<std::collections::BTreeMap<String, SiteCounts>> {
        let mut stmt = self
            .conn
            .prepare("SELECT site_id, state, count(*) FROM round_sites GROUP BY site_id, state")?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = std::collections::BTreeMap::<String, SiteCounts>::new();
        for r in rows {
            let (site, state, n) = r?;
            let c = out.entry(site).or_default();
            let n = n as u32;
            match state.parse::<SiteState>()? {
                SiteState::Selected => c.selected += n,
                SiteState::Uploaded => c.uploaded += n,
                SiteState::Late => c.late += n,
                SiteState::Dropped => c.dropped += n,
                SiteState::Rejected => c.rejected += n,
                SiteState::Declined => c.declined += n,
            }
        }
        // Refused updates change nothing in `round_sites`; they are counted apart.
        for (site, n) in self.rejections_by_site()? {
            out.entry(site).or_default().rejected += n;
        }
        Ok(out)
    }
}

const RUN_SELECT: &str =
    "SELECT run_id, created_at, config_json, strategy, status, status_reason FROM runs";

fn run_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<RunRecord>> {
    let status: String = row.get(4)?;
    let rec = RunRecord {
        run_id: row.get(0)?,
        created_at_ms: row.get(1)?,
        config_json: row.get(2)?,
        strategy: row.get(3)?,
        status: RunStatus::Running,
        status_reason: row.get(5)?,
    };
    Ok(status.parse().map(|status| RunRecord { status, ..rec }))
}
