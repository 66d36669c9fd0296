//! Saved models: a directory holding the parameters (`model.safetensors`), the event
//! vocabulary (`vocab.json`) and a model card (`model.json`) that ties them together with
//! content hashes, so a model is never evaluated against the wrong vocabulary.

use std::path::Path;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::{AttentionFlowModel, ModelConfig};
use crate::data::Vocab;
use crate::params::ParamSet;
use crate::{Error, Result};

/// Format tag of `model.json`.
pub const MODEL_FORMAT: &str = "fedflow-model/1";
/// File names inside a model directory.
pub const PARAMS_FILE: &str = "model.safetensors";
/// See [`PARAMS_FILE`].
pub const VOCAB_FILE: &str = "vocab.json";
/// See [`PARAMS_FILE`].
pub const CARD_FILE: &str = "model.json";

/// The model card: what `model.safetensors` is and what it was built for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    /// Always [`MODEL_FORMAT`].
    pub format: String,
    /// The architecture.
    pub model: ModelConfig,
    /// SHA-256 (hex) of the canonical safetensors bytes of the parameters.
    pub params_sha256: String,
    /// SHA-256 (hex) of the vocabulary's canonical JSON.
    pub vocab_sha256: String,
    /// Number of scalar parameters.
    pub parameters: usize,
}

/// SHA-256 (hex) of a vocabulary's canonical JSON form.
pub fn vocab_sha256(vocab: &Vocab) -> String {
    crate::hash::sha256_hex(vocab.to_json_string().as_bytes())
}

/// Writes `model` and `vocab` into `dir` (created if missing); each file is replaced
/// atomically, the card last, so a crash never leaves a card describing other parameters.
pub fn save_model(dir: &Path, model: &AttentionFlowModel, vocab: &Vocab) -> Result<ModelCard> {
    let params = ParamSet::from_varmap(model.varmap())?;
    save_params(dir, &params, model.config(), vocab)
}

/// [`save_model`] for parameters held as a [`ParamSet`] (a checkpoint, a downloaded
/// version), checked against `config`'s shapes and `vocab`'s size first.
pub fn save_params(
    dir: &Path,
    params: &ParamSet,
    config: &ModelConfig,
    vocab: &Vocab,
) -> Result<ModelCard> {
    if vocab.len() != config.vocab_size {
        return Err(Error::ParamMismatch(format!(
            "vocabulary has {} ids but the model expects {}",
            vocab.len(),
            config.vocab_size
        )));
    }
    let expected = AttentionFlowModel::new(config, &Device::Cpu, 0)?;
    params.validate_against(&ParamSet::from_varmap(expected.varmap())?.spec())?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (_, params_sha256) = params.save(dir.join(PARAMS_FILE))?;
    vocab.save(dir.join(VOCAB_FILE))?;
    let card = ModelCard {
        format: MODEL_FORMAT.to_string(),
        model: config.clone(),
        params_sha256,
        vocab_sha256: vocab_sha256(vocab),
        parameters: params.num_elements(),
    };
    crate::fsio::write_atomic(
        &dir.join(CARD_FILE),
        serde_json::to_string_pretty(&card)?.as_bytes(),
    )?;
    Ok(card)
}

/// Loads a model directory written by [`save_model`], verifying both hashes, onto `device`.
pub fn load_model(dir: &Path, device: &Device) -> Result<(AttentionFlowModel, Vocab, ModelCard)> {
    let card_path = dir.join(CARD_FILE);
    let text = std::fs::read_to_string(&card_path).map_err(|e| Error::io(&card_path, e))?;
    let card: ModelCard = serde_json::from_str(&text).map_err(|e| {
        Error::Config(format!(
            "{}: not a fedflow model card: {e}",
            card_path.display()
        ))
    })?;
    if card.format != MODEL_FORMAT {
        return Err(Error::Config(format!(
            "{}: format `{}` is not `{MODEL_FORMAT}`",
            card_path.display(),
            card.format
        )));
    }
    let vocab = Vocab::load(dir.join(VOCAB_FILE))?;
    if vocab_sha256(&vocab) != card.vocab_sha256 {
        return Err(Error::ParamMismatch(format!(
            "{}: the vocabulary does not match the model card (hash differs)",
            dir.join(VOCAB_FILE).display()
        )));
    }
    let params = ParamSet::load(dir.join(PARAMS_FILE))?;
    if params.sha256_hex()? != card.params_sha256 {
        return Err(Error::ParamMismatch(format!(
            "{}: the parameters do not match the model card (hash differs)",
            dir.join(PARAMS_FILE).display()
        )));
    }
    // The card's config sizes the model about to be allocated and no hash covers it: check
    // it against the parameters (already in memory, bounded by the file) before building.
    card.model.validate()?;
    check_parameter_count(&card, &params, &dir.join(CARD_FILE))?;
    let model = AttentionFlowModel::new(&card.model, device, 0)?;
    params.check_finite()?;
    params.load_into_varmap(model.varmap())?;
    Ok((model, vocab, card))
}

/// Fails with [`Error::ParamMismatch`] unless the number of scalar parameters the card's
/// config implies, the card's own `parameters` and the parameter file all agree. Cheap and
/// allocation-free, so a card edited to describe a huge model is refused before the model is
/// built; the names and shapes are then checked when the parameters are loaded into it.
fn check_parameter_count(card: &ModelCard, params: &ParamSet, card_path: &Path) -> Result<()> {
    let held = params.num_elements();
    let implied = card.model.num_parameters();
    if implied != Some(held) {
        let implied = implied.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string());
        return Err(Error::ParamMismatch(format!(
            "{}: the model config implies {implied} parameters but {PARAMS_FILE} holds {held}",
            card_path.display()
        )));
    }
    if card.parameters != held {
        return Err(Error::ParamMismatch(format!(
            "{}: `parameters` is {} but {PARAMS_FILE} holds {held}",
            card_path.display(),
            card.parameters
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::EncodedSession;
    use crate::model::{Batch, Mode};

    #[test]
    fn save_then_load_gives_identical_logits_and_tampering_is_detected() {
        let vocab = Vocab::from_events(["a", "b", "c"]).unwrap();
        let cfg = ModelConfig {
            vocab_size: vocab.len(),
            hidden_size: 8,
            embed_dim: 8,
            ..ModelConfig::default()
        };
        let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 5).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let card = save_model(dir.path(), &model, &vocab).unwrap();
        let (loaded, vocab2, card2) = load_model(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(card, card2);
        assert_eq!(vocab, vocab2);
        let s = EncodedSession {
            events: vec![2, 3, 4, 2],
            class: 1,
        };
        let batch = Batch::new(&[&s], &cfg, &Device::Cpu).unwrap();
        let a = model
            .forward(&batch, &mut Mode::Eval)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = loaded
            .forward(&batch, &mut Mode::Eval)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a, b, "round trip must be exact");

        // A vocabulary swapped under the model is refused.
        Vocab::from_events(["a", "b", "d"])
            .unwrap()
            .save(dir.path().join(VOCAB_FILE))
            .unwrap();
        let err = load_model(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("vocabulary does not match"), "{err}");
    }

    #[test]
    fn cards_disagreeing_with_the_parameters_are_refused_before_building() {
        let vocab = Vocab::from_events(["a", "b", "c"]).unwrap();
        let cfg = ModelConfig {
            vocab_size: vocab.len(),
            hidden_size: 8,
            embed_dim: 8,
            ..ModelConfig::default()
        };
        let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 5).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let card = save_model(dir.path(), &model, &vocab).unwrap();
        let card_path = dir.path().join(CARD_FILE);
        let write = |card: &ModelCard| {
            std::fs::write(&card_path, serde_json::to_vec(card).unwrap()).unwrap();
        };
        // A config far larger than the parameters (building it would exhaust memory).
        let mut huge = card.clone();
        huge.model.hidden_size = 1 << 40;
        write(&huge);
        let err = load_model(dir.path(), &Device::Cpu)
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, Error::ParamMismatch(_)), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("config implies"), "{message}");
        assert!(
            message.contains(&card_path.display().to_string()),
            "{message}"
        );
        // A count that overflows is reported as such.
        let mut overflow = card.clone();
        overflow.model.vocab_size = usize::MAX;
        write(&overflow);
        let err = load_model(dir.path(), &Device::Cpu)
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("more than usize::MAX"), "{err}");
        // A wrong `parameters` count with the right config.
        let mut count = card.clone();
        count.parameters += 1;
        write(&count);
        let err = load_model(dir.path(), &Device::Cpu)
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("`parameters`"), "{err}");
        // The untouched card still loads.
        write(&card);
        assert!(load_model(dir.path(), &Device::Cpu).is_ok());
    }
}
