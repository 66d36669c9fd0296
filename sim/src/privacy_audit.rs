//! Empirical privacy audits with one training run (Steinke, Nasr, Jagielski 2023): an
//! empirical lower bound on ε next to the accountant's ε, for a configuration.
//!
//! - Record level: DP-SGD at one simulated site of the demo's federation (its training
//!   sessions, the privacy curve's model and DP-SGD settings) with `m` Dirac gradient
//!   canaries, each included with probability 1/2, through the real DP-SGD path
//!   ([`fedflow_common::train::audit`]), for every round of the run; the auditor sees every
//!   released noisy gradient sum.
//! - Site level: the many-site simulation of the site-level curve ([`crate::site_curve`])
//!   with `m` canary sites, each included with probability 1/2, through the real round
//!   engine (Poisson site sampling, clipping, noise, adaptive clipping, ledger); the auditor
//!   sees every committed global model.
//!
//! The estimator ([`fedflow_common::privacy::audit`]) turns the scores into a lower bound at
//! a stated confidence. It is a test, not a guarantee: the accountant's ε is the guarantee,
//! and a lower bound above it would show a bug.

pub use fedflow_common::privacy::audit::{FILE, Level};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use fedflow_client::site::SiteTrainer;
use fedflow_common::data::SiteDataset;
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::privacy::SampledGaussian;
use fedflow_common::privacy::audit::{AuditPoint, EmpiricalAudit, SCHEMA, audit, default_grid};
use fedflow_common::privacy::planner::{Accounting, epsilon_by, noise_for_epsilon_by};
use fedflow_common::train::audit::{draw_canaries, train_dp_with_canaries};
use fedflow_common::train::{DpSgdConfig, PrivacyUnit, privacy_units};
use fedflow_coordinator::config::RunConfig;
use rand::seq::index;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::demo::generate_sites;
use crate::site_curve::{SiteCanaries, SiteCurveConfig, base_config, one_run, site_dp};
use crate::{Error, Result};

/// What the audit runs, common to both levels.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Output folder.
    pub out: PathBuf,
    /// Canaries m.
    pub canaries: usize,
    /// Confidence of the lower bound.
    pub confidence: f64,
    /// δ of the accountant's ε and of the tested hypothesis.
    pub delta: f64,
    /// Target ε of each audited run; `None`: no noise at all (the control).
    pub targets: Vec<Option<f64>>,
    /// Seed of the data, the canaries and the noise (a simulation; a real site's noise comes
    /// from the operating system).
    pub seed: u64,
    /// Partner sites of the generated data.
    pub sites: usize,
    /// Sessions over all sites.
    pub sessions: usize,
    /// Poisson sampling rate: of records (record level) or of sites (site level).
    pub sampling_rate: f64,
    /// The run configuration (TOML; `model.vocab` is replaced).
    pub run_config: String,
    /// Rounds (instead of the configuration's).
    pub rounds: Option<u64>,
    /// Clip C (the initial one at site level).
    pub clip_norm: f64,
    /// Record level: the DP-SGD learning rate.
    pub learning_rate: f64,
    /// Site level: sites training at the same time.
    pub threads: usize,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// ε of `rounds` rounds of `event` at `delta` by both accountants: (min, PLD, RDP).
fn accounted(event: SampledGaussian, rounds: u64, delta: f64) -> Result<[Option<f64>; 3]> {
    if event.z == 0.0 {
        return Ok([None, None, None]);
    }
    let pld = epsilon_by(Accounting::Pld, &[event], rounds, delta)?;
    let rdp = epsilon_by(Accounting::Rdp, &[event], rounds, delta)?;
    Ok([finite(pld.min(rdp)), finite(pld), finite(rdp)])
}

/// Runs the audit at `level` for every target and writes [`FILE`] into `cfg.out`.
pub fn run(level: Level, cfg: &AuditConfig, say: &mut dyn FnMut(&str)) -> Result<EmpiricalAudit> {
    std::fs::create_dir_all(&cfg.out)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", cfg.out.display())))?;
    let (_, vocab_path, vocab, sites) = generate_sites(
        &cfg.out,
        cfg.sites,
        cfg.sessions,
        cfg.seed,
        crate::demo::DemoConfig::default().val_fraction,
        say,
    )?;
    let mut run_cfg = RunConfig::with_vocab(&cfg.run_config, &vocab_path)?;
    if let Some(r) = cfg.rounds {
        run_cfg.run.rounds = r;
    }
    let mut points = Vec::new();
    for (k, &target) in cfg.targets.iter().enumerate() {
        let seed = cfg.seed.wrapping_add(1000 * k as u64);
        let p = match level {
            Level::Record => record(cfg, &run_cfg, &sites[0].dataset, target, seed)?,
            Level::Site => site(
                cfg,
                &vocab_path,
                &vocab,
                &sites,
                &run_cfg,
                target,
                seed,
                say,
            )?,
        };
        say(&format!(
            "{level:?} level, target {}: z {:.4}, accountant epsilon {}, empirical lower bound \
             {:.3} ({} of {} guesses right, {} canaries); {:.0} s",
            target.map_or("none".into(), |e| e.to_string()),
            p.noise_multiplier,
            p.epsilon.map_or("inf".into(), |e| format!("{e:.3}")),
            p.audit.epsilon_lower_bound,
            p.audit.best.correct,
            p.audit.best.guesses,
            p.audit.canaries,
            p.seconds
        ));
        points.push(p);
    }
    let report = EmpiricalAudit {
        schema: SCHEMA.into(),
        generated_at: fedflow_common::clock::rfc3339(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        ),
        run_config: run_cfg.to_toml_string()?,
        points,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Other(e.to_string()))?;
    fedflow_common::fsio::write_atomic(&cfg.out.join(FILE), json.as_bytes())?;
    Ok(report)
}

/// Record level: `rounds` rounds of DP-SGD at one site with canaries.
fn record(
    cfg: &AuditConfig,
    run_cfg: &RunConfig,
    data: &SiteDataset,
    target: Option<f64>,
    seed: u64,
) -> Result<AuditPoint> {
    let started = Instant::now();
    let rounds = run_cfg.run.rounds;
    let epochs = run_cfg.train.epochs as u64;
    let steps =
        fedflow_common::privacy::planner::dpsgd_round_at_rate(1, cfg.sampling_rate, epochs, 0.0)?
            .steps;
    let z = match target {
        Some(eps) => noise_for_epsilon_by(
            Accounting::Pld,
            cfg.sampling_rate,
            steps,
            rounds,
            cfg.delta,
            eps,
        )?,
        None => 0.0,
    };
    let dp = DpSgdConfig {
        clip_norm: cfg.clip_norm,
        noise_multiplier: z,
        expected_batch_size: 0,
        sampling_rate: Some(cfg.sampling_rate),
        unit: PrivacyUnit::Session,
        ..DpSgdConfig::default()
    };
    let model = AttentionFlowModel::new(&run_cfg.model_config()?, &Device::Cpu, run_cfg.run.seed)?;
    let units = privacy_units(&data.train_users, &dp);
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let canaries = draw_canaries(&model, cfg.canaries, &mut rng)?;
    let included: Vec<bool> = (0..cfg.canaries).map(|_| rng.random()).collect();
    let mut scores = vec![0f64; cfg.canaries];
    for round in 1..=rounds {
        let mut train = run_cfg.local_train_config(round, "audit");
        train.learning_rate = cfg.learning_rate;
        let run = train_dp_with_canaries(
            &model,
            &data.train,
            &units,
            &train,
            &dp,
            &canaries,
            &included,
            &mut rng,
        )?;
        for (s, r) in scores.iter_mut().zip(&run.scores) {
            *s += r;
        }
    }
    let event = SampledGaussian {
        q: cfg.sampling_rate,
        z,
        steps,
    };
    finish(
        cfg,
        Level::Record,
        target,
        event,
        rounds,
        &scores,
        &included,
        started,
    )
}

/// Site level: the site curve's federation with canary sites.
#[allow(clippy::too_many_arguments)]
fn site(
    cfg: &AuditConfig,
    vocab_path: &Path,
    vocab: &fedflow_common::data::Vocab,
    sites: &[crate::SimSite],
    run_cfg: &RunConfig,
    target: Option<f64>,
    seed: u64,
    say: &mut dyn FnMut(&str),
) -> Result<AuditPoint> {
    let started = Instant::now();
    let curve = SiteCurveConfig {
        out: cfg.out.clone(),
        sites: cfg.sites,
        sessions: cfg.sessions,
        seed: cfg.seed,
        val_fraction: crate::demo::DemoConfig::default().val_fraction,
        epsilons: Vec::new(),
        delta: cfg.delta,
        sampling_rate: cfg.sampling_rate,
        clip_norm: cfg.clip_norm,
        momenta: vec![0.0],
        server_learning_rate: 1.0,
        run_config: run_cfg.to_toml_string()?,
        threads: cfg.threads,
    };
    let mut config = base_config(&curve, vocab_path)?;
    config.run.rounds = run_cfg.run.rounds;
    // A fixed denominator that does not depend on which canaries were drawn in.
    let expected = cfg.sampling_rate * (cfg.sites as f64 + cfg.canaries as f64 / 2.0);
    let Some(target) = target else {
        return Err(Error::Other(
            "a site-level audit needs a target epsilon (the no-noise control is record level)"
                .into(),
        ));
    };
    let dp = site_dp(&curve, config.run.rounds, expected, target)?;
    let event = dp.round_event(&config.sampling);
    config.site_dp = Some(dp);
    config.validate().map_err(Error::Other)?;
    let trainers: Vec<(String, Arc<SiteTrainer>)> = sites
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                Arc::new(SiteTrainer::new(s.dataset.clone(), vocab, Device::Cpu)),
            )
        })
        .collect();
    let held_out = SiteDataset::pool(sites.iter().map(|s| &s.dataset));
    let params = crate::initial_model(&config)?.num_elements();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let coordinates = index::sample(&mut rng, params, cfg.canaries).into_vec();
    let mut canaries = SiteCanaries {
        canaries: coordinates
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
                (format!("canary-{i:05}"), c, sign, rng.random::<bool>())
            })
            .collect(),
        scores: vec![0.0; cfg.canaries],
        rng: ChaCha20Rng::seed_from_u64(seed ^ 0x5eed),
    };
    let name = format!("site-audit-eps-{target}");
    let point = one_run(
        &curve,
        &config,
        &cfg.out.join(name),
        &trainers,
        vocab,
        &held_out,
        Some(&mut canaries),
        say,
    )?;
    let included: Vec<bool> = canaries.canaries.iter().map(|c| c.3).collect();
    finish(
        cfg,
        Level::Site,
        Some(target),
        event,
        point.rounds,
        &canaries.scores,
        &included,
        started,
    )
}

/// The audit of one run's canary `scores` and what the accountants say of `rounds` rounds of
/// `event` (the round's noisy releases), as one [`AuditPoint`].
#[allow(clippy::too_many_arguments)]
fn finish(
    cfg: &AuditConfig,
    level: Level,
    target: Option<f64>,
    event: SampledGaussian,
    rounds: u64,
    scores: &[f64],
    included: &[bool],
    started: Instant,
) -> Result<AuditPoint> {
    let outcome = audit(
        scores,
        included,
        cfg.delta,
        cfg.confidence,
        &default_grid(cfg.canaries),
    )?;
    let [epsilon, epsilon_pld, epsilon_rdp] = accounted(event, rounds, cfg.delta)?;
    Ok(AuditPoint {
        level,
        target_epsilon: target,
        noise_multiplier: event.z,
        sampling_rate: cfg.sampling_rate,
        steps_per_round: event.steps,
        rounds,
        delta: cfg.delta,
        epsilon,
        epsilon_pld,
        epsilon_rdp,
        audit: outcome,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(out: &Path, targets: Vec<Option<f64>>) -> AuditConfig {
        AuditConfig {
            out: out.to_path_buf(),
            canaries: 200,
            confidence: 0.95,
            delta: 1e-4,
            targets,
            seed: 7,
            sites: 20,
            sessions: 2_000,
            sampling_rate: 0.2,
            run_config: include_str!("../examples/site_curve.toml").to_string(),
            rounds: Some(6),
            clip_norm: 0.5,
            learning_rate: 0.05,
            threads: 2,
        }
    }

    #[test]
    fn canary_sites_go_through_the_round_engine_and_the_bound_stays_below_the_accountant() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small(dir.path(), vec![Some(4.0)]);
        let report = run(Level::Site, &cfg, &mut |_| {}).unwrap();
        let p = &report.points[0];
        assert_eq!((p.level, p.rounds, p.audit.canaries), (Level::Site, 6, 200));
        let stated = p.epsilon.unwrap();
        assert!((stated - 4.0).abs() < 0.05, "{stated}");
        assert!(p.audit.epsilon_lower_bound <= stated, "{p:?}");
        // Exactly the included canaries took part: the coordinator knows them, and no other.
        let store =
            fedflow_coordinator::store::Store::open_read_only(dir.path().join("site-audit-eps-4"))
                .unwrap();
        let canaries: Vec<String> = store
            .sites()
            .unwrap()
            .into_iter()
            .map(|s| s.site_id)
            .filter(|s| s.starts_with("canary-"))
            .collect();
        assert_eq!(canaries.len() as u64, p.audit.included);
        // The file reads back as written.
        let back = EmpiricalAudit::load(&dir.path().join(FILE)).unwrap();
        assert_eq!(back.points.len(), 1);
        assert_eq!(back.points[0].audit.best, p.audit.best);
        assert!(
            (back.points[0].audit.epsilon_lower_bound - p.audit.epsilon_lower_bound).abs() < 1e-12
        );
    }

    #[test]
    fn a_site_level_audit_without_noise_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(Level::Site, &small(dir.path(), vec![None]), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("needs a target epsilon"), "{err}");
    }
}
