//! The model the agent serves: the federation's published version as installed in the
//! site's published folder ([`crate::published`]), swapped atomically when a new one is
//! installed. A request takes the current version once (an `Arc`) and answers every session
//! of it with that version, so a swap never fails a request or mixes versions within one.

use std::path::Path;
use std::sync::{Arc, RwLock};

use candle_core::Device;
use fedflow_common::data::{EncodedSession, Vocab};
use fedflow_common::model::{AttentionFlowModel, load_model};

use crate::published::PublishedSink;
use crate::{Error, Result};

/// Sessions per forward pass.
const PREDICT_BATCH: usize = 256;

/// One loaded version.
#[derive(Debug)]
pub struct ServedModel {
    /// The run's round the version is.
    pub round: u64,
    /// SHA-256 of its parameters.
    pub model_sha256: String,
    model: AttentionFlowModel,
    vocab: Vocab,
}

impl ServedModel {
    /// Loads the model directory `dir`; its vocabulary must be the site's.
    pub fn load(dir: &Path, round: u64, site_vocab: &Vocab) -> Result<ServedModel> {
        let (model, vocab, card) = load_model(dir, &Device::Cpu)?;
        if vocab != *site_vocab {
            return Err(Error::Published(format!(
                "{}: the model's vocabulary is not the site's",
                dir.display()
            )));
        }
        Ok(ServedModel {
            round,
            model_sha256: card.params_sha256,
            model,
            vocab,
        })
    }

    /// The vocabulary sessions are encoded with.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Integrated-gradients attribution of `class`'s logit over the events of `session`
    /// (see [`fedflow_common::model::integrated_gradients`]).
    pub fn explain(
        &self,
        session: &EncodedSession,
        class: usize,
        steps: usize,
    ) -> Result<fedflow_common::model::Attribution> {
        Ok(fedflow_common::model::integrated_gradients(
            &self.model,
            session,
            class,
            steps,
        )?)
    }

    /// Class probabilities of each session (index `k` is label `k + 1`).
    pub fn probabilities(&self, sessions: &[EncodedSession]) -> Result<Vec<Vec<f32>>> {
        Ok(fedflow_common::train::probabilities(
            &self.model,
            sessions,
            PREDICT_BATCH,
        )?)
    }
}

/// The version being served, swapped atomically.
#[derive(Debug, Default)]
pub struct Served {
    current: RwLock<Option<Arc<ServedModel>>>,
}

impl Served {
    /// The version serving now (`None` before the first is installed).
    pub fn current(&self) -> Option<Arc<ServedModel>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves `model` from now on; requests already running finish with the old one.
    pub fn swap(&self, model: ServedModel) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(model));
    }

    /// Loads the version `sink` names, when it is not the one serving; returns its round
    /// when it swapped.
    pub fn follow(&self, sink: &PublishedSink) -> Result<Option<u64>> {
        let Some(c) = sink.current()? else {
            return Ok(None);
        };
        if self
            .current()
            .is_some_and(|m| m.model_sha256 == c.model_sha256)
        {
            return Ok(None);
        }
        let model = ServedModel::load(&sink.dir.join(&c.path), c.round, &sink.vocab)?;
        self.swap(model);
        Ok(Some(c.round))
    }
}
