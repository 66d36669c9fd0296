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
//! <dir>/previous.json   the version current before it (same fields)
//! <dir>/pin.json        a version the site serves instead, while the file exists
//! ```
//!
//! A version directory is written under a temporary name, fsync'd and renamed; then
//! `previous.json` and `current.json` are replaced atomically, so a reader sees the old
//! version or the new one, whole. The previous version is kept (a quick way back) and so is
//! a pinned one; older ones are removed. A site pins a kept version locally
//! ([`PublishedSink::pin`], `fedflow-client agent pin`): the agent then serves it whatever
//! the federation publishes, until it is unpinned.

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

/// The file naming the federation's published version.
pub const CURRENT_FILE: &str = "current.json";
/// The file naming the version published before it.
pub const PREVIOUS_FILE: &str = "previous.json";
/// The file naming a version pinned locally.
pub const PIN_FILE: &str = "pin.json";

/// Which version the site serves, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Serving {
    /// The version.
    pub version: Current,
    /// Whether it is pinned locally (else it is the federation's published version).
    pub pinned: bool,
}

/// Which kept version to pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinTarget {
    /// The version of this round (the current or the previous one).
    Round(u64),
    /// The version published before the current one: a rollback.
    Previous,
}

impl PublishedSink {
    /// The federation's version installed now, if any.
    pub fn current(&self) -> Result<Option<Current>> {
        self.read_record(CURRENT_FILE)
    }

    /// The version installed before the current one, if it is kept.
    pub fn previous(&self) -> Result<Option<Current>> {
        self.read_record(PREVIOUS_FILE)
    }

    /// The version pinned locally, if any.
    pub fn pinned(&self) -> Result<Option<Current>> {
        self.read_record(PIN_FILE)
    }

    /// The version to serve: the pinned one, else the current one.
    pub fn serving(&self) -> Result<Option<Serving>> {
        if let Some(version) = self.pinned()? {
            return Ok(Some(Serving {
                version,
                pinned: true,
            }));
        }
        Ok(self.current()?.map(|version| Serving {
            version,
            pinned: false,
        }))
    }

    /// Pins a kept version: the site serves it from now on, whatever is published, until
    /// [`unpin`](Self::unpin). Only the current and the previous version are kept, so only
    /// they can be pinned (a version pinned already stays pinnable too).
    pub fn pin(&self, target: PinTarget) -> Result<Current> {
        let kept = [self.current()?, self.previous()?, self.pinned()?];
        let found = match target {
            PinTarget::Previous => kept[1].clone().ok_or_else(|| {
                Error::Published(format!(
                    "{}: no previous version is kept (a version has to be published twice \
                     before there is one)",
                    self.dir.display()
                ))
            })?,
            PinTarget::Round(round) => kept
                .iter()
                .flatten()
                .find(|c| c.round == round)
                .cloned()
                .ok_or_else(|| {
                    let rounds: Vec<String> =
                        kept.iter().flatten().map(|c| c.round.to_string()).collect();
                    Error::Published(format!(
                        "version {round} is not kept in {} (kept: {})",
                        self.dir.display(),
                        if rounds.is_empty() {
                            "none".to_string()
                        } else {
                            rounds.join(", ")
                        }
                    ))
                })?,
        };
        self.write_record(PIN_FILE, &found)?;
        // An install running at the same moment may have removed it before it was pinned.
        if !self.dir.join(&found.path).join(CARD_FILE).exists() {
            let _ = self.unpin();
            return Err(Error::Published(format!(
                "version {} was removed while it was being pinned; pin again",
                found.round
            )));
        }
        Ok(found)
    }

    /// Removes the pin: the site serves the federation's current version again. Returns
    /// whether there was one.
    pub fn unpin(&self) -> Result<bool> {
        let path = self.dir.join(PIN_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.dir)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(&path, e)),
        }
    }

    fn write_record(&self, file: &str, record: &Current) -> Result<()> {
        let json = serde_json::to_string_pretty(record)
            .map_err(|e| Error::Published(format!("cannot write {file}: {e}")))?;
        write_atomic(&self.dir.join(file), json.as_bytes())?;
        Ok(())
    }

    fn read_record(&self, file: &str) -> Result<Option<Current>> {
        let path = self.dir.join(file);
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
        let current = Current {
            round,
            model_sha256: sha256.to_string(),
            published_at_unix_ms,
            path: format!("versions/{name}"),
        };
        // previous.json first: a crash between the two leaves previous == current, and the
        // old previous version's directory still on disk until the next install.
        let previous = match self.current()? {
            Some(old) if old.model_sha256 != current.model_sha256 => {
                self.write_record(PREVIOUS_FILE, &old)?;
                Some(old)
            }
            _ => self.previous()?,
        };
        self.write_record(CURRENT_FILE, &current)?;
        let pinned = self.pinned()?;
        self.remove_old(&[Some(&current), previous.as_ref(), pinned.as_ref()])?;
        Ok(current)
    }

    /// Removes version directories other than those of `keep`.
    fn remove_old(&self, keep: &[Option<&Current>]) -> Result<()> {
        let versions = self.dir.join("versions");
        let keep: Vec<&str> = keep
            .iter()
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

    /// A published folder in `dir` and a tiny model configuration for its vocabulary.
    fn tiny_sink(dir: &Path) -> (PublishedSink, ModelConfig) {
        let vocab = Vocab::from_events(["open", "search"]).unwrap();
        let config = ModelConfig {
            vocab_size: vocab.len(),
            embed_dim: 4,
            hidden_size: 4,
            num_layers: 1,
            ..ModelConfig::default()
        };
        let sink = PublishedSink {
            dir: dir.join("published"),
            vocab,
        };
        (sink, config)
    }

    #[test]
    fn an_installed_version_loads_as_a_model_directory_and_replaces_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, config) = tiny_sink(dir.path());
        let vocab = sink.vocab.clone();
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
        assert_eq!(sink.previous().unwrap().unwrap().round, 5);
    }

    fn install_seeded(sink: &PublishedSink, config: &ModelConfig, round: u64) -> Current {
        let model = AttentionFlowModel::new(config, &Device::Cpu, round).unwrap();
        let bytes = ParamSet::from_varmap(model.varmap())
            .unwrap()
            .to_safetensors_bytes()
            .unwrap();
        let sha = fedflow_common::hash::sha256_hex(&bytes);
        sink.install(round, &sha, 0, config, &vocab_sha256(&sink.vocab), &bytes)
            .unwrap()
    }

    #[test]
    fn a_pinned_version_is_served_and_kept_while_newer_ones_are_installed() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, config) = tiny_sink(dir.path());
        assert_eq!(sink.serving().unwrap(), None);
        let err = sink.pin(PinTarget::Previous).unwrap_err().to_string();
        assert!(err.contains("no previous version"), "{err}");
        let v1 = install_seeded(&sink, &config, 1);
        let v2 = install_seeded(&sink, &config, 2);
        let serving = sink.serving().unwrap().unwrap();
        assert_eq!((serving.version.round, serving.pinned), (2, false));
        // A rollback pins the previous version.
        assert_eq!(sink.pin(PinTarget::Previous).unwrap(), v1);
        // Newer versions are installed as current, but the pin is what is served, and its
        // directory survives the removal of old versions.
        install_seeded(&sink, &config, 3);
        let v4 = install_seeded(&sink, &config, 4);
        assert_eq!(sink.current().unwrap().unwrap(), v4);
        let serving = sink.serving().unwrap().unwrap();
        assert_eq!(
            (serving.version.clone(), serving.pinned),
            (v1.clone(), true)
        );
        assert!(sink.dir.join(&v1.path).join(CARD_FILE).exists());
        assert!(!sink.dir.join(&v2.path).exists());
        // A version no longer kept cannot be pinned; the message lists the kept ones.
        let err = sink.pin(PinTarget::Round(2)).unwrap_err().to_string();
        assert!(
            err.contains("version 2 is not kept") && err.contains("4, 3, 1"),
            "{err}"
        );
        assert_eq!(sink.pin(PinTarget::Round(4)).unwrap(), v4);
        assert!(sink.unpin().unwrap());
        assert!(!sink.unpin().unwrap());
        let serving = sink.serving().unwrap().unwrap();
        assert_eq!((serving.version, serving.pinned), (v4, false));
        // Unpinned, the old pin's directory goes at the next install.
        install_seeded(&sink, &config, 5);
        assert!(!sink.dir.join(&v1.path).exists());
    }
}
