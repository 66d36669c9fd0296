//! The published version at the site: every task poll tells the site which version the
//! federation publishes (what it should serve); when that changes, the site downloads it
//! with the same verified, chunked transfer as a task's model and installs it as a model
//! directory (the format `fedflow-client evaluate` loads) under its published folder.
//!
//! Layout of the folder:
//!
//! ```text
//! <dir>/versions/<round>-<sha12>/{model.safetensors, model.json, vocab.json}
//! <dir>/current.json    {"round", "model_sha256", "published_at_unix_ms", "path"}
//! ```
//!
//! A version directory is written under a temporary name, fsync'd and renamed; then
//! `current.json` is replaced atomically, so a reader sees the old version or the new one,
//! whole. The previous version is kept (a quick way back), older ones are removed.

use std::path::{Path, PathBuf};

use fedflow_common::data::Vocab;
use fedflow_common::fsio::write_atomic;
use fedflow_common::model::{
    CARD_FILE, MODEL_FORMAT, ModelCard, ModelConfig, PARAMS_FILE, VOCAB_FILE, vocab_sha256,
};
use fedflow_common::params::ParamSet;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where a site installs published versions, and the vocabulary it serves them with.
#[derive(Debug, Clone)]
pub struct PublishedSink {
    /// The published folder.
    pub dir: PathBuf,
    /// The federation's vocabulary (its hash must match the version's).
    pub vocab: Vocab,
}

/// `current.json`: the version the site serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Current {
    /// The run's round the version is.
    pub round: u64,
    /// SHA-256 of its parameters (the coordinator's model hash).
    pub model_sha256: String,
    /// When the coordinator published it.
    pub published_at_unix_ms: i64,
    /// Its model directory, relative to the published folder.
    pub path: String,
}

/// The file naming the version being served.
pub const CURRENT_FILE: &str = "current.json";

impl PublishedSink {
    /// The version installed now, if any.
    pub fn current(&self) -> Result<Option<Current>> {
        let path = self.dir.join(CURRENT_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                Error::Published(format!(
                    "{}: not a published-version record: {e}",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Published(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// Installs a downloaded version (`bytes` already verified against `sha256` by the
    /// transfer) and makes it current.
    pub fn install(
        &self,
        round: u64,
        sha256: &str,
        published_at_unix_ms: i64,
        config: &ModelConfig,
        vocab_hash: &str,
        bytes: &[u8],
    ) -> Result<Current> {
        let ours = vocab_sha256(&self.vocab);
        if vocab_hash != ours {
            return Err(Error::Task(format!(
                "the published version {round} was built for vocabulary {vocab_hash}, this site \
                 has {ours}"
            )));
        }
        if config.vocab_size != self.vocab.len() {
            return Err(Error::Task(format!(
                "the published version {round} has vocab_size {}, the site's vocabulary {} ids",
                config.vocab_size,
                self.vocab.len()
            )));
        }
        let params = ParamSet::from_safetensors_bytes(bytes)?;
        let name = format!("{round}-{}", &sha256[..12.min(sha256.len())]);
        let versions = self.dir.join("versions");
        let target = versions.join(&name);
        if !target.join(CARD_FILE).exists() {
            let tmp = versions.join(format!(".{name}.tmp"));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
            write_atomic(&tmp.join(PARAMS_FILE), bytes)?;
            self.vocab.save(tmp.join(VOCAB_FILE))?;
            let card = ModelCard {
                format: MODEL_FORMAT.to_string(),
                model: config.clone(),
                params_sha256: sha256.to_string(),
                vocab_sha256: ours,
                parameters: params.num_elements(),
            };
            let json = serde_json::to_string_pretty(&card)
                .map_err(|e| Error::Published(format!("cannot write the model card: {e}")))?;
            write_atomic(&tmp.join(CARD_FILE), json.as_bytes())?;
            std::fs::rename(&tmp, &target).map_err(|e| io(&target, e))?;
            sync_dir(&versions)?;
        }
        let previous = self.current()?;
        let current = Current {
            round,
            model_sha256: sha256.to_string(),
            published_at_unix_ms,
            path: format!("versions/{name}"),
        };
        let json = serde_json::to_string_pretty(&current)
            .map_err(|e| Error::Published(format!("cannot write {CURRENT_FILE}: {e}")))?;
        write_atomic(&self.dir.join(CURRENT_FILE), json.as_bytes())?;
        self.remove_old(&current, previous.as_ref())?;
        Ok(current)
    }

    /// Removes version directories other than the current and the previous one.
    fn remove_old(&self, current: &Current, previous: Option<&Current>) -> Result<()> {
        let versions = self.dir.join("versions");
        let keep: Vec<&str> = [Some(current), previous]
            .into_iter()
            .flatten()
            .filter_map(|c| c.path.strip_prefix("versions/"))
            .collect();
        for entry in std::fs::read_dir(&versions).map_err(|e| io(&versions, e))? {
            let entry = entry.map_err(|e| io(&versions, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !keep.contains(&name.as_ref()) && !name.starts_with('.') {
                std::fs::remove_dir_all(entry.path()).map_err(|e| io(&entry.path(), e))?;
            }
        }
        Ok(())
    }
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Published(format!("published folder {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use fedflow_common::model::{AttentionFlowModel, load_model};

    #[test]
    fn an_installed_version_loads_as_a_model_directory_and_replaces_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = Vocab::from_events(["open", "search"]).unwrap();
        let config = ModelConfig {
            vocab_size: vocab.len(),
            embed_dim: 4,
            hidden_size: 4,
            num_layers: 1,
            ..ModelConfig::default()
        };
        let sink = PublishedSink {
            dir: dir.path().join("published"),
            vocab: vocab.clone(),
        };
        assert_eq!(sink.current().unwrap(), None);
        let mut shas = Vec::new();
        for (round, seed) in [(3, 1), (5, 2), (8, 3)] {
            let model = AttentionFlowModel::new(&config, &Device::Cpu, seed).unwrap();
            let params = ParamSet::from_varmap(model.varmap()).unwrap();
            let bytes = params.to_safetensors_bytes().unwrap();
            let sha = fedflow_common::hash::sha256_hex(&bytes);
            let c = sink
                .install(
                    round,
                    &sha,
                    1000 + round as i64,
                    &config,
                    &vocab_sha256(&vocab),
                    &bytes,
                )
                .unwrap();
            assert_eq!(sink.current().unwrap().as_ref(), Some(&c));
            let (_, loaded_vocab, card) =
                load_model(&sink.dir.join(&c.path), &Device::Cpu).unwrap();
            assert_eq!(card.params_sha256, sha);
            assert_eq!(loaded_vocab, vocab);
            shas.push(sha);
        }
        // The current and the previous version are kept.
        let mut left: Vec<String> = std::fs::read_dir(sink.dir.join("versions"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                format!("5-{}", &shas[1][..12]),
                format!("8-{}", &shas[2][..12])
            ]
        );
        // Another vocabulary's version is refused and changes nothing.
        let err = sink
            .install(9, &shas[0], 0, &config, &"0".repeat(64), b"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("vocabulary"), "{err}");
        assert_eq!(sink.current().unwrap().unwrap().round, 8);
    }
}
