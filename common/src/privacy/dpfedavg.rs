//! Site-level DP-FedAvg: what each trust mode adds where, and what it is worth.
//!
//! The mechanism is DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially
//! Private Recurrent Language Models", Algorithm 1 with the fixed-denominator estimator
//! f̃_f): every contributing site clips its delta to L2 norm C; the released average is
//! `(Σ clipped deltas + noise) / expected_sites`, with uniform weights and the *expected*
//! number of sites as denominator, so one site moves the sum by at most C whatever the
//! sample. The noise on the sum is N(0, (z·C)²) per coordinate; who adds it is the trust
//! mode:
//!
//! - [`TrustMode::Central`]: the coordinator adds N(0, (z·C)²) to the sum (that is
//!   N(0, (z·C / expected_sites)²) on the average). Protects against everyone who sees the
//!   models; the coordinator sees every clipped update in the clear.
//! - [`TrustMode::Distributed`]: each site adds N(0, (z·C)² / expected_sites) to its own
//!   update, so that `expected_sites` contributions carry the central noise between them
//!   (the distributed-DP construction of Kairouz, Liu, Steinke 2021, "The Distributed
//!   Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", without
//!   the secure aggregation, which fedflow does not have yet). Against the coordinator each
//!   update carries only its own share: a much weaker guarantee, reported separately.
//! - [`TrustMode::Local`]: each site adds the full N(0, (z·C)²) to its own update: the same
//!   guarantee against the coordinator as against everyone downstream, at k times the noise
//!   in the sum of k updates.
//!
//! **Dropouts and the coordinator's top-up**: with k contributions each carrying σ_s², the
//! coordinator adds N(0, max(0, V − k·σ_s²)), V = (z·C)², so the released sum always carries
//! at least the central noise, whatever the dropouts: in central mode exactly V, in the
//! distributed mode exactly V up to `expected_sites` contributions and k·σ_s² beyond, in the
//! local mode max(V, k·V).
//!
//! **What a round is charged** ([`SiteDp::downstream_event`], always a Gaussian mechanism
//! with sensitivity-normalised multiplier, composed by the RDP accountant):
//!
//! - Central mode, adding or removing one site (hides participation): the noise is N(0, V)
//!   whoever takes part, so with Poisson sampling at rate q the round is exactly the
//!   Poisson-subsampled Gaussian mechanism `SampledGaussian(q, z)` (McMahan et al. 2018;
//!   Mironov, Talwar, Zhang 2019); when every available site is selected, `(1, z)`; with a
//!   fixed-size sample of fewer than all sites, adding a site can displace another, so one
//!   site changes the sum by up to 2C: `(1, z/2)`, no amplification.
//! - Distributed and local modes, replacing one site's data by data whose update is zero
//!   (the zero-out relation of Kairouz et al. 2021, "Practical and Private (Deep) Learning
//!   without Sampling or Shuffling"): the site takes part either way with its own noise
//!   share, so both neighbouring rounds have the same contributions and the same noise, of
//!   variance at least V, and differ by a shift of at most C: `(1, z)`. The add/remove
//!   relation and amplification by subsampling are *not* claimed: a site's own share makes
//!   the noise of the sum depend on whether it takes part, and Gaussians of different
//!   variances are not the mechanism the accountant knows. These modes protect what a site
//!   contributed, not whether it took part.
//!
//! The guarantee downstream in the distributed and local modes relies on the coordinator
//! adding its top-up, as it relies on the coordinator not publishing individual updates
//! until secure aggregation exists.
//!
//! **Adaptive clipping** (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private
//! Learning with Adaptive Clipping", Algorithm 1 and Theorem 1): sites also report whether
//! their delta's norm was at most C (a bit b); the coordinator forms
//! `b̄ = (Σ (b − ½) + N(0, σ_b²)) / expected_sites + ½` (centred, as TF Privacy's
//! `QuantileEstimatorQuery` does) and updates `C ← C · exp(−η_C (b̄ − γ))` towards the target
//! quantile γ. Releasing the noisy bit count and the noisy sum together is a
//! Gaussian mechanism with effective noise multiplier `(z_Δ⁻² + (2σ_b)⁻²)^(−1/2)` (the bit,
//! centred as b − ½, has sensitivity ½); [`AdaptiveClipping::update_noise_multiplier`]
//! chooses z_Δ so that the pair costs exactly the configured z.

use rand::{CryptoRng, Rng};
use serde::{Deserialize, Serialize};

use super::add_gaussian;
use super::rdp::SampledGaussian;
use crate::{Error, Result};

/// Who adds the noise, and so whom the guarantee holds against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustMode {
    /// The coordinator adds all the noise (it is trusted with clipped updates).
    #[default]
    Central,
    /// Each site adds a 1/expected_sites share of the noise.
    Distributed,
    /// Each site adds all of the noise to its own update.
    Local,
}

impl std::fmt::Display for TrustMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrustMode::Central => "central",
            TrustMode::Distributed => "distributed",
            TrustMode::Local => "local",
        })
    }
}

/// Adaptive clipping (Andrew et al. 2021).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClipping {
    /// The quantile γ of update norms the clip tracks, in (0, 1) (the paper's default 0.5).
    pub target_quantile: f64,
    /// Geometric step η_C of the clip update (the paper uses 0.2).
    pub learning_rate: f64,
    /// Noise std σ_b on the count of unclipped updates (the paper: expected_sites / 20).
    pub bit_noise_std: f64,
}

impl AdaptiveClipping {
    /// The noise multiplier z_Δ for the updates such that updates and bits together cost the
    /// effective multiplier `z`: z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, Thm. 1).
    /// Fails when the bit noise alone already costs more than `z` allows.
    pub fn update_noise_multiplier(&self, z: f64) -> Result<f64> {
        let rest = z.powi(-2) - (2.0 * self.bit_noise_std).powi(-2);
        if rest.is_nan() || rest <= 0.0 {
            return Err(Error::Privacy(format!(
                "adaptive clipping: bit noise std {} is too small for noise multiplier {z} \
                 (need 2 * bit_noise_std > z)",
                self.bit_noise_std
            )));
        }
        Ok(rest.powf(-0.5))
    }

    /// The next clip from the current one and the noisy fraction of unclipped updates.
    pub fn next_clip(&self, clip: f64, unclipped_fraction: f64) -> f64 {
        clip * (-self.learning_rate * (unclipped_fraction - self.target_quantile)).exp()
    }
}

/// How a round's sites are chosen, as far as the accountant is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum SiteSampling {
    /// Every available site independently with probability q (Poisson sampling).
    Poisson(f64),
    /// Every available site.
    All,
    /// A fixed-size sample of fewer than all available sites.
    FixedSize,
}

impl SiteSampling {
    /// `poisson`, `all` or `fixed` (the ledger's name).
    pub fn name(&self) -> &'static str {
        match self {
            SiteSampling::Poisson(_) => "poisson",
            SiteSampling::All => "all",
            SiteSampling::FixedSize => "fixed",
        }
    }
}

/// The neighbouring relation a site-level guarantee holds for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Relation {
    /// One site added or removed (its participation is hidden).
    AddRemove,
    /// One site's data replaced by data whose update is zero (its contents are hidden, not
    /// its participation).
    ZeroOut,
}

/// Site-level DP-FedAvg parameters of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteDp {
    /// Who adds the noise.
    pub mode: TrustMode,
    /// L2 bound C on each site's delta (the initial C with adaptive clipping).
    pub clip_norm: f64,
    /// Noise multiplier z of the released average (the effective one, bits included).
    pub noise_multiplier: f64,
    /// The fixed denominator: the expected number of contributing sites per round.
    pub expected_sites: f64,
    /// Adaptive clipping, if on.
    pub adaptive: Option<AdaptiveClipping>,
}

impl SiteDp {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Privacy(format!("site-level DP: {why}")));
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return bad(format!(
                "clip_norm {} must be a positive number",
                self.clip_norm
            ));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return bad(format!(
                "noise_multiplier {} must be >= 0",
                self.noise_multiplier
            ));
        }
        if !(self.expected_sites.is_finite() && self.expected_sites >= 1.0) {
            return bad(format!(
                "expected_sites {} must be >= 1",
                self.expected_sites
            ));
        }
        if let Some(a) = &self.adaptive {
            if self.mode != TrustMode::Central {
                return bad(format!(
                    "adaptive clipping needs the coordinator to see each site's clipped bit, \
                     which {} mode must not reveal; use it with mode = central",
                    self.mode
                ));
            }
            if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) {
                return bad(format!(
                    "target_quantile {} must be in (0, 1)",
                    a.target_quantile
                ));
            }
            if !(a.learning_rate.is_finite() && a.learning_rate > 0.0) {
                return bad(format!(
                    "clip learning rate {} must be > 0",
                    a.learning_rate
                ));
            }
            if self.noise_multiplier > 0.0 {
                a.update_noise_multiplier(self.noise_multiplier)?;
            }
        }
        Ok(())
    }

    /// The multiplier the updates' noise is calibrated with (z, or z_Δ with adaptive
    /// clipping).
    pub fn update_multiplier(&self) -> Result<f64> {
        match &self.adaptive {
            Some(a) if self.noise_multiplier > 0.0 => {
                a.update_noise_multiplier(self.noise_multiplier)
            }
            _ => Ok(self.noise_multiplier),
        }
    }

    /// Noise std each site adds to every coordinate of its clipped delta, for clip `clip`.
    pub fn site_noise_std(&self, clip: f64) -> Result<f64> {
        let s = self.update_multiplier()? * clip;
        Ok(match self.mode {
            TrustMode::Central => 0.0,
            TrustMode::Distributed => s / self.expected_sites.sqrt(),
            TrustMode::Local => s,
        })
    }

    /// Noise std the coordinator adds to every coordinate of the *sum* of `contributors`
    /// updates clipped to `clip`: the top-up that brings the sum's noise to at least the
    /// central N(0, (z_Δ·C)²) (see the module docs). All of it in central mode; in the
    /// distributed and local modes only what dropouts (or fewer sampled sites than expected)
    /// left missing.
    pub fn server_noise_std(&self, clip: f64, contributors: u64) -> Result<f64> {
        let central = (self.update_multiplier()? * clip).powi(2);
        let shares = contributors as f64 * self.site_noise_std(clip)?.powi(2);
        Ok((central - shares).max(0.0).sqrt())
    }

    /// The neighbouring relation of the guarantee downstream (see the module docs).
    pub fn relation(&self) -> Relation {
        match self.mode {
            TrustMode::Central => Relation::AddRemove,
            TrustMode::Distributed | TrustMode::Local => Relation::ZeroOut,
        }
    }

    /// The round's privacy event against everyone who sees the released model, under
    /// [`SiteDp::relation`], for the round's site sampling (see the module docs). The same
    /// for any number of contributions, thanks to the coordinator's top-up; the configured
    /// z is the effective one (adaptive clipping's bit included).
    pub fn downstream_event(&self, sampling: SiteSampling) -> SampledGaussian {
        let z = self.noise_multiplier;
        let (q, z) = match (self.mode, sampling) {
            (TrustMode::Central, SiteSampling::Poisson(q)) => (q, z),
            (TrustMode::Central, SiteSampling::All) => (1.0, z),
            // Sensitivity 2C: a site added to the population can take another's place.
            (TrustMode::Central, SiteSampling::FixedSize) => (1.0, z / 2.0),
            (TrustMode::Distributed | TrustMode::Local, _) => (1.0, z),
        };
        SampledGaussian { q, z, steps: 1 }
    }

    /// The privacy event of one update against the coordinator, which sees it and knows the
    /// site was sampled (no amplification), w.r.t. replacing the site's data by data whose
    /// update is zero (the zero-out relation of Kairouz et al. 2021, "Practical and Private
    /// (Deep) Learning without Sampling or Shuffling"). `None` in central mode, where there
    /// is no guarantee against the coordinator.
    pub fn coordinator_event(&self) -> Result<Option<SampledGaussian>> {
        Ok(match self.mode {
            TrustMode::Central => None,
            _ => Some(SampledGaussian {
                q: 1.0,
                z: self.site_noise_std(1.0)?,
                steps: 1,
            }),
        })
    }

    /// The largest L2 norm the coordinator accepts for one update of `dim` coordinates with
    /// clip `clip`: C itself in central mode (the site sends the clipped delta in the clear);
    /// with the site's noise on top, `C + σ_s·(√dim + 10)`, which a Gaussian vector of std σ_s
    /// exceeds with probability below e^(−50) (the norm of a Gaussian vector is 1-Lipschitz:
    /// P(‖n‖ ≥ σ(√d + t)) ≤ e^(−t²/2), Boucheron, Lugosi, Massart 2013, Thm. 5.6). So honest
    /// updates pass and a site that skipped clipping by more than that is caught.
    pub fn norm_bound(&self, clip: f64, dim: usize) -> Result<f64> {
        Ok(accepted_norm(clip, self.site_noise_std(clip)?, dim))
    }
}

/// The largest L2 norm the coordinator accepts for one update of `dim` coordinates clipped
/// to `clip` with a site noise std `site_noise_std` added (see
/// [`SiteDp::norm_bound`]); a site compressing its update keeps the decoded update
/// within it.
pub fn accepted_norm(clip: f64, site_noise_std: f64, dim: usize) -> f64 {
    if site_noise_std == 0.0 {
        clip
    } else {
        clip + site_noise_std * ((dim as f64).sqrt() + 10.0)
    }
}

impl SiteDpTask {
    /// The largest L2 norm the coordinator accepts for this task's update of a model of
    /// `dim` coordinates ([`accepted_norm`]).
    pub fn accepted_norm(&self, dim: usize) -> f64 {
        accepted_norm(self.clip_norm, self.noise_std, dim)
    }
}

/// What a training task tells a site to do under site-level DP.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SiteDpTask {
    /// The trust mode (the site reports its clipped bit only in central mode).
    pub mode: TrustMode,
    /// The clip C of this round.
    pub clip_norm: f64,
    /// The noise std the site adds to every coordinate of its clipped delta.
    pub noise_std: f64,
}

/// What a site releases under site-level DP: its delta clipped to `clip` and, in the
/// distributed and local modes, its noise share added.
#[derive(Debug)]
pub struct PrivatizedUpdate {
    /// The clipped, noised delta.
    pub delta: crate::params::ParamSet,
    /// The delta's L2 norm before clipping (stays at the site).
    pub norm: f64,
    /// Whether the norm was at most the clip (the bit of adaptive clipping).
    pub unclipped: bool,
}

/// Clips `delta` to L2 norm `clip` and adds N(0, `noise_std`²) to every coordinate, drawing
/// from `rng` (a CSPRNG seeded from the OS at a site; seeded in tests).
pub fn privatize<R: Rng + CryptoRng>(
    delta: &crate::params::ParamSet,
    clip: f64,
    noise_std: f64,
    rng: &mut R,
) -> Result<PrivatizedUpdate> {
    let (clipped, norm) = delta.clip_to_norm(clip)?;
    let noised = if noise_std == 0.0 {
        clipped
    } else {
        let mut tensors = std::collections::BTreeMap::new();
        for (name, t) in clipped.iter() {
            let mut values = t
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            add_gaussian(&mut values, noise_std, rng);
            let noisy = candle_core::Tensor::from_vec(values, t.shape(), t.device())?
                .to_dtype(t.dtype())?;
            tensors.insert(name.to_string(), noisy);
        }
        crate::params::ParamSet::from_tensors(tensors)?
    };
    Ok(PrivatizedUpdate {
        delta: noised,
        norm,
        unclipped: norm <= clip,
    })
}

#[cfg(test)]
mod tests;
