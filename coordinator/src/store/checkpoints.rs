//! Checkpoint files: where a run's models and strategy states live on disk, writing them
//! durably, reading them back verified against their recorded hash, recording their rows,
//! and removing the orphans a crash between file and row leaves behind (see the crash-safety
//! notes in the module root).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use fedflow_common::params::ParamSet;
use rusqlite::{OptionalExtension, Transaction, params};

use super::{CHECKPOINT_DIR, Store, to_i64};
use crate::{Error, Result};

impl Store {
    /// Where the global model of a committed `round` is stored: the model's canonical
    /// safetensors bytes, whose SHA-256 is the model hash. Serving it from the file spares
    /// holding a serialised copy of the model in memory.
    pub fn model_checkpoint_path(&self, run_id: &str, round: u64) -> PathBuf {
        self.dir
            .join(Self::checkpoint_rel(run_id, round, CheckpointKind::Model))
    }

    pub(super) fn checkpoint_rel(run_id: &str, round: u64, kind: CheckpointKind) -> String {
        format!(
            "{CHECKPOINT_DIR}/{run_id}/round-{round:06}{}",
            kind.suffix()
        )
    }

    pub(super) fn write_checkpoint(
        &self,
        run_id: &str,
        round: u64,
        kind: CheckpointKind,
        params: &ParamSet,
    ) -> Result<WrittenCheckpoint> {
        let rel = Self::checkpoint_rel(run_id, round, kind);
        let path = self.dir.join(&rel);
        let run_dir = self.dir.join(CHECKPOINT_DIR).join(run_id);
        std::fs::create_dir_all(&run_dir).map_err(|e| {
            Error::Store(format!(
                "cannot create checkpoint directory {}: {e}",
                run_dir.display()
            ))
        })?;
        // Streamed tensor by tensor and hashed on the way (`ParamSet::save`, which writes
        // with `write_atomic`'s guarantees), so no serialised copy of the model is held.
        let (size, sha256) = params.save(&path)?;
        crate::memtrace::probe(format_args!("checkpoint-written round={round}"));
        Ok(WrittenCheckpoint {
            kind,
            rel,
            sha256,
            size,
        })
    }

    pub(super) fn load_checkpoint(
        &self,
        run_id: &str,
        round: u64,
        kind: CheckpointKind,
        expected: &str,
    ) -> Result<ParamSet> {
        let rel: Option<(String, i64)> = self
            .conn
            .query_row(
                "SELECT path, size_bytes FROM checkpoints
                 WHERE run_id = ?1 AND round = ?2 AND kind = ?3",
                params![run_id, to_i64(round)?, kind.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (rel, size) = rel.ok_or_else(|| {
            Error::Store(format!(
                "run {run_id} round {round} has no {} checkpoint recorded; the database is inconsistent",
                kind.as_str()
            ))
        })?;
        let path = self.dir.join(&rel);
        // Parsed and hashed in one pass, tensor by tensor: the file's bytes are never held
        // next to the parsed model.
        let (model, actual_size, actual) = ParamSet::load_hashed(&path).map_err(|e| {
            Error::Store(format!(
                "checkpoint {} of run {run_id} round {round} cannot be read or is corrupt: {e}; \
                 restore it from a backup",
                path.display()
            ))
        })?;
        if actual != expected || actual_size as i64 != size {
            return Err(Error::Store(format!(
                "checkpoint {} of run {run_id} round {round} is corrupt: {actual_size} bytes with \
                 sha256 {actual}, expected {size} bytes with sha256 {expected}; restore it from a backup",
                path.display(),
            )));
        }
        Ok(model)
    }

    /// Deletes checkpoint files (and write_atomic temporaries) no checkpoint row points to;
    /// returns how many were removed. Files that are not fedflow's are left alone.
    pub(super) fn remove_orphans(&self) -> Result<usize> {
        let known: HashSet<String> = {
            let mut stmt = self.conn.prepare("SELECT path FROM checkpoints")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let root = self.dir.join(CHECKPOINT_DIR);
        let io = |p: &Path, e: std::io::Error| {
            Error::Store(format!("cannot clean up {}: {e}", p.display()))
        };
        let mut removed = 0;
        for run_dir in std::fs::read_dir(&root).map_err(|e| io(&root, e))? {
            let run_dir = run_dir.map_err(|e| io(&root, e))?;
            if !run_dir
                .file_type()
                .map_err(|e| io(&run_dir.path(), e))?
                .is_dir()
            {
                continue;
            }
            let Some(run_name) = run_dir.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let mut left = 0;
            for entry in std::fs::read_dir(run_dir.path()).map_err(|e| io(&run_dir.path(), e))? {
                let entry = entry.map_err(|e| io(&run_dir.path(), e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else {
                    left += 1;
                    continue;
                };
                let rel = format!("{CHECKPOINT_DIR}/{run_name}/{name}");
                let ours = name.starts_with("round-") || name.starts_with(".round-");
                if known.contains(&rel) || !ours {
                    left += 1;
                    continue;
                }
                std::fs::remove_file(entry.path()).map_err(|e| io(&entry.path(), e))?;
                removed += 1;
            }
            if left == 0 {
                // Only the directory of a run whose creation never committed gets here;
                // failing to remove it is harmless.
                let _ = std::fs::remove_dir(run_dir.path());
            }
        }
        Ok(removed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CheckpointKind {
    Model,
    Strategy,
}

impl CheckpointKind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Model => "model",
            CheckpointKind::Strategy => "strategy",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            CheckpointKind::Model => ".safetensors",
            CheckpointKind::Strategy => ".strategy.safetensors",
        }
    }
}

#[derive(Debug)]
pub(super) struct WrittenCheckpoint {
    kind: CheckpointKind,
    rel: String,
    /// SHA-256 of the file's bytes.
    pub(super) sha256: String,
    size: u64,
}

pub(super) fn insert_checkpoint(
    tx: &Transaction<'_>,
    run_id: &str,
    round: u64,
    c: &WrittenCheckpoint,
    now: i64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO checkpoints (run_id, round, kind, path, sha256, size_bytes, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            run_id,
            to_i64(round)?,
            c.kind.as_str(),
            c.rel,
            c.sha256,
            to_i64(c.size)?,
            now
        ],
    )?;
    Ok(())
}
