//! Where a site's data comes from between tasks: [`SiteSource`], asked before every task
//! for the data the site holds then, and its file implementation [`DataSource`], re-read
//! when it changed, so that feedback which arrived since the last round is used by the next
//! one.
//!
//! A file's change is seen from the file's size and modification time (and its identity, inode
//! and device, where the platform has them): a file that grew, was rewritten or replaced is
//! read again, with exactly the validation of the first read (every row checked, errors
//! naming file and line) and the same hashed train/validation split by session id
//! ([`fedflow_common::data::split_of`]), so a session keeps its split as the file grows. A
//! file that cannot be read or holds a bad row fails the task with that reason: the site
//! declines the round rather than train on part of its data, and tries again at the next
//! task.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use fedflow_common::data::{LoadOptions, SiteDataset, Vocab};

use crate::Result;

/// The task a [`SiteSource`] is asked for data before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStart {
    /// A training task of this round.
    Training(u64),
    /// An evaluation task of the model of this round (the publish gate's baseline
    /// evaluations measure an older round again, on the data the site holds now).
    Evaluation(u64),
}

/// The data a site trains and evaluates on, taken in again before each task.
///
/// A source returns a new dataset when what the site holds changed since it was last asked
/// (`None`: keep the current one). It must keep each session's train/validation split
/// ([`fedflow_common::data::split_of`]) and validate as the first load did; an error
/// fails the task with that reason and the site keeps the data it had.
pub trait SiteSource: Send + Sync + std::fmt::Debug {
    /// The data the site holds when the task `start` begins, if it changed.
    fn poll(&self, start: TaskStart) -> Result<Option<SiteDataset>>;
}

/// What identifies one version of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    id: (u64, u64),
}

fn stamp(path: &std::path::Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    #[cfg(unix)]
    let id = {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    };
    #[cfg(not(unix))]
    let id = (0, 0);
    Ok(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        id,
    })
}

/// A site's data file with how it is read.
#[derive(Debug)]
pub struct DataSource {
    path: PathBuf,
    vocab: Vocab,
    options: LoadOptions,
    val_fraction: f64,
    /// The version read last.
    seen: Mutex<Option<Stamp>>,
}

impl DataSource {
    /// Reads `path` (CSV or JSON Lines) as [`SiteDataset::load`] does and returns the
    /// dataset with the source that re-reads it.
    pub fn open(
        path: impl Into<PathBuf>,
        vocab: &Vocab,
        options: LoadOptions,
        val_fraction: f64,
    ) -> Result<(SiteDataset, DataSource)> {
        let path = path.into();
        let before = stamp(&path).ok();
        let dataset = SiteDataset::load(&path, vocab, &options, val_fraction)?;
        let source = DataSource {
            path,
            vocab: vocab.clone(),
            options,
            val_fraction,
            seen: Mutex::new(before),
        };
        Ok((dataset, source))
    }

    /// The file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The dataset the file holds now, when it changed since it was last read.
    pub fn reload_if_changed(&self) -> Result<Option<SiteDataset>> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = stamp(&self.path).map_err(|e| fedflow_common::Error::io(&self.path, e))?;
        if seen.as_ref() == Some(&now) {
            return Ok(None);
        }
        let dataset = SiteDataset::load(&self.path, &self.vocab, &self.options, self.val_fraction)?;
        // The stamp taken before reading: a write during the read is seen next time.
        *seen = Some(now);
        Ok(Some(dataset))
    }
}

impl SiteSource for DataSource {
    /// The file as it is now, whatever the task: feedback appended at any time is used by
    /// the next task.
    fn poll(&self, _start: TaskStart) -> Result<Option<SiteDataset>> {
        self.reload_if_changed()
    }
}

impl<T: SiteSource + ?Sized> SiteSource for std::sync::Arc<T> {
    fn poll(&self, start: TaskStart) -> Result<Option<SiteDataset>> {
        (**self).poll(start)
    }
}
