//! The coordinator's durable state: runs, rounds, per-site outcomes and model checkpoints,
//! kept so that a crash (even `kill -9`) at any moment resumes at the last committed round
//! with the identical global model.
//!
//! # Layout
//!
//! ```text
//! <dir>/fedflow.sqlite                                          the database (WAL mode)
//! <dir>/checkpoints/<run_id>/round-<NNNNNN>.safetensors          global model after a round
//! <dir>/checkpoints/<run_id>/round-<NNNNNN>.strategy.safetensors strategy state (optional)
//! ```
//!
//! # Crash safety
//!
//! A round is committed in two steps, in this order:
//!
//! 1. the checkpoint file(s) are written with
//!    [`write_atomic_with`](fedflow_common::fsio::write_atomic_with) (temporary file, fsync,
//!    rename, directory fsync), so they are complete and durable; they are streamed tensor
//!    by tensor and hashed on the way ([`ParamSet::save`]), never held serialised in memory;
//! 2. one SQL transaction marks the round committed with the model's SHA-256 and records a
//!    row per checkpoint file.
//!
//! A crash before step 2 leaves a file no committed row points to: it is ignored, and
//! [`Store::open`] deletes it. A crash during step 2 is undone by SQLite. A round that was
//! begun but not committed stays `open`; beginning it again discards its site rows, so it is
//! re-run from scratch and never half-applied. [`Store::resume_point`] verifies the
//! checkpoint's bytes against the recorded hash before it hands the model out.
//!
//! The database runs in WAL mode with `synchronous=FULL` (a commit is on disk when it
//! returns) and foreign keys on. The writer holds an exclusive lock on `<dir>/store.lock`
//! for as long as it is open, so a second coordinator on the same directory is refused
//! instead of racing the first (its orphan cleanup could otherwise delete a checkpoint the
//! first has written but not yet committed). Readers ([`Store::open_read_only`], the
//! `report` and `privacy-report` commands) need no lock: WAL gives each read a consistent
//! snapshot of the last committed state while the coordinator keeps writing.
//!
//! # Schema (version 7, in `PRAGMA user_version`)
//!
//! Times are Unix milliseconds (`INTEGER`); `*_json` columns hold JSON text.
//!
//! - `runs(run_id PK, created_at, config_json, strategy, status, status_reason)`;
//!   `status` is one of `running`, `paused`, `finished`, `stopped`.
//! - `rounds(run_id, round, status, started_at, committed_at, model_sha256,
//!   strategy_sha256, failure_reason, metrics_json, evaluation_json)`, keyed by
//!   `(run_id, round)`; `status` is `open`, `committed` or `failed`. Round 0 is the initial
//!   model, committed by [`Store::create_run`]. `metrics_json` holds the training metrics
//!   recorded at commit, `evaluation_json` the federated evaluation of the committed model
//!   once it is complete (`NULL` while none has completed).
//! - `evaluations(run_id, round, site_id, task_id, validation_examples, metrics_json,
//!   updated_at)`, keyed by `(run_id, round, site_id)`: each site's evaluation of a
//!   committed round's global model.
//! - `round_sites(run_id, round, site_id, task_id, state, reason, train_examples, weight,
//!   metrics_json, delta_sha256, updated_at, update_norm, clipped)`, keyed by `(run_id, round, site_id)`; `state`
//!   is `selected`, `uploaded`, `late`, `dropped`, `rejected` or `declined`.
//! - `sites(site_id PK, first_seen, last_seen)`.
//! - `round_attempts(run_id, round, attempt, started_at, failed_at, reason)`: every failed
//!   attempt of a round, kept when it is retried; `update_rejections(run_id, round, site_id,
//!   count, last_reason, updated_at)`: how many updates were refused (`history.rs`).
//! - `checkpoints(run_id, round, kind, path, sha256, size_bytes, created_at)`, keyed by
//!   `(run_id, round, kind)`; `kind` is `model` or `strategy`, `path` is relative to the
//!   data directory.
//!
//! Version 2 adds the site-level privacy ledger (`site_dp_rounds`, `site_dp_uploads`,
//! append-only; see `privacy.rs`); version 3 the revoked identities and certificates
//! (`revocations`, append-only; see `revocations.rs`); version 4 the ledger's
//! `seeded_randomness` column, `round_sites.update_norm`, `round_sites.clipped` and the
//! history tables; version 5 the model registry (`publications`, `gate_decisions`,
//! `baseline_evaluations`, `rounds.pruned_at`; see `registry.rs`); version 6 the one-time
//! enrolment tokens (`enrolment_tokens`; see `enrolment.rs`); version 7
//! `site_dp_rounds.epsilon_pld`. Older databases are upgraded
//! in place on open.
//!
//! A database with a newer `user_version` than this build knows is refused.
//!
//! The API is synchronous (rusqlite blocks): async callers run it in `spawn_blocking`.
//!
//! This file (about 725 lines, a tenth of them this documentation) keeps opening, the schema
//! and the round-lifecycle writes together because they share one transaction discipline;
//! checkpoint files are in `checkpoints.rs`, the kept history in `history.rs`, reads and
//! records in their own files.

use fedflow_common::clock::now_ms;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use fedflow_common::params::ParamSet;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::{Error, Result};
use checkpoints::{CheckpointKind, insert_checkpoint};

mod checkpoints;
mod enrolment;
mod evaluation;
mod history;
mod privacy;
mod reads;
mod records;
mod registry;
mod revocations;

pub use enrolment::{NewToken, Redeemed, TokenRefusal};
pub use evaluation::EvaluationRecord;
pub use history::FailedAttempt;
pub use privacy::{SiteDpRound, SiteDpUpload};
pub use records::{
    Resume, RoundRecord, RoundSiteRecord, RoundStatus, RunRecord, RunStatus, SiteCounts,
    SiteOutcome, SiteRecord, SiteState,
};
pub use registry::{GateDecision, Publication, PublishAction};
pub use revocations::RevocationRecord;

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = 7;

/// Version 4 of the round tables: each accepted update's norm and whether it was clipped
/// (`round_sites`; empty for rows written before).
const SCHEMA_V4: &str = "
ALTER TABLE round_sites ADD COLUMN update_norm REAL;
ALTER TABLE round_sites ADD COLUMN clipped INTEGER CHECK (clipped IN (0, 1));
";

/// The database's file name inside the data directory.
pub const DB_FILE: &str = "fedflow.sqlite";

/// The file the one writer of a data directory holds locked while it is open.
pub const LOCK_FILE: &str = "store.lock";

/// The checkpoint folder's name inside the data directory.
pub const CHECKPOINT_DIR: &str = "checkpoints";

const SCHEMA_V1: &str = "
CREATE TABLE runs (
    run_id        TEXT PRIMARY KEY NOT NULL,
    created_at    INTEGER NOT NULL,
    config_json   TEXT NOT NULL,
    strategy      TEXT NOT NULL,
    status        TEXT NOT NULL
                  CHECK (status IN ('running', 'paused', 'finished', 'stopped')),
    status_reason TEXT
);
CREATE TABLE rounds (
    run_id          TEXT NOT NULL REFERENCES runs(run_id),
    round           INTEGER NOT NULL CHECK (round >= 0),
    status          TEXT NOT NULL CHECK (status IN ('open', 'committed', 'failed')),
    started_at      INTEGER NOT NULL,
    committed_at    INTEGER,
    model_sha256    TEXT,
    strategy_sha256 TEXT,
    failure_reason  TEXT,
    metrics_json    TEXT,
    evaluation_json TEXT,
    PRIMARY KEY (run_id, round),
    CHECK (status <> 'committed' OR (model_sha256 IS NOT NULL AND committed_at IS NOT NULL))
);
CREATE TABLE round_sites (
    run_id         TEXT NOT NULL,
    round          INTEGER NOT NULL,
    site_id        TEXT NOT NULL,
    task_id        TEXT,
    state          TEXT NOT NULL
                   CHECK (state IN ('selected', 'uploaded', 'late', 'dropped', 'rejected',
                                    'declined')),
    reason         TEXT,
    train_examples INTEGER,
    weight         REAL,
    metrics_json   TEXT,
    delta_sha256   TEXT,
    updated_at     INTEGER NOT NULL,
    PRIMARY KEY (run_id, round, site_id),
    FOREIGN KEY (run_id, round) REFERENCES rounds(run_id, round) ON DELETE CASCADE
);
CREATE TABLE evaluations (
    run_id              TEXT NOT NULL,
    round               INTEGER NOT NULL,
    site_id             TEXT NOT NULL,
    task_id             TEXT NOT NULL,
    validation_examples INTEGER NOT NULL,
    metrics_json        TEXT NOT NULL,
    updated_at          INTEGER NOT NULL,
    PRIMARY KEY (run_id, round, site_id),
    FOREIGN KEY (run_id, round) REFERENCES rounds(run_id, round) ON DELETE CASCADE
);
CREATE TABLE sites (
    site_id    TEXT PRIMARY KEY NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL
);
CREATE TABLE checkpoints (
    run_id     TEXT NOT NULL,
    round      INTEGER NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('model', 'strategy')),
    path       TEXT NOT NULL UNIQUE,
    sha256     TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, round, kind),
    FOREIGN KEY (run_id, round) REFERENCES rounds(run_id, round) ON DELETE CASCADE
);
";

// --- The store ------------------------------------------------------------------------------

/// The coordinator's durable state in one data directory (see the module docs).
///
/// Holds the directory's only connection; it is `Send`, not `Sync`: share it behind a mutex.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    conn: Connection,
    /// The writer's lock on [`LOCK_FILE`], held until the store is dropped; `None` for a
    /// read-only store.
    _lock: Option<std::fs::File>,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`: creates the schema on first open,
    /// refuses a newer schema, refuses a directory another process holds open, and deletes
    /// checkpoint files that no committed round points to (leftovers of a crash).
    pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(dir.join(CHECKPOINT_DIR)).map_err(|e| {
            Error::Store(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let db_path = dir.join(DB_FILE);
        let lock_path = dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        // Nobody else may hold the lock legitimately, so waiting for it would only hide a
        // second coordinator: fail at once. The lock ends with the process, however it ends.
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Store(format!(
                    "{} is in use by another process; stop the other coordinator or use another data directory",
                    db_path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }
        let mut conn = Connection::open(&db_path)?;
        // Readers take the database's own locks only for moments (WAL): wait a little.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Store(format!(
                "{}: cannot switch to WAL journal mode (got {mode})",
                db_path.display()
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;

        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(Error::Store(format!(
                "{} has schema version {version}, newer than the {SCHEMA_VERSION} this coordinator knows; use a newer fedflow",
                db_path.display()
            )));
        }
        if version == 0 {
            tx.execute_batch(SCHEMA_V1)?;
        }
        if version < 2 {
            tx.execute_batch(privacy::SCHEMA_V2)?;
        }
        if version < 3 {
            tx.execute_batch(revocations::SCHEMA_V3)?;
        }
        if version < 4 {
            tx.execute_batch(privacy::SCHEMA_V4)?;
            tx.execute_batch(SCHEMA_V4)?;
            tx.execute_batch(history::SCHEMA_V4)?;
        }
        if version < 5 {
            tx.execute_batch(registry::SCHEMA_V5)?;
        }
        if version < 6 {
            tx.execute_batch(enrolment::SCHEMA_V6)?;
        }
        if version < 7 {
            tx.execute_batch(privacy::SCHEMA_V7)?;
        }
        if version < SCHEMA_VERSION {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.commit()?;

        let store = Store {
            dir,
            conn,
            _lock: Some(lock),
        };
        let removed = store.remove_orphans()?;
        if removed > 0 {
            tracing::warn!(
                removed,
                dir = %store.dir.display(),
                "removed checkpoint files left by an interrupted commit"
            );
        }
        Ok(store)
    }

    /// Opens the store in `dir` for reading only, while a coordinator may be writing it:
    /// each query sees the last committed state. Creates nothing: a directory without a
    /// database is an error naming it, and so is a database of a newer schema.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<Store> {
        let dir = dir.as_ref().to_path_buf();
        let db_path = dir.join(DB_FILE);
        if !db_path.is_file() {
            return Err(Error::NotFound(format!(
                "{} holds no coordinator database ({DB_FILE}); pass the --data directory the \
                 coordinator runs with",
                dir.display()
            )));
        }
        let conn = Connection::open_with_flags(
            &db_path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION {
            return Err(Error::Store(format!(
                "{} has schema version {version}, this fedflow reads version {SCHEMA_VERSION}; \
                 {}",
                db_path.display(),
                if version > SCHEMA_VERSION {
                    "use a newer fedflow"
                } else {
                    "start the coordinator once to upgrade it"
                }
            )));
        }
        Ok(Store {
            dir,
            conn,
            _lock: None,
        })
    }

    /// Makes every later write of this connection fail (SQLite's `query_only`), as a full
    /// or failing disk would: for tests of what callers see when the database fails.
    #[cfg(test)]
    pub(crate) fn fail_writes(&self) {
        self.conn.pragma_update(None, "query_only", true).unwrap();
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a run with its initial model as committed round 0.
    ///
    /// The checkpoint is written durably first, then the run, round 0 and the checkpoint
    /// row are recorded in one transaction. Fails if the run already exists.
    pub fn create_run(
        &mut self,
        run_id: &str,
        config_json: &str,
        strategy_name: &str,
        initial_model: &ParamSet,
    ) -> Result<()> {
        check_run_id(run_id)?;
        check_json("config_json", config_json)?;
        if self.run(run_id)?.is_some() {
            return Err(Error::Store(format!(
                "run {run_id} already exists; pick another run id or resume it"
            )));
        }
        let model = self.write_checkpoint(run_id, 0, CheckpointKind::Model, initial_model)?;
        let now = now_ms();
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO runs (run_id, created_at, config_json, strategy, status)
             VALUES (?1, ?2, ?3, ?4, 'running')",
            params![run_id, now, config_json, strategy_name],
        )?;
        tx.execute(
            "INSERT INTO rounds (run_id, round, status, started_at, committed_at, model_sha256)
             VALUES (?1, 0, 'committed', ?2, ?2, ?3)",
            params![run_id, now, model.sha256],
        )?;
        insert_checkpoint(&tx, run_id, 0, &model, now)?;
        tx.commit()?;
        Ok(())
    }

    /// Begins (or re-begins) `round` with the selected `(site_id, task_id)` pairs.
    ///
    /// `round` must follow the last committed round. An open or failed row for it (a round
    /// interrupted by a crash, or abandoned) is reset: its site rows are discarded, so the
    /// round is re-run cleanly. Fails on a finished or stopped run and on duplicate sites.
    pub fn begin_round(
        &mut self,
        run_id: &str,
        round: u64,
        selected: &[(String, String)],
    ) -> Result<()> {
        let run = self.require_run(run_id)?;
        if matches!(run.status, RunStatus::Finished | RunStatus::Stopped) {
            return Err(Error::Store(format!(
                "run {run_id} is {}; start a new run instead of beginning round {round}",
                run.status
            )));
        }
        let last = self.last_committed(run_id)?;
        if round != last + 1 {
            return Err(Error::Store(format!(
                "run {run_id}: cannot begin round {round}, the last committed round is {last} so the next is {}",
                last + 1
            )));
        }
        let mut seen = HashSet::new();
        for (site, _) in selected {
            if !seen.insert(site.as_str()) {
                return Err(Error::Store(format!(
                    "run {run_id} round {round}: site {site} is selected twice"
                )));
            }
        }
        let r = to_i64(round)?;
        let now = now_ms();
        let tx = self.conn.transaction()?;
        tx.execute(
            "DELETE FROM round_sites WHERE run_id = ?1 AND round = ?2",
            params![run_id, r],
        )?;
        tx.execute(
            "INSERT INTO rounds (run_id, round, status, started_at) VALUES (?1, ?2, 'open', ?3)
             ON CONFLICT (run_id, round) DO UPDATE SET
                 status = 'open', started_at = excluded.started_at, committed_at = NULL,
                 model_sha256 = NULL, strategy_sha256 = NULL, failure_reason = NULL,
                 metrics_json = NULL, evaluation_json = NULL",
            params![run_id, r, now],
        )?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO round_sites (run_id, round, site_id, task_id, state, updated_at)
                 VALUES (?1, ?2, ?3, ?4, 'selected', ?5)",
            )?;
            for (site, task) in selected {
                insert.execute(params![run_id, r, site, task, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records what became of a site in an open round (arrival, lateness, drop, rejection).
    ///
    /// Replaces the site's earlier outcome in that round, keeping its task id; a site that
    /// was not selected (e.g. a rejected stranger) gets a row without a task id.
    pub fn record_site(&mut self, run_id: &str, round: u64, outcome: &SiteOutcome) -> Result<()> {
        self.require_open(run_id, round)?;
        if let Some(m) = &outcome.metrics_json {
            check_json("metrics_json", m)?;
        }
        let examples = outcome.train_examples.map(to_i64).transpose()?;
        self.conn.execute(
            "INSERT INTO round_sites (run_id, round, site_id, state, reason, train_examples,
                                      weight, metrics_json, delta_sha256, updated_at,
                                      update_norm, clipped)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (run_id, round, site_id) DO UPDATE SET
                 state = excluded.state, reason = excluded.reason,
                 train_examples = excluded.train_examples, weight = excluded.weight,
                 metrics_json = excluded.metrics_json, delta_sha256 = excluded.delta_sha256,
                 updated_at = excluded.updated_at, update_norm = excluded.update_norm,
                 clipped = excluded.clipped",
            params![
                run_id,
                to_i64(round)?,
                outcome.site_id,
                outcome.state.as_str(),
                outcome.reason,
                examples,
                outcome.weight,
                outcome.metrics_json,
                outcome.delta_sha256,
                now_ms(),
                outcome.update_norm,
                outcome.clipped
            ],
        )?;
        Ok(())
    }

    /// Marks an open round failed (it may be begun again later).
    /// The attempt is kept in the history ([`Store::failed_attempts`]) when the round is
    /// begun again.
    pub fn fail_round(&mut self, run_id: &str, round: u64, reason: &str) -> Result<()> {
        self.require_open(run_id, round)?;
        let tx = self.conn.transaction()?;
        history::record_failed_attempt(&tx, run_id, round, reason)?;
        tx.execute(
            "UPDATE rounds SET status = 'failed', failure_reason = ?3
             WHERE run_id = ?1 AND round = ?2 AND status = 'open'",
            params![run_id, to_i64(round)?, reason],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Commits an open round: writes the new global model (and the strategy state, if any)
    /// as checkpoint files durably first, then marks the round committed with the model's
    /// hash in one transaction, which also appends the round's site-level privacy record
    /// when there is one (so a released round is always in the ledger). Returns the model's
    /// SHA-256.
    ///
    /// Fails if the round was never begun, is already committed, or failed.
    pub fn commit_round(
        &mut self,
        run_id: &str,
        round: u64,
        new_global: &ParamSet,
        strategy_state: Option<&ParamSet>,
        metrics_json: Option<&str>,
        site_dp: Option<&SiteDpRound>,
    ) -> Result<String> {
        self.require_open(run_id, round)?;
        if let Some(m) = metrics_json {
            check_json("metrics_json", m)?;
        }
        if let Some(dp) = site_dp
            && dp.round != round
        {
            return Err(Error::Store(format!(
                "run {run_id}: the privacy record of round {} cannot commit round {round}",
                dp.round
            )));
        }
        let model = self.write_checkpoint(run_id, round, CheckpointKind::Model, new_global)?;
        let strategy = strategy_state
            .map(|s| self.write_checkpoint(run_id, round, CheckpointKind::Strategy, s))
            .transpose()?;
        #[cfg(test)]
        tests::crash_point("commit_after_files");
        let now = now_ms();
        let r = to_i64(round)?;
        let tx = self.conn.transaction()?;
        let updated = tx.execute(
            "UPDATE rounds SET status = 'committed', committed_at = ?3, model_sha256 = ?4,
                               strategy_sha256 = ?5, metrics_json = ?6
             WHERE run_id = ?1 AND round = ?2 AND status = 'open'",
            params![
                run_id,
                r,
                now,
                model.sha256,
                strategy.as_ref().map(|s| &s.sha256),
                metrics_json
            ],
        )?;
        if updated != 1 {
            // Unreachable while this connection holds the exclusive lock; kept as a guard.
            return Err(Error::Store(format!(
                "run {run_id} round {round} changed while it was being committed"
            )));
        }
        // A strategy checkpoint left from an earlier attempt at this round must not
        // survive a commit without one.
        tx.execute(
            "DELETE FROM checkpoints WHERE run_id = ?1 AND round = ?2",
            params![run_id, r],
        )?;
        insert_checkpoint(&tx, run_id, round, &model, now)?;
        if let Some(s) = &strategy {
            insert_checkpoint(&tx, run_id, round, s, now)?;
        }
        if let Some(dp) = site_dp {
            privacy::insert_round(&tx, run_id, dp)?;
        }
        tx.commit()?;
        Ok(model.sha256)
    }

    /// The last committed round of a run with its verified global model and strategy state.
    ///
    /// The checkpoint files are read and their SHA-256 compared with the database; a
    /// missing or altered file is an error naming it.
    pub fn resume_point(&self, run_id: &str) -> Result<Resume> {
        self.require_run(run_id)?;
        let round = self.last_committed(run_id)?;
        let r = to_i64(round)?;
        let (model_sha256, strategy_sha256): (String, Option<String>) = self.conn.query_row(
            "SELECT model_sha256, strategy_sha256 FROM rounds WHERE run_id = ?1 AND round = ?2",
            params![run_id, r],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        let model = self.load_checkpoint(run_id, round, CheckpointKind::Model, &model_sha256)?;
        let strategy_state = strategy_sha256
            .map(|h| self.load_checkpoint(run_id, round, CheckpointKind::Strategy, &h))
            .transpose()?;
        let open_round = self
            .conn
            .query_row(
                "SELECT round FROM rounds WHERE run_id = ?1 AND round > ?2 AND status = 'open'
                 ORDER BY round LIMIT 1",
                params![run_id, r],
                |row| row.get::<_, i64>(0),
            )
            .optional()?
            .map(|r| r as u64);
        Ok(Resume {
            round,
            model,
            model_sha256,
            strategy_state,
            open_round,
        })
    }

    /// Sets a run's status and the reason for it.
    pub fn set_run_status(
        &mut self,
        run_id: &str,
        status: RunStatus,
        reason: Option<&str>,
    ) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE runs SET status = ?2, status_reason = ?3 WHERE run_id = ?1",
            params![run_id, status.as_str(), reason],
        )?;
        if n == 0 {
            return Err(unknown_run(run_id));
        }
        Ok(())
    }

    /// Records contact with a site at `now_ms` (Unix milliseconds); `last_seen` never moves
    /// backwards.
    pub fn touch_site(&mut self, site_id: &str, now_ms: i64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO sites (site_id, first_seen, last_seen) VALUES (?1, ?2, ?2)
             ON CONFLICT (site_id) DO UPDATE SET
                 last_seen = max(last_seen, excluded.last_seen),
                 first_seen = min(first_seen, excluded.first_seen)",
            params![site_id, now_ms],
        )?;
        Ok(())
    }

    // --- Internals --------------------------------------------------------------------------

    fn require_run(&self, run_id: &str) -> Result<RunRecord> {
        self.run(run_id)?.ok_or_else(|| unknown_run(run_id))
    }

    fn last_committed(&self, run_id: &str) -> Result<u64> {
        let last: Option<i64> = self.conn.query_row(
            "SELECT max(round) FROM rounds WHERE run_id = ?1 AND status = 'committed'",
            [run_id],
            |r| r.get(0),
        )?;
        last.map(|l| l as u64).ok_or_else(|| {
            Error::Store(format!(
                "run {run_id} has no committed round; the database is inconsistent"
            ))
        })
    }

    /// The status of a run's round (`None` if it was never begun); an error for an
    /// unknown run.
    fn round_status(&self, run_id: &str, round: u64) -> Result<Option<RoundStatus>> {
        self.require_run(run_id)?;
        let status: Option<String> = self
            .conn
            .query_row(
                "SELECT status FROM rounds WHERE run_id = ?1 AND round = ?2",
                params![run_id, to_i64(round)?],
                |r| r.get(0),
            )
            .optional()?;
        status.as_deref().map(str::parse).transpose()
    }

    fn require_open(&self, run_id: &str, round: u64) -> Result<()> {
        match self.round_status(run_id, round)? {
            Some(RoundStatus::Open) => Ok(()),
            Some(other) => Err(Error::Store(format!(
                "run {run_id} round {round} is {other}, not open; begin it first"
            ))),
            None => Err(Error::Store(format!(
                "run {run_id} round {round} was never begun; call begin_round first"
            ))),
        }
    }
}

/// Run ids become directory names: they follow fedflow's one naming rule
/// ([`fedflow_common::names`]), as the run config's `run.name` does.
fn check_run_id(run_id: &str) -> Result<()> {
    fedflow_common::names::check_name(run_id).map_err(|e| Error::Store(format!("run id {e}")))
}

fn check_json(field: &str, text: &str) -> Result<()> {
    serde_json::from_str::<serde_json::Value>(text)
        .map(|_| ())
        .map_err(|e| Error::Store(format!("{field} is not valid JSON: {e}")))
}

fn unknown_run(run_id: &str) -> Error {
    Error::Store(format!("unknown run {run_id}"))
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Store(format!("{v} does not fit the database's integers")))
}

#[cfg(test)]
mod read_only_tests;
#[cfg(test)]
mod tests;
