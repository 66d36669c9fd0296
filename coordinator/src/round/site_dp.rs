//! Site-level DP-FedAvg in the round engine: Poisson site sampling, the clip and noise each
//! task dictates, the norm bound every update is checked against, the noisy release with
//! the fixed denominator, adaptive clipping's update, the budget check before a round, and
//! the ledger record committed with the round.
//!
//! Randomness that protects anyone here (which sites are sampled, the coordinator's noise,
//! the noise on the bit count) comes from a ChaCha20 CSPRNG seeded from the operating system,
//! never from the run's seed: an observer who knows the configuration must not be able to
//! predict it.

use fedflow_common::fedavg::FedAvgAccumulator;
use fedflow_common::params::{ParamSet, ParamSpec};
use fedflow_common::privacy::SampledGaussian;
use fedflow_common::privacy::dpfedavg::{SiteDp, SiteDpTask};
use fedflow_common::privacy::{RdpAccountant, add_gaussian};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::Result;
use crate::config::SiteDpSection;
use crate::store::{SiteDpRound, Store};

/// The engine's site-level DP state, rebuilt from the ledger on open.
#[derive(Debug)]
pub(super) struct SiteDpState {
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
    rng: ChaCha20Rng,
}

impl SiteDpState {
    /// Rebuilds the state of `run_id` from its ledger.
    pub(super) fn open(
        section: SiteDpSection,
        sampling: &crate::strategy::SamplingConfig,
        store: &Store,
        run_id: &str,
    ) -> Result<Self> {
        let mech = section.site_dp();
        let event = section.round_event(sampling);
        let sampling = section.sampling(sampling).name();
        let mut accountant = RdpAccountant::default();
        let mut clip = section.clip_norm;
        for row in store.site_dp_rounds(run_id)? {
            accountant.compose(&SampledGaussian {
                q: row.sampling_rate,
                z: row.noise_multiplier,
                steps: 1,
            })?;
            clip = row.next_clip_norm;
        }
        Ok(SiteDpState {
            section,
            mech,
            event,
            sampling,
            clip,
            accountant,
            rng: ChaCha20Rng::from_os_rng(),
        })
    }

    /// Replaces the CSPRNG by a seeded one (statistical tests only).
    pub(super) fn seed_noise(&mut self, seed: u64) {
        self.rng = ChaCha20Rng::seed_from_u64(seed);
    }

    /// Why `round` must not start (its release would pass the target), if so.
    pub(super) fn over_budget(&self, round: u64) -> Result<Option<String>> {
        let s = &self.section;
        let mut next = self.accountant.clone();
        next.compose(&self.event)?;
        let (eps, _) = next.epsilon(s.target_delta)?;
        Ok((eps > s.target_epsilon).then(|| {
            let (spent, _) = self
                .accountant
                .epsilon(s.target_delta)
                .unwrap_or((f64::NAN, 0.0));
            format!(
                "site-level privacy budget: round {round} would take epsilon to {eps:.4} at \
                 delta {:e}, above the target {} (spent: {spent:.4} over {} round(s))",
                s.target_delta,
                s.target_epsilon,
                round - 1
            )
        }))
    }

    /// The round's sites, drawn from the CSPRNG (never from the run's seed: the accounting
    /// assumes a sample the sites cannot predict): with Poisson sampling each of `available`
    /// independently with probability q; otherwise `sampling.target` of them uniformly at
    /// random (all of them when the target is everyone). Sorted first, so only the set
    /// matters.
    pub(super) fn sample(
        &mut self,
        available: &[String],
        sampling: &crate::strategy::SamplingConfig,
    ) -> Vec<String> {
        match self.section.sampling_rate {
            Some(q) => {
                let mut sorted: Vec<&String> = available.iter().collect();
                sorted.sort();
                sorted
                    .into_iter()
                    .filter(|_| self.rng.random::<f64>() < q)
                    .cloned()
                    .collect()
            }
            None => crate::strategy::sample_sorted(
                available,
                sampling.target(available.len()),
                &mut self.rng,
            ),
        }
    }

    /// What every task of the next round tells its site.
    pub(super) fn task(&self) -> Result<SiteDpTask> {
        Ok(SiteDpTask {
            mode: self.mech.mode,
            clip_norm: self.clip,
            noise_std: self.mech.site_noise_std(self.clip)?,
        })
    }

    /// The round's accumulator, refusing updates above the norm bound.
    pub(super) fn accumulator(&self, spec: &ParamSpec) -> Result<FedAvgAccumulator> {
        let dim = spec.iter().map(|(_, t)| t.elem_count()).sum();
        Ok(FedAvgAccumulator::new(spec)?.with_norm_bound(self.mech.norm_bound(self.clip, dim)?))
    }

    /// The round's release: the noisy mean (sum plus the coordinator's top-up, over the fixed
    /// denominator) and the ledger record, which the caller commits with the model.
    /// `unclipped` is the number of contributions whose sites reported an unclipped delta
    /// (central mode).
    pub(super) fn release(
        &mut self,
        round: u64,
        acc: FedAvgAccumulator,
        selected: u64,
        unclipped: u64,
    ) -> Result<(ParamSet, SiteDpRound)> {
        let s = &self.section;
        let k = acc.count() as u64;
        let server_noise_std = self.mech.server_noise_std(self.clip, k)?;
        let mean = acc.finish_dp(s.expected_sites, server_noise_std, &mut self.rng)?;
        let central = self.mech.mode == fedflow_common::privacy::dpfedavg::TrustMode::Central;
        let (noisy_unclipped_fraction, next_clip) = match &s.adaptive_clipping {
            Some(a) => {
                // Andrew et al. 2021, Algorithm 1, with the bits centred as b − ½ so that one
                // site added or removed moves the noisy sum by at most ½ (as TF Privacy's
                // QuantileEstimatorQuery does; Theorem 1's (2σ_b)⁻² assumes it):
                // b̄ = (Σ (b − ½) + N(0, σ_b²)) / expected sites + ½.
                let mut centred = [unclipped as f64 - k as f64 / 2.0];
                add_gaussian(&mut centred, a.bit_noise_std, &mut self.rng);
                let fraction = centred[0] / s.expected_sites + 0.5;
                (Some(fraction), a.next_clip(self.clip, fraction))
            }
            None => (None, self.clip),
        };
        let event = self.event;
        let mut increment = RdpAccountant::default();
        increment.compose(&event)?;
        let mut after = self.accountant.clone();
        after.compose(&event)?;
        let (epsilon, _) = after.epsilon(s.target_delta)?;
        let record = SiteDpRound {
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
            selected,
            contributions: k,
            clipped_fraction: (central && k > 0).then(|| 1.0 - unclipped as f64 / k as f64),
            noisy_unclipped_fraction,
            next_clip_norm: next_clip,
            epsilon,
            target_delta: s.target_delta,
            rdp: increment.rdp().to_vec(),
            recorded_at_ms: 0,
        };
        Ok((mean, record))
    }

    /// The round recorded by [`SiteDpState::release`] was committed.
    pub(super) fn committed(&mut self, record: &SiteDpRound) -> Result<()> {
        self.accountant.compose(&self.event)?;
        self.clip = record.next_clip_norm;
        Ok(())
    }

    /// The site-level ε spent so far at the target δ.
    pub(super) fn spent(&self) -> Result<f64> {
        Ok(self.accountant.epsilon(self.section.target_delta)?.0)
    }
}

#[cfg(test)]
mod tests;
