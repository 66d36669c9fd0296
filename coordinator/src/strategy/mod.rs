//! Strategies: which sites train in a round, what each task tells its site, how much each
//! update weighs, how the round's updates are combined and released, and how the released
//! delta becomes the next global model.
//!
//! The split follows Flower's strategy API (`configure_train` / `aggregate_train`), adapted
//! to streaming aggregation: the round engine owns the round loop and a [`RoundAccumulator`]
//! that folds deltas in as they arrive, weighted by [`Strategy::update_weight`]; the
//! strategy only decides. So memory stays one model's worth whatever the number of sites
//! (for the mean), and a strategy never sees more than one update at a time.
//!
//! Differential privacy is a wrapper, as in Flower's `DifferentialPrivacy*` strategies:
//! [`DpFedAvg`] (site-level DP-FedAvg) wraps any inner strategy and overrides sampling, the
//! tasks' clip and noise, unit weights, the norm-bounded accumulator, the release policy
//! (every closed round released, whatever the number of contributions) and the ledger
//! rows; the engine calls the same hooks whatever the strategy. [`build`] assembles a run's
//! strategy from its configuration.
//!
//! - `fedavg.rs`: FedAvg and FedAvgM.
//! - `site_dp.rs`: the DP-FedAvg wrapper.
//! - `accumulator.rs`: the round's accumulator (the mean, or a robust rule's kept updates).

use std::path::Path;

use fedflow_common::fedavg::NormBound;
use fedflow_common::params::{ParamSet, ParamSpec};
use fedflow_common::privacy::dpfedavg::SiteDpTask;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;

use crate::config::{AggregationSection, RunConfig, SamplingConfig, StrategyKind};
use crate::store::{SiteDpRound, SiteDpUpload};
use crate::{Error, Result};

mod accumulator;
mod fedavg;
mod site_dp;

pub use accumulator::RoundAccumulator;
pub(crate) use accumulator::reset_aggregation_dir;
pub use fedavg::{FedAvg, FedAvgM};
pub use site_dp::DpFedAvg;

/// What a site reported with its update, as the strategy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateReport {
    /// Training examples the site used.
    pub train_examples: u64,
    /// The weight the site claims (its example count in plain FedAvg).
    pub claimed_weight: f64,
}

/// An update the coordinator received, whatever becomes of it (for ledgers that count what
/// the coordinator saw, not only what it used).
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The round the update says it is for.
    pub round: u64,
    /// The sending site.
    pub site_id: &'a str,
    /// The task it answers.
    pub task_id: &'a str,
    /// SHA-256 of the delta's bytes.
    pub delta_sha256: &'a str,
}

/// What the engine knows of a round when it closes, beyond its accumulator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundTally {
    /// Sites selected.
    pub selected: u64,
    /// Accepted updates whose sites reported an unclipped delta (site-level DP's bit).
    pub unclipped: u64,
}

/// A closed round's released mean delta, with the ledger row to commit with it.
#[derive(Debug)]
pub struct Release {
    /// The delta [`Strategy::aggregate_train`] turns into the next model.
    pub mean: ParamSet,
    /// The largest L2 norm `mean` may have (see [`RoundAccumulator::aggregate_bound`]); the
    /// engine refuses to commit a round whose release exceeds it. `None` where noise makes
    /// the norm unbounded (site-level DP).
    pub bound: Option<f64>,
    /// The site-level privacy ledger's row of the round, under site-level DP.
    pub ledger: Option<SiteDpRound>,
}

/// A federated-learning strategy: the decisions of a run's rounds. Every hook but
/// [`Strategy::name`], [`Strategy::sampling`] and [`Strategy::aggregate_train`] has the
/// behaviour of plain FedAvg as its default; wrappers such as [`DpFedAvg`] override them.
pub trait Strategy: Send + std::fmt::Debug {
    /// A short name for logs and the database.
    fn name(&self) -> &'static str;

    /// How many sites a round samples.
    fn sampling(&self) -> &SamplingConfig;

    /// Why `round` must not start (the run then ends with that reason), if so. By default
    /// every round may start.
    fn refuse_round(&self, _round: u64) -> Result<Option<String>> {
        Ok(None)
    }

    /// Chooses which of the `available` sites train in `round` (deterministic given `rng`).
    /// Errs when too few sites are available to start the round. By default a uniform
    /// sample of [`SamplingConfig::target`] sites.
    fn configure_train(
        &mut self,
        _round: u64,
        available: &[String],
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<String>> {
        select(self.sampling(), available, rng)
    }

    /// The clip and noise every training task of the next round tells its site, if any.
    fn task_privacy(&self) -> Result<Option<SiteDpTask>> {
        Ok(None)
    }

    /// The accumulator of a new round. By default the one `[aggregation]` asks for, spilling
    /// to `dir` for a robust rule, every update's norm within `bound` (the run's
    /// `aggregation.max_update_norm`, clipping or refusing as it says).
    fn accumulator(
        &self,
        spec: &ParamSpec,
        aggregation: &AggregationSection,
        dir: &Path,
        bound: NormBound,
    ) -> Result<RoundAccumulator> {
        RoundAccumulator::new(spec, aggregation, dir, bound)
    }

    /// The ledger row to record for an update the coordinator received, before anything
    /// else is decided about it, if the strategy keeps one.
    fn received(&self, _update: Received<'_>) -> Result<Option<SiteDpUpload>> {
        Ok(None)
    }

    /// The weight of one update in the round's weighted mean of deltas (the engine caps it
    /// at `aggregation.max_examples`). By default its training example count (FedAvg's
    /// weighting).
    fn update_weight(&self, report: &UpdateReport) -> Result<f64> {
        examples_weight(report)
    }

    /// How many accepted updates a round needs to be released, given the configured
    /// `rounds.min_completed`. By default that number.
    fn quorum(&self, min_completed: usize) -> usize {
        min_completed
    }

    /// The closed round's release: by default the accumulator's (weighted) result, checked
    /// against the bound its updates' bound implies, and no ledger row.
    fn release(
        &mut self,
        _round: u64,
        acc: RoundAccumulator,
        _tally: RoundTally,
    ) -> Result<Release> {
        Ok(Release {
            bound: acc.aggregate_bound(),
            mean: acc.finish()?,
            ledger: None,
        })
    }

    /// Turns the round's released mean delta into the next global model.
    fn aggregate_train(
        &mut self,
        round: u64,
        global: &ParamSet,
        mean_delta: &ParamSet,
    ) -> Result<ParamSet>;

    /// The round released by [`Strategy::release`] was committed, with its ledger row.
    fn committed(&mut self, _ledger: Option<&SiteDpRound>) -> Result<()> {
        Ok(())
    }

    /// The site-level ε spent so far at the run's target δ, under site-level DP.
    fn privacy_spent(&self) -> Result<Option<f64>> {
        Ok(None)
    }

    /// Replaces the strategy's privacy randomness (site sampling, noise), normally drawn
    /// from the operating system, by a seeded stream: for statistical tests and simulations
    /// only, and recorded in the ledger as such.
    fn seed_privacy_randomness(&mut self, _seed: u64) {}

    /// Server-side state to checkpoint with the global model (e.g. momentum), if any.
    fn state(&self) -> Option<&ParamSet> {
        None
    }

    /// Restores state saved by [`Strategy::state`] after a restart.
    fn restore_state(&mut self, _state: Option<ParamSet>) {}
}

/// The strategy of the run `cfg` describes: `run.strategy`, wrapped in [`DpFedAvg`] when the
/// run has `[site_dp]`, whose accountant is rebuilt from `ledger` (the run's committed
/// rounds, empty for a new run).
pub fn build(cfg: &RunConfig, ledger: &[SiteDpRound]) -> Result<Box<dyn Strategy>> {
    let inner: Box<dyn Strategy> = match cfg.run.strategy {
        StrategyKind::Fedavg => Box::new(FedAvg::new(cfg.sampling.clone())),
        StrategyKind::Fedavgm => Box::new(FedAvgM::new(
            cfg.sampling.clone(),
            cfg.run.server_learning_rate() as f32,
            cfg.run.server_momentum() as f32,
        )?),
    };
    Ok(match &cfg.site_dp {
        Some(section) => {
            tracing::info!(run = %cfg.run.name, "site-level DP: uniform weights, fixed denominator; rounds.min_completed does not apply");
            Box::new(DpFedAvg::new(inner, section.clone(), ledger)?)
        }
        None => inner,
    })
}

fn select(
    sampling: &SamplingConfig,
    available: &[String],
    rng: &mut ChaCha8Rng,
) -> Result<Vec<String>> {
    if available.len() < sampling.min_available {
        return Err(Error::Strategy(format!(
            "{} site(s) available, the round needs at least {} (sampling.min_available)",
            available.len(),
            sampling.min_available
        )));
    }
    Ok(sample_sorted(
        available,
        sampling.target(available.len()),
        rng,
    ))
}

/// A uniform sample of `k` of `available` (all of them if fewer), sorted. The sites are
/// sorted before drawing, so the choice depends only on the set of sites and the random
/// stream, not on the order in which sites happened to connect.
pub fn sample_sorted<R: rand::Rng + ?Sized>(
    available: &[String],
    k: usize,
    rng: &mut R,
) -> Vec<String> {
    let mut sorted: Vec<&String> = available.iter().collect();
    sorted.sort();
    let mut chosen: Vec<String> = sorted
        .choose_multiple(rng, k)
        .map(|s| (*s).clone())
        .collect();
    chosen.sort();
    chosen
}

fn examples_weight(report: &UpdateReport) -> Result<f64> {
    if report.train_examples == 0 {
        return Err(Error::Strategy(
            "an update trained on 0 examples has no weight".into(),
        ));
    }
    Ok(report.train_examples as f64)
}
