//! The feedback store as a site's data: before each training task the trainer takes a
//! snapshot of the sessions stored at that moment (sessions stored during training wait for
//! the next round), encoded with the federation's vocabulary and split by the hashed
//! session id ([`fedflow_common::data::split_of`]) like a data file, so a session keeps its
//! split as the store grows.

use std::sync::{Arc, Mutex};

use fedflow_common::data::{SiteDataset, Vocab};

use super::store::FeedbackStore;
use crate::Result;
use crate::site::source::{SiteSource, TaskStart};

/// A site's data taken from its feedback store.
#[derive(Debug)]
pub struct StoreSource {
    store: Arc<FeedbackStore>,
    vocab: Vocab,
    val_fraction: f64,
    /// The store generation the current dataset was built from, and its newest session.
    seen: Mutex<Option<(u64, u64)>>,
}

impl StoreSource {
    /// The data `store` holds now, with the source that takes it in again before each task.
    pub fn open(
        store: Arc<FeedbackStore>,
        vocab: &Vocab,
        val_fraction: f64,
    ) -> Result<(SiteDataset, StoreSource)> {
        let snap = store.snapshot()?;
        let dataset = SiteDataset::from_records(&snap.records, vocab, val_fraction)?;
        let source = StoreSource {
            store,
            vocab: vocab.clone(),
            val_fraction,
            seen: Mutex::new(Some((snap.generation, snap.last_seq))),
        };
        Ok((dataset, source))
    }
}

impl SiteSource for StoreSource {
    /// The stored sessions, when the store changed since the last snapshot. Evaluations
    /// take in the store too (they measure on everything the site holds); a training task
    /// also records which sessions it used.
    fn poll(&self, start: TaskStart) -> Result<Option<SiteDataset>> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let training = matches!(start, TaskStart::Training(_));
        if let Some((generation, last_seq)) = *seen
            && generation == self.store.generation()?
        {
            if training {
                self.store.mark_trained(last_seq)?;
            }
            return Ok(None);
        }
        let snap = self.store.snapshot()?;
        let dataset = SiteDataset::from_records(&snap.records, &self.vocab, self.val_fraction)?;
        if training {
            self.store.mark_trained(snap.last_seq)?;
        }
        *seen = Some((snap.generation, snap.last_seq));
        Ok(Some(dataset))
    }
}
