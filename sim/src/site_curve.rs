//! The privacy-utility curve of site-level DP with many small sites (cross-device style):
//! thousands of generated sites, Poisson-sampled at rate q each round (about q·N per round),
//! DP-FedAvg in central mode with adaptive clipping at several target ε, next to
//! non-private FedAvg with the same expected participation, each with and without server
//! momentum (DP-FedAvgM).
//!
//! The federation runs in one process through the real [`RoundEngine`] (its Poisson
//! sampling, norm bound, top-up noise, adaptive clipping, ledger and budget stop, with its
//! SQLite store and checkpoints) and the real site code ([`SiteTrainer::train_task`], which
//! clips and noises the delta as a partner site does), without gRPC: thousands of clients
//! on one 2-core machine would measure the sockets, not the privacy. Time is simulated.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use fedflow_client::site::{SiteTrainer, TaskSpec};
use fedflow_common::data::{SiteDataset, Vocab};
use fedflow_common::model::vocab_sha256;
use fedflow_common::privacy::dpfedavg::{AdaptiveClipping, TrustMode};
use fedflow_common::privacy::planner::noise_for_epsilon;
use fedflow_coordinator::config::{RunConfig, SiteDpSection, StrategyKind};
use fedflow_coordinator::metrics::SiteReport;
use fedflow_coordinator::round::{DeltaSource, Phase, RoundEngine, Submission};
use fedflow_coordinator::store::Store;
use fedflow_coordinator::strategy::UpdateReport;
use serde::Serialize;

use crate::demo::{Scores, generate_sites, score};
use crate::{Error, Result, initial_model};

/// What the curve runs.
#[derive(Debug, Clone)]
pub struct SiteCurveConfig {
    /// Output folder: `data/`, one folder per run, `site-curve.json`.
    pub out: PathBuf,
    /// Partner sites.
    pub sites: usize,
    /// Sessions over all sites.
    pub sessions: usize,
    /// Seed of the data, the training and (simulation only) the coordinator's randomness.
    pub seed: u64,
    /// Validation (held-out) fraction of each site.
    pub val_fraction: f64,
    /// Site-level target ε of each private run.
    pub epsilons: Vec<f64>,
    /// δ of every target (below 1 / sites).
    pub delta: f64,
    /// Poisson site sampling rate q.
    pub sampling_rate: f64,
    /// Initial clip C (adaptive clipping moves it towards the median update norm).
    pub clip_norm: f64,
    /// Server momentum values to run (0 = FedAvg).
    pub momenta: Vec<f64>,
    /// Server learning rate of the momentum runs (η; the effective step of FedAvgM is
    /// η / (1 − β), so η = 1 − β keeps FedAvg's).
    pub server_learning_rate: f64,
    /// The run configuration (TOML; `model.vocab` is replaced).
    pub run_config: String,
    /// Sites training at the same time.
    pub threads: usize,
}

/// One run of the curve.
#[derive(Debug, Clone, Serialize)]
pub struct SiteCurvePoint {
    /// Site-level target ε (`None`: non-private).
    pub target_epsilon: Option<f64>,
    /// Noise multiplier z (effective, bits included).
    pub noise_multiplier: Option<f64>,
    /// Server momentum.
    pub server_momentum: f64,
    /// Server learning rate (1 without momentum).
    pub server_learning_rate: f64,
    /// ε the coordinator's ledger records at the end, at δ.
    pub epsilon_spent: Option<f64>,
    /// Rounds committed.
    pub rounds: u64,
    /// Mean number of contributions per round.
    pub mean_contributions: f64,
    /// The clip of the last round.
    pub final_clip: Option<f64>,
    /// Pooled held-out scores of the final global model.
    pub scores: Scores,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The whole curve.
#[derive(Debug, Clone, Serialize)]
pub struct SiteCurveReport {
    /// Sites in the federation.
    pub sites: usize,
    /// Sessions over all sites.
    pub sessions: usize,
    /// Poisson rate q.
    pub sampling_rate: f64,
    /// Expected contributions per round (the fixed denominator).
    pub expected_sites: f64,
    /// δ.
    pub delta: f64,
    /// The run configuration.
    pub run_config: String,
    /// Bayes-optimal accuracy of the generated data.
    pub bayes_accuracy: f64,
    /// The runs.
    pub points: Vec<SiteCurvePoint>,
}

/// Runs the curve; `say` gets progress lines.
pub fn run(cfg: &SiteCurveConfig, say: &mut dyn FnMut(&str)) -> Result<SiteCurveReport> {
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
    let held_out = SiteDataset::pool(sites.iter().map(|s| &s.dataset));
    let trainers: Vec<(String, Arc<SiteTrainer>)> = sites
        .into_iter()
        .map(|s| {
            (
                s.name,
                Arc::new(SiteTrainer::new(s.dataset, &vocab, Device::Cpu)),
            )
        })
        .collect();
    let expected = cfg.sampling_rate * trainers.len() as f64;
    let mut base = RunConfig::with_vocab(&cfg.run_config, &vocab_path)?;
    base.run.seed = cfg.seed;
    base.evaluation.every = 0;
    base.evaluation.final_round = false;
    base.sampling.fraction = cfg.sampling_rate;
    base.sampling.count = None;
    base.sampling.min_selected = 1;
    base.sampling.min_available = 1;
    base.rounds.min_completed = 1;
    let mut points = Vec::new();
    let targets: Vec<Option<f64>> = std::iter::once(None)
        .chain(cfg.epsilons.iter().copied().map(Some))
        .collect();
    for &momentum in &cfg.momenta {
        for &target in &targets {
            let mut run_cfg = base.clone();
            if momentum > 0.0 {
                run_cfg.run.strategy = StrategyKind::Fedavgm;
                run_cfg.run.server_learning_rate = Some(cfg.server_learning_rate);
                run_cfg.run.server_momentum = Some(momentum);
            }
            let mut z = None;
            if let Some(eps) = target {
                let noise =
                    noise_for_epsilon(cfg.sampling_rate, 1, base.run.rounds, cfg.delta, eps)?;
                z = Some(noise);
                run_cfg.site_dp = Some(SiteDpSection {
                    mode: TrustMode::Central,
                    clip_norm: cfg.clip_norm,
                    noise_multiplier: noise,
                    sampling_rate: Some(cfg.sampling_rate),
                    expected_sites: expected,
                    target_epsilon: eps,
                    target_delta: cfg.delta,
                    adaptive_clipping: Some(AdaptiveClipping {
                        target_quantile: 0.5,
                        learning_rate: 0.2,
                        bit_noise_std: expected / 20.0,
                    }),
                });
            }
            run_cfg.validate().map_err(Error::Other)?;
            let name = match target {
                Some(e) => format!("eps-{e}-m{momentum}-lr{}", cfg.server_learning_rate),
                None => format!("non-private-m{momentum}-lr{}", cfg.server_learning_rate),
            };
            say(&format!(
                "{name}: {} sites, q = {}, {} rounds, z = {}",
                trainers.len(),
                cfg.sampling_rate,
                run_cfg.run.rounds,
                z.map_or("-".into(), |z| format!("{z:.4}"))
            ));
            let p = one_run(
                cfg,
                &run_cfg,
                &out.join(&name),
                &trainers,
                &vocab,
                &held_out,
                say,
            )?;
            say(&format!(
                "  accuracy {:.4}, macro-F1 {:.4}; epsilon {}; {:.1} contributions/round; \
                 final clip {}; {:.0} s",
                p.scores.accuracy,
                p.scores.macro_f1,
                p.epsilon_spent.map_or("-".into(), |e| format!("{e:.3}")),
                p.mean_contributions,
                p.final_clip.map_or("-".into(), |c| format!("{c:.4}")),
                p.seconds
            ));
            points.push(p);
        }
    }
    let report = SiteCurveReport {
        sites: trainers.len(),
        sessions: cfg.sessions,
        sampling_rate: cfg.sampling_rate,
        expected_sites: expected,
        delta: cfg.delta,
        run_config: base.to_toml_string()?,
        bayes_accuracy,
        points,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Other(e.to_string()))?;
    fedflow_common::fsio::write_atomic(&out.join("site-curve.json"), json.as_bytes())?;
    Ok(report)
}

/// Runs `run_cfg` to its end and scores the final global model on `held_out`; the point's
/// target, z and server settings are the configuration's.
fn one_run(
    cfg: &SiteCurveConfig,
    run_cfg: &RunConfig,
    dir: &Path,
    sites: &[(String, Arc<SiteTrainer>)],
    vocab: &Vocab,
    held_out: &SiteDataset,
    say: &mut dyn FnMut(&str),
) -> Result<SiteCurvePoint> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| Error::Other(format!("cannot clear {}: {e}", dir.display())))?;
    }
    let started = Instant::now();
    let store = Store::open(dir)?;
    let mut engine = RoundEngine::open(store, run_cfg.clone(), initial_model(run_cfg)?)?;
    // Reproducible simulation; a real coordinator draws this from the operating system.
    engine.seed_site_dp_randomness(cfg.seed);
    let vocab_sha = vocab_sha256(vocab);
    let model = run_cfg.model_config()?;
    let mut contributions = 0u64;
    // Simulated time: every round inside one liveness window.
    let now = 1_000_000i64;
    while engine.phase() != Phase::Finished {
        let round = engine.committed_round() + 1;
        for (name, _) in sites {
            engine.site_seen(name, now)?;
        }
        let mut tickets = Vec::new();
        for (i, (name, _)) in sites.iter().enumerate() {
            if let Some(t) = engine.poll_task(name, now)? {
                tickets.push((i, t));
            }
        }
        if engine.phase() == Phase::Finished {
            break;
        }
        let (global, global_sha) = engine.global();
        let global_bytes = global.to_safetensors_bytes()?;
        let global_sha = global_sha.to_string();
        let specs: Vec<TaskSpec> = tickets
            .iter()
            .map(|(i, t)| TaskSpec {
                run_id: run_cfg.run.name.clone(),
                round: t.round,
                task_id: t.task_id.clone(),
                model: model.clone(),
                vocab_sha256: vocab_sha.clone(),
                expected_model_sha256: global_sha.clone(),
                train: run_cfg.local_train_config(t.round, &sites[*i].0),
                record_dp: None,
                site_dp: t.site_dp,
            })
            .collect();
        // Train the selected sites on `threads` workers, in a fixed assignment.
        let threads = cfg.threads.max(1);
        let mut outcomes: Vec<Option<fedflow_client::Result<_>>> =
            (0..tickets.len()).map(|_| None).collect();
        std::thread::scope(|scope| {
            let mut slots: Vec<_> = outcomes.iter_mut().enumerate().collect();
            let per = slots.len().div_ceil(threads).max(1);
            let mut handles = Vec::new();
            while !slots.is_empty() {
                let chunk: Vec<_> = slots.drain(..per.min(slots.len())).collect();
                let (tickets, specs, bytes) = (&tickets, &specs, &global_bytes);
                handles.push(scope.spawn(move || {
                    for (k, slot) in chunk {
                        let trainer = &sites[tickets[k].0].1;
                        *slot = Some(trainer.train_task(&specs[k], bytes, &mut |_| {}));
                    }
                }));
            }
            for h in handles {
                h.join().expect("a training thread panicked");
            }
        });
        for ((i, t), outcome) in tickets.iter().zip(outcomes) {
            let name = &sites[*i].0;
            match outcome.expect("every slot trained") {
                Ok(o) => {
                    let r = engine.submit(
                        Submission {
                            site_id: name.to_owned(),
                            round: t.round,
                            task_id: t.task_id.clone(),
                            nonce: t.nonce.clone(),
                            base_model_sha256: global_sha.clone(),
                            delta: DeltaSource::Params(o.delta),
                            delta_sha256: o.delta_sha256,
                            report: UpdateReport {
                                train_examples: o.metrics.train_examples as u64,
                                claimed_weight: o.metrics.train_examples as f64,
                            },
                            metrics: SiteReport {
                                train_examples: o.metrics.train_examples as u64,
                                ..SiteReport::default()
                            },
                            unclipped: o.unclipped,
                        },
                        now,
                    )?;
                    match r {
                        Ok(_) => contributions += 1,
                        Err(rej) => say(&format!("  round {round}: {name} rejected: {rej}")),
                    }
                }
                Err(e) => {
                    if let Err(rej) =
                        engine.decline(name, t.round, &t.task_id, &t.nonce, &e.to_string(), now)?
                    {
                        say(&format!("  round {round}: {name} could not decline: {rej}"));
                    }
                }
            }
        }
        if engine.committed_round() < round {
            return Err(Error::Other(format!(
                "round {round} did not commit (phase {:?})",
                engine.phase()
            )));
        }
        if round % 10 == 0 {
            say(&format!(
                "  round {round}: {} selected; {:.0} s",
                tickets.len(),
                started.elapsed().as_secs_f64()
            ));
        }
    }
    let rounds = engine.committed_round();
    let ledger = engine.store().site_dp_rounds(&run_cfg.run.name)?;
    let status = engine.store().run(&run_cfg.run.name)?;
    if let Some(reason) = status.and_then(|r| r.status_reason) {
        say(&format!("  the run ended: {reason}"));
    }
    // Training time only: scoring comes after.
    let seconds = started.elapsed().as_secs_f64();
    let dp = run_cfg.site_dp.as_ref();
    Ok(SiteCurvePoint {
        target_epsilon: dp.map(|d| d.target_epsilon),
        noise_multiplier: dp.map(|d| d.noise_multiplier),
        server_momentum: run_cfg.run.server_momentum(),
        server_learning_rate: run_cfg.run.server_learning_rate(),
        epsilon_spent: ledger.last().map(|r| r.epsilon),
        rounds,
        mean_contributions: contributions as f64 / rounds.max(1) as f64,
        final_clip: ledger.last().map(|r| r.clip_norm),
        scores: Scores::from(&score(engine.global().0, run_cfg, held_out)?),
        seconds,
    })
}
