//! Privacy planning: ε for a planned run, and the inverse searches.
//!
//! Each figure comes from one of the two accountants a site's ledger keeps ([`Accounting`]):
//! [`RdpAccountant`] (the functions without a suffix) or the tighter
//! [`super::pld::PldAccountant`] (the `_by` functions with [`Accounting::Pld`]), so a plan
//! and the accounting of the run that follows it agree exactly. The inverse searches return
//! values whose forward ε meets the target: the noise multiplier is rounded *up* (bisection
//! keeps the upper end of the bracket), the number of rounds *down*.

use serde::Serialize;

use super::pld::PldAccountant;
use super::rdp::{RdpAccountant, SampledGaussian};
use crate::{Error, Result};

/// Which accountant a plan uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accounting {
    /// Rényi DP ([`RdpAccountant`]).
    Rdp,
    /// Privacy loss distributions ([`PldAccountant`]): tighter for the same events.
    Pld,
}

impl std::str::FromStr for Accounting {
    type Err = Error;
    fn from_str(s: &str) -> Result<Accounting> {
        match s {
            "rdp" => Ok(Accounting::Rdp),
            "pld" => Ok(Accounting::Pld),
            other => Err(Error::Privacy(format!(
                "accountant {other:?}: use pld or rdp"
            ))),
        }
    }
}

/// The events of `rounds` repetitions of `round`: each event's steps times `rounds`.
fn repeated(round: &[SampledGaussian], rounds: u64) -> Result<Vec<SampledGaussian>> {
    round
        .iter()
        .map(|e| {
            let steps = e.steps.checked_mul(rounds).ok_or_else(|| {
                Error::Privacy(format!(
                    "total step count overflows: {} steps per round × {rounds} rounds exceeds {}",
                    e.steps,
                    u64::MAX
                ))
            })?;
            Ok(SampledGaussian { steps, ..*e })
        })
        .collect()
}

/// ε at `delta` after `rounds` repetitions of the events of one round, by `accounting`.
pub fn epsilon_by(
    accounting: Accounting,
    round: &[SampledGaussian],
    rounds: u64,
    delta: f64,
) -> Result<f64> {
    match accounting {
        Accounting::Rdp => Ok(epsilon(round, rounds, delta)?.epsilon),
        Accounting::Pld => {
            let mut acc = PldAccountant::default();
            for e in repeated(round, rounds)? {
                acc.compose(&e)?;
            }
            Ok(acc.epsilon(delta))
        }
    }
}

/// [`noise_for_epsilon`] by `accounting`. The PLD search starts from the RDP solution
/// (which PLD always meets, being tighter) and bisects below it.
pub fn noise_for_epsilon_by(
    accounting: Accounting,
    q: f64,
    steps: u64,
    rounds: u64,
    delta: f64,
    target: f64,
) -> Result<f64> {
    let rdp = noise_for_epsilon(q, steps, rounds, delta, target)?;
    if accounting == Accounting::Rdp || rdp == 0.0 {
        return Ok(rdp);
    }
    let eps = |z: f64| {
        epsilon_by(
            accounting,
            &[SampledGaussian { q, z, steps }],
            rounds,
            delta,
        )
    };
    let mut hi = rdp;
    let mut lo = 0.5 * rdp;
    while eps(lo)? <= target {
        hi = lo;
        lo *= 0.5;
        if lo < 1e-3 {
            return Ok(hi);
        }
    }
    smallest_noise_within(lo, hi, |z| Ok(eps(z)? <= target))
}

/// [`rounds_for_epsilon`] by `accounting`. The PLD search starts from the RDP count (which
/// PLD always allows, being tighter).
pub fn rounds_for_epsilon_by(
    accounting: Accounting,
    round: &[SampledGaussian],
    delta: f64,
    target: f64,
) -> Result<u64> {
    let rdp = rounds_for_epsilon(round, delta, target)?;
    if accounting == Accounting::Rdp || rdp == UNLIMITED_ROUNDS {
        return Ok(rdp);
    }
    let within =
        |r: u64| -> Result<bool> { Ok(epsilon_by(accounting, round, r, delta)? <= target) };
    if rdp == 0 && !within(1)? {
        return Ok(0);
    }
    let mut lo = rdp.max(1); // within
    let mut hi = lo * 2;
    while within(hi)? {
        lo = hi;
        if hi >= 1 << 40 {
            return Ok(UNLIMITED_ROUNDS);
        }
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if within(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// ε of a run and the RDP order that attains it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spent {
    /// ε at the requested δ.
    pub epsilon: f64,
    /// The optimal RDP order.
    pub order: f64,
}

/// DP-SGD at a site: the sampling rate and step count of one round of local training.
///
/// Poisson sampling with expected batch size `B` over `n` records has rate `q = B / n`
/// (capped at 1); an epoch is `⌈n / B⌉` steps, as in Opacus's and TF Privacy's data loaders.
pub fn dpsgd_round(n: u64, expected_batch: u64, epochs: u64, z: f64) -> Result<SampledGaussian> {
    if n == 0 || expected_batch == 0 {
        return Err(Error::Privacy(format!(
            "DP-SGD needs records and a batch size (n = {n}, batch = {expected_batch})"
        )));
    }
    let q = (expected_batch as f64 / n as f64).min(1.0);
    let per_epoch = n.div_ceil(expected_batch);
    let steps = epochs.checked_mul(per_epoch).ok_or_else(|| {
        Error::Privacy(format!(
            "DP-SGD step count overflows: {epochs} epochs × {per_epoch} steps per epoch \
             exceeds {}",
            u64::MAX
        ))
    })?;
    Ok(SampledGaussian { q, z, steps })
}

/// DP-SGD at a site with a sampling rate fixed by the run: `q` for every site whatever its
/// size `n`, an epoch being `⌈1 / q⌉` steps (so about n records are seen per epoch).
pub fn dpsgd_round_at_rate(n: u64, q: f64, epochs: u64, z: f64) -> Result<SampledGaussian> {
    if n == 0 || !(q > 0.0 && q <= 1.0) {
        return Err(Error::Privacy(format!(
            "DP-SGD needs records and a sampling rate in (0, 1] (n = {n}, q = {q})"
        )));
    }
    // 1/q rounded up, tolerant of the last-bit error of 1/q for q = 0.1, 0.2, ...
    // (saturating at u64::MAX for a tiny q, which the product below then refuses).
    let per_epoch = ((1.0 / q) * (1.0 - 1e-12)).ceil().max(1.0) as u64;
    let steps = epochs.checked_mul(per_epoch).ok_or_else(|| {
        Error::Privacy(format!(
            "DP-SGD step count overflows: {epochs} epochs × {per_epoch} steps per epoch \
             exceeds {}",
            u64::MAX
        ))
    })?;
    Ok(SampledGaussian { q, z, steps })
}

/// ε at `delta` after `rounds` repetitions of the events of one round.
///
/// Fails with [`Error::Privacy`] when an event's total step count (steps × rounds) does not
/// fit a `u64`.
pub fn epsilon(round: &[SampledGaussian], rounds: u64, delta: f64) -> Result<Spent> {
    let mut acc = RdpAccountant::default();
    for e in repeated(round, rounds)? {
        acc.compose(&e)?;
    }
    let (epsilon, order) = acc.epsilon(delta)?;
    Ok(Spent { epsilon, order })
}

fn check_target(target: f64) -> Result<()> {
    if !(target.is_finite() && target > 0.0) {
        return Err(Error::Privacy(format!(
            "target epsilon must be a positive number, got {target}"
        )));
    }
    Ok(())
}

/// The smallest noise multiplier (to a relative precision of 1e-6, rounded up) with which
/// `steps` steps at sampling rate `q`, repeated over `rounds`, stay within `target` ε at `delta`.
pub fn noise_for_epsilon(q: f64, steps: u64, rounds: u64, delta: f64, target: f64) -> Result<f64> {
    check_target(target)?;
    let eps = |z: f64| -> Result<f64> {
        Ok(epsilon(&[SampledGaussian { q, z, steps }], rounds, delta)?.epsilon)
    };
    if eps(0.0)? <= target {
        return Ok(0.0);
    }
    let mut hi = 1.0;
    while eps(hi)? > target {
        hi *= 2.0;
        if hi > 1e6 {
            return Err(Error::Privacy(format!(
                "no noise multiplier up to 1e6 reaches epsilon {target} at delta {delta}"
            )));
        }
    }
    let lo = 0.0;
    smallest_noise_within(lo, hi, |z| Ok(eps(z)? <= target))
}

/// Bisects `(lo, hi]`, where `hi` meets the target and `lo` does not, down to a relative
/// width of 1e-6, keeping the upper end: the returned z always meets it.
fn smallest_noise_within(
    mut lo: f64,
    mut hi: f64,
    within: impl Fn(f64) -> Result<bool>,
) -> Result<f64> {
    while hi - lo > 1e-6 * hi {
        let mid = 0.5 * (lo + hi);
        if within(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// Rounds that can never exhaust a budget (a round that spends nothing) are reported as this.
pub const UNLIMITED_ROUNDS: u64 = u64::MAX;

/// The largest number of rounds, each spending `round`, that stays within `target` ε at
/// `delta` (0 if even one round exceeds it; [`UNLIMITED_ROUNDS`] if a round spends nothing).
///
/// Fails with [`Error::Privacy`] when the search reaches a number of rounds whose total step
/// count does not fit a `u64` (see [`epsilon`]) before it finds the limit.
pub fn rounds_for_epsilon(round: &[SampledGaussian], delta: f64, target: f64) -> Result<u64> {
    check_target(target)?;
    let within = |r: u64| -> Result<bool> { Ok(epsilon(round, r, delta)?.epsilon <= target) };
    if !within(1)? {
        return Ok(0);
    }
    let mut lo = 1u64; // within
    let mut hi = 2u64;
    while within(hi)? {
        lo = hi;
        if hi >= 1 << 40 {
            return Ok(UNLIMITED_ROUNDS);
        }
        hi *= 2; // never beyond 2^40: the cap above keeps the doubling in range
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if within(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pld_plans_need_less_noise_or_allow_more_rounds_and_meet_their_target() {
        let (q, steps, delta, target) = (0.02, 250, 1e-5, 4.0);
        let rdp = noise_for_epsilon_by(Accounting::Rdp, q, steps, 10, delta, target).unwrap();
        let pld = noise_for_epsilon_by(Accounting::Pld, q, steps, 10, delta, target).unwrap();
        assert!(pld < rdp, "{pld} vs {rdp}");
        let eps = |z: f64| {
            epsilon_by(
                Accounting::Pld,
                &[SampledGaussian { q, z, steps }],
                10,
                delta,
            )
            .unwrap()
        };
        assert!(eps(pld) <= target && eps(pld * (1.0 - 1e-4)) > target);
        let round = [SampledGaussian { q, z: 1.0, steps }];
        let r_rdp = rounds_for_epsilon_by(Accounting::Rdp, &round, delta, target).unwrap();
        let r_pld = rounds_for_epsilon_by(Accounting::Pld, &round, delta, target).unwrap();
        assert!(r_pld > r_rdp, "{r_pld} vs {r_rdp}");
        assert!(epsilon_by(Accounting::Pld, &round, r_pld, delta).unwrap() <= target);
        assert!(epsilon_by(Accounting::Pld, &round, r_pld + 1, delta).unwrap() > target);
        assert_eq!("pld".parse::<Accounting>().unwrap(), Accounting::Pld);
        assert!("moments".parse::<Accounting>().is_err());
    }

    #[test]
    fn dpsgd_round_counts_steps_per_epoch_rounded_up() {
        let r = dpsgd_round(1000, 64, 2, 1.1).unwrap();
        assert_eq!(r.steps, 2 * 16);
        assert!((r.q - 0.064).abs() < 1e-15);
        assert_eq!(dpsgd_round(10, 64, 1, 1.0).unwrap().q, 1.0);
        assert!(dpsgd_round(0, 64, 1, 1.0).is_err());
        let r = dpsgd_round_at_rate(5000, 0.03, 2, 1.0).unwrap();
        assert_eq!((r.q, r.steps), (0.03, 2 * 34));
        assert!(dpsgd_round_at_rate(10, 0.0, 1, 1.0).is_err());
    }

    #[test]
    fn noise_search_meets_the_target_tightly() {
        for &(q, steps, rounds, target) in &[(0.01, 100, 10, 1.0), (0.05, 20, 30, 8.0)] {
            let z = noise_for_epsilon(q, steps, rounds, 1e-5, target).unwrap();
            let ev = |z| SampledGaussian { q, z, steps };
            let at = epsilon(&[ev(z)], rounds, 1e-5).unwrap().epsilon;
            let below = epsilon(&[ev(z * (1.0 - 1e-4))], rounds, 1e-5)
                .unwrap()
                .epsilon;
            assert!(at <= target, "z={z}: eps {at} > {target}");
            assert!(below > target, "z={z} is not the smallest: {below}");
        }
    }

    #[test]
    fn rounds_search_is_the_last_round_within_budget() {
        let round = [SampledGaussian {
            q: 0.02,
            z: 1.0,
            steps: 50,
        }];
        let r = rounds_for_epsilon(&round, 1e-5, 4.0).unwrap();
        assert!(r >= 1);
        assert!(epsilon(&round, r, 1e-5).unwrap().epsilon <= 4.0);
        assert!(epsilon(&round, r + 1, 1e-5).unwrap().epsilon > 4.0);
        let free = [SampledGaussian {
            q: 0.0,
            z: 1.0,
            steps: 50,
        }];
        assert_eq!(
            rounds_for_epsilon(&free, 1e-5, 1.0).unwrap(),
            UNLIMITED_ROUNDS
        );
        let costly = [SampledGaussian {
            q: 1.0,
            z: 0.1,
            steps: 50,
        }];
        assert_eq!(rounds_for_epsilon(&costly, 1e-5, 1.0).unwrap(), 0);
    }

    #[test]
    fn step_counts_that_overflow_u64_are_errors_not_panics() {
        let err = dpsgd_round(u64::MAX, 1, 2, 1.0).unwrap_err().to_string();
        assert!(err.contains("step count overflows"), "{err}");
        assert!(err.contains("epochs"), "{err}");
        let err = dpsgd_round_at_rate(10, 1e-300, 2, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("step count overflows"), "{err}");
        let round = [SampledGaussian {
            q: 0.01,
            z: 1.0,
            steps: u64::MAX / 2,
        }];
        let err = epsilon(&round, 3, 1e-5).unwrap_err().to_string();
        assert!(err.contains("total step count overflows"), "{err}");
        assert!(err.contains("rounds"), "{err}");
        // A round that spends nothing per step but has so many steps that doubling the
        // rounds overflows: the search reports the overflow instead of wrapping around.
        let free = [SampledGaussian {
            q: 0.0,
            z: 1.0,
            steps: u64::MAX / 3,
        }];
        let err = rounds_for_epsilon(&free, 1e-5, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("total step count overflows"), "{err}");
        let err = noise_for_epsilon(0.01, u64::MAX, 2, 1e-5, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("total step count overflows"), "{err}");
        // In range, nothing changes.
        assert_eq!(dpsgd_round(1000, 64, 2, 1.1).unwrap().steps, 32);
    }
}
