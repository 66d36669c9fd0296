//! The site's privacy ledger: every release of a DP-SGD update, with the parameters that
//! determine its privacy cost, recorded durably *before* the update leaves the site.
//!
//! Storage: SQLite (`<dir>/ledger.sqlite`, WAL, `synchronous = FULL`) for the entries and
//! `<dir>/pending/` for the exact update bytes of each entry until the coordinator has
//! accepted them. The order of writes makes every crash safe:
//!
//! 1. the update is trained (nothing recorded yet: a crash here released nothing);
//! 2. its bytes are written to `pending/` and fsync'd;
//! 3. the entry is inserted in one durable transaction: from here on the spend counts;
//! 4. the bytes are uploaded; on acceptance the entry is marked released and the pending file
//!    removed.
//!
//! A task seen again after a crash between 3 and 4 (or after a network error) is answered
//! with the *recorded* bytes, never retrained: sending the same noisy update twice reveals
//! nothing new, so nothing is double-counted, and no fresh noise is ever drawn for a task
//! that already has an entry, so no retry is free. Entries are never deleted or changed
//! except for the `released` mark.

use std::path::{Path, PathBuf};

use fedflow_common::clock::now_ms;
use fedflow_common::fsio::write_atomic;
use fedflow_common::hash::sha256_hex;
use fedflow_common::privacy::{RdpAccountant, SampledGaussian};
use fedflow_common::train::PrivacyUnit;
use rusqlite::{Connection, params};
use serde::Serialize;

use crate::{Error, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_unix_ms    INTEGER NOT NULL,
    run_id              TEXT NOT NULL,
    round               INTEGER NOT NULL,
    task_id             TEXT NOT NULL,
    unit                TEXT NOT NULL,
    units               INTEGER NOT NULL,
    clip_norm           REAL NOT NULL,
    noise_multiplier    REAL NOT NULL,
    expected_batch_size INTEGER NOT NULL,
    epochs              INTEGER NOT NULL,
    q                   REAL NOT NULL,
    steps               INTEGER NOT NULL,
    update_sha256       TEXT NOT NULL,
    metrics_released    INTEGER NOT NULL,
    released            INTEGER NOT NULL DEFAULT 0,
    UNIQUE (run_id, round, task_id)
);
";

/// One recorded release.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerEntry {
    /// Position in the ledger (1-based, increasing).
    pub id: i64,
    /// When it was recorded (Unix milliseconds).
    pub recorded_unix_ms: i64,
    /// The federated run.
    pub run_id: String,
    /// The round within the run.
    pub round: u64,
    /// The coordinator's task id.
    pub task_id: String,
    /// The privacy unit of this release.
    pub unit: PrivacyUnit,
    /// Number of privacy units n the sampling rate was computed over.
    pub units: u64,
    /// Clipping bound C.
    pub clip_norm: f64,
    /// Noise multiplier z.
    pub noise_multiplier: f64,
    /// Expected batch size B.
    pub expected_batch_size: u64,
    /// Local epochs.
    pub epochs: u64,
    /// Poisson sampling rate q = B / n.
    pub q: f64,
    /// DP-SGD steps.
    pub steps: u64,
    /// SHA-256 of the released update bytes.
    pub update_sha256: String,
    /// Whether metrics computed on the site's data went out with the update (outside the
    /// guarantee).
    pub metrics_released: bool,
    /// Whether the coordinator has acknowledged the update (it counts either way).
    pub released: bool,
}

impl LedgerEntry {
    /// The privacy event this entry accounts for.
    pub fn event(&self) -> SampledGaussian {
        SampledGaussian {
            q: self.q,
            z: self.noise_multiplier,
            steps: self.steps,
        }
    }
}

/// What is recorded for a new release (the ledger assigns id and time).
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// The federated run.
    pub run_id: String,
    /// The round within the run.
    pub round: u64,
    /// The coordinator's task id.
    pub task_id: String,
    /// The privacy unit.
    pub unit: PrivacyUnit,
    /// Number of privacy units.
    pub units: u64,
    /// Clipping bound C.
    pub clip_norm: f64,
    /// Expected batch size B.
    pub expected_batch_size: u64,
    /// Local epochs.
    pub epochs: u64,
    /// The privacy event actually run.
    pub event: SampledGaussian,
    /// Whether metrics on the site's data go out with the update.
    pub metrics_released: bool,
}

/// The ledger of one site (see the module docs for the crash-safety protocol).
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
    db_path: PathBuf,
    pending: PathBuf,
}

impl Ledger {
    /// Opens (creating if needed) the ledger in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let db_path = dir.join("ledger.sqlite");
        let pending = dir.join("pending");
        let err = |reason: String| Error::Ledger {
            path: db_path.clone(),
            reason,
        };
        std::fs::create_dir_all(&pending)
            .map_err(|e| err(format!("cannot create {}: {e}", pending.display())))?;
        let conn = Connection::open(&db_path).map_err(|e| err(e.to_string()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .and_then(|()| conn.execute_batch(SCHEMA))
        .map_err(|e| err(e.to_string()))?;
        Ok(Ledger {
            conn,
            db_path,
            pending,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.db_path
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Ledger {
            path: self.db_path.clone(),
            reason: e.to_string(),
        }
    }

    /// Where the bytes of a task's update wait for acknowledgement (named by a hash, since
    /// run and task ids come from the coordinator).
    fn pending_path(&self, run_id: &str, round: u64, task_id: &str) -> PathBuf {
        let key = sha256_hex(format!("{run_id}\0{round}\0{task_id}").as_bytes());
        self.pending.join(format!("{}.safetensors", &key[..32]))
    }

    /// Entries matching `filter` (an SQL condition over the columns, with `args`), oldest
    /// first.
    fn select(&self, filter: &str, args: impl rusqlite::Params) -> Result<Vec<LedgerEntry>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT id, recorded_unix_ms, run_id, round, task_id, unit, units, clip_norm,
                        noise_multiplier, expected_batch_size, epochs, q, steps, update_sha256,
                        released, metrics_released
                 FROM entries WHERE {filter} ORDER BY id"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(args, |r| {
                let unit: String = r.get(5)?;
                Ok(LedgerEntry {
                    id: r.get(0)?,
                    recorded_unix_ms: r.get(1)?,
                    run_id: r.get(2)?,
                    round: r.get::<_, i64>(3)? as u64,
                    task_id: r.get(4)?,
                    unit: unit.parse().unwrap_or(PrivacyUnit::Session),
                    units: r.get::<_, i64>(6)? as u64,
                    clip_norm: r.get(7)?,
                    noise_multiplier: r.get(8)?,
                    expected_batch_size: r.get::<_, i64>(9)? as u64,
                    epochs: r.get::<_, i64>(10)? as u64,
                    q: r.get(11)?,
                    steps: r.get::<_, i64>(12)? as u64,
                    update_sha256: r.get(13)?,
                    released: r.get::<_, i64>(14)? != 0,
                    metrics_released: r.get::<_, i64>(15)? != 0,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Result<Vec<LedgerEntry>> {
        self.select("1", [])
    }

    /// The entry of a task, if recorded (the key is unique).
    fn entry(&self, run_id: &str, round: u64, task_id: &str) -> Result<Option<LedgerEntry>> {
        Ok(self
            .select(
                "run_id = ?1 AND round = ?2 AND task_id = ?3",
                params![run_id, round as i64, task_id],
            )?
            .pop())
    }

    /// An accountant holding every recorded release.
    pub fn accountant(&self) -> Result<RdpAccountant> {
        // RDP is linear in the number of steps, so releases with the same (q, z) are composed
        // once with their steps summed: a long ledger costs one RDP curve per distinct setting.
        let mut grouped: Vec<SampledGaussian> = Vec::new();
        for e in self.entries()? {
            let ev = e.event();
            match grouped
                .iter_mut()
                .find(|g| g.q.to_bits() == ev.q.to_bits() && g.z.to_bits() == ev.z.to_bits())
            {
                Some(g) => g.steps += ev.steps,
                None => grouped.push(ev),
            }
        }
        let mut acc = RdpAccountant::default();
        for g in &grouped {
            acc.compose(g)?;
        }
        Ok(acc)
    }

    /// The recorded entry of a task and, while it is not yet acknowledged, its update bytes.
    pub fn find(
        &self,
        run_id: &str,
        round: u64,
        task_id: &str,
    ) -> Result<Option<(LedgerEntry, Option<Vec<u8>>)>> {
        let Some(entry) = self.entry(run_id, round, task_id)? else {
            return Ok(None);
        };
        let path = self.pending_path(run_id, round, task_id);
        let bytes = match std::fs::read(&path) {
            Ok(b) if sha256_hex(&b) == entry.update_sha256 => Some(b),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.err(format!("{}: {e}", path.display()))),
        };
        Ok(Some((entry, bytes)))
    }

    /// Records a release: first the update bytes (fsync'd), then the entry (one durable
    /// transaction). Fails if the task already has an entry.
    pub fn record(&mut self, entry: &NewEntry, update: &[u8]) -> Result<LedgerEntry> {
        if self
            .entry(&entry.run_id, entry.round, &entry.task_id)?
            .is_some()
        {
            return Err(self.err(format!(
                "run {} round {} task {} is already recorded: its recorded update must be \
                 sent again, never a new one",
                entry.run_id, entry.round, entry.task_id
            )));
        }
        let path = self.pending_path(&entry.run_id, entry.round, &entry.task_id);
        write_atomic(&path, update)?;
        let sha = sha256_hex(update);
        self.conn
            .execute(
                "INSERT INTO entries (recorded_unix_ms, run_id, round, task_id, unit, units,
                    clip_norm, noise_multiplier, expected_batch_size, epochs, q, steps,
                    update_sha256, metrics_released)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                params![
                    now_ms(),
                    entry.run_id,
                    entry.round as i64,
                    entry.task_id,
                    entry.unit.to_string(),
                    entry.units as i64,
                    entry.clip_norm,
                    entry.event.z,
                    entry.expected_batch_size as i64,
                    entry.epochs as i64,
                    entry.event.q,
                    entry.event.steps as i64,
                    sha,
                    entry.metrics_released,
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(self
            .entry(&entry.run_id, entry.round, &entry.task_id)?
            .expect("just inserted"))
    }

    /// Marks a task's update acknowledged and drops its pending bytes.
    pub fn mark_released(&mut self, run_id: &str, round: u64, task_id: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE entries SET released = 1 WHERE run_id = ?1 AND round = ?2 AND task_id = ?3",
                params![run_id, round as i64, task_id],
            )
            .map_err(|e| self.err(e))?;
        match std::fs::remove_file(self.pending_path(run_id, round, task_id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(round: u64, task: &str) -> NewEntry {
        NewEntry {
            run_id: "run-1".into(),
            round,
            task_id: task.into(),
            unit: PrivacyUnit::Session,
            units: 1000,
            clip_norm: 1.0,
            expected_batch_size: 50,
            epochs: 1,
            event: SampledGaussian {
                q: 0.05,
                z: 1.1,
                steps: 20,
            },
            metrics_released: false,
        }
    }

    #[test]
    fn entries_survive_reopening_and_compose() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut l = Ledger::open(dir.path()).unwrap();
            l.record(&entry(1, "t1"), b"update one").unwrap();
            l.record(&entry(2, "t2"), b"update two").unwrap();
            l.mark_released("run-1", 1, "t1").unwrap();
        }
        let l = Ledger::open(dir.path()).unwrap();
        let e = l.entries().unwrap();
        assert_eq!(e.len(), 2);
        assert!(e[0].released && !e[1].released);
        assert_eq!(e[1].update_sha256, sha256_hex(b"update two"));
        let mut want = RdpAccountant::default();
        want.compose(&SampledGaussian {
            q: 0.05,
            z: 1.1,
            steps: 40,
        })
        .unwrap();
        let (ours, theirs) = (
            l.accountant().unwrap().epsilon(1e-5).unwrap(),
            want.epsilon(1e-5).unwrap(),
        );
        assert!((ours.0 - theirs.0).abs() < 1e-12);
        // The unacknowledged update is kept byte for byte; the acknowledged one is gone.
        let (_, bytes) = l.find("run-1", 2, "t2").unwrap().unwrap();
        assert_eq!(bytes.as_deref(), Some(&b"update two"[..]));
        assert_eq!(l.find("run-1", 1, "t1").unwrap().unwrap().1, None);
        assert!(l.find("run-1", 3, "t3").unwrap().is_none());
    }

    #[test]
    fn a_task_is_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        l.record(&entry(1, "t1"), b"first").unwrap();
        let again = l.record(&entry(1, "t1"), b"second");
        assert!(matches!(again, Err(Error::Ledger { .. })), "{again:?}");
        assert_eq!(l.entries().unwrap().len(), 1);
        // The recorded bytes are untouched by the refused second release.
        let (_, bytes) = l.find("run-1", 1, "t1").unwrap().unwrap();
        assert_eq!(bytes.as_deref(), Some(&b"first"[..]));
    }
}
