//! Local commands: generate, validate, train, evaluate, and the pooled baseline.
//!
//! Each function takes an explicit options struct and returns a serialisable summary; the
//! binary decides how to print it (table or JSON).

use std::path::{Path, PathBuf};

use fedflow_common::baseline::{BagOfEvents, BaselineConfig};
use fedflow_common::data::{
    DatasetStats, EncodedSession, LoadOptions, SiteDataset, Split, Vocab, read_sessions, split_of,
    write_sessions,
};
use fedflow_common::device::DeviceChoice;
use fedflow_common::model::{AttentionFlowModel, ModelCard, ModelConfig, load_model, save_model};
use fedflow_common::synth::{SynthConfig, generate as synth_generate};
use fedflow_common::train::{EpochReport, EvalMetrics, TrainConfig, evaluate as eval_model, train};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Default fraction of each site's sessions held out for validation.
pub const DEFAULT_VAL_FRACTION: f64 = 0.2;

/// File format for generated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// CSV with a header.
    Csv,
    /// JSON Lines.
    Jsonl,
}

impl DataFormat {
    fn extension(self) -> &'static str {
        match self {
            DataFormat::Csv => "csv",
            DataFormat::Jsonl => "jsonl",
        }
    }
}

/// One generated site, as recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeneratedSite {
    /// Site name (e.g. `site-007`).
    pub name: String,
    /// Data file, relative to the output directory.
    pub file: PathBuf,
    /// Number of sessions.
    pub sessions: usize,
    /// The site's Dirichlet draw over journey types.
    pub label_mix: [f64; 5],
    /// Bayes-optimal accuracy on this site's sessions.
    pub bayes_accuracy: f64,
}

/// `manifest.json` of a generated federation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateManifest {
    /// Always `fedflow-synth/1`.
    pub format: String,
    /// The generator settings used.
    pub config: SynthConfig,
    /// Vocabulary file, relative to the output directory.
    pub vocab: PathBuf,
    /// Bayes-optimal accuracy over all sessions: the ceiling for any model.
    pub bayes_accuracy: f64,
    /// Total number of sessions.
    pub sessions: usize,
    /// Per-site details.
    pub sites: Vec<GeneratedSite>,
}

/// Generates a synthetic federation into `out`: `vocab.json`, one data file per site under
/// `sites/`, and `manifest.json` (with the Bayes-optimal accuracy).
pub fn generate(out: &Path, cfg: &SynthConfig, format: DataFormat) -> Result<GenerateManifest> {
    let fed = synth_generate(cfg)?;
    let vocab = Vocab::from_events(fed.event_names.iter().cloned())?;
    let sites_dir = out.join("sites");
    std::fs::create_dir_all(&sites_dir).map_err(|e| fedflow_common::Error::io(&sites_dir, e))?;
    vocab.save(out.join("vocab.json"))?;
    let mut sites = Vec::with_capacity(fed.sites.len());
    for site in &fed.sites {
        let file = PathBuf::from("sites").join(format!("{}.{}", site.name, format.extension()));
        write_sessions(out.join(&file), &site.records)?;
        sites.push(GeneratedSite {
            name: site.name.clone(),
            file,
            sessions: site.records.len(),
            label_mix: site.label_mix,
            bayes_accuracy: site.bayes_accuracy,
        });
    }
    let manifest = GenerateManifest {
        format: "fedflow-synth/1".into(),
        config: cfg.clone(),
        vocab: PathBuf::from("vocab.json"),
        bayes_accuracy: fed.bayes_accuracy,
        sessions: fed.total_sessions(),
        sites,
    };
    let json = serde_json::to_string_pretty(&manifest).map_err(fedflow_common::Error::from)?;
    fedflow_common::fsio::write_atomic(&out.join("manifest.json"), json.as_bytes())?;
    Ok(manifest)
}

/// Result of validating one data file.
#[derive(Debug, Clone, Serialize)]
pub struct ValidateReport {
    /// The file.
    pub file: PathBuf,
    /// Statistics of the valid sessions (split with the default validation fraction).
    pub stats: DatasetStats,
    /// Rows skipped (only with `skip_invalid`): line and reason.
    pub skipped: Vec<(u64, String)>,
}

/// Validates a data file against a vocabulary (every row checked; see
/// [`fedflow_common::data`] for the rules).
pub fn validate(file: &Path, vocab: &Vocab, options: &LoadOptions) -> Result<ValidateReport> {
    let loaded = read_sessions(file, options)?;
    let mut ds = SiteDataset::from_records(&loaded.records, vocab, DEFAULT_VAL_FRACTION)?;
    ds.stats.skipped_rows = loaded.skipped.len();
    Ok(ValidateReport {
        file: file.to_path_buf(),
        stats: ds.stats,
        skipped: loaded
            .skipped
            .into_iter()
            .map(|s| (s.line, s.reason))
            .collect(),
    })
}

/// A training configuration file (TOML): `[model]` and `[train]` tables, both optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainFile {
    /// Model architecture (vocab_size is always taken from the vocabulary).
    pub model: ModelConfig,
    /// Training hyper-parameters.
    pub train: TrainConfig,
}

impl TrainFile {
    /// Reads a TOML file, rejecting unknown keys with their location.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

/// Options of a local training run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Data files (one site, or several pooled).
    pub data: Vec<PathBuf>,
    /// The federation's vocabulary.
    pub vocab: PathBuf,
    /// Output directory for the model and `metrics.json`.
    pub out: PathBuf,
    /// Architecture (vocab_size is overwritten from the vocabulary).
    pub model: ModelConfig,
    /// Hyper-parameters.
    pub train: TrainConfig,
    /// Fraction of sessions held out for validation (by hashed session id).
    pub val_fraction: f64,
    /// Where to train.
    pub device: DeviceChoice,
    /// Skip invalid rows instead of failing.
    pub skip_invalid: bool,
    /// Also fit the bag-of-events baseline on the same split, for comparison.
    pub baseline: bool,
}

/// What a training run produced (`metrics.json`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Per-file dataset statistics.
    pub datasets: Vec<(PathBuf, DatasetStats)>,
    /// Sessions used for training / validation (pooled).
    pub train_sessions: usize,
    /// See `train_sessions`.
    pub validation_sessions: usize,
    /// The device used.
    pub device: String,
    /// Per-epoch progress.
    pub epochs: Vec<EpochReport>,
    /// Epoch whose weights were kept.
    pub best_epoch: usize,
    /// Whether early stopping ended training.
    pub stopped_early: bool,
    /// Validation metrics of the kept weights (absent without validation data).
    pub validation: Option<EvalMetrics>,
    /// Bag-of-events accuracy on the same validation sessions, when requested.
    pub baseline_accuracy: Option<f64>,
    /// The saved model's card.
    pub model_card: ModelCard,
    /// Training wall-clock seconds.
    pub train_seconds: f64,
}

fn load_pooled(
    files: &[PathBuf],
    vocab: &Vocab,
    val_fraction: f64,
    skip_invalid: bool,
) -> Result<(SiteDataset, Vec<(PathBuf, DatasetStats)>)> {
    if files.is_empty() {
        return Err(Error::Usage("no data files given".into()));
    }
    let options = LoadOptions { skip_invalid };
    let mut sets = Vec::with_capacity(files.len());
    for f in files {
        sets.push(SiteDataset::load(f, vocab, &options, val_fraction)?);
    }
    let stats = files
        .iter()
        .cloned()
        .zip(sets.iter().map(|s| s.stats.clone()))
        .collect();
    Ok((SiteDataset::pool(&sets), stats))
}

/// Trains a model on the given files (pooled), saves it with `metrics.json` into `out`.
pub fn train_local(
    opts: &TrainOptions,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<TrainSummary> {
    let vocab = Vocab::load(&opts.vocab)?;
    let (data, datasets) = load_pooled(&opts.data, &vocab, opts.val_fraction, opts.skip_invalid)?;
    if data.train.is_empty() {
        return Err(Error::Usage(format!(
            "no training sessions after the split (validation fraction {}): use more data or a smaller --val-fraction",
            opts.val_fraction
        )));
    }
    let cfg = ModelConfig {
        vocab_size: vocab.len(),
        ..opts.model.clone()
    };
    let device = opts.device.open()?;
    let model = AttentionFlowModel::new(&cfg, &device, opts.train.seed)?;
    let started = std::time::Instant::now();
    let report = train(&model, &data.train, &data.validation, &opts.train, on_epoch)?;
    let train_seconds = started.elapsed().as_secs_f64();
    let validation = if data.validation.is_empty() {
        None
    } else {
        Some(eval_model(&model, &data.validation, 256)?)
    };
    let baseline_accuracy = if opts.baseline && !data.validation.is_empty() {
        let bag = BagOfEvents::fit(&data.train, vocab.len(), &BaselineConfig::default())?;
        Some(bag.accuracy(&data.validation))
    } else {
        None
    };
    let model_card = save_model(&opts.out, &model, &vocab)?;
    let summary = TrainSummary {
        datasets,
        train_sessions: data.train.len(),
        validation_sessions: data.validation.len(),
        device: format!("{device:?}"),
        epochs: report.epochs,
        best_epoch: report.best_epoch,
        stopped_early: report.stopped_early,
        validation,
        baseline_accuracy,
        model_card,
        train_seconds,
    };
    let json = serde_json::to_string_pretty(&summary).map_err(fedflow_common::Error::from)?;
    fedflow_common::fsio::write_atomic(&opts.out.join("metrics.json"), json.as_bytes())?;
    Ok(summary)
}

/// Which sessions of the data files to evaluate on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSplit {
    /// Every session (a held-out file).
    All,
    /// Only the validation split (the part of a training file training did not use).
    Validation,
}

/// Result of [`evaluate`].
#[derive(Debug, Clone, Serialize)]
pub struct EvaluateReport {
    /// Metrics over the evaluated sessions.
    pub metrics: EvalMetrics,
    /// Invalid rows left out (only with `skip_invalid`): the metrics do not cover them.
    pub skipped_rows: usize,
}

/// Evaluates the model saved in `model_dir` on data files, using the model's own vocabulary.
pub fn evaluate(
    model_dir: &Path,
    data: &[PathBuf],
    split: EvalSplit,
    val_fraction: f64,
    device: DeviceChoice,
    skip_invalid: bool,
) -> Result<EvaluateReport> {
    if data.is_empty() {
        return Err(Error::Usage("no data files given".into()));
    }
    if !(0.0..=1.0).contains(&val_fraction) {
        return Err(Error::Usage(format!(
            "--val-fraction {val_fraction} is outside [0, 1]"
        )));
    }
    let device = device.open()?;
    let (model, vocab, _card) = load_model(model_dir, &device)?;
    let options = LoadOptions { skip_invalid };
    let mut sessions: Vec<EncodedSession> = Vec::new();
    let mut skipped_rows = 0;
    for f in data {
        let loaded = read_sessions(f, &options)?;
        skipped_rows += loaded.skipped.len();
        for r in &loaded.records {
            if split == EvalSplit::All || split_of(&r.session_id, val_fraction) == Split::Validation
            {
                sessions.push(fedflow_common::data::encode_session(r, &vocab)?);
            }
        }
    }
    if sessions.is_empty() {
        return Err(Error::Usage(
            "no sessions to evaluate in the selected split".into(),
        ));
    }
    Ok(EvaluateReport {
        metrics: eval_model(&model, &sessions, 256)?,
        skipped_rows,
    })
}

/// What [`build_vocab`] found.
#[derive(Debug, Clone, Serialize)]
pub struct VocabReport {
    /// Sessions read.
    pub sessions: usize,
    /// Events read.
    pub events: usize,
    /// Distinct event names seen.
    pub distinct: usize,
    /// Names kept (seen at least `min_count` times).
    pub kept: usize,
    /// Names left out as rarer; they become unknown (or fall into the buckets).
    pub left_out: usize,
}

/// The federation's vocabulary from real session files: every event name seen at least
/// `min_count` times (most frequent first, ties by name, so the same files always give the
/// same ids), with `oov_buckets` hashed buckets for the names it lacks. Every row is
/// validated as `data validate` does; a bad row is an error naming file and line.
///
/// The vocabulary goes to every site: a name seen fewer than `min_count` times stays out
/// of it, so a rare event name (which can identify a user or a site) is not shared.
pub fn build_vocab(
    files: &[PathBuf],
    min_count: usize,
    oov_buckets: u32,
) -> Result<(Vocab, VocabReport)> {
    if files.is_empty() {
        return Err(Error::Usage("no data files given".into()));
    }
    if min_count == 0 {
        return Err(Error::Usage("--min-count must be at least 1".into()));
    }
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    let (mut sessions, mut events) = (0, 0);
    for f in files {
        for r in read_sessions(f, &LoadOptions::default())?.records {
            sessions += 1;
            events += r.events.len();
            for e in r.events {
                *counts.entry(e).or_default() += 1;
            }
        }
    }
    let distinct = counts.len();
    let mut kept: Vec<(String, usize)> = counts
        .into_iter()
        .filter(|(_, n)| *n >= min_count)
        .collect();
    kept.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    if kept.is_empty() {
        return Err(Error::Usage(format!(
            "no event name is seen {min_count} times or more in these files: lower --min-count"
        )));
    }
    let report = VocabReport {
        sessions,
        events,
        distinct,
        kept: kept.len(),
        left_out: distinct - kept.len(),
    };
    let mut vocab = Vocab::from_events(kept.into_iter().map(|(name, _)| name))?;
    if oov_buckets > 0 {
        vocab = vocab.with_oov_buckets(oov_buckets)?;
    }
    Ok((vocab, report))
}

/// Fine-tunes the model saved in `model_dir` on the sessions of `data` (one site's files)
/// as the agent does after a publish ([`crate::personalise`]), with the split of
/// `val_fraction`; writes the fine-tuned model to `out` when it is the better one.
pub fn personalise_model(
    model_dir: &Path,
    data: &[PathBuf],
    val_fraction: f64,
    cfg: &crate::personalise::PersonaliseConfig,
    out: Option<&Path>,
) -> Result<crate::personalise::PersonalisationReport> {
    if data.is_empty() {
        return Err(Error::Usage("no data files given".into()));
    }
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(Error::Usage(format!(
            "--val-fraction {val_fraction} is not in (0, 1)"
        )));
    }
    let (model, vocab, _card) = load_model(model_dir, &candle_core::Device::Cpu)?;
    let mut records = Vec::new();
    for f in data {
        records.extend(read_sessions(f, &LoadOptions::default())?.records);
    }
    let dataset = SiteDataset::from_records(&records, &vocab, val_fraction)?;
    let done = crate::personalise::personalise(&model, &dataset, cfg)?;
    if let (Some(out), Some(tuned)) = (out, &done.model) {
        save_model(out, tuned, &vocab)?;
    }
    Ok(done.report)
}

/// What a model attributes to one event name, over the sessions explained.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventAttribution {
    /// The event name.
    pub event: String,
    /// Its occurrences in the sessions explained.
    pub occurrences: usize,
    /// Mean integrated-gradients attribution of an occurrence to the session's predicted
    /// label's logit.
    pub to_predicted: f64,
    /// The same towards label 1 (very unhappy).
    pub to_label_1: f64,
    /// The same towards label 5 (very happy).
    pub to_label_5: f64,
}

/// Per-event attribution summaries of the model in `model_dir` over the first `sessions`
/// sessions of `data` (the split as [`evaluate`]'s): integrated gradients
/// ([`fedflow_common::model::integrated_gradients`], [`fedflow_common::model::IG_STEPS`]
/// steps) of the predicted label, label 1 and label 5, averaged per event name; sorted by
/// the pull towards label 1, strongest first. What a site can read of what its model
/// learned; it never leaves the site.
pub fn explain_events(
    model_dir: &Path,
    data: &[PathBuf],
    split: EvalSplit,
    val_fraction: f64,
    device: DeviceChoice,
    sessions: usize,
) -> Result<Vec<EventAttribution>> {
    use fedflow_common::model::{IG_STEPS, integrated_gradients};
    let device = device.open()?;
    let (model, vocab, _card) = load_model(model_dir, &device)?;
    let mut sums: std::collections::BTreeMap<String, (usize, [f64; 3])> = Default::default();
    let mut done = 0;
    'files: for f in data {
        for r in &read_sessions(f, &LoadOptions::default())?.records {
            if done == sessions {
                break 'files;
            }
            if split == EvalSplit::Validation
                && split_of(&r.session_id, val_fraction) != Split::Validation
            {
                continue;
            }
            let s = fedflow_common::data::encode_session(r, &vocab)?;
            let predicted = fedflow_common::train::predict(&model, std::slice::from_ref(&s), 1)?[0];
            let per_class =
                [predicted as usize, 0, 4].map(|c| integrated_gradients(&model, &s, c, IG_STEPS));
            let [p, lo, hi] = per_class;
            let (p, lo, hi) = (p?, lo?, hi?);
            for (i, name) in r.events.iter().enumerate() {
                let e = sums.entry(name.clone()).or_default();
                e.0 += 1;
                e.1[0] += p.per_event[i];
                e.1[1] += lo.per_event[i];
                e.1[2] += hi.per_event[i];
            }
            done += 1;
        }
    }
    let mut out: Vec<EventAttribution> = sums
        .into_iter()
        .map(|(event, (n, s))| EventAttribution {
            event,
            occurrences: n,
            to_predicted: s[0] / n as f64,
            to_label_1: s[1] / n as f64,
            to_label_5: s[2] / n as f64,
        })
        .collect();
    out.sort_by(|a, b| b.to_label_1.total_cmp(&a.to_label_1));
    Ok(out)
}

/// What the pooled baseline did (`baseline.json` in its directory).
#[derive(Debug, Clone, Serialize)]
pub struct BaselineSummary {
    /// The generated federation.
    pub manifest: GenerateManifest,
    /// The centralised (pooled) training run.
    pub training: TrainSummary,
}

/// The centralised baseline end to end: generate a synthetic federation into `out/data`,
/// train one model on all sites' data pooled into `out/model` with the bag-of-events
/// comparison, and write `out/baseline.json`. (The federated demo is `fedflow-sim demo`.)
pub fn pooled_baseline(
    out: &Path,
    synth: &SynthConfig,
    train_cfg: &TrainConfig,
    on_epoch: &mut dyn FnMut(&EpochReport),
) -> Result<BaselineSummary> {
    let data_dir = out.join("data");
    let manifest = generate(&data_dir, synth, DataFormat::Csv)?;
    let opts = TrainOptions {
        data: manifest
            .sites
            .iter()
            .map(|s| data_dir.join(&s.file))
            .collect(),
        vocab: data_dir.join(&manifest.vocab),
        out: out.join("model"),
        model: ModelConfig::default(),
        train: train_cfg.clone(),
        val_fraction: DEFAULT_VAL_FRACTION,
        device: DeviceChoice::Auto,
        skip_invalid: false,
        baseline: true,
    };
    let training = train_local(&opts, on_epoch)?;
    let summary = BaselineSummary { manifest, training };
    let json = serde_json::to_string_pretty(&summary).map_err(fedflow_common::Error::from)?;
    fedflow_common::fsio::write_atomic(&out.join("baseline.json"), json.as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_file_reads_both_tables_and_names_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.toml");
        std::fs::write(&path, "[model]\nencoder = \"gru\"\nhidden_size = 32\n\n[train]\nepochs = 3\noptimizer = \"sgd\"\n").unwrap();
        let f = TrainFile::load(&path).unwrap();
        assert_eq!(f.model.encoder, fedflow_common::model::EncoderKind::Gru);
        assert_eq!(f.model.hidden_size, 32);
        assert_eq!(f.model.embed_dim, ModelConfig::default().embed_dim);
        assert_eq!(f.train.epochs, 3);

        std::fs::write(&path, "[train]\nepohcs = 3\n").unwrap();
        let err = TrainFile::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("train.toml") && err.contains("epohcs"),
            "{err}"
        );
    }

    #[test]
    fn evaluate_rejects_an_impossible_validation_fraction() {
        let err = evaluate(
            Path::new("nowhere"),
            &[PathBuf::from("x.csv")],
            EvalSplit::Validation,
            2.0,
            DeviceChoice::Cpu,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--val-fraction 2"), "{err}");
    }
}
