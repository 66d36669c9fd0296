//! Keeping a site's privacy ledger beyond the disk it lives on, without ever under-counting.
//!
//! A restored ledger must hold every release the site made, or the site's spend (and the
//! limit checked against it) would be understated. A point-in-time copy cannot promise that
//! alone: releases recorded after it are not in it. So:
//!
//! - **The journal** ([`Ledger::set_journal`], `fedflow-client ledger journal`): a JSON-lines
//!   file on other storage (another disk, a network mount) to which every entry is appended
//!   and fsync'd *before* its update can leave the site (in [`Ledger::record`], and again
//!   before a recorded update is re-sent). If the journal cannot be written, nothing is
//!   released. The journal alone is enough to rebuild the accounting.
//! - **Backups** ([`backup`], `fedflow-client ledger backup`): a consistent snapshot while the
//!   site runs (SQLite `VACUUM INTO`, one read transaction), with the pending update bytes of
//!   unacknowledged entries, written under a temporary name and renamed when complete.
//! - **Restore** ([`restore`], `fedflow-client ledger restore`) into an empty ledger folder,
//!   from a backup, a journal or both: the entries of both are merged (the same task in both
//!   must be the same release), and the restore is recorded in the ledger (`restores`) and
//!   in the site's privacy report. A restore with neither a journal nor the operator's
//!   statement that the site released nothing since the backup is refused, since it could
//!   forget releases.
//!
//! Entries taken from the journal only have lost their update bytes, so they are marked
//! acknowledged: the site declines such a task if the coordinator offers it again (never a
//! second, fresh release for one task).

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, params};
use serde::{Deserialize, Serialize};

use fedflow_common::clock::now_ms;
use fedflow_common::fsio::write_atomic;
use fedflow_common::hash::sha256_hex;

use super::{DB_FILE, Ledger, LedgerEntry, PENDING_DIR};
use crate::{Error, Result};

/// The file in the ledger folder naming the journal.
pub const JOURNAL_LINK: &str = "journal.json";
/// A backup's manifest, written last.
pub const BACKUP_MANIFEST: &str = "backup.json";
/// The manifest's format tag.
pub const BACKUP_FORMAT: &str = "fedflow.ledger-backup/1";
/// Each journal line's format tag.
pub const JOURNAL_FORMAT: &str = "fedflow.ledger-entry/1";

fn err(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Ledger {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(dir, e))
}

#[derive(Debug, Serialize, Deserialize)]
struct JournalLink {
    path: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct JournalLine {
    format: String,
    #[serde(flatten)]
    entry: LedgerEntry,
}

/// The journal a ledger appends to, and the tasks whose entries it holds.
#[derive(Debug)]
pub(super) struct Journal {
    path: PathBuf,
    /// `None` until the file has been read (it is read at the first append, so a ledger
    /// opens even while the journal's volume is away; it then releases nothing).
    held: Option<std::collections::HashSet<TaskKey>>,
}

/// A release's task: (run, round, task id), unique in a ledger.
type TaskKey = (String, u64, String);

fn key(e: &LedgerEntry) -> TaskKey {
    (e.run_id.clone(), e.round, e.task_id.clone())
}

impl Journal {
    /// The journal named in the ledger folder `dir`, if one is.
    pub(super) fn configured(dir: &Path) -> Result<Option<Journal>> {
        let link = dir.join(JOURNAL_LINK);
        match std::fs::read(&link) {
            Ok(bytes) => {
                let l: JournalLink = serde_json::from_slice(&bytes).map_err(|e| err(&link, e))?;
                Ok(Some(Journal {
                    path: l.path,
                    held: None,
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(&link, e)),
        }
    }

    /// Where the journal is.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends every entry of `entries` the journal does not hold yet, then fsyncs.
    pub(super) fn append(&mut self, entries: &[LedgerEntry]) -> Result<()> {
        if self.held.is_none() {
            self.held = Some(read_journal(&self.path)?.iter().map(key).collect());
        }
        let held = self.held.as_mut().expect("just read");
        let new: Vec<&LedgerEntry> = entries.iter().filter(|e| !held.contains(&key(e))).collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for e in &new {
            let line = JournalLine {
                format: JOURNAL_FORMAT.into(),
                entry: (*e).clone(),
            };
            text.push_str(&serde_json::to_string(&line).map_err(|e| err(&self.path, e))?);
            text.push('\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| err(&self.path, format!("the journal cannot be opened: {e}")))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| err(&self.path, format!("the journal cannot be written: {e}")))?;
        held.extend(new.into_iter().map(key));
        Ok(())
    }
}

/// The entries of the journal at `path` (none if it does not exist yet); a line that is not
/// an entry is an error naming the line.
pub fn read_journal(path: &Path) -> Result<Vec<LedgerEntry>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(path, format!("the journal cannot be read: {e}"))),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let l: JournalLine = serde_json::from_str(line)
            .map_err(|e| err(path, format!("{at}: not a ledger entry: {e}")))?;
        if l.format != JOURNAL_FORMAT {
            return Err(err(
                path,
                format!("{at}: format {:?}, expected {JOURNAL_FORMAT:?}", l.format),
            ));
        }
        out.push(l.entry);
    }
    Ok(out)
}

impl Ledger {
    /// Appends every entry to the journal at `path` from now on (the entries recorded so
    /// far first), and names it in the ledger folder so every later open does too.
    pub fn set_journal(&mut self, path: &Path) -> Result<()> {
        let path = std::path::absolute(path).map_err(|e| err(path, e))?;
        if path.starts_with(&self.dir) {
            return Err(err(
                &path,
                "the journal must live outside the ledger's folder (on other storage): it is \
                 what survives the loss of that folder",
            ));
        }
        let mut journal = Journal {
            path: path.clone(),
            held: None,
        };
        journal.append(&self.entries()?)?;
        let link = serde_json::to_vec_pretty(&JournalLink { path }).map_err(|e| self.err(e))?;
        write_atomic(&self.dir.join(JOURNAL_LINK), &link)?;
        self.journal = Some(journal);
        Ok(())
    }

    /// Brings the journal (if any) up to date with the entries; an error means it could not
    /// be written, and then no update may leave.
    pub(super) fn sync_journal(&mut self) -> Result<()> {
        if self.journal.is_none() {
            return Ok(());
        }
        let entries = self.entries()?;
        self.journal
            .as_mut()
            .expect("checked above")
            .append(&entries)
    }

    /// The journal's path, if the ledger has one.
    pub fn journal(&self) -> Option<&Path> {
        self.journal.as_ref().map(Journal::path)
    }

    /// Every restore this ledger went through, oldest first.
    pub fn restores(&self) -> Result<Vec<RestoreRecord>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT restored_unix_ms, backup_taken_unix_ms, from_backup, from_journal, basis
                 FROM restores ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(RestoreRecord {
                    restored_unix_ms: r.get(0)?,
                    backup_taken_unix_ms: r.get(1)?,
                    from_backup: r.get::<_, i64>(2)? as u64,
                    from_journal: r.get::<_, i64>(3)? as u64,
                    basis: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }
}

/// One restore, as the ledger records it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestoreRecord {
    /// When (Unix ms).
    pub restored_unix_ms: i64,
    /// When the backup restored from was taken (Unix ms); `None` from a journal alone.
    pub backup_taken_unix_ms: Option<i64>,
    /// Entries taken from the backup.
    pub from_backup: u64,
    /// Entries only the journal held.
    pub from_journal: u64,
    /// Why the restored ledger holds every release: the journal, or the operator's word.
    pub basis: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    taken_unix_ms: i64,
    entries: u64,
    last_entry_id: i64,
    /// File name (relative to the backup) → SHA-256.
    files: std::collections::BTreeMap<String, String>,
}

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackedUp {
    /// Entries in the snapshot.
    pub entries: u64,
    /// Pending update files copied.
    pub pending: usize,
}

/// Backs up the ledger in `ledger_dir` into the new directory `out`, while the site may be
/// recording: a consistent snapshot of the database and the pending bytes of every entry
/// not yet acknowledged in it.
pub fn backup(ledger_dir: &Path, out: &Path) -> Result<BackedUp> {
    if out.exists() {
        return Err(err(out, "exists already: back up into a new directory"));
    }
    let db = ledger_dir.join(DB_FILE);
    if !db.is_file() {
        return Err(err(&db, "no ledger here"));
    }
    let name = out
        .file_name()
        .ok_or_else(|| err(out, "not a directory name"))?;
    let tmp = out.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join(PENDING_DIR)).map_err(|e| err(&tmp, e))?;
    let taken_unix_ms = now_ms();
    let live = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| err(&db, e))?;
    live.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(|e| err(&db, e))?;
    let snapshot = tmp.join(DB_FILE);
    live.execute(
        "VACUUM INTO ?1",
        [snapshot
            .to_str()
            .ok_or_else(|| err(&snapshot, "not UTF-8"))?],
    )
    .map_err(|e| err(&db, e))?;
    drop(live);
    let mut files = std::collections::BTreeMap::new();
    let copy = Ledger::open_file(&snapshot)?;
    let entries = copy.entries()?;
    let mut pending = 0;
    for e in entries.iter().filter(|e| !e.released) {
        let from = copy.pending_path_in(ledger_dir, &e.run_id, e.round, &e.task_id);
        let Ok(bytes) = std::fs::read(&from) else {
            // Acknowledged (and removed) after the snapshot: nothing left to re-send.
            continue;
        };
        if sha256_hex(&bytes) != e.update_sha256 {
            continue;
        }
        let rel = format!(
            "{PENDING_DIR}/{}",
            from.file_name().expect("a file").to_string_lossy()
        );
        write_atomic(&tmp.join(&rel), &bytes)?;
        files.insert(rel, e.update_sha256.clone());
        pending += 1;
    }
    drop(copy);
    // Which journal the ledger appends to, so a restore finds it.
    match std::fs::read(ledger_dir.join(JOURNAL_LINK)) {
        Ok(link) => {
            write_atomic(&tmp.join(JOURNAL_LINK), &link)?;
            files.insert(JOURNAL_LINK.into(), sha256_hex(&link));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(&ledger_dir.join(JOURNAL_LINK), e)),
    }
    let db_bytes = std::fs::read(&snapshot).map_err(|e| err(&snapshot, e))?;
    files.insert(DB_FILE.into(), sha256_hex(&db_bytes));
    let manifest = Manifest {
        format: BACKUP_FORMAT.into(),
        taken_unix_ms,
        entries: entries.len() as u64,
        last_entry_id: entries.iter().map(|e| e.id).max().unwrap_or(0),
        files,
    };
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| err(out, e))?;
    write_atomic(&tmp.join(BACKUP_MANIFEST), &text)?;
    sync_dir(&tmp.join(PENDING_DIR))?;
    sync_dir(&tmp)?;
    std::fs::rename(&tmp, out).map_err(|e| err(out, e))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(BackedUp {
        entries: entries.len() as u64,
        pending,
    })
}

/// What a restore is based on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completeness {
    /// Use the journal the backup's ledger named, or the one given: it holds every release.
    Journal,
    /// No journal: the operator states that the site released nothing after the backup
    /// (e.g. it was stopped when the backup was taken and has not run since).
    NoReleasesSinceBackup,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    /// The record written into the ledger.
    pub record: RestoreRecord,
    /// The journal the restored ledger appends to.
    pub journal: Option<PathBuf>,
}

/// Restores into the ledger folder `ledger_dir` (which must hold no ledger) from the backup
/// `from` and/or the journal `journal`. With a backup, its files are checked against its
/// manifest; with a journal (given, or named by the backed-up ledger), every entry it holds
/// that the backup does not is added, and an entry both hold must be the same release.
/// Without a journal, `completeness` must be [`Completeness::NoReleasesSinceBackup`].
pub fn restore(
    from: Option<&Path>,
    journal: Option<&Path>,
    completeness: Completeness,
    ledger_dir: &Path,
) -> Result<Restored> {
    let db = ledger_dir.join(DB_FILE);
    if db.exists() {
        return Err(err(
            &db,
            "a ledger is here already: restore into an empty folder (a restore never merges \
             into or replaces a live ledger)",
        ));
    }
    let manifest = match from {
        Some(dir) => Some(check_backup(dir)?),
        None => None,
    };
    let backed_journal = match from {
        Some(dir) => Journal::configured(dir)?.map(|j| j.path),
        None => None,
    };
    let journal_path = journal.map(Path::to_path_buf).or(backed_journal);
    if from.is_none() && journal_path.is_none() {
        return Err(err(
            ledger_dir,
            "restore needs a backup, a journal, or both",
        ));
    }
    let basis = match (&journal_path, completeness) {
        (Some(j), _) => format!("journal {}", j.display()),
        (None, Completeness::NoReleasesSinceBackup) => {
            "the operator stated that the site released nothing after the backup".into()
        }
        (None, Completeness::Journal) => {
            return Err(err(
                ledger_dir,
                "this backup's ledger had no journal, so releases recorded after the backup \
                 may be missing and the restored spend could be too low: restore with the \
                 journal (--journal), or state that the site released nothing since the \
                 backup (--no-releases-since-backup)",
            ));
        }
    };
    let journal_entries = match &journal_path {
        Some(j) => {
            if !j.is_file() {
                return Err(err(j, "the journal is not there"));
            }
            read_journal(j)?
        }
        None => Vec::new(),
    };
    std::fs::create_dir_all(ledger_dir.join(PENDING_DIR)).map_err(|e| err(ledger_dir, e))?;
    if let (Some(dir), Some(m)) = (from, &manifest) {
        for rel in m
            .files
            .keys()
            .filter(|f| f.starts_with(&format!("{PENDING_DIR}/")))
        {
            let bytes = std::fs::read(dir.join(rel)).map_err(|e| err(&dir.join(rel), e))?;
            write_atomic(&ledger_dir.join(rel), &bytes)?;
        }
        sync_dir(&ledger_dir.join(PENDING_DIR))?;
        // The database last, under a temporary name: a folder holds a ledger only once the
        // whole restore is there.
        let tmp = ledger_dir.join(format!(".{DB_FILE}.restoring"));
        let bytes = std::fs::read(dir.join(DB_FILE)).map_err(|e| err(&dir.join(DB_FILE), e))?;
        write_atomic(&tmp, &bytes)?;
        let mut ledger = Ledger::open_file(&tmp)?;
        let added = ledger.merge(&journal_entries)?;
        ledger.record_restore(&RestoreRecord {
            restored_unix_ms: now_ms(),
            backup_taken_unix_ms: Some(m.taken_unix_ms),
            from_backup: m.entries,
            from_journal: added,
            basis,
        })?;
        drop(ledger);
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| err(&tmp, e))?;
        std::fs::rename(&tmp, &db).map_err(|e| err(&db, e))?;
    } else {
        let tmp = ledger_dir.join(format!(".{DB_FILE}.restoring"));
        let _ = std::fs::remove_file(&tmp);
        let mut ledger = Ledger::open_file(&tmp)?;
        let added = ledger.merge(&journal_entries)?;
        ledger.record_restore(&RestoreRecord {
            restored_unix_ms: now_ms(),
            backup_taken_unix_ms: None,
            from_backup: 0,
            from_journal: added,
            basis,
        })?;
        drop(ledger);
        std::fs::rename(&tmp, &db).map_err(|e| err(&db, e))?;
    }
    sync_dir(ledger_dir)?;
    let mut ledger = Ledger::open(ledger_dir)?;
    if let Some(j) = &journal_path {
        ledger.set_journal(j)?;
    }
    let record = ledger
        .restores()?
        .pop()
        .expect("the restore was just recorded");
    Ok(Restored {
        record,
        journal: journal_path,
    })
}

/// Checks every file of the backup `dir` against its manifest.
fn check_backup(dir: &Path) -> Result<Manifest> {
    let path = dir.join(BACKUP_MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| {
        err(
            &path,
            format!("{e} (not a ledger backup, or one that did not complete)"),
        )
    })?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| err(&path, e))?;
    if m.format != BACKUP_FORMAT {
        return Err(err(
            &path,
            format!("format {:?}, expected {BACKUP_FORMAT:?}", m.format),
        ));
    }
    for (rel, sha) in &m.files {
        let f = dir.join(rel);
        let bytes = std::fs::read(&f).map_err(|e| err(&f, e))?;
        if &sha256_hex(&bytes) != sha {
            return Err(err(&f, "does not match the backup's manifest (damaged?)"));
        }
    }
    if !m.files.contains_key(DB_FILE) {
        return Err(err(&path, "the manifest names no database"));
    }
    Ok(m)
}

impl Ledger {
    /// Adds every entry of `journal` this ledger does not hold (as acknowledged: its bytes
    /// are gone), in the journal's order; an entry it holds must be the same release.
    /// Returns how many were added.
    fn merge(&mut self, journal: &[LedgerEntry]) -> Result<u64> {
        let mut added = 0;
        for j in journal {
            match self.entry(&j.run_id, j.round, &j.task_id)? {
                Some(held) => {
                    if held.update_sha256 != j.update_sha256
                        || held.q != j.q
                        || held.steps != j.steps
                        || held.noise_multiplier != j.noise_multiplier
                        || held.unit != j.unit
                    {
                        return Err(self.err(format!(
                            "run {} round {} task {}: the backup and the journal hold different \
                             releases for this task; they are not of the same ledger",
                            j.run_id, j.round, j.task_id
                        )));
                    }
                }
                None => {
                    self.conn
                        .execute(
                            "INSERT INTO entries (recorded_unix_ms, run_id, round, task_id, unit,
                                units, clip_norm, noise_multiplier, expected_batch_size, epochs,
                                q, steps, update_sha256, metrics_released, released,
                                count_noise_multiplier, released_count)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 1,
                                ?15, ?16)",
                            params![
                                j.recorded_unix_ms,
                                j.run_id,
                                j.round as i64,
                                j.task_id,
                                j.unit.to_string(),
                                j.units as i64,
                                j.clip_norm,
                                j.noise_multiplier,
                                j.expected_batch_size as i64,
                                j.epochs as i64,
                                j.q,
                                j.steps as i64,
                                j.update_sha256,
                                j.metrics_released,
                                j.count.map(|c| c.noise_multiplier),
                                j.count.map(|c| c.released as i64),
                            ],
                        )
                        .map_err(|e| self.err(e))?;
                    added += 1;
                }
            }
        }
        Ok(added)
    }

    fn record_restore(&mut self, r: &RestoreRecord) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO restores (restored_unix_ms, backup_taken_unix_ms, from_backup,
                    from_journal, basis) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    r.restored_unix_ms,
                    r.backup_taken_unix_ms,
                    r.from_backup as i64,
                    r.from_journal as i64,
                    r.basis
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}
