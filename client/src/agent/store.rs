//! The site's feedback store: every session the application reported, in an embedded SQLite
//! database (WAL, `synchronous = FULL`), written and synced before a write is acknowledged.
//!
//! Sessions are keyed by `session_id`: a re-sent identical session is acknowledged as a
//! duplicate and stored once; a re-send that differs (events, label, user or timestamp) is
//! refused as a conflict, and a batch holding one changes nothing (one transaction per
//! batch). Erasing a user deletes their sessions; the application may withdraw sessions by
//! id; retention deletes sessions older than a
//! maximum age or beyond a maximum count (oldest first). Every change bumps the store's
//! *generation*, so a reader (the training source) knows when to take a new snapshot.
//! Session and user ids are personal data: errors name a session by its position in the
//! request, never by its id.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fedflow_common::data::{SessionRecord, validate_record};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::{Error, Result};

/// The database file inside the store's directory.
pub const STORE_FILE: &str = "feedback.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL UNIQUE,
    events TEXT NOT NULL,
    label INTEGER NOT NULL CHECK (label BETWEEN 1 AND 5),
    user_id TEXT,
    timestamp TEXT,
    received_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0), ('contributed_seq', 0);
";

/// What a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Appended {
    /// Sessions stored now.
    pub stored: usize,
    /// Sessions already stored identically (acknowledged again, stored once).
    pub duplicates: usize,
}

/// Why a batch was refused (nothing of it is stored).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A session breaks the record rules (empty events, label outside 1-5, ...).
    #[error("session {index}: {reason}")]
    Invalid {
        /// Its position in the batch (0-based).
        index: usize,
        /// Why.
        reason: String,
    },
    /// A session id already stored (or earlier in the batch) with other content.
    #[error(
        "session {index}: its session_id is already stored with other events, label, user or \
         timestamp; a session cannot be changed once acknowledged"
    )]
    Conflict {
        /// Its position in the batch (0-based).
        index: usize,
    },
}

/// The sessions held at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The store's generation at that moment.
    pub generation: u64,
    /// Sequence number of the newest session (0 when empty).
    pub last_seq: u64,
    /// The sessions, oldest first.
    pub records: Vec<SessionRecord>,
}

/// Counts describing the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StoreCounts {
    /// Sessions held.
    pub sessions: u64,
    /// Of those, sessions stored after the last training round took its snapshot.
    pub since_last_snapshot: u64,
    /// The store's generation (bumped by every change).
    pub generation: u64,
}

/// The feedback store of one site.
#[derive(Debug)]
pub struct FeedbackStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn store_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Store(format!("{}: {e}", path.display()))
}

impl FeedbackStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<FeedbackStore> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| store_err(dir, e))?;
        let path = dir.join(STORE_FILE);
        let conn = Connection::open(&path).map_err(|e| store_err(&path, e))?;
        let setup = || -> rusqlite::Result<String> {
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.execute_batch(SCHEMA)?;
            Ok(mode)
        };
        let mode = setup().map_err(|e| store_err(&path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(store_err(
                &path,
                format!("cannot switch to WAL journal mode (got {mode})"),
            ));
        }
        Ok(FeedbackStore {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores `batch` in one transaction, synced before it returns: every session is
    /// checked first; a refused batch stores nothing.
    pub fn append(
        &self,
        batch: &[SessionRecord],
        now_ms: i64,
    ) -> Result<std::result::Result<Appended, Refusal>> {
        for (index, r) in batch.iter().enumerate() {
            if let Err(reason) = validate_record(r) {
                return Ok(Err(Refusal::Invalid { index, reason }));
            }
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| store_err(&self.path, e))?;
        let mut out = Appended {
            stored: 0,
            duplicates: 0,
        };
        let result = (|| -> rusqlite::Result<Option<Refusal>> {
            for (index, r) in batch.iter().enumerate() {
                let events = serde_json::to_string(&r.events).expect("strings serialise");
                let existing: Option<(String, u8, Option<String>, Option<String>)> = tx
                    .query_row(
                        "SELECT events, label, user_id, timestamp FROM sessions WHERE session_id = ?1",
                        params![r.session_id],
                        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
                    )
                    .optional()?;
                match existing {
                    Some(e)
                        if e == (
                            events.clone(),
                            r.label,
                            r.user_id.clone(),
                            r.timestamp.clone(),
                        ) =>
                    {
                        out.duplicates += 1;
                    }
                    Some(_) => return Ok(Some(Refusal::Conflict { index })),
                    None => {
                        tx.execute(
                            "INSERT INTO sessions (session_id, events, label, user_id, timestamp, received_ms) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                            params![r.session_id, events, r.label, r.user_id, r.timestamp, now_ms],
                        )?;
                        out.stored += 1;
                    }
                }
            }
            if out.stored > 0 {
                bump(&tx)?;
            }
            Ok(None)
        })();
        match result {
            Ok(Some(refusal)) => Ok(Err(refusal)), // the transaction rolls back on drop
            Ok(None) => {
                tx.commit().map_err(|e| store_err(&self.path, e))?;
                Ok(Ok(out))
            }
            Err(e) => Err(store_err(&self.path, e)),
        }
    }

    /// Deletes every session of `user_id`; returns how many.
    pub fn erase_user(&self, user_id: &str) -> Result<usize> {
        self.delete_where("user_id = ?1", params![user_id])
    }

    /// Deletes the sessions of `session_ids` (ids not stored are passed over), in one
    /// transaction; returns how many were deleted.
    pub fn delete_sessions(&self, session_ids: &[String]) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| store_err(&self.path, e))?;
        let mut n = 0;
        {
            let mut delete = tx
                .prepare("DELETE FROM sessions WHERE session_id = ?1")
                .map_err(|e| store_err(&self.path, e))?;
            for id in session_ids {
                n += delete
                    .execute(params![id])
                    .map_err(|e| store_err(&self.path, e))?;
            }
        }
        if n > 0 {
            bump(&tx).map_err(|e| store_err(&self.path, e))?;
        }
        tx.commit().map_err(|e| store_err(&self.path, e))?;
        Ok(n)
    }

    /// Deletes sessions received before `now_ms - max_age_ms` (if set) and the oldest ones
    /// beyond `max_sessions` (if set); returns how many.
    pub fn enforce_retention(
        &self,
        max_age_ms: Option<i64>,
        max_sessions: Option<u64>,
        now_ms: i64,
    ) -> Result<usize> {
        let mut removed = 0;
        if let Some(age) = max_age_ms {
            removed +=
                self.delete_where("received_ms < ?1", params![now_ms.saturating_sub(age)])?;
        }
        if let Some(max) = max_sessions {
            let max = i64::try_from(max).unwrap_or(i64::MAX);
            removed += self.delete_where(
                "seq NOT IN (SELECT seq FROM sessions ORDER BY seq DESC LIMIT ?1)",
                params![max],
            )?;
        }
        Ok(removed)
    }

    fn delete_where(&self, condition: &str, args: impl rusqlite::Params) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| store_err(&self.path, e))?;
        let n = tx
            .execute(&format!("DELETE FROM sessions WHERE {condition}"), args)
            .map_err(|e| store_err(&self.path, e))?;
        if n > 0 {
            bump(&tx).map_err(|e| store_err(&self.path, e))?;
        }
        tx.commit().map_err(|e| store_err(&self.path, e))?;
        Ok(n)
    }

    /// The store's generation: it changes whenever a session is stored or deleted.
    pub fn generation(&self) -> Result<u64> {
        let conn = self.conn();
        meta(&conn, "generation").map_err(|e| store_err(&self.path, e))
    }

    /// Every session held, oldest first, with the generation it is of and the sequence
    /// number of the newest session (0 when empty).
    pub fn snapshot(&self) -> Result<Snapshot> {
        let conn = self.conn();
        let read = || -> rusqlite::Result<Snapshot> {
            // One read transaction: the generation and the rows are of the same moment.
            conn.execute_batch("BEGIN")?;
            let generation = meta(&conn, "generation")?;
            let mut stmt = conn.prepare(
                "SELECT seq, session_id, events, label, user_id, timestamp FROM sessions \
                 ORDER BY seq",
            )?;
            let mut last_seq = 0u64;
            let mut records = Vec::new();
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let events: String = row.get(2)?;
                let events: Vec<String> = serde_json::from_str(&events).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        2,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?;
                last_seq = row.get::<_, i64>(0)? as u64;
                records.push(SessionRecord {
                    session_id: row.get(1)?,
                    events,
                    label: row.get(3)?,
                    user_id: row.get(4)?,
                    timestamp: row.get(5)?,
                });
            }
            drop(rows);
            drop(stmt);
            conn.execute_batch("COMMIT")?;
            Ok(Snapshot {
                generation,
                last_seq,
                records,
            })
        };
        let out = read();
        if out.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        out.map_err(|e| store_err(&self.path, e))
    }

    /// Records that a training round used the sessions up to `last_seq` (for
    /// [`StoreCounts::since_last_snapshot`]).
    pub fn mark_trained(&self, last_seq: u64) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "UPDATE meta SET value = MAX(value, ?1) WHERE key = 'contributed_seq'",
            params![last_seq as i64],
        )
        .map_err(|e| store_err(&self.path, e))?;
        Ok(())
    }

    /// Sessions held, stored since the last training snapshot, and the generation.
    pub fn counts(&self) -> Result<StoreCounts> {
        let conn = self.conn();
        let read = || -> rusqlite::Result<StoreCounts> {
            let since = meta(&conn, "contributed_seq")?;
            let sessions: i64 =
                conn.query_row("SELECT COUNT(*) FROM sessions", [], |r| r.get(0))?;
            let newer: i64 = conn.query_row(
                "SELECT COUNT(*) FROM sessions WHERE seq > ?1",
                params![since as i64],
                |r| r.get(0),
            )?;
            Ok(StoreCounts {
                sessions: sessions as u64,
                since_last_snapshot: newer as u64,
                generation: meta(&conn, "generation")?,
            })
        };
        read().map_err(|e| store_err(&self.path, e))
    }
}

fn meta(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
        r.get::<_, i64>(0)
    })
    .map(|v| v as u64)
}

fn bump(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'generation'",
        [],
    )?;
    Ok(())
}

/// Imports `file` (CSV or JSON Lines, validated row by row as data files are, errors naming
/// the line) into the store in `store_dir`, in one transaction: a bad row, or a session id
/// stored with other content, imports nothing.
pub fn import(file: &Path, store_dir: &Path) -> Result<Appended> {
    let loaded = fedflow_common::data::read_sessions(file, &Default::default())?;
    let store = FeedbackStore::open(store_dir)?;
    match store.append(&loaded.records, fedflow_common::clock::now_ms())? {
        Ok(a) => Ok(a),
        Err(Refusal::Conflict { index }) => Err(Error::Usage(format!(
            "{}: record {}: its session_id is already stored with other content; nothing \
             was imported",
            file.display(),
            index + 1
        ))),
        Err(r) => Err(Error::Usage(format!(
            "{}: {r}; nothing was imported",
            file.display()
        ))),
    }
}
