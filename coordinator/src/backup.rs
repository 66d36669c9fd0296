//! Backups of a coordinator's data directory, taken while it serves, and their restore.
//!
//! A backup is a directory holding what a coordinator needs to resume:
//!
//! ```text
//! <out>/fedflow.sqlite          a consistent snapshot of the database (SQLite VACUUM INTO)
//! <out>/checkpoints/...         every checkpoint the snapshot records, hash-verified
//! <out>/security-audit.jsonl    the security audit log, whole records up to the backup
//! <out>/backup.json             the manifest, written last
//! ```
//!
//! The snapshot is one read transaction of the live database (WAL readers never block the
//! writer), so it is a committed state; checkpoints are immutable once their round is
//! committed, and each is copied with its SHA-256 checked against the snapshot, so a backup
//! never pairs a database with other models than the ones it names. It is written under a
//! temporary name, synced, and renamed into place only when complete: a directory named
//! `<out>` is a whole backup. Uploads in flight (`incoming/`) and an open round are not
//! kept: a restored coordinator begins that round again, as after a crash. Reports are
//! regenerated from the database.
//!
//! [`restore`] copies a backup into an empty data directory after checking every
//! checkpoint's hash and the audit log's chain.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::security::SECURITY_LOG;
use crate::security::audit_log;
use crate::store::DB_FILE;
use crate::{Error, Result};

/// The manifest's file name in a backup.
pub const MANIFEST: &str = "backup.json";
/// The manifest's format.
pub const FORMAT: &str = "fedflow.coordinator-backup/1";

/// What a backup holds (`backup.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// When it was taken (Unix ms).
    pub created_at_unix_ms: i64,
    /// The database's schema version.
    pub schema_version: i64,
    /// Every run: its id, last committed round and that round's model hash.
    pub runs: Vec<RunPoint>,
    /// Checkpoint files copied.
    pub checkpoints: usize,
    /// Their bytes.
    pub checkpoint_bytes: u64,
    /// Records of the security audit log copied, and the last one's hash.
    pub audit_records: u64,
    /// See `audit_records`.
    pub audit_head: String,
}

/// A run's state in a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunPoint {
    /// The run.
    pub run_id: String,
    /// Its last committed round.
    pub committed_round: u64,
    /// That round's model SHA-256.
    pub model_sha256: String,
}

fn backup_err(what: impl std::fmt::Display) -> Error {
    Error::Store(what.to_string())
}

fn io(path: &Path, e: std::io::Error) -> Error {
    backup_err(format!("{}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

/// Copies `from` to `to` (synced), returning the bytes' SHA-256 and length.
fn copy_hashed(from: &Path, to: &Path) -> Result<(String, u64)> {
    let mut src = std::fs::File::open(from).map_err(|e| io(from, e))?;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    let mut dst = std::fs::File::create(to).map_err(|e| io(to, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(|e| io(from, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).map_err(|e| io(to, e))?;
        total += n as u64;
    }
    dst.sync_all().map_err(|e| io(to, e))?;
    Ok((fedflow_common::hash::hex(&hasher.finalize()), total))
}

/// The checkpoints a database records: (relative path, SHA-256, size).
fn checkpoints(db: &Connection) -> Result<Vec<(String, String, u64)>> {
    let mut stmt = db.prepare("SELECT path, sha256, size_bytes FROM checkpoints ORDER BY path")?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get(1)?,
                r.get::<_, i64>(2)? as u64,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Every run's last committed round and its model hash.
fn run_points(db: &Connection) -> Result<Vec<RunPoint>> {
    let mut stmt = db.prepare(
        "SELECT r.run_id, r.round, r.model_sha256 FROM rounds r \
         WHERE r.status = 'committed' AND r.round = \
         (SELECT MAX(round) FROM rounds WHERE run_id = r.run_id AND status = 'committed') \
         ORDER BY r.run_id",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(RunPoint {
                run_id: r.get(0)?,
                committed_round: r.get::<_, i64>(1)? as u64,
                model_sha256: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// A path inside `root` for a relative `path` from the database, refusing one that would
/// leave it.
fn inside(root: &Path, path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(backup_err(format!(
            "the database records a checkpoint outside the data directory: {path:?}"
        )));
    }
    Ok(root.join(p))
}

/// Copies the whole records (lines) of the audit log `from` to `to`; returns how many and
/// the chain's head, after checking the chain.
fn copy_audit_log(from: &Path, to: &Path) -> Result<(u64, String)> {
    let bytes = match std::fs::read(from) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(from, e)),
    };
    // A record being appended right now may be incomplete: keep whole lines only.
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let kept = &bytes[..whole];
    let verified = audit_log::verify_bytes(kept).map_err(|b| {
        backup_err(format!(
            "{}: the audit log does not verify: {b}",
            from.display()
        ))
    })?;
    let mut f = std::fs::File::create(to).map_err(|e| io(to, e))?;
    f.write_all(kept).map_err(|e| io(to, e))?;
    f.sync_all().map_err(|e| io(to, e))?;
    Ok((verified.lines, verified.head))
}

/// Backs up the data directory `data` (a coordinator may be serving it) into the new
/// directory `out`.
pub fn backup(data: &Path, out: &Path) -> Result<Manifest> {
    if out.exists() {
        return Err(backup_err(format!(
            "{} exists: a backup goes to a new directory",
            out.display()
        )));
    }
    let db_path = data.join(DB_FILE);
    if !db_path.is_file() {
        return Err(Error::NotFound(format!(
            "{} holds no coordinator database ({DB_FILE}); pass the --data directory the \
             coordinator runs with",
            data.display()
        )));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .ok_or_else(|| backup_err(format!("{}: not a directory name", out.display())))?;
    let tmp = parent.join(format!(".{}.partial", name.to_string_lossy()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let done = (|| -> Result<Manifest> {
        let live = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        live.busy_timeout(std::time::Duration::from_secs(30))?;
        let snapshot = tmp.join(DB_FILE);
        live.execute(
            "VACUUM INTO ?1",
            [snapshot
                .to_str()
                .ok_or_else(|| backup_err(format!("{}: not UTF-8", snapshot.display())))?],
        )?;
        drop(live);
        std::fs::File::open(&snapshot)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(&snapshot, e))?;
        let db = Connection::open_with_flags(&snapshot, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let schema_version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let mut bytes = 0;
        let files = checkpoints(&db)?;
        for (path, sha256, size) in &files {
            let from = inside(data, path)?;
            if !from.is_file() {
                return Err(backup_err(format!(
                    "{} is gone (retention removed it after the snapshot was taken): run the \
                     backup again",
                    from.display()
                )));
            }
            let (got, len) = copy_hashed(&from, &inside(&tmp, path)?)?;
            if &got != sha256 || len != *size {
                return Err(backup_err(format!(
                    "{}: its SHA-256 is {got} ({len} bytes), the database records {sha256} \
                     ({size} bytes): the data directory is damaged",
                    from.display()
                )));
            }
            bytes += len;
        }
        for (path, _, _) in &files {
            if let Some(dir) = inside(&tmp, path)?.parent() {
                sync_dir(dir)?;
            }
        }
        let (audit_records, audit_head) =
            copy_audit_log(&data.join(SECURITY_LOG), &tmp.join(SECURITY_LOG))?;
        let manifest = Manifest {
            format: FORMAT.to_string(),
            created_at_unix_ms: fedflow_common::clock::now_ms(),
            schema_version,
            runs: run_points(&db)?,
            checkpoints: files.len(),
            checkpoint_bytes: bytes,
            audit_records,
            audit_head,
        };
        let json = serde_json::to_vec_pretty(&manifest)?;
        fedflow_common::fsio::write_atomic(&tmp.join(MANIFEST), &json)?;
        sync_dir(&tmp)?;
        Ok(manifest)
    })();
    match done {
        Ok(manifest) => {
            std::fs::rename(&tmp, out).map_err(|e| io(out, e))?;
            sync_dir(parent)?;
            Ok(manifest)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Restores the backup `from` into the data directory `data`, which must be empty or
/// absent; checks every checkpoint's hash and the audit log's chain first. Returns the
/// backup's manifest.
pub fn restore(from: &Path, data: &Path) -> Result<Manifest> {
    let manifest_path = from.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
        backup_err(format!(
            "{}: {e} (a backup made by `fedflow-coordinator backup` has one; without it the \
             backup is incomplete)",
            manifest_path.display()
        ))
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| backup_err(format!("{}: {e}", manifest_path.display())))?;
    if manifest.format != FORMAT {
        return Err(backup_err(format!(
            "{}: format {:?}, this fedflow restores {FORMAT:?}",
            manifest_path.display(),
            manifest.format
        )));
    }
    if data.exists()
        && std::fs::read_dir(data)
            .map_err(|e| io(data, e))?
            .next()
            .is_some()
    {
        return Err(backup_err(format!(
            "{} is not empty: restore into a new data directory (move the old one aside first)",
            data.display()
        )));
    }
    let db = Connection::open_with_flags(from.join(DB_FILE), OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let files = checkpoints(&db)?;
    let audit = from.join(SECURITY_LOG);
    if audit.exists() {
        match audit_log::verify(&audit)? {
            Ok(v) if v.lines == manifest.audit_records && v.head == manifest.audit_head => {}
            Ok(v) => {
                return Err(backup_err(format!(
                    "{}: {} records ending in {}, the manifest says {} ending in {}",
                    audit.display(),
                    v.lines,
                    v.head,
                    manifest.audit_records,
                    manifest.audit_head
                )));
            }
            Err(b) => {
                return Err(backup_err(format!(
                    "{}: the audit log does not verify: {b}",
                    audit.display()
                )));
            }
        }
    }
    std::fs::create_dir_all(data).map_err(|e| io(data, e))?;
    let copy = || -> Result<()> {
        for (path, sha256, _) in &files {
            let (got, _) = copy_hashed(&inside(from, path)?, &inside(data, path)?)?;
            if &got != sha256 {
                return Err(backup_err(format!(
                    "{}: its SHA-256 is {got}, the backup's database records {sha256}: the \
                     backup is damaged",
                    inside(from, path)?.display()
                )));
            }
            if let Some(dir) = inside(data, path)?.parent() {
                sync_dir(dir)?;
            }
        }
        if audit.exists() {
            copy_hashed(&audit, &data.join(SECURITY_LOG))?;
        }
        // The database last: until it is there, the directory holds no coordinator.
        copy_hashed(&from.join(DB_FILE), &data.join(DB_FILE))?;
        sync_dir(data)
    };
    if let Err(e) = copy() {
        // Leave nothing a coordinator could start from.
        let _ = std::fs::remove_file(data.join(DB_FILE));
        return Err(e);
    }
    Ok(manifest)
}
