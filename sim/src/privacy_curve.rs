//! The privacy-utility curve of record-level DP: the same generated federation as the demo,
//! trained once without DP and once per target ε with DP-SGD at every site, each global model
//! scored on the pooled held-out sessions of all sites.
//!
//! The run dictates one noise multiplier z for all sites. With an expected batch size B it is
//! the smallest z with which the site with the fewest sessions (the largest sampling rate
//! q = B / n) stays within the target ε at δ over all planned rounds, and every other site
//! spends less; with a shared sampling rate q every site spends exactly the target. Each site's ledger then
//! records what it really spent; the report gives the largest and smallest realised ε.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedflow_client::privacy::SitePrivacy;
use fedflow_common::privacy::planner::{Accounting, noise_for_epsilon_by};
use fedflow_common::train::{DpSgdConfig, PrivacyUnit};
use fedflow_coordinator::config::{RecordDpSection, RunConfig};
use serde::Serialize;

use crate::demo::{Scores, generate_sites, pooled, score};
use crate::{Error, Result, SimOptions, SimSite, run_federation};

/// What the curve runs.
#[derive(Debug, Clone)]
pub struct CurveConfig {
    /// Output folder: `data/`, one folder per run, `privacy-curve.json`.
    pub out: PathBuf,
    /// Partner sites.
    pub sites: usize,
    /// Sessions over all sites.
    pub sessions: usize,
    /// Seed of data, sampling and training.
    pub seed: u64,
    /// Validation (held-out) fraction of each site.
    pub val_fraction: f64,
    /// Target ε of each private run.
    pub epsilons: Vec<f64>,
    /// δ of every target.
    pub delta: f64,
    /// The run configuration (TOML text; `model.vocab` is replaced) shared by all runs; the
    /// private runs add `[record_dp]`.
    pub run_config: String,
    /// Clipping bound C.
    pub clip_norm: f64,
    /// Expected batch size B (ignored when `sampling_rate` is set).
    pub expected_batch_size: usize,
    /// A sampling rate shared by all sites instead of B (then z is the same ε for all).
    pub sampling_rate: Option<f64>,
    /// Learning rate of the private runs (noisy gradients want a larger step than the
    /// non-private run's `train.learning_rate`); `None`: the configuration's.
    pub dp_learning_rate: Option<f64>,
    /// Sites that may train at the same time.
    pub concurrent_work: usize,
    /// Also run without DP (the reference point).
    pub non_private: bool,
    /// The accountant that calibrates z to each target (the sites' ledgers state and enforce
    /// the smaller of both bounds either way).
    pub accountant: Accounting,
    /// Serve each run over mutual TLS, with a federation PKI of its own in `<run>/pki`;
    /// otherwise plaintext on loopback.
    pub mutual_tls: bool,
}

/// One run of the curve.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    /// The target ε (None: the non-private run).
    pub target_epsilon: Option<f64>,
    /// The noise multiplier the run dictated.
    pub noise_multiplier: Option<f64>,
    /// The largest ε any site's ledger reached, at the curve's δ.
    pub max_site_epsilon: Option<f64>,
    /// The smallest.
    pub min_site_epsilon: Option<f64>,
    /// Global model on the pooled held-out sessions.
    pub scores: Scores,
    /// Rounds committed.
    pub rounds: u64,
    /// Wall-clock seconds of the federated run.
    pub seconds: f64,
    /// The global model on each site's held-out sessions, in site order.
    pub per_site: Vec<Scores>,
    /// The run's privacy-audit report (HTML).
    pub privacy_audit: PathBuf,
}

/// The whole curve.
#[derive(Debug, Clone, Serialize)]
pub struct CurveReport {
    /// δ of every target.
    pub delta: f64,
    /// C.
    pub clip_norm: f64,
    /// B (0 when a sampling rate is used).
    pub expected_batch_size: usize,
    /// The shared sampling rate, if one is used.
    pub sampling_rate: Option<f64>,
    /// Learning rate of the private runs.
    pub dp_learning_rate: f64,
    /// Training sessions of the smallest site (it sets z).
    pub smallest_site_sessions: usize,
    /// The run configuration used (TOML, without `[record_dp]`).
    pub run_config: String,
    /// Bayes-optimal accuracy of the data.
    pub bayes_accuracy: f64,
    /// The runs, non-private first.
    pub points: Vec<CurvePoint>,
}

async fn one_run(
    cfg: &CurveConfig,
    run_cfg: RunConfig,
    dir: &Path,
    sites: &[SimSite],
    vocab: &fedflow_common::data::Vocab,
    say: &mut dyn FnMut(&str),
) -> Result<(CurvePoint, Vec<SimSite>)> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| Error::Other(format!("cannot clear {}: {e}", dir.display())))?;
    }
    let dp = run_cfg.record_dp.clone();
    let mut run_sites = sites.to_vec();
    if let Some(dp) = &dp {
        for s in &mut run_sites {
            let p = SitePrivacy::open(
                &dir.join("privacy").join(&s.name),
                dp.target_epsilon,
                cfg.delta,
                false,
            )
            .map_err(|e| Error::Other(e.to_string()))?;
            s.privacy = Some(Arc::new(p));
        }
    }
    let opts = SimOptions {
        concurrent_work: cfg.concurrent_work,
        pki_dir: cfg.mutual_tls.then(|| dir.join("pki")),
        ..SimOptions::default()
    };
    let outcome = run_federation(
        run_cfg.clone(),
        &dir.join("coordinator"),
        run_sites.clone(),
        vocab,
        &opts,
        |_| {},
    )
    .await?;
    let mut spent = Vec::new();
    for s in &run_sites {
        if let Some(p) = &s.privacy {
            // What the site's ledger states: the smaller of its RDP and PLD bounds.
            let e = p
                .ledger()
                .spend()
                .and_then(|s| s.epsilon(cfg.delta))
                .map_err(|e| Error::Other(e.to_string()))?;
            spent.push(e);
        }
        let contributed = outcome
            .sites
            .iter()
            .filter(|(n, _)| n == &s.name)
            .map(|(_, x)| x.rounds_contributed.len())
            .sum::<usize>();
        if contributed as u64 != outcome.committed_round {
            say(&format!(
                "note: {} contributed to {contributed} of {} rounds",
                s.name, outcome.committed_round
            ));
        }
    }
    let metrics = run_sites
        .iter()
        .map(|s| score(&outcome.global, &run_cfg, &s.dataset))
        .collect::<Result<Vec<_>>>()?;
    let scores = pooled(&metrics)?;
    let per_site = metrics.iter().map(Scores::from).collect();
    let point = CurvePoint {
        target_epsilon: dp.as_ref().map(|d| d.target_epsilon),
        noise_multiplier: dp.as_ref().map(|d| d.noise_multiplier),
        max_site_epsilon: spent.iter().copied().reduce(f64::max),
        min_site_epsilon: spent.iter().copied().reduce(f64::min),
        scores,
        rounds: outcome.committed_round,
        seconds: outcome.seconds,
        per_site,
        privacy_audit: outcome.privacy_audit.clone(),
    };
    Ok((point, run_sites))
}

/// The configuration every run of the curve shares: `cfg.run_config` without DP, no
/// evaluation rounds (the global models are scored here), the quorum scaled to `sites`, and
/// `rounds` instead of the configuration's when given.
pub(crate) fn base_config(
    cfg: &CurveConfig,
    vocab_path: &Path,
    sites: usize,
    rounds: Option<u64>,
) -> Result<RunConfig> {
    let mut base = RunConfig::with_vocab(&cfg.run_config, vocab_path)?;
    base.run.seed = cfg.seed;
    base.record_dp = None;
    // The sites score nothing themselves (metrics are withheld under DP); the global models
    // are scored here, on the held-out sessions.
    base.evaluation.every = 0;
    base.evaluation.final_round = false;
    if let Some(r) = rounds {
        base.run.rounds = r;
    }
    base.sampling.min_available = sites;
    base.sampling.min_selected = base.sampling.min_selected.min(sites);
    base.rounds.min_completed = base.rounds.min_completed.min(sites).max(1);
    Ok(RunConfig::from_toml_str(&base.to_toml_string()?, &cfg.out)?)
}

/// Training sessions of the smallest site (with an expected batch size, it sets z).
pub(crate) fn smallest_site(sites: &[SimSite]) -> usize {
    sites
        .iter()
        .map(|s| s.dataset.train.len())
        .min()
        .unwrap_or(0)
}

/// One private run of the curve: `base` with DP-SGD at every site, z calibrated by
/// `cfg.accountant` so that the site with `smallest` sessions ends at `target`, in
/// `cfg.out/eps-<target>`.
pub(crate) async fn private_run(
    cfg: &CurveConfig,
    base: &RunConfig,
    target: f64,
    smallest: usize,
    sites: &[SimSite],
    vocab: &fedflow_common::data::Vocab,
    say: &mut dyn FnMut(&str),
) -> Result<CurvePoint> {
    let batch = if cfg.sampling_rate.is_some() {
        0
    } else {
        cfg.expected_batch_size
    };
    let sgd = DpSgdConfig {
        clip_norm: cfg.clip_norm,
        expected_batch_size: batch,
        sampling_rate: cfg.sampling_rate,
        unit: PrivacyUnit::Session,
        ..DpSgdConfig::default()
    };
    let round = sgd.round_event(smallest, base.train.epochs)?;
    let z = noise_for_epsilon_by(
        cfg.accountant,
        round.q,
        round.steps,
        base.run.rounds,
        cfg.delta,
        target,
    )?;
    let mut run_cfg = base.clone();
    if let Some(lr) = cfg.dp_learning_rate {
        run_cfg.train.learning_rate = lr;
    }
    run_cfg.record_dp = Some(RecordDpSection {
        clip_norm: cfg.clip_norm,
        noise_multiplier: z,
        expected_batch_size: (batch > 0).then_some(batch),
        sampling_rate: cfg.sampling_rate,
        unit: PrivacyUnit::Session,
        max_sessions_per_user: sgd.max_sessions_per_user,
        target_epsilon: target,
        target_delta: cfg.delta,
        // z is calibrated to the target for DP-SGD alone: counts in the clear, as the
        // curve's reports state.
        count_noise_multiplier: 0.0,
    });
    say(&format!(
        "record-level DP, target epsilon {target} at delta {:e}: noise multiplier {z:.4}",
        cfg.delta
    ));
    let (p, _) = one_run(
        cfg,
        run_cfg,
        &cfg.out.join(format!("eps-{target}")),
        sites,
        vocab,
        say,
    )
    .await?;
    Ok(p)
}

/// Runs the curve; `say` gets progress lines.
pub async fn run(cfg: &CurveConfig, say: &mut dyn FnMut(&str)) -> Result<CurveReport> {
    let out = &cfg.out;
    std::fs::create_dir_all(out)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", out.display())))?;
    let (bayes_accuracy, vocab_path, vocab, sites) = generate_sites(
        out,
        cfg.sites,
        cfg.sessions,
        cfg.seed,
        cfg.val_fraction,
        say,
    )?;
    let base = base_config(cfg, &vocab_path, sites.len(), None)?;
    let smallest = smallest_site(&sites);
    let mut points = Vec::new();
    if cfg.non_private {
        say("non-private federated run");
        let (p, _) = one_run(
            cfg,
            base.clone(),
            &out.join("non-private"),
            &sites,
            &vocab,
            say,
        )
        .await?;
        say(&format!(
            "  accuracy {:.4}, macro-F1 {:.4} ({:.0} s)",
            p.scores.accuracy, p.scores.macro_f1, p.seconds
        ));
        points.push(p);
    }
    for &target in &cfg.epsilons {
        let p = private_run(cfg, &base, target, smallest, &sites, &vocab, say).await?;
        say(&format!(
            "  accuracy {:.4}, macro-F1 {:.4}; site epsilon {:.3}..{:.3} ({:.0} s)",
            p.scores.accuracy,
            p.scores.macro_f1,
            p.min_site_epsilon.unwrap_or(f64::NAN),
            p.max_site_epsilon.unwrap_or(f64::NAN),
            p.seconds
        ));
        points.push(p);
    }
    let report = CurveReport {
        delta: cfg.delta,
        clip_norm: cfg.clip_norm,
        expected_batch_size: if cfg.sampling_rate.is_some() {
            0
        } else {
            cfg.expected_batch_size
        },
        sampling_rate: cfg.sampling_rate,
        dp_learning_rate: cfg.dp_learning_rate.unwrap_or(base.train.learning_rate),
        smallest_site_sessions: smallest,
        run_config: base.to_toml_string()?,
        bayes_accuracy,
        points,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Other(e.to_string()))?;
    fedflow_common::fsio::write_atomic(&out.join("privacy-curve.json"), json.as_bytes())?;
    Ok(report)
}
