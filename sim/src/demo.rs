//! The README's first command: a complete local federation on the embedded default.
//!
//! 1. Generate partner data (20 sites by default, non-IID: each site has its own mix of
//!    journeys and its own size) into `<out>/data`.
//! 2. Run a federation over real gRPC on loopback ([`run_federation`]) with the embedded run
//!    configuration (`coordinator/examples/run.toml`, written to `<out>/run.toml`): the
//!    coordinator's database and checkpoints go to `<out>/coordinator`.
//! 3. Train two baselines from the same initial model with the same local hyper-parameters:
//!    the *centralised* model on the pooled training data, and each site *alone* on its own.
//!    Both stop early on validation loss (patience [`DemoConfig::patience`]), which if
//!    anything favours them: the federated model gets no model selection.
//! 4. Score all three on every site's held-out validation split (the same sessions for all
//!    three) and write the table and everything behind it to `<out>/demo.json`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use candle_core::Device;
use fedflow_client::local::generate;
use fedflow_common::data::{LoadOptions, SiteDataset, Vocab};
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::params::ParamSet;
use fedflow_common::synth::SynthConfig;
use fedflow_common::train::{EvalMetrics, MetricsAccumulator, TrainConfig, evaluate, train};
use fedflow_coordinator::config::RunConfig;
use fedflow_coordinator::metrics::EvaluationSummary;
use fedflow_coordinator::round::{LiveState, Phase, RunView};
use serde::Serialize;

use crate::{Error, Result, SimOptions, SimSite, initial_model, run_federation};

/// Sessions per forward pass when scoring.
const EVAL_BATCH: usize = 256;

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Output folder: `data/`, `coordinator/`, `run.toml`, `demo.json`.
    pub out: PathBuf,
    /// Partner sites.
    pub sites: usize,
    /// Sessions over all sites.
    pub sessions: usize,
    /// Seed of the data, the sampling and the training.
    pub seed: u64,
    /// Federated rounds (`None`: the embedded configuration's).
    pub rounds: Option<u64>,
    /// Local epochs per round (`None`: the embedded configuration's).
    pub local_epochs: Option<usize>,
    /// Most epochs for the baselines.
    pub baseline_epochs: usize,
    /// Early-stopping patience of the baselines.
    pub patience: usize,
    /// Fraction of each site's sessions held out for validation.
    pub val_fraction: f64,
    /// Sites that may train at the same time.
    pub concurrent_work: usize,
    /// A run configuration (TOML text) to use instead of the embedded one; its
    /// `model.vocab` is replaced by the generated vocabulary.
    pub run_config: Option<String>,
    /// Also run the federation with record-level DP-SGD at every site, calibrated (by PLD)
    /// to this ε at [`DemoConfig::dp_delta`]; `None`: no private run.
    pub dp_epsilon: Option<f64>,
    /// δ of the private run.
    pub dp_delta: f64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            out: PathBuf::from("runs/demo"),
            sites: 20,
            sessions: 20_000,
            seed: 42,
            rounds: None,
            local_epochs: None,
            baseline_epochs: 20,
            patience: 3,
            val_fraction: 0.2,
            concurrent_work: 1,
            run_config: None,
            dp_epsilon: Some(8.0),
            dp_delta: 1e-5,
        }
    }
}

/// Accuracy, macro-F1 and loss of one model on some sessions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scores {
    /// Sessions scored.
    pub sessions: usize,
    /// Fraction classified right.
    pub accuracy: f64,
    /// Macro-F1 (scikit-learn semantics) of these sessions' predictions.
    pub macro_f1: f64,
    /// Mean cross-entropy.
    pub loss: f64,
}

impl From<&EvalMetrics> for Scores {
    fn from(m: &EvalMetrics) -> Self {
        Scores {
            sessions: m.examples,
            accuracy: m.accuracy,
            macro_f1: m.macro_f1,
            loss: m.loss,
        }
    }
}

/// One site's line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct SiteRow {
    /// The site.
    pub site: String,
    /// Its training sessions.
    pub train_sessions: usize,
    /// The federated global model on its validation split.
    pub federated: Scores,
    /// The centralised model on its validation split.
    pub centralised: Scores,
    /// Its own model on its validation split.
    pub alone: Scores,
    /// The record-level private federation's model on its validation split.
    pub private: Option<Scores>,
}

/// Everything the demo measured (also written to `demo.json`).
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// The output folder.
    pub out: PathBuf,
    /// Per-site scores.
    pub sites: Vec<SiteRow>,
    /// The federated model on all validation sessions (pooled predictions).
    pub federated: Scores,
    /// The centralised model on all validation sessions.
    pub centralised: Scores,
    /// Each site's own model on its own validation sessions, pooled.
    pub alone: Scores,
    /// Bayes-optimal accuracy of the generated data (the ceiling for any model).
    pub bayes_accuracy: f64,
    /// Federated rounds committed.
    pub rounds: u64,
    /// SHA-256 of the final global model.
    pub global_sha256: String,
    /// The coordinator's own federated evaluation of the final model.
    pub coordinator_evaluation: Option<EvaluationSummary>,
    /// Seconds: federated run, centralised training, all sites alone.
    pub seconds: Timings,
    /// The run's privacy-audit report (HTML; privacy-audit.json next to it).
    pub privacy_audit: PathBuf,
    /// The federation with record-level DP-SGD at every site, if it ran.
    pub private: Option<PrivateRun>,
}

/// The demo's private federation: DP-SGD at every site, each site's ledger and limit, the
/// noise calibrated by PLD to the target ε.
#[derive(Debug, Clone, Serialize)]
pub struct PrivateRun {
    /// The target ε each site stays within ...
    pub target_epsilon: f64,
    /// ... at this δ.
    pub delta: f64,
    /// The noise multiplier z the run dictated.
    pub noise_multiplier: f64,
    /// The largest ε any site's ledger states at the end (the smaller of RDP and PLD).
    pub max_site_epsilon: Option<f64>,
    /// The global model on all validation sessions (pooled).
    pub scores: Scores,
    /// Rounds committed.
    pub rounds: u64,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// How its configuration differs from the non-private run's, and why.
    pub configuration: String,
    /// Its privacy-audit report (HTML), with the record-level section filled in.
    pub privacy_audit: PathBuf,
}

/// Wall-clock seconds of each part.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timings {
    /// The federated run (rounds, evaluations, transfers).
    pub federated: f64,
    /// Centralised training.
    pub centralised: f64,
    /// Every site training alone, one after another.
    pub alone: f64,
}

/// Removes what an earlier demo left in `out` (only the demo's own products).
fn clear_previous(out: &Path) -> Result<()> {
    for name in ["data", "coordinator", "pki", "dp"] {
        let p = out.join(name);
        if p.exists() {
            std::fs::remove_dir_all(&p)
                .map_err(|e| Error::Other(format!("cannot clear {}: {e}", p.display())))?;
        }
    }
    for name in ["run.toml", "demo.json"] {
        let _ = std::fs::remove_file(out.join(name));
    }
    Ok(())
}

/// Generates the demo's partner data into `<out>/data` (replacing an earlier one) and loads
/// every site's split dataset.
/// Returns the data's Bayes-optimal accuracy, the vocabulary (path and loaded) and the sites.
pub(crate) fn generate_sites(
    out: &Path,
    sites: usize,
    sessions: usize,
    seed: u64,
    val_fraction: f64,
    say: &mut dyn FnMut(&str),
) -> Result<(f64, PathBuf, Vocab, Vec<SimSite>)> {
    let data_dir = out.join("data");
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)
            .map_err(|e| Error::Other(format!("cannot clear {}: {e}", data_dir.display())))?;
    }
    say(&format!(
        "generating {sessions} sessions for {sites} partner sites into {}",
        data_dir.display()
    ));
    let synth = SynthConfig {
        sites,
        total_sessions: sessions,
        seed,
        ..SynthConfig::default()
    };
    let manifest = generate(&data_dir, &synth, fedflow_client::local::DataFormat::Csv)
        .map_err(|e| Error::Other(e.to_string()))?;
    let vocab_path = data_dir.join(&manifest.vocab);
    let vocab = Vocab::load(&vocab_path)?;
    let mut loaded = Vec::with_capacity(manifest.sites.len());
    for s in &manifest.sites {
        let dataset = SiteDataset::load(
            data_dir.join(&s.file),
            &vocab,
            &LoadOptions::default(),
            val_fraction,
        )?;
        loaded.push(SimSite {
            name: s.name.clone(),
            dataset,
            privacy: None,
            source: None,
            published: None,
        });
    }
    Ok((manifest.bayes_accuracy, vocab_path, vocab, loaded))
}

pub(crate) fn score(
    params: &ParamSet,
    cfg: &RunConfig,
    sessions: &SiteDataset,
) -> Result<EvalMetrics> {
    let model = AttentionFlowModel::new(&cfg.model_config()?, &Device::Cpu, 0)?;
    params.load_into_varmap(model.varmap())?;
    Ok(evaluate(&model, &sessions.validation, EVAL_BATCH)?)
}

/// Trains from the run's initial model with early stopping; returns the trained weights.
fn train_from_initial(
    cfg: &RunConfig,
    initial: &ParamSet,
    data: &SiteDataset,
    tc: &TrainConfig,
) -> Result<ParamSet> {
    let model = AttentionFlowModel::new(&cfg.model_config()?, &Device::Cpu, 0)?;
    initial.load_into_varmap(model.varmap())?;
    train(&model, &data.train, &data.validation, tc, &mut |_| {})?;
    Ok(ParamSet::from_varmap(model.varmap())?)
}

pub(crate) fn pooled(metrics: &[EvalMetrics]) -> Result<Scores> {
    let classes = metrics.first().map_or(5, |m| m.confusion.len());
    let mut acc = MetricsAccumulator::new(classes);
    for m in metrics {
        acc.merge(m)?;
    }
    Ok(Scores::from(&acc.finish()))
}

/// Trains the baselines and scores the three models on every site's validation split;
/// returns the rows, the pooled scores (federated, centralised, alone) and the timings.
fn baselines(
    run_cfg: &RunConfig,
    initial: &ParamSet,
    global: &ParamSet,
    sites: &[SimSite],
    tc: &TrainConfig,
    federated_seconds: f64,
) -> Result<(Vec<SiteRow>, [Scores; 3], Timings)> {
    let t = std::time::Instant::now();
    let pooled_data = SiteDataset::pool(sites.iter().map(|s| &s.dataset));
    let central = train_from_initial(run_cfg, initial, &pooled_data, tc)?;
    let centralised_seconds = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let mut rows = Vec::with_capacity(sites.len());
    let mut all: [Vec<EvalMetrics>; 3] = Default::default();
    for s in sites {
        let own = train_from_initial(run_cfg, initial, &s.dataset, tc)?;
        let m = [
            score(global, run_cfg, &s.dataset)?,
            score(&central, run_cfg, &s.dataset)?,
            score(&own, run_cfg, &s.dataset)?,
        ];
        rows.push(SiteRow {
            site: s.name.clone(),
            train_sessions: s.dataset.train.len(),
            federated: Scores::from(&m[0]),
            centralised: Scores::from(&m[1]),
            alone: Scores::from(&m[2]),
            private: None,
        });
        for (dst, m) in all.iter_mut().zip(m) {
            dst.push(m);
        }
    }
    let overall = [pooled(&all[0])?, pooled(&all[1])?, pooled(&all[2])?];
    let timings = Timings {
        federated: federated_seconds,
        centralised: centralised_seconds,
        alone: t.elapsed().as_secs_f64(),
    };
    Ok((rows, overall, timings))
}

/// Prints a one-line summary of the run's live view when it changes (in place on a
/// terminal).
#[derive(Debug, Default)]
pub(crate) struct ProgressLine {
    last: String,
    /// The run goes on until stopped: rounds are not counted against its configured total.
    continuous: bool,
}

impl ProgressLine {
    /// The line of a run that goes on until it is stopped.
    pub(crate) fn continuous() -> ProgressLine {
        ProgressLine {
            continuous: true,
            ..ProgressLine::default()
        }
    }

    /// "round 3/10", or "round 3" in a continuous run.
    fn round(&self, round: u64, total: u64) -> String {
        if self.continuous {
            format!("round {round}")
        } else {
            format!("round {round}/{total}")
        }
    }

    pub(crate) fn show(&mut self, v: &RunView) {
        let count = |s: LiveState| v.sites.iter().filter(|x| x.state == s).count();
        let line = match v.phase {
            Phase::Waiting => format!(
                "{}: waiting for sites ({} connected)",
                self.round(v.committed_round + 1, v.total_rounds),
                v.sites_connected
            ),
            Phase::Training | Phase::Evaluating => {
                let training = v
                    .sites
                    .iter()
                    .find(|s| s.state == LiveState::Training)
                    .map(|s| {
                        let current = (s.epoch + 1).min(s.epochs);
                        format!(", {} training epoch {current}/{}", s.site_id, s.epochs)
                    })
                    .unwrap_or_default();
                format!(
                    "{}: {} - {}/{} done{training}{}{}",
                    self.round(
                        v.current_round.unwrap_or(v.committed_round + 1),
                        v.total_rounds
                    ),
                    if v.phase == Phase::Training {
                        "training  "
                    } else {
                        "evaluating"
                    },
                    count(LiveState::Uploaded),
                    v.sites.len(),
                    match count(LiveState::Dropped) + count(LiveState::Late) {
                        0 => String::new(),
                        n => format!(", {n} dropped or late"),
                    },
                    match count(LiveState::Rejected) {
                        0 => String::new(),
                        n => format!(", {n} rejected"),
                    },
                )
            }
            Phase::Paused => "run paused".to_string(),
            Phase::Finished => format!("run finished: {} rounds committed", v.committed_round),
        };
        let mut err = std::io::stderr();
        let tty = err.is_terminal();
        // In a log (not a terminal) only the phase and round matter, not every upload.
        let key = if tty {
            line.clone()
        } else {
            format!("{:?} {:?}", v.phase, v.current_round)
        };
        if key == self.last {
            return;
        }
        if tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            if v.phase == Phase::Finished {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
        self.last = key;
    }
}

/// Runs the demo; `say` receives human-readable progress lines.
pub async fn run(cfg: &DemoConfig, say: &mut dyn FnMut(&str)) -> Result<DemoReport> {
    let out = &cfg.out;
    std::fs::create_dir_all(out)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", out.display())))?;
    clear_previous(out)?;
    let (bayes_accuracy, vocab_path, vocab, sites) = generate_sites(
        out,
        cfg.sites,
        cfg.sessions,
        cfg.seed,
        cfg.val_fraction,
        say,
    )?;

    let run_cfg = run_config(cfg, &vocab_path, sites.len(), out)?;
    fedflow_common::fsio::write_atomic(
        &out.join("run.toml"),
        run_cfg.to_toml_string()?.as_bytes(),
    )?;
    let initial = initial_model(&run_cfg)?;

    say(&format!(
        "federated run over mutual TLS: {} rounds, {} local epoch(s) per round, coordinator \
         data in {}, certificates in {}",
        run_cfg.run.rounds,
        run_cfg.train.epochs,
        out.join("coordinator").display(),
        out.join("pki").display()
    ));
    let mut line = ProgressLine::default();
    // Real mutual TLS, as a deployment would run: a federation CA and a certificate per
    // site in <out>/pki, each site known to the coordinator by its certificate.
    let opts = SimOptions {
        concurrent_work: cfg.concurrent_work,
        pki_dir: Some(out.join("pki")),
        ..SimOptions::default()
    };
    let outcome = run_federation(
        run_cfg.clone(),
        &out.join("coordinator"),
        sites.clone(),
        &vocab,
        &opts,
        |v| line.show(v),
    )
    .await?;
    say(&format!(
        "privacy audit: {} ({})",
        outcome.privacy_summary,
        outcome.privacy_audit.display()
    ));
    say(&format!(
        "run report (charts per round): {}",
        outcome.run_report.display()
    ));
    let coordinator_evaluation = outcome
        .rounds
        .last()
        .and_then(|r| r.evaluation_json.as_deref())
        .and_then(|j| serde_json::from_str(j).ok());
    let private = match cfg.dp_epsilon {
        Some(eps) => Some(private_federation(cfg, eps, &vocab_path, &vocab, &sites, say).await?),
        None => None,
    };

    // Baselines, on a blocking thread: they are long CPU work.
    say(&format!(
        "baselines: centralised on the pooled data, then each site alone (at most {} epochs, patience {})",
        cfg.baseline_epochs, cfg.patience
    ));
    let base_tc = TrainConfig {
        epochs: cfg.baseline_epochs,
        patience: cfg.patience,
        ..run_cfg.local_train_config(0, "baseline")
    };
    let federated_seconds = outcome.seconds;
    let global = outcome.global.clone();
    let blocking_cfg = run_cfg.clone();
    let (rows, overall, timings) = tokio::task::spawn_blocking(move || {
        baselines(
            &blocking_cfg,
            &initial,
            &global,
            &sites,
            &base_tc,
            federated_seconds,
        )
    })
    .await
    .map_err(|e| Error::Other(format!("baseline training failed: {e}")))??;
    let mut rows = rows;
    if let Some((_, per_site)) = &private {
        for (row, scores) in rows.iter_mut().zip(per_site) {
            row.private = Some(*scores);
        }
    }
    let report = DemoReport {
        out: out.clone(),
        federated: overall[0],
        centralised: overall[1],
        alone: overall[2],
        sites: rows,
        bayes_accuracy,
        rounds: outcome.committed_round,
        global_sha256: outcome.global_sha256,
        coordinator_evaluation,
        seconds: timings,
        privacy_audit: outcome.privacy_audit.clone(),
        private: private.map(|(p, _)| p),
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Other(e.to_string()))?;
    fedflow_common::fsio::write_atomic(&out.join("demo.json"), json.as_bytes())?;
    Ok(report)
}

/// The demo's run configuration for `sites` sites: the embedded one (or `--config`'s) with
/// the demo's seed, rounds and epochs, its quorum scaled to the sites there are, validated
/// again as a whole (relative paths against `out`).
pub(crate) fn run_config(
    cfg: &DemoConfig,
    vocab_path: &Path,
    sites: usize,
    out: &Path,
) -> Result<RunConfig> {
    let mut run_cfg = match &cfg.run_config {
        Some(text) => RunConfig::with_vocab(text, vocab_path)?,
        None => RunConfig::demo(vocab_path)?,
    };
    run_cfg.run.seed = cfg.seed;
    if let Some(r) = cfg.rounds {
        run_cfg.run.rounds = r;
    }
    if let Some(e) = cfg.local_epochs {
        run_cfg.train.epochs = e;
    }
    // The embedded configuration expects 20 sites; scale its quorum to the sites there are.
    let n = sites;
    run_cfg.sampling.min_available = n;
    run_cfg.sampling.min_selected = run_cfg.sampling.min_selected.min(n);
    run_cfg.rounds.min_completed = run_cfg
        .rounds
        .min_completed
        .min(n.div_ceil(5) * 4)
        .min(run_cfg.sampling.min_selected)
        .max(1);
    Ok(RunConfig::from_toml_str(&run_cfg.to_toml_string()?, out)?)
}

/// The configuration of the demo's private run (the privacy curve's): a smaller model than
/// the demo's, which keeps more utility under DP-SGD's noise (see BENCHMARKS.md).
const PRIVATE_CONFIG: &str = include_str!("../examples/privacy_curve.toml");

/// Rounds of the demo's private run (unless `--rounds` says otherwise) and its learning
/// rate: 10 rounds keep the demo within two minutes of its non-private run; the privacy
/// curve's 40 rounds at lr 0.03 score about 4 points higher at the same ε and take four
/// times as long.
const PRIVATE_ROUNDS: u64 = 10;
const PRIVATE_LEARNING_RATE: f64 = 0.05;

/// The demo's federation with DP-SGD at every site at target `epsilon` (the privacy curve's
/// configuration: a shared Poisson sampling rate of 0.05, C = 1, AdamW at 0.05), in
/// `<out>/dp`; its report and each site's scores on its validation split.
async fn private_federation(
    cfg: &DemoConfig,
    epsilon: f64,
    vocab_path: &Path,
    vocab: &Vocab,
    sites: &[SimSite],
    say: &mut dyn FnMut(&str),
) -> Result<(PrivateRun, Vec<Scores>)> {
    use crate::privacy_curve::{CurveConfig, base_config, private_run, smallest_site};
    let curve = CurveConfig {
        out: cfg.out.join("dp"),
        sites: sites.len(),
        sessions: cfg.sessions,
        seed: cfg.seed,
        val_fraction: cfg.val_fraction,
        epsilons: vec![epsilon],
        delta: cfg.dp_delta,
        run_config: PRIVATE_CONFIG.to_string(),
        clip_norm: 1.0,
        expected_batch_size: 0,
        sampling_rate: Some(0.05),
        dp_learning_rate: Some(PRIVATE_LEARNING_RATE),
        concurrent_work: cfg.concurrent_work,
        non_private: false,
        accountant: fedflow_common::privacy::planner::Accounting::Pld,
        // Mutual TLS, as the non-private run.
        mutual_tls: true,
    };
    std::fs::create_dir_all(&curve.out)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", curve.out.display())))?;
    let rounds = cfg.rounds.unwrap_or(PRIVATE_ROUNDS);
    let mut base = base_config(&curve, vocab_path, sites.len(), Some(rounds))?;
    base.run.name = "demo-dp".into();
    if let Some(e) = cfg.local_epochs {
        base.train.epochs = e;
    }
    say(&format!(
        "private federated run: DP-SGD at every site, epsilon {epsilon} at delta {:e} per \
         site (PLD-calibrated noise), {} rounds, in {}",
        cfg.dp_delta,
        base.run.rounds,
        curve.out.display()
    ));
    let p = private_run(
        &curve,
        &base,
        epsilon,
        smallest_site(sites),
        sites,
        vocab,
        say,
    )
    .await?;
    say(&format!(
        "private run: accuracy {:.4}, largest site epsilon {:.3}; privacy audit: {}",
        p.scores.accuracy,
        p.max_site_epsilon.unwrap_or(f64::NAN),
        p.privacy_audit.display()
    ));
    let run = PrivateRun {
        target_epsilon: epsilon,
        delta: cfg.dp_delta,
        noise_multiplier: p.noise_multiplier.unwrap_or(0.0),
        max_site_epsilon: p.max_site_epsilon,
        scores: p.scores,
        rounds: p.rounds,
        seconds: p.seconds,
        configuration: format!(
            "sim/examples/privacy_curve.toml with {} rounds: one LSTM layer of 32, no \
             dropout, {} local epoch(s) per round; DP-SGD with Poisson sampling q = 0.05 at \
             every site, C = 1, AdamW at lr {PRIVATE_LEARNING_RATE}; counts of sessions sent in \
             the clear (fedflow-sim privacy-curve: 40 rounds at lr 0.03 score higher and take \
             longer)",
            base.run.rounds, base.train.epochs
        ),
        privacy_audit: p.privacy_audit.clone(),
    };
    Ok((run, p.per_site))
}

#[cfg(test)]
mod tests {
    use super::ProgressLine;

    /// A run of N rounds counts its rounds against N; a continuous run, whose configured
    /// total is not used, does not.
    #[test]
    fn a_continuous_run_is_not_counted_against_a_total() {
        assert_eq!(ProgressLine::default().round(3, 10), "round 3/10");
        assert_eq!(ProgressLine::continuous().round(13, 1), "round 13");
    }
}
