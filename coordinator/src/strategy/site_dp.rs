//! Site-level DP-FedAvg as a strategy wrapper (McMahan et al. 2018, "Learning
//! Differentially Private Recurrent Language Models"; Flower's
//! `DifferentialPrivacyServerSideFixedClipping` has the same shape): Poisson or CSPRNG site
//! sampling, the clip and noise each task dictates, unit weights, the norm bound every
//! update is checked against, the noisy release with the fixed denominator (every closed
//! round, whatever the number of contributions), adaptive clipping's update, the budget
//! check before a round, and the ledger rows committed with the round and recorded for
//! every update received. The inner strategy turns the released delta into the next model.
//!
//! Randomness that protects anyone here (which sites are sampled, the coordinator's noise,
//! the noise on the bit count) comes from a ChaCha20 CSPRNG seeded from the operating system,
//! never from the run's seed: an observer who knows the configuration must not be able to
//! predict it. Seeding it (simulations, statistical tests) is recorded in every ledger row.

use std::path::Path;

use fedflow_common::fedavg::{FedAvgAccumulator, NormBound};
use fedflow_common::params::{ParamSet, ParamSpec};
use fedflow_common::privacy::SampledGaussian;
use fedflow_common::privacy::dpfedavg::{SiteDp, SiteDpTask, TrustMode};
use fedflow_common::privacy::pld::PldAccountant;
use fedflow_common::privacy::{RdpAccountant, add_gaussian};
use rand::{Rng, SeedableRng};
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};

use super::{Received, Release, RoundAccumulator, RoundTally, Strategy, UpdateReport};
use crate::config::{AggregationSection, SamplingConfig, SiteDpSection};
use crate::store::{SiteDpRound, SiteDpUpload};
use crate::{Error, Result};

/// Site-level DP-FedAvg around an inner strategy (which keeps only
/// [`Strategy::aggregate_train`] and its state: everything that decides what is released is
/// this wrapper's).
#[derive(Debug)]
pub struct DpFedAvg {
    inner: Box<dyn Strategy>,
    section: SiteDpSection,
    mech: SiteDp,
    /// Every round's event (see `SiteDp::downstream_event`).
    event: SampledGaussian,
    /// `poisson`, `all` or `fixed`.
    sampling: &'static str,
    /// The clip of the next round (moves with adaptive clipping).
    clip: f64,
    /// Every released round composed.
    accountant: RdpAccountant,
    /// Every released round's event, for the PLD accountant (events with the same q and z
    /// are one self-composition).
    released: Vec<SampledGaussian>,
    /// (stated, RDP, PLD) ε at the target δ of the released rounds, and with the next round:
    /// worked out when a round commits, since PLD takes a few tens of milliseconds and the
    /// status views ask often.
    spent: (f64, f64, f64),
    next: (f64, f64, f64),
    rng: ChaCha20Rng,
    /// Whether `rng` was seeded by [`Strategy::seed_privacy_randomness`].
    seeded: bool,
}

impl DpFedAvg {
    /// Wraps `inner` in the mechanism `section` describes, its accountant and clip rebuilt
    /// from `ledger` (the run's committed rounds, in order).
    pub fn new(
        inner: Box<dyn Strategy>,
        section: SiteDpSection,
        ledger: &[SiteDpRound],
    ) -> Result<Self> {
        let sampling_cfg = inner.sampling();
        let mech = section.site_dp();
        let event = section.round_event(sampling_cfg);
        let sampling = section.sampling(sampling_cfg).name();
        let mut accountant = RdpAccountant::default();
        let mut released = Vec::with_capacity(ledger.len());
        let mut clip = section.clip_norm;
        for row in ledger {
            let e = SampledGaussian {
                q: row.sampling_rate,
                z: row.noise_multiplier,
                steps: 1,
            };
            accountant.compose(&e)?;
            released.push(e);
            clip = row.next_clip_norm;
        }
        let mut dp = DpFedAvg {
            inner,
            section,
            mech,
            event,
            sampling,
            clip,
            accountant,
            released,
            spent: (0.0, 0.0, 0.0),
            next: (0.0, 0.0, 0.0),
            rng: ChaCha20Rng::from_os_rng(),
            seeded: false,
        };
        dp.refresh()?;
        Ok(dp)
    }

    /// The run's stated ε at the target δ (the smaller of the RDP and PLD bounds) of every
    /// released round and `next`: (stated, RDP, PLD).
    fn compute_spent(&self, next: Option<SampledGaussian>) -> Result<(f64, f64, f64)> {
        let delta = self.section.target_delta;
        let mut rdp = self.accountant.clone();
        if let Some(e) = &next {
            rdp.compose(e)?;
        }
        let (rdp, _) = rdp.epsilon(delta)?;
        let events = self.released.iter().copied().chain(next);
        let pld = PldAccountant::of(events)?.epsilon(delta);
        Ok((rdp.min(pld), rdp, pld))
    }

    /// Works out [`DpFedAvg::spent`] and [`DpFedAvg::next`] again.
    fn refresh(&mut self) -> Result<()> {
        self.spent = self.compute_spent(None)?;
        self.next = self.compute_spent(Some(self.event))?;
        Ok(())
    }

    fn task(&self) -> Result<SiteDpTask> {
        Ok(SiteDpTask {
            mode: self.mech.mode,
            clip_norm: self.clip,
            noise_std: self.mech.site_noise_std(self.clip)?,
        })
    }
}

impl Strategy for DpFedAvg {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn sampling(&self) -> &SamplingConfig {
        self.inner.sampling()
    }

    /// Refuses the round whose release would take ε (the smaller of the RDP and PLD
    /// bounds) past the target.
    fn refuse_round(&self, round: u64) -> Result<Option<String>> {
        let s = &self.section;
        let (eps, spent) = (self.next.0, self.spent.0);
        Ok((eps > s.target_epsilon).then(|| {
            format!(
                "site-level privacy budget: round {round} would take epsilon to {eps:.4} at \
                 delta {:e}, above the target {} (spent: {spent:.4} over {} round(s))",
                s.target_delta,
                s.target_epsilon,
                round - 1
            )
        }))
    }

    /// The round's sites, drawn from the CSPRNG (never from the run's seed, which `_rng` is
    /// derived from: the accounting assumes a sample the sites cannot predict): with Poisson
    /// sampling each of `available` independently with probability q; otherwise
    /// `sampling.target` of them uniformly at random (all of them when the target is
    /// everyone). Sorted first, so only the set matters.
    fn configure_train(
        &mut self,
        _round: u64,
        available: &[String],
        _rng: &mut ChaCha8Rng,
    ) -> Result<Vec<String>> {
        Ok(match self.section.sampling_rate {
            Some(q) => {
                let mut sorted: Vec<&String> = available.iter().collect();
                sorted.sort();
                sorted
                    .into_iter()
                    .filter(|_| self.rng.random::<f64>() < q)
                    .cloned()
                    .collect()
            }
            None => super::sample_sorted(
                available,
                self.inner.sampling().target(available.len()),
                &mut self.rng,
            ),
        })
    }

    fn task_privacy(&self) -> Result<Option<SiteDpTask>> {
        self.task().map(Some)
    }

    /// The mean, refusing updates above the mechanism's norm bound (the configuration
    /// refuses a robust rule with `[site_dp]`; `aggregation.max_update_norm` gives way to the
    /// clip, which is what the accounting assumes).
    fn accumulator(
        &self,
        spec: &ParamSpec,
        _aggregation: &AggregationSection,
        _dir: &Path,
        _bound: NormBound,
    ) -> Result<RoundAccumulator> {
        let dim = spec.iter().map(|(_, t)| t.elem_count()).sum();
        let bound = NormBound::Refuse(self.mech.norm_bound(self.clip, dim)?);
        Ok(RoundAccumulator::Mean(
            FedAvgAccumulator::new(spec)?.with_norm_bound(bound),
        ))
    }

    /// Whatever becomes of it (late, for a task a restart abandoned, invalid, ...), the
    /// coordinator has seen this update: it counts against the site's guarantee towards the
    /// coordinator.
    fn received(&self, update: Received<'_>) -> Result<Option<SiteDpUpload>> {
        let task = self.task()?;
        Ok(Some(SiteDpUpload {
            round: update.round,
            site_id: update.site_id.to_string(),
            task_id: update.task_id.to_string(),
            delta_sha256: update.delta_sha256.to_string(),
            site_noise_std: task.noise_std,
            clip_norm: task.clip_norm,
        }))
    }

    /// Every update weighs the same, so one site's influence is its clip.
    fn update_weight(&self, _report: &UpdateReport) -> Result<f64> {
        Ok(1.0)
    }

    /// Every round that closes is released: a retry decided by the number of contributions
    /// would reveal it.
    fn quorum(&self, _min_completed: usize) -> usize {
        0
    }

    /// The noisy mean (sum plus the coordinator's top-up, over the fixed denominator) and the
    /// ledger row, which the engine commits with the model.
    fn release(&mut self, round: u64, acc: RoundAccumulator, tally: RoundTally) -> Result<Release> {
        let RoundAccumulator::Mean(acc) = acc else {
            return Err(Error::Strategy(
                "site-level DP needs the mean (the config refuses a robust rule with it)".into(),
            ));
        };
        let s = &self.section;
        let k = acc.count() as u64;
        let server_noise_std = self.mech.server_noise_std(self.clip, k)?;
        let mean = acc.finish_dp(s.expected_sites, server_noise_std, &mut self.rng)?;
        let central = self.mech.mode == TrustMode::Central;
        let (noisy_unclipped_fraction, next_clip) = match &s.adaptive_clipping {
            Some(a) => {
                // Andrew et al. 2021, Algorithm 1, with the bits centred as b − ½ so that one
                // site added or removed moves the noisy sum by at most ½ (as TF Privacy's
                // QuantileEstimatorQuery does; Theorem 1's (2σ_b)⁻² assumes it):
                // b̄ = (Σ (b − ½) + N(0, σ_b²)) / expected sites + ½.
                let mut centred = [tally.unclipped as f64 - k as f64 / 2.0];
                add_gaussian(&mut centred, a.bit_noise_std, &mut self.rng);
                let fraction = centred[0] / s.expected_sites + 0.5;
                (Some(fraction), a.next_clip(self.clip, fraction))
            }
            None => (None, self.clip),
        };
        let event = self.event;
        let mut increment = RdpAccountant::default();
        increment.compose(&event)?;
        let (stated, epsilon, epsilon_pld) = self.next;
        let ledger = SiteDpRound {
            round,
            mode: self.mech.mode.to_string(),
            sampling: self.sampling.into(),
            sampling_rate: event.q,
            noise_multiplier: event.z,
            update_noise_multiplier: self.mech.update_multiplier()?,
            clip_norm: self.clip,
            expected_sites: s.expected_sites,
            site_noise_std: self.mech.site_noise_std(self.clip)?,
            server_noise_std,
            bit_noise_std: s.adaptive_clipping.as_ref().map(|a| a.bit_noise_std),
            selected: tally.selected,
            contributions: k,
            clipped_fraction: (central && k > 0).then(|| 1.0 - tally.unclipped as f64 / k as f64),
            noisy_unclipped_fraction,
            next_clip_norm: next_clip,
            epsilon,
            epsilon_pld: Some(epsilon_pld),
            target_delta: s.target_delta,
            rdp: increment.rdp().to_vec(),
            seeded_randomness: self.seeded,
            recorded_at_ms: 0,
        };
        tracing::info!(
            round,
            "site-level DP: {k} contribution(s), server noise std {server_noise_std:.4e}, \
             epsilon {stated:.4} at delta {:e} (RDP {epsilon:.4}, PLD {epsilon_pld:.4})",
            s.target_delta
        );
        Ok(Release {
            mean,
            bound: None,
            ledger: Some(ledger),
        })
    }

    fn aggregate_train(
        &mut self,
        round: u64,
        global: &ParamSet,
        mean_delta: &ParamSet,
    ) -> Result<ParamSet> {
        self.inner.aggregate_train(round, global, mean_delta)
    }

    /// Composes the committed round into the accountant and moves to its next clip.
    fn committed(&mut self, ledger: Option<&SiteDpRound>) -> Result<()> {
        let Some(row) = ledger else {
            return Err(Error::Strategy(
                "a site-level DP round was committed without its ledger row".into(),
            ));
        };
        self.accountant.compose(&self.event)?;
        self.released.push(self.event);
        self.clip = row.next_clip_norm;
        self.refresh()
    }

    fn privacy_spent(&self) -> Result<Option<f64>> {
        Ok(Some(self.spent.0))
    }

    fn seed_privacy_randomness(&mut self, seed: u64) {
        self.rng = ChaCha20Rng::seed_from_u64(seed);
        self.seeded = true;
    }

    fn state(&self) -> Option<&ParamSet> {
        self.inner.state()
    }

    fn restore_state(&mut self, state: Option<ParamSet>) {
        self.inner.restore_state(state);
    }
}
