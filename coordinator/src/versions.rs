//! Model versions outside the coordinator: `export` writes a committed version as a model
//! directory (`model.safetensors`, `model.json` with both hashes, `vocab.json`: the format
//! `fedflow-client evaluate` loads), and [`initial_model`] gives a new run its round-0
//! model, from a fresh initialisation or, with `[init]`, from a previous version.
//!
//! A version is read back through its recorded hash (a checkpoint that does not match is
//! an error naming the file), its architecture from the run's stored configuration and its
//! vocabulary from what the run recorded when it was created (runs from before that record
//! existed fall back to the configured vocabulary file, checked for size).

use std::path::Path;

use candle_core::Device;
use fedflow_common::data::Vocab;
use fedflow_common::model::{AttentionFlowModel, ModelCard, ModelConfig, load_model, save_params};
use fedflow_common::params::ParamSet;

use crate::config::RunConfig;
use crate::store::{RoundStatus, Store};
use crate::{Error, Result};

/// Which version of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// A committed round.
    Round(u64),
    /// The published version.
    Published,
}

/// A run's version: its parameters (hash-verified), architecture and vocabulary.
#[derive(Debug)]
pub struct LoadedVersion {
    /// The committed round.
    pub round: u64,
    /// The parameters.
    pub params: ParamSet,
    /// Their SHA-256 (the coordinator's model hash).
    pub sha256: String,
    /// The architecture.
    pub config: ModelConfig,
    /// The vocabulary.
    pub vocab: Vocab,
}

/// Reads `version` of run `run_id` from `store`, verified against its recorded hash.
pub fn load_version(store: &Store, run_id: &str, version: Version) -> Result<LoadedVersion> {
    let run = store.run(run_id)?.ok_or_else(|| {
        Error::NotFound(format!("no run named {run_id:?} in this data directory"))
    })?;
    let round = match version {
        Version::Round(r) => r,
        Version::Published => {
            store
                .published(run_id)?
                .ok_or_else(|| {
                    Error::NotFound(format!("run {run_id} has no published version yet"))
                })?
                .round
        }
    };
    let record = store
        .rounds(run_id)?
        .into_iter()
        .find(|r| r.round == round)
        .ok_or_else(|| Error::NotFound(format!("run {run_id} has no round {round}")))?;
    let sha = match (record.status, record.model_sha256) {
        (RoundStatus::Committed, Some(sha)) => sha,
        (status, _) => {
            return Err(Error::Refused(format!(
                "run {run_id} round {round} is {status}; only a committed round is a version"
            )));
        }
    };
    if store.pruned(run_id, round)? {
        return Err(Error::Refused(format!(
            "run {run_id} round {round}: its checkpoint was deleted by the retention rule"
        )));
    }
    let path = store.model_checkpoint_path(run_id, round);
    let (params, _, actual) = ParamSet::load_hashed(&path)?;
    if actual != sha {
        return Err(Error::Store(format!(
            "checkpoint {} of run {run_id} round {round} is corrupt: sha256 {actual}, the \
             database recorded {sha}; restore it from a backup",
            path.display()
        )));
    }
    let cfg: RunConfig = serde_json::from_str(&run.config_json)?;
    let config = cfg.model_config()?;
    let vocab = match store.run_vocabulary(run_id)? {
        Some((json, _)) => Vocab::from_json_str(&json)?,
        None => {
            let v = Vocab::load(&cfg.model.vocab)?;
            if v.len() != config.vocab_size {
                return Err(Error::ConfigMismatch(format!(
                    "run {run_id} recorded no vocabulary, and {} (its configured file) has {} \
                     ids where the model has {}: the file changed since the run was created",
                    cfg.model.vocab.display(),
                    v.len(),
                    config.vocab_size
                )));
            }
            v
        }
    };
    Ok(LoadedVersion {
        round,
        params,
        sha256: sha,
        config,
        vocab,
    })
}

/// Writes `version` of run `run_id` as a model directory at `out`: into a temporary
/// directory beside it, then renamed, so `out` is either absent or complete. An existing
/// non-empty `out` is refused unless `force` (then it is replaced).
pub fn export(
    store: &Store,
    run_id: &str,
    version: Version,
    out: &Path,
    force: bool,
) -> Result<(u64, ModelCard)> {
    let v = load_version(store, run_id, version)?;
    let occupied = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if occupied && !force {
        return Err(Error::Refused(format!(
            "{} exists and is not empty; choose another --out or add --force to replace it",
            out.display()
        )));
    }
    let name = out.file_name().ok_or_else(|| {
        Error::BadRequest(format!("--out {}: not a directory name", out.display()))
    })?;
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let card = save_params(&tmp, &v.params, &v.config, &v.vocab)?;
    if card.params_sha256 != v.sha256 {
        return Err(Error::Store(format!(
            "the exported parameters hash to {}, the checkpoint to {}",
            card.params_sha256, v.sha256
        )));
    }
    if occupied {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(parent, e))?;
    }
    Ok((v.round, card))
}

/// Where a warm start's model came from, for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// `run R round N` or the model directory.
    pub what: String,
    /// The parameters' SHA-256.
    pub sha256: String,
}

/// The round-0 model of run `cfg` in `store`: a fresh initialisation seeded by `run.seed`,
/// or with `[init]` the named version, checked for the same architecture (dropout aside)
/// and vocabulary. A run that already exists keeps its round 0: the fresh model is
/// returned and [`crate::round::RoundEngine::open`] ignores it.
pub fn initial_model(cfg: &RunConfig, store: &Store) -> Result<(ParamSet, Option<Source>)> {
    let config = cfg.model_config()?;
    let fresh = || -> Result<ParamSet> {
        let model = AttentionFlowModel::new(&config, &Device::Cpu, cfg.run.seed)?;
        Ok(ParamSet::from_varmap(model.varmap())?)
    };
    let Some(init) = &cfg.init else {
        return Ok((fresh()?, None));
    };
    if store.run(&cfg.run.name)?.is_some() {
        return Ok((fresh()?, None));
    }
    let vocab = Vocab::load(&cfg.model.vocab)?;
    let (params, source_config, source_vocab, source) = match (&init.from_run, &init.model_dir) {
        (Some(run), _) => {
            let version = match init.round {
                Some(r) => Version::Round(r),
                None => Version::Published,
            };
            let v = load_version(store, run, version)?;
            let what = format!("run {run} round {}", v.round);
            let source = Source {
                what,
                sha256: v.sha256,
            };
            (v.params, v.config, v.vocab, source)
        }
        (None, Some(dir)) => {
            let (_, source_vocab, card) = load_model(dir, &Device::Cpu)?;
            let params = ParamSet::load(dir.join(fedflow_common::model::PARAMS_FILE))?;
            let source = Source {
                what: dir.display().to_string(),
                sha256: card.params_sha256.clone(),
            };
            (params, card.model, source_vocab, source)
        }
        (None, None) => unreachable!("validated: [init] names a source"),
    };
    check_compatible(&source.what, &source_config, &config)?;
    let (ours, theirs) = (
        fedflow_common::model::vocab_sha256(&vocab),
        fedflow_common::model::vocab_sha256(&source_vocab),
    );
    if ours != theirs {
        return Err(Error::ConfigMismatch(format!(
            "init: {} was built for vocabulary {theirs} ({} ids), this run's {} is {ours} ({} \
             ids); start from a version built for this vocabulary",
            source.what,
            source_vocab.len(),
            cfg.model.vocab.display(),
            vocab.len()
        )));
    }
    params.validate_against(&fresh()?.spec())?;
    Ok((params, Some(source)))
}

/// Refuses a source whose architecture differs from the run's in anything but dropout,
/// naming the first field that differs.
fn check_compatible(what: &str, source: &ModelConfig, run: &ModelConfig) -> Result<()> {
    let a = serde_json::to_value(source)?;
    let b = serde_json::to_value(run)?;
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (key, theirs) in a {
            if key == "dropout" {
                continue;
            }
            let ours = b.get(key).unwrap_or(&serde_json::Value::Null);
            if theirs != ours {
                return Err(Error::ConfigMismatch(format!(
                    "init: {what} is not this run's architecture: model.{key}: source \
                     {theirs}, this run {ours}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InitConfig;
    use crate::round::RoundEngine;
    use crate::round::tests::{SITES, engine, fixture, start, submit, update};

    /// A run `t` with round 1 committed; returns the fixture and round 1's model hash.
    fn trained() -> (crate::round::tests::Fixture, String) {
        let f = fixture("[evaluation]\nevery = 0\nfinal_round = false\n");
        let mut e = engine(&f);
        let tickets = start(&mut e);
        for s in SITES {
            submit(
                &mut e,
                s,
                &tickets[s],
                &update(&f, 0.05),
                10,
                crate::round::tests::T0,
            )
            .unwrap();
        }
        assert_eq!(e.committed_round(), 1);
        (f, e.global().1.to_string())
    }

    fn with_init(cfg: &RunConfig, name: &str, init: InitConfig) -> RunConfig {
        let mut c = cfg.clone();
        c.run.name = name.into();
        c.init = Some(init);
        c.validate().unwrap();
        c
    }

    #[test]
    fn a_warm_start_from_a_version_or_an_export_is_bit_identical_to_it() {
        let (f, sha) = trained();
        let data = f.dir.path().join("data");
        let source_file = std::fs::read(
            Store::open_read_only(&data)
                .unwrap()
                .model_checkpoint_path("t", 1),
        )
        .unwrap();
        let out = f.dir.path().join("export");
        {
            let store = Store::open_read_only(&data).unwrap();
            let (round, card) = export(&store, "t", Version::Round(1), &out, false).unwrap();
            assert_eq!((round, card.params_sha256.as_str()), (1, sha.as_str()));
            let err = export(&store, "t", Version::Round(1), &out, false).unwrap_err();
            assert!(err.to_string().contains("--force"), "{err}");
            export(&store, "t", Version::Round(1), &out, true).unwrap();
            for (v, want) in [
                (Version::Round(7), "no round 7"),
                (Version::Published, "no published version"),
            ] {
                let err = export(&store, "t", v, &f.dir.path().join("x"), false).unwrap_err();
                assert!(err.to_string().contains(want), "{err}");
            }
            let err = export(&store, "nope", Version::Round(1), &out, true).unwrap_err();
            assert!(err.to_string().contains("no run named"), "{err}");
        }
        // The export loads as a model directory with both hashes.
        let (_, _, card) = load_model(&out, &Device::Cpu).unwrap();
        assert_eq!(card.params_sha256, sha);
        for (name, init) in [
            (
                "from-run",
                InitConfig {
                    from_run: Some("t".into()),
                    round: Some(1),
                    ..InitConfig::default()
                },
            ),
            (
                "from-dir",
                InitConfig {
                    model_dir: Some(out.clone()),
                    ..InitConfig::default()
                },
            ),
        ] {
            let cfg = with_init(&f.cfg, name, init);
            let store = Store::open(&data).unwrap();
            let (initial, source) = initial_model(&cfg, &store).unwrap();
            assert_eq!(source.unwrap().sha256, sha);
            let e = RoundEngine::open(store, cfg, initial).unwrap();
            assert_eq!(e.global().1, sha, "{name}");
            let round0 = std::fs::read(e.store().model_checkpoint_path(name, 0)).unwrap();
            assert_eq!(
                round0, source_file,
                "{name}: round 0 is the source, bit for bit"
            );
        }
    }

    #[test]
    fn an_incompatible_source_is_refused_naming_what_differs() {
        let (f, _) = trained();
        let data = f.dir.path().join("data");
        let init = InitConfig {
            from_run: Some("t".into()),
            round: Some(1),
            ..InitConfig::default()
        };
        let mut wider = with_init(&f.cfg, "wider", init.clone());
        wider.model.hidden_size = 8;
        let store = Store::open(&data).unwrap();
        let err = initial_model(&wider, &store).unwrap_err().to_string();
        assert!(
            err.contains("model.hidden_size: source 4, this run 8"),
            "{err}"
        );
        // Dropout changes no parameter: allowed.
        let mut other_dropout = with_init(&f.cfg, "dropout", init.clone());
        other_dropout.model.dropout = 0.5;
        initial_model(&other_dropout, &store).unwrap();
        // Another vocabulary of the same size.
        let vocab = f.dir.path().join("other-vocab.json");
        Vocab::from_events(["x", "y", "z"])
            .unwrap()
            .save(&vocab)
            .unwrap();
        let mut other = with_init(&f.cfg, "other", init);
        other.model.vocab = vocab;
        let err = initial_model(&other, &store).unwrap_err().to_string();
        assert!(err.contains("vocabulary"), "{err}");
        // A bad [init] is named.
        let bad = InitConfig {
            from_run: Some("t".into()),
            ..InitConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("init.round"));
    }
}
