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
use fedflow_common::params::ParamSet;
use fedflow_common::privacy::dpfedavg::{AdaptiveClipping, TrustMode};
use fedflow_common::privacy::planner::{Accounting, noise_for_epsilon_by};
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
    /// ε the coordinator's ledger states at the end, at δ (the smaller of RDP and PLD).
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
    let base = base_config(cfg, &vocab_path)?;
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
                let dp = site_dp(cfg, base.run.rounds, expected, eps)?;
                z = Some(dp.noise_multiplier);
                run_cfg.site_dp = Some(dp);
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
                None,
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

/// What a simulated site hands the engine for its task `t`: its delta on the global model
/// `base_sha`, weighted by (and reporting) `examples`, with adaptive clipping's bit.
fn submission(
    site: &str,
    t: &fedflow_coordinator::round::TaskTicket,
    base_sha: &str,
    delta: ParamSet,
    delta_sha256: String,
    examples: u64,
    unclipped: bool,
) -> Submission {
    Submission {
        site_id: site.to_owned(),
        round: t.round,
        task_id: t.task_id.clone(),
        nonce: t.nonce.clone(),
        base_model_sha256: base_sha.to_owned(),
        delta: DeltaSource::Params(delta),
        delta_sha256,
        report: UpdateReport {
            train_examples: examples,
            claimed_weight: examples as f64,
        },
        metrics: SiteReport {
            train_examples: examples,
            ..SiteReport::default()
        },
        unclipped,
    }
}

/// The run configuration every run of the curve starts from: `cfg.run_config` with Poisson
/// sampling at `cfg.sampling_rate`, no evaluation rounds, and a round that commits with one
/// contribution.
pub(crate) fn base_config(cfg: &SiteCurveConfig, vocab_path: &Path) -> Result<RunConfig> {
    let mut base = RunConfig::with_vocab(&cfg.run_config, vocab_path)?;
    base.run.seed = cfg.seed;
    base.evaluation.every = 0;
    base.evaluation.final_round = false;
    base.sampling.fraction = cfg.sampling_rate;
    base.sampling.count = None;
    base.sampling.min_selected = 1;
    base.sampling.min_available = 1;
    base.rounds.min_completed = 1;
    Ok(base)
}

/// DP-FedAvg in central mode at target `epsilon` over `rounds` rounds: z from the PLD
/// planner, a fixed denominator of `expected` sites, adaptive clipping towards the median.
pub(crate) fn site_dp(
    cfg: &SiteCurveConfig,
    rounds: u64,
    expected: f64,
    epsilon: f64,
) -> Result<SiteDpSection> {
    let noise = noise_for_epsilon_by(
        Accounting::Pld,
        cfg.sampling_rate,
        1,
        rounds,
        cfg.delta,
        epsilon,
    )?;
    Ok(SiteDpSection {
        mode: TrustMode::Central,
        clip_norm: cfg.clip_norm,
        noise_multiplier: noise,
        sampling_rate: Some(cfg.sampling_rate),
        expected_sites: expected,
        target_epsilon: epsilon,
        target_delta: cfg.delta,
        adaptive_clipping: Some(AdaptiveClipping {
            target_quantile: 0.5,
            learning_rate: 0.2,
            bit_noise_std: expected / 20.0,
        }),
    })
}

/// Canary sites for an empirical site-level audit (Steinke, Nasr, Jagielski 2023): each
/// canary is a site whose update, every round it is sampled, is `sign · C` on one
/// coordinate of the model (C the round's clip), released through the real
/// [`privatize`](fedflow_common::privacy::dpfedavg::privatize) (its noise share in the
/// distributed and local modes) and the real round engine. Only included canaries exist in
/// the federation; every canary is scored on the committed global models.
#[derive(Debug)]
pub(crate) struct SiteCanaries {
    /// Site name, flat coordinate, sign, included.
    pub canaries: Vec<(String, usize, f32, bool)>,
    /// One score per canary: `Σ_rounds sign · (global_t − global_{t−1})[coordinate] / C_t`.
    pub scores: Vec<f64>,
    /// The canaries' own noise (distributed and local modes).
    pub rng: rand_chacha::ChaCha20Rng,
}

impl SiteCanaries {
    /// The names of the included canaries.
    fn present(&self) -> Vec<String> {
        self.canaries
            .iter()
            .filter(|c| c.3)
            .map(|c| c.0.clone())
            .collect()
    }

    /// Every canary's coordinate's value in `params`.
    fn values(&self, params: &ParamSet) -> Result<Vec<f64>> {
        let flat = flatten(params)?;
        Ok(self.canaries.iter().map(|c| f64::from(flat[c.1])).collect())
    }

    /// Adds the round's change at each canary's coordinate to its score.
    fn score_round(&mut self, before: &[f64], after: &ParamSet, clip: f64) -> Result<()> {
        let now = self.values(after)?;
        for ((score, c), (b, a)) in self
            .scores
            .iter_mut()
            .zip(&self.canaries)
            .zip(before.iter().zip(&now))
        {
            *score += f64::from(c.2) * (a - b) / clip;
        }
        Ok(())
    }

    /// The release of canary `name` in a round with task `dp`.
    fn update(
        &mut self,
        name: &str,
        global: &ParamSet,
        dp: &fedflow_common::privacy::dpfedavg::SiteDpTask,
    ) -> Result<fedflow_common::privacy::dpfedavg::PrivatizedUpdate> {
        let &(_, coordinate, sign, _) = self
            .canaries
            .iter()
            .find(|c| c.0 == name)
            .ok_or_else(|| Error::Other(format!("no canary {name}")))?;
        let mut tensors = std::collections::BTreeMap::new();
        let mut offset = 0;
        for (n, t) in global.iter() {
            let count = t.elem_count();
            let mut values = vec![0f32; count];
            if (offset..offset + count).contains(&coordinate) {
                values[coordinate - offset] = sign * dp.clip_norm as f32;
            }
            offset += count;
            tensors.insert(
                n.to_string(),
                candle_core::Tensor::from_vec(values, t.shape(), t.device())
                    .and_then(|x| x.to_dtype(t.dtype()))
                    .map_err(fedflow_common::Error::from)?,
            );
        }
        let dirac = ParamSet::from_tensors(tensors)?;
        Ok(fedflow_common::privacy::dpfedavg::privatize(
            &dirac,
            dp.clip_norm,
            dp.noise_std,
            &mut self.rng,
        )?)
    }
}

/// All values of `params`, in its (name) order, as one f32 vector.
pub(crate) fn flatten(params: &ParamSet) -> Result<Vec<f32>> {
    let mut flat = Vec::with_capacity(params.num_elements());
    for (_, t) in params.iter() {
        flat.extend(
            t.flatten_all()
                .and_then(|x| x.to_dtype(candle_core::DType::F32))
                .and_then(|x| x.to_vec1::<f32>())
                .map_err(fedflow_common::Error::from)?,
        );
    }
    Ok(flat)
}

/// Runs `run_cfg` to its end and scores the final global model on `held_out`; the point's
/// target, z and server settings are the configuration's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn one_run(
    cfg: &SiteCurveConfig,
    run_cfg: &RunConfig,
    dir: &Path,
    sites: &[(String, Arc<SiteTrainer>)],
    vocab: &Vocab,
    held_out: &SiteDataset,
    mut canaries: Option<&mut SiteCanaries>,
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
        let canary_sites: Vec<String> = canaries.as_deref().map_or(Vec::new(), |c| c.present());
        for name in &canary_sites {
            engine.site_seen(name, now)?;
        }
        let mut tickets = Vec::new();
        for (i, (name, _)) in sites.iter().enumerate() {
            if let Some(t) = engine.poll_task(name, now)? {
                tickets.push((i, t));
            }
        }
        let mut canary_tickets = Vec::new();
        for (i, name) in canary_sites.iter().enumerate() {
            if let Some(t) = engine.poll_task(name, now)? {
                canary_tickets.push((i, t));
            }
        }
        if engine.phase() == Phase::Finished {
            break;
        }
        let (global, global_sha) = engine.global();
        let before = match canaries.as_deref() {
            Some(c) => Some((c.values(global)?, global.clone())),
            None => None,
        };
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
                compression: run_cfg.compression(),
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
                    let examples = o.metrics.train_examples as u64;
                    // What the site sent: the compressed update when the run compresses.
                    let delta = if run_cfg.compression().is_lossy() {
                        ParamSet::from_safetensors_bytes(&o.delta_bytes)?
                    } else {
                        o.delta
                    };
                    let r = engine.submit(
                        submission(
                            name,
                            t,
                            &global_sha,
                            delta,
                            o.delta_sha256,
                            examples,
                            o.unclipped,
                        ),
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
        if let Some(c) = canaries.as_deref_mut() {
            for (i, t) in &canary_tickets {
                let name = &canary_sites[*i];
                let dp = t.site_dp.ok_or_else(|| {
                    Error::Other("a canary site needs a site-level DP task".into())
                })?;
                let base = &before.as_ref().expect("taken with the canaries").1;
                let update = c.update(name, base, &dp)?;
                let delta_sha256 =
                    fedflow_common::hash::sha256_hex(&update.delta.to_safetensors_bytes()?);
                let r = engine.submit(
                    submission(
                        name,
                        t,
                        &global_sha,
                        update.delta,
                        delta_sha256,
                        1,
                        update.unclipped,
                    ),
                    now,
                )?;
                if let Err(rej) = r {
                    return Err(Error::Other(format!("canary {name} rejected: {rej}")));
                }
            }
        }
        if engine.committed_round() < round {
            return Err(Error::Other(format!(
                "round {round} did not commit (phase {:?})",
                engine.phase()
            )));
        }
        if let (Some(c), Some(before)) = (canaries.as_deref_mut(), before) {
            let clip = engine
                .store()
                .site_dp_rounds(&run_cfg.run.name)?
                .last()
                .map(|r| r.clip_norm)
                .ok_or_else(|| Error::Other("a canary run without a ledger".into()))?;
            c.score_round(&before.0, engine.global().0, clip)?;
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
        // What the ledger states: the smaller of its RDP and PLD figures.
        epsilon_spent: ledger
            .last()
            .map(|r| r.epsilon_pld.map_or(r.epsilon, |p| p.min(r.epsilon))),
        rounds,
        mean_contributions: contributions as f64 / rounds.max(1) as f64,
        final_clip: ledger.last().map(|r| r.clip_norm),
        scores: Scores::from(&score(engine.global().0, run_cfg, held_out)?),
        seconds,
    })
}
