//! The site-level section of the privacy-audit report, from the coordinator's ledger: the
//! guarantee downstream, each site's guarantee against the coordinator (distributed and
//! local modes) and, in the distributed mode, against other sites, which know their own
//! noise shares.

use std::collections::BTreeMap;

use fedflow_common::privacy::dpfedavg::{Relation, SiteSampling, TrustMode};
use fedflow_common::privacy::pld::PldAccountant;
use fedflow_common::privacy::{RdpAccountant, SampledGaussian};
use fedflow_common::report::finite;

use super::{
    AgainstCoordinator, AgainstSites, COLLUDING_SITES, Coalition, EpsilonAt,
    SiteAgainstCoordinator, SiteLevel, SiteMechanism, SiteRound, Target, at_deltas,
};
use crate::Result;
use crate::config::{RunConfig, SiteDpSection};
use crate::store::{SiteDpRound, Store};

/// Voids every ε of `rows` (null: unbounded) when a committed round is missing from the
/// ledger.
fn void_if_unrecorded(rows: Vec<EpsilonAt>, unrecorded_rounds: u64) -> Vec<EpsilonAt> {
    rows.into_iter()
        .map(|e| EpsilonAt {
            epsilon: e.epsilon.filter(|_| unrecorded_rounds == 0),
            ..e
        })
        .collect()
}

/// At each δ the smaller ε of `rdp` and `pld` (the same δ, in the same order); unbounded only
/// where both are.
fn smaller(rdp: &[EpsilonAt], pld: &[EpsilonAt]) -> Vec<EpsilonAt> {
    rdp.iter()
        .zip(pld)
        .map(|(r, p)| match (r.epsilon, p.epsilon) {
            (Some(a), Some(b)) if b < a => p.clone(),
            (None, Some(_)) => p.clone(),
            _ => r.clone(),
        })
        .collect()
}

/// The noise multiplier of `row`'s release against `colluding` sites that pool what they
/// know (`None`: every other site that contributed to the round), w.r.t. the zero-out
/// relation of the round's charge.
///
/// The released sum carries the coordinator's top-up N(0, S²) and every contributing site's
/// share N(0, σ_s²) (the mechanism of `fedflow_common::privacy::dpfedavg`: Kairouz, Liu,
/// Steinke 2021's distributed construction, without secure aggregation). A colluding site
/// knows its own share, so against t colluding contributors the noise that still protects
/// another site has variance S² + (k − t)·σ_s² for k contributions, t at most k − 1 (the
/// protected site contributes in both neighbouring rounds under zero-out, and its share is
/// never known to the others). Over the sensitivity C that is the multiplier of a Gaussian
/// mechanism (for k = expected_sites, where S = 0: z·√(1 − t/k)). It is capped at the
/// multiplier the round was charged downstream (the ledger's `noise_multiplier`), so this
/// figure is never below the downstream one: with more contributions than expected the sum
/// carries more noise than the charge, which the downstream figure does not count either.
pub fn colluding_multiplier(row: &SiteDpRound, colluding: Option<u64>) -> f64 {
    let k = row.contributions;
    let others = k.saturating_sub(1);
    let known = colluding.map_or(others, |t| t.min(others));
    let unknown = row.server_noise_std.powi(2) + (k - known) as f64 * row.site_noise_std.powi(2);
    (unknown.sqrt() / row.clip_norm).min(row.noise_multiplier)
}

/// Each site's guarantee against other sites in the distributed mode, for the coalition
/// sizes of [`COLLUDING_SITES`] smaller than the most contributions of any round (a larger
/// coalition knows no more than every other contributor) and for every other contributing
/// site: every released round charged as the Gaussian mechanism with
/// [`colluding_multiplier`], no amplification, composed by the RDP accountant, ε at
/// `target_delta` and the other δ.
pub fn against_sites(rows: &[SiteDpRound], target_delta: f64) -> Result<AgainstSites> {
    let most = rows.iter().map(|r| r.contributions).max().unwrap_or(0);
    let sizes = COLLUDING_SITES
        .iter()
        .filter(|t| **t < most)
        .map(|t| Some(*t))
        .chain([None]);
    let mut coalitions = Vec::new();
    for colluding in sizes {
        let mut acc = RdpAccountant::default();
        let mut min_z = f64::INFINITY;
        for row in rows {
            let z = colluding_multiplier(row, colluding);
            min_z = min_z.min(z);
            acc.compose(&SampledGaussian {
                q: 1.0,
                z,
                steps: 1,
            })?;
        }
        coalitions.push(Coalition {
            colluding_sites: colluding,
            min_noise_multiplier: finite(min_z),
            cumulative: at_deltas(&acc, target_delta)?,
        });
    }
    Ok(AgainstSites {
        neighbouring_relation: "zero-out, as downstream: one site's data replaced by data \
                                whose update is zero; hides what a site contributed, not \
                                whether it took part"
            .into(),
        assumption: "every site sees the released models and knows its own noise share; t \
                     colluding sites pool their shares (and their updates), so against them \
                     a site is protected only by the coordinator's top-up and the shares of \
                     the other contributors, the protected site's own included: per round, \
                     noise variance S² + (k − t)·σ_s² for k contributions (t at most k − 1), \
                     over the clip C, capped at the round's downstream multiplier; \
                     z·√(1 − t/k) when k = expected_sites. Every round charged without \
                     amplification. A site that colludes with the coordinator is covered by \
                     against_coordinator, not here"
            .into(),
        coalitions,
    })
}

/// Each site's guarantee against the coordinator, from every update it received (refused
/// ones too): `None` in central mode.
fn against_coordinator(
    store: &Store,
    run_id: &str,
    dp: &SiteDpSection,
) -> Result<Option<AgainstCoordinator>> {
    let Some(event) = dp.site_dp().coordinator_event()? else {
        return Ok(None);
    };
    let mut per_site: BTreeMap<String, u64> = BTreeMap::new();
    for u in store.site_dp_uploads(run_id)? {
        *per_site.entry(u.site_id).or_default() += 1;
    }
    let mut sites = Vec::new();
    for (site_id, updates) in per_site {
        let mut a = RdpAccountant::default();
        a.compose(&SampledGaussian {
            steps: updates,
            ..event
        })?;
        sites.push(SiteAgainstCoordinator {
            site_id,
            updates,
            epsilon: finite(a.epsilon(dp.target_delta)?.0),
        });
    }
    let worst = if sites.iter().any(|s| s.epsilon.is_none()) {
        None
    } else {
        sites.iter().filter_map(|s| s.epsilon).reduce(f64::max)
    };
    Ok(Some(AgainstCoordinator {
        neighbouring_relation: "zero-out: the site's data replaced by data whose update is \
                                zero (Kairouz et al. 2021); the coordinator knows which sites \
                                sent updates"
            .into(),
        per_update_noise_multiplier: event.z,
        sites,
        worst_epsilon: worst,
    }))
}

/// What the metrics sentence of the distributed and local modes says (sites send their
/// metrics with every update unless they withhold them).
const METRICS_IN_THE_CLEAR: &str = "the metrics each site sends with its update (training \
     loss, validation loss, accuracy and macro-F1, epochs run), computed on its data and sent \
     to the coordinator without noise unless the site withholds them: the guarantee covers \
     the model updates only";

/// The site-level section of `run_id`'s report.
pub(super) fn site_level(
    store: &Store,
    run_id: &str,
    cfg: &RunConfig,
    dp: &SiteDpSection,
    committed: u64,
) -> Result<SiteLevel> {
    let ledger = store.site_dp_rounds(run_id)?;
    // Every committed round must be in the ledger; one that is not (impossible while the
    // engine refuses to resume with another [site_dp]) makes the guarantee unbounded.
    let unrecorded_rounds = committed.saturating_sub(ledger.len() as u64);
    let seeded_rounds = ledger.iter().filter(|r| r.seeded_randomness).count() as u64;
    let against_sites = match dp.mode {
        TrustMode::Distributed => {
            let mut a = against_sites(&ledger, dp.target_delta)?;
            for c in &mut a.coalitions {
                c.cumulative =
                    void_if_unrecorded(std::mem::take(&mut c.cumulative), unrecorded_rounds);
            }
            Some(a)
        }
        TrustMode::Central | TrustMode::Local => None,
    };
    let mut acc = RdpAccountant::default();
    let events: Vec<SampledGaussian> = ledger
        .iter()
        .map(|row| SampledGaussian {
            q: row.sampling_rate,
            z: row.noise_multiplier,
            steps: 1,
        })
        .collect();
    let pld = PldAccountant::of(events.iter().copied())?;
    let mut rounds = Vec::with_capacity(ledger.len());
    for (row, event) in ledger.into_iter().zip(&events) {
        acc.compose(event)?;
        let (e, _) = acc.epsilon(dp.target_delta)?;
        rounds.push(SiteRound {
            ledger: row,
            epsilon_recomputed: finite(e),
        });
    }
    let (protects, not) = match dp.mode {
        TrustMode::Central => (
            "everyone who sees the released models (model users, other sites, outsiders)"
                .to_string(),
            "the coordinator and its operators, who see every clipped update in the clear"
                .to_string(),
        ),
        TrustMode::Distributed => (
            "those who see only the released models (model users, outsiders), at the \
             cumulative ε; other sites, which also know their own noise shares, only at the \
             weaker ε of against_sites; the coordinator only by each update's own share of \
             the noise (see against_coordinator)"
                .to_string(),
            format!(
                "{METRICS_IN_THE_CLEAR}; a coordinator that publishes individual updates or \
                 skips its top-up (no secure aggregation yet); sites that skip their share"
            ),
        ),
        TrustMode::Local => (
            "everyone, the coordinator included (each update carries the full noise), for \
             the model updates"
                .to_string(),
            format!(
                "{METRICS_IN_THE_CLEAR}; a coordinator that skips its top-up when nobody \
                 contributed"
            ),
        ),
    };
    let randomness = if seeded_rounds == 0 {
        "a ChaCha20 CSPRNG seeded from the operating system in every released round (as \
         each round's ledger row records), never from the run's seed"
            .to_string()
    } else {
        format!(
            "SEEDED: in {seeded_rounds} of the {} released round(s) the coordinator's \
             randomness (site sampling, its noise top-up, the noise on adaptive clipping's \
             bit count) came from a fixed seed (a simulation or test), not from the \
             operating system; whoever knows the seed can reproduce that sample and that \
             noise, so the ε stated here does not hold against them",
            rounds.len()
        )
    };
    let event = dp.round_event(&cfg.sampling);
    let central = dp.mode == TrustMode::Central;
    let csprng = if seeded_rounds == 0 {
        "the coordinator's CSPRNG (seeded from the operating system)".to_string()
    } else {
        format!(
            "the coordinator's CSPRNG (from a FIXED SEED in {seeded_rounds} round(s): see \
             coordinator_randomness)"
        )
    };
    let assumption = match dp.sampling(&cfg.sampling) {
        SiteSampling::Poisson(q) if central => format!(
            "each available site takes part in each round independently with probability \
             q = {q}, drawn from {csprng} and kept secret from the sites; a site that is not \
             connected is included with probability 0 ≤ q, which the bound covers; \
             amplification by subsampling is used"
        ),
        SiteSampling::Poisson(q) => format!(
            "Poisson sampling at q = {q}, drawn from {csprng}, but no amplification is \
             claimed (rate 1 in the accountant): under the zero-out relation of this mode a \
             site's own noise share makes the noise depend on whether it takes part"
        ),
        SiteSampling::All => {
            "every available site in every round: no amplification (rate 1)".to_string()
        }
        SiteSampling::FixedSize if central => format!(
            "a sample of the size [sampling] sets, drawn uniformly from the available sites \
             with {csprng}: no amplification (rate 1), and adding a site can displace \
             another, so one site changes a round's sum by up to 2C: charged with z/2"
        ),
        SiteSampling::FixedSize => format!(
            "a sample of the size [sampling] sets, drawn uniformly with {csprng}: no \
             amplification (rate 1); under zero-out the site takes part either way, so the \
             sensitivity stays C"
        ),
    };
    let relation = match dp.site_dp().relation() {
        Relation::AddRemove => "add or remove one site: hides whether a site took part",
        Relation::ZeroOut => {
            "zero-out: one site's data replaced by data whose update is zero (Kairouz et al. \
             2021): hides what a site contributed, not whether it took part"
        }
    };
    let rdp_at = at_deltas(&acc, dp.target_delta)?;
    let pld_at: Vec<EpsilonAt> = rdp_at
        .iter()
        .map(|e| EpsilonAt {
            delta: e.delta,
            epsilon: finite(pld.epsilon(e.delta)),
            order: 0.0,
        })
        .collect();
    Ok(SiteLevel {
        trust_mode: dp.mode.to_string(),
        protects_against: protects,
        does_not_protect_against: not,
        privacy_unit: "a partner site: all of its updates in every round".into(),
        neighbouring_relation: relation.into(),
        round_event: event,
        sampling: super::Sampling {
            method: dp.sampling(&cfg.sampling).name().into(),
            rate: Some(event.q),
            assumption,
        },
        mechanism: SiteMechanism {
            name: "DP-FedAvg with the fixed-denominator estimator (McMahan et al. 2018, \
                   Algorithm 1)"
                .into(),
            clip_norm: dp.clip_norm,
            noise_multiplier: dp.noise_multiplier,
            expected_sites: dp.expected_sites,
            weighting: "uniform (every update weighs 1; example counts ignored), sum divided \
                        by expected_sites: unbiased for the expected sum, shorter steps when \
                        fewer sites contribute"
                .into(),
            adaptive_clipping: dp
                .adaptive_clipping
                .as_ref()
                .map(|a| serde_json::to_value(a).unwrap_or_default()),
            noise: "sites clip their delta to C and add their share (0 central, zC/√expected \
                    distributed, zC local); the coordinator tops the sum's noise up to \
                    N(0, (zC)²) per coordinate whatever the number of contributions, so every \
                    round is a Gaussian mechanism with noise std zC over the sensitivity (C, or \
                    2C for a fixed-size sample in central mode: see round_event; adaptive \
                    clipping: z is the effective multiplier of the updates and the centred noisy \
                    bit count together, Andrew et al. 2021 Thm. 1)"
                .into(),
        },
        accountant: "the smaller of two valid bounds on the same rounds: Rényi DP of the \
                     Poisson-subsampled Gaussian mechanism, a port of dp_accounting 0.6.0 \
                     RdpAccountant (orders 1.1 to 1024), converted with Canonne, Kamath, \
                     Steinke 2020 (cumulative_rdp); and privacy loss distributions, a port of \
                     dp_accounting 0.6.0 PLDAccountant (pessimistic connect-the-dots at 1e-4; \
                     Doroshenko et al. 2022) (cumulative_pld)"
            .into(),
        target: Target {
            epsilon: dp.target_epsilon,
            delta: dp.target_delta,
        },
        cumulative: void_if_unrecorded(smaller(&rdp_at, &pld_at), unrecorded_rounds),
        cumulative_rdp: void_if_unrecorded(rdp_at, unrecorded_rounds),
        cumulative_pld: void_if_unrecorded(pld_at, unrecorded_rounds),
        unrecorded_rounds,
        seeded_rounds,
        coordinator_randomness: randomness,
        sites_seen: store.sites()?.len() as u64,
        rounds,
        against_coordinator: against_coordinator(store, run_id, dp)?,
        against_sites,
    })
}
