//! The model the agent serves: the federation's published version as installed in the
//! site's published folder ([`crate::published`]), swapped atomically when a new one is
//! installed. A request takes the current version once (an `Arc`) and answers every session
//! of it with that version, so a swap never fails a request or mixes versions within one.
//! With personalisation on, the served model may be the published version fine-tuned on the
//! site's data ([`crate::personalise`]): it answers under the published version's round and
//! hash, marked `personalised`.

use std::path::Path;
use std::sync::{Arc, RwLock};

use candle_core::Device;
use fedflow_common::data::{EncodedSession, SiteDataset, Vocab};
use fedflow_common::model::{AttentionFlowModel, load_model};

use crate::personalise::{PersonalisationReport, PersonaliseConfig, personalise};
use crate::published::PublishedSink;
use crate::{Error, Result};

/// Sessions per forward pass.
const PREDICT_BATCH: usize = 256;

/// One loaded version.
#[derive(Debug)]
pub struct ServedModel {
    /// The run's round the version is.
    pub round: u64,
    /// SHA-256 of the published version's parameters (a personalised model's base).
    pub model_sha256: String,
    /// Whether it is pinned locally rather than the federation's published version.
    pub pinned: bool,
    /// Whether it is the published version fine-tuned on the site's data.
    pub personalised: bool,
    model: AttentionFlowModel,
    vocab: Vocab,
}

impl ServedModel {
    /// Loads the model directory `dir`; its vocabulary must be the site's.
    pub fn load(dir: &Path, round: u64, site_vocab: &Vocab) -> Result<ServedModel> {
        Self::load_as(dir, round, false, site_vocab)
    }

    fn load_as(dir: &Path, round: u64, pinned: bool, site_vocab: &Vocab) -> Result<ServedModel> {
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
            pinned,
            personalised: false,
            model,
            vocab,
        })
    }

    /// The model.
    pub fn model(&self) -> &AttentionFlowModel {
        &self.model
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
#[derive(Debug)]
pub struct Served {
    current: RwLock<Option<Arc<ServedModel>>>,
    personalisation: RwLock<Option<PersonalisationReport>>,
    /// Counts swaps and personalisation attempts, for whoever waits on them.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Served {
    fn default() -> Self {
        Served {
            current: RwLock::default(),
            personalisation: RwLock::default(),
            changes: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Served {
    /// The version serving now (`None` before the first is installed).
    pub fn current(&self) -> Option<Arc<ServedModel>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A receiver that sees a new value after every swap and personalisation attempt.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// The figures of the last personalisation attempt.
    pub fn personalisation(&self) -> Option<PersonalisationReport> {
        self.personalisation
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Fine-tunes the published version serving now on `data` and serves the result when it
    /// predicts the site's validation split better; returns the figures. A pinned or an
    /// already personalised model is left alone (`None`).
    pub fn personalise(
        &self,
        data: &SiteDataset,
        cfg: &PersonaliseConfig,
    ) -> Result<Option<PersonalisationReport>> {
        let Some(base) = self.current().filter(|m| !m.pinned && !m.personalised) else {
            return Ok(None);
        };
        let out = personalise(&base.model, data, cfg)?;
        if let Some(model) = out.model {
            let mut current = self
                .current
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Only over the base it was tuned from: a newer version wins.
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &base)) {
                *current = Some(Arc::new(ServedModel {
                    round: base.round,
                    model_sha256: base.model_sha256.clone(),
                    pinned: false,
                    personalised: true,
                    model,
                    vocab: base.vocab.clone(),
                }));
            }
        }
        *self
            .personalisation
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(out.report.clone());
        self.changed();
        Ok(Some(out.report))
    }

    /// Serves `model` from now on; requests already running finish with the old one.
    pub fn swap(&self, model: ServedModel) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(model));
        self.changed();
    }

    /// Loads the version `sink` says to serve (the pinned one, else the published one),
    /// when it is not the one serving; returns its round when it swapped.
    pub fn follow(&self, sink: &PublishedSink) -> Result<Option<u64>> {
        let Some(s) = sink.serving()? else {
            return Ok(None);
        };
        if self
            .current()
            .is_some_and(|m| m.model_sha256 == s.version.model_sha256 && m.pinned == s.pinned)
        {
            return Ok(None);
        }
        let model = ServedModel::load_as(
            &sink.dir.join(&s.version.path),
            s.version.round,
            s.pinned,
            &sink.vocab,
        )?;
        self.swap(model);
        Ok(Some(s.version.round))
    }
}
