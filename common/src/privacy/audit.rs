//! Empirical privacy auditing with one training run, after Steinke, Nasr and Jagielski 2023,
//! "Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846).
//!
//! `m` canaries are each included in the training data independently with probability 1/2.
//! After training, an auditor scores every canary (how much the released outputs look as if
//! it was included), guesses "included" for the `k+` highest scores and "excluded" for the
//! `k−` lowest, and abstains on the rest. If the training is (ε, δ)-DP, the number `W` of
//! correct guesses among the `r = k+ + k−` made is stochastically dominated as in the paper's
//! Theorem 3.3 (the δ = 0 case is Binomial(r, e^ε / (1 + e^ε)), i.e. no better than ε-DP
//! randomised response on every guess). [`p_value`] is that bound on `P[W ≥ v]`, computed as
//! the paper's Appendix D code (`p_value_DP_audit`) computes it; [`epsilon_lower_bound`] is
//! the largest ε that the observation rejects at the given p-value (`get_eps_audit`, by
//! bisection).
//!
//! The result is a *lower bound from a test*: with probability at least the stated
//! confidence, a mechanism that satisfies the accountant's (ε, δ) yields a bound at most ε.
//! A bound above the accountant's ε shows a bug in the DP code or the accountant; a bound far
//! below it says only that this auditor did not find more leakage (one-run audits are not
//! tight for Poisson-subsampled Gaussian mechanisms at moderate ε; the paper's Figure 1).
//!
//! Choosing the guess counts after seeing the scores is a multiple test: [`audit`] tries a
//! fixed grid of `(k+, k−)` and tests each at `p / grid size` (Bonferroni), so the stated
//! confidence holds for the best of them.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `P[Binomial(r, q) = k]` for `k = 0..=r`, with `q = e^ε / (1 + e^ε)`, from the log-space
/// recurrence `ln P(k+1) = ln P(k) + ln((r−k)/(k+1)) + ε` (exact in real arithmetic; the
/// rounding error grows with `r`, about 1e-13 relative at `r` = 10,000).
fn binomial_pmf(r: u64, epsilon: f64) -> Vec<f64> {
    // ln(1 − q) = −ln(1 + e^ε) = −ε − ln(1 + e^−ε), stable for large ε.
    let ln_one_minus_q = -epsilon - (-epsilon).exp().ln_1p();
    let mut ln_p = r as f64 * ln_one_minus_q;
    let mut pmf = Vec::with_capacity(r as usize + 1);
    for k in 0..=r {
        pmf.push(ln_p.exp());
        if k < r {
            ln_p += ((r - k) as f64 / (k + 1) as f64).ln() + epsilon;
        }
    }
    pmf
}

/// The p-value of `v` correct guesses out of `r`, with `m` canaries, under the hypothesis
/// that the training is (ε, δ)-DP: an upper bound on `P[W ≥ v]` (Steinke et al. 2023,
/// Theorem 3.3, computed as their Appendix D `p_value_DP_audit`):
/// `min(1, β + α·δ·2m)` with `β = P[Binomial(r, q) ≥ v]`, `q = e^ε / (1 + e^ε)` and
/// `α = max_{1≤i≤v} P[v > Binomial(r, q) ≥ v − i] / i`.
pub fn p_value(m: u64, r: u64, v: u64, epsilon: f64, delta: f64) -> Result<f64> {
    if !(v <= r && r <= m) {
        return Err(Error::Config(format!(
            "audit: need correct ({v}) <= guesses ({r}) <= canaries ({m})"
        )));
    }
    if !(epsilon >= 0.0 && epsilon.is_finite()) {
        return Err(Error::Config(format!(
            "audit: epsilon {epsilon} must be >= 0"
        )));
    }
    if !(0.0..=1.0).contains(&delta) {
        return Err(Error::Config(format!(
            "audit: delta {delta} must be in [0, 1]"
        )));
    }
    let pmf = binomial_pmf(r, epsilon);
    // The upper tail, summed from the small end of the terms.
    let beta: f64 = pmf[v as usize..].iter().rev().sum();
    let (mut alpha, mut below) = (0.0f64, 0.0f64);
    for i in 1..=v {
        below += pmf[(v - i) as usize];
        if below > i as f64 * alpha {
            alpha = below / i as f64;
        }
    }
    Ok((beta + alpha * delta * 2.0 * m as f64).min(1.0))
}

/// The largest ε (to within 1e-6) at which `v` correct guesses out of `r` (with `m` canaries)
/// have a p-value below `p`, i.e. the ε that (ε, δ)-DP is rejected for at confidence `1 − p`;
/// 0 when even ε = 0 is not rejected.
pub fn epsilon_lower_bound(m: u64, r: u64, v: u64, delta: f64, p: f64) -> Result<f64> {
    if !(p > 0.0 && p < 1.0) {
        return Err(Error::Config(format!(
            "audit: p-value {p} must be in (0, 1)"
        )));
    }
    if p_value(m, r, v, 0.0, delta)? >= p {
        return Ok(0.0);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while p_value(m, r, v, hi, delta)? < p {
        lo = hi;
        hi *= 2.0;
        if hi > 1e4 {
            return Ok(lo);
        }
    }
    while hi - lo > 1e-6 {
        let mid = 0.5 * (lo + hi);
        if p_value(m, r, v, mid, delta)? < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// The auditor's guesses on one set of scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Guesses {
    /// "Included" guesses (highest scores).
    pub k_plus: u64,
    /// "Excluded" guesses (lowest scores).
    pub k_minus: u64,
    /// Guesses made, `k_plus + k_minus`.
    pub guesses: u64,
    /// Of which correct.
    pub correct: u64,
}

/// Guesses "included" for the `k_plus` highest scores and "excluded" for the `k_minus`
/// lowest (ties broken by canary index), and counts the correct ones against `included`.
pub fn guess(scores: &[f64], included: &[bool], k_plus: usize, k_minus: usize) -> Result<Guesses> {
    if scores.len() != included.len() {
        return Err(Error::Config(format!(
            "audit: {} scores for {} canaries",
            scores.len(),
            included.len()
        )));
    }
    if k_plus + k_minus > scores.len() {
        return Err(Error::Config(format!(
            "audit: {k_plus} + {k_minus} guesses for {} canaries",
            scores.len()
        )));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::Config(format!(
            "audit: score of canary {i} is {}",
            scores[i]
        )));
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let top = order[..k_plus].iter().filter(|&&i| included[i]).count();
    let bottom = order[order.len() - k_minus..]
        .iter()
        .filter(|&&i| !included[i])
        .count();
    Ok(Guesses {
        k_plus: k_plus as u64,
        k_minus: k_minus as u64,
        guesses: (k_plus + k_minus) as u64,
        correct: (top + bottom) as u64,
    })
}

/// The outcome of one audit, as reports state it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditOutcome {
    /// Canaries m.
    pub canaries: u64,
    /// Of which were included (drawn with probability 1/2 each).
    pub included: u64,
    /// δ of the hypothesis tested.
    pub delta: f64,
    /// Confidence of the bound (1 − p over the whole grid).
    pub confidence: f64,
    /// The `(k+, k−)` tried, each tested at `(1 − confidence) / grid size`.
    pub grid: Vec<(u64, u64)>,
    /// The guesses that gave the largest bound.
    pub best: Guesses,
    /// The empirical lower bound on ε at `delta` (0 when nothing was rejected).
    pub epsilon_lower_bound: f64,
}

/// The default grid of guess counts for `m` canaries: `k+ = k−` at 1, 2, 5, 10, 20 and 50%
/// of `m / 2` (at least one each), without repeats.
pub fn default_grid(m: usize) -> Vec<(usize, usize)> {
    let mut grid: Vec<(usize, usize)> = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
        .iter()
        .map(|f| {
            let k = ((m as f64 / 2.0 * f).round() as usize).max(1).min(m / 2);
            (k, k)
        })
        .filter(|&(k, _)| k >= 1)
        .collect();
    grid.dedup();
    grid
}

/// Audits `scores` of canaries whose inclusion was `included`: the largest lower bound on ε
/// at `delta` over `grid`, each tested at p = `(1 − confidence) / grid.len()`.
pub fn audit(
    scores: &[f64],
    included: &[bool],
    delta: f64,
    confidence: f64,
    grid: &[(usize, usize)],
) -> Result<AuditOutcome> {
    if grid.is_empty() {
        return Err(Error::Config("audit: no guess counts to try".into()));
    }
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(Error::Config(format!(
            "audit: confidence {confidence} must be in (0, 1)"
        )));
    }
    let m = scores.len() as u64;
    let p = (1.0 - confidence) / grid.len() as f64;
    let mut best: Option<(Guesses, f64)> = None;
    for &(kp, km) in grid {
        let g = guess(scores, included, kp, km)?;
        let eps = epsilon_lower_bound(m, g.guesses, g.correct, delta, p)?;
        if best.as_ref().is_none_or(|(_, e)| eps > *e) {
            best = Some((g, eps));
        }
    }
    let (best, epsilon_lower_bound) = best.expect("the grid is not empty");
    Ok(AuditOutcome {
        canaries: m,
        included: included.iter().filter(|&&x| x).count() as u64,
        delta,
        confidence,
        grid: grid.iter().map(|&(a, b)| (a as u64, b as u64)).collect(),
        best,
        epsilon_lower_bound,
    })
}

/// The schema of an empirical audit's file ([`FILE`]).
pub const SCHEMA: &str = "fedflow.empirical-audit/1";

/// The file an audit writes into its output folder.
pub const FILE: &str = "empirical-audit.json";

/// Which guarantee is audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Record-level DP-SGD at one site (a canary is one training record).
    Record,
    /// Site-level DP-FedAvg (a canary is one site).
    Site,
}

/// One audited configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditPoint {
    /// Record or site level.
    pub level: Level,
    /// The target ε the noise was calibrated to (PLD); `None`: no noise.
    pub target_epsilon: Option<f64>,
    /// Noise multiplier z (at site level, the effective one the ledger charges).
    pub noise_multiplier: f64,
    /// Poisson sampling rate q.
    pub sampling_rate: f64,
    /// Noisy releases per round (DP-SGD steps; 1 at site level).
    pub steps_per_round: u64,
    /// Rounds run.
    pub rounds: u64,
    /// δ.
    pub delta: f64,
    /// The accountant's ε (the smaller valid bound of PLD and RDP); `None`: unbounded.
    pub epsilon: Option<f64>,
    /// PLD's ε.
    pub epsilon_pld: Option<f64>,
    /// RDP's ε.
    pub epsilon_rdp: Option<f64>,
    /// The audit: guesses and the empirical lower bound.
    pub audit: AuditOutcome,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// What `fedflow-sim privacy-audit` writes ([`FILE`]), and what the privacy-audit report's
/// `--empirical` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmpiricalAudit {
    /// [`SCHEMA`].
    pub schema: String,
    /// When it was written (RFC 3339, UTC).
    pub generated_at: String,
    /// The run configuration the audit started from (TOML); at site level, each audited
    /// run's complete configuration is in its coordinator folder.
    pub run_config: String,
    /// The audited configurations.
    pub points: Vec<AuditPoint>,
}

impl EmpiricalAudit {
    /// Reads and checks a file, naming it in every error.
    pub fn load(path: &std::path::Path) -> Result<EmpiricalAudit> {
        let bad = |reason: String| Error::DataFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let r: EmpiricalAudit = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if r.schema != SCHEMA {
            return Err(bad(format!("schema {:?}, expected {SCHEMA:?}", r.schema)));
        }
        if let Some(p) = r.points.iter().find(|p| p.audit.canaries == 0) {
            return Err(bad(format!(
                "an audit of {:?} level with no canaries",
                p.level
            )));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binomial_sums_to_one_and_has_its_mean() {
        for (r, eps) in [(10u64, 0.0), (200, 1.0), (1000, 4.0), (500, 30.0)] {
            let pmf = binomial_pmf(r, eps);
            let total: f64 = pmf.iter().sum();
            let q = 1.0 / (1.0 + (-eps).exp());
            let mean: f64 = pmf.iter().enumerate().map(|(k, p)| k as f64 * p).sum();
            assert!((total - 1.0).abs() < 1e-10, "r {r} eps {eps}: {total}");
            assert!((mean - r as f64 * q).abs() < 1e-8 * r as f64, "{mean}");
        }
    }

    #[test]
    fn chance_level_guessing_rejects_nothing_and_perfect_guessing_rejects_a_lot() {
        assert_eq!(epsilon_lower_bound(1000, 100, 50, 1e-5, 0.05).unwrap(), 0.0);
        let perfect = epsilon_lower_bound(1000, 100, 100, 0.0, 0.05).unwrap();
        // All 100 right: q^100 = 0.05 at q = 0.05^(1/100), ε = ln(q / (1 − q)).
        let q = 0.05f64.powf(0.01);
        assert!((perfect - (q / (1.0 - q)).ln()).abs() < 1e-5, "{perfect}");
        // δ only weakens the test.
        assert!(epsilon_lower_bound(1000, 100, 100, 1e-5, 0.05).unwrap() <= perfect);
    }

    #[test]
    fn the_p_value_rises_with_the_hypothesis_epsilon_and_is_at_most_one() {
        let mut last = 0.0;
        for e in [0.0, 0.5, 1.0, 2.0, 4.0] {
            let p = p_value(1000, 200, 150, e, 1e-5).unwrap();
            assert!(p <= 1.0);
            assert!(p >= last, "{e}: {p} after {last}");
            last = p;
        }
        assert!(p_value(10, 20, 5, 1.0, 0.0).is_err());
    }

    #[test]
    fn guesses_count_the_top_and_the_bottom() {
        let scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0];
        let included = [true, false, true, false, false, true];
        let g = guess(&scores, &included, 2, 2).unwrap();
        // top two: canaries 0 (in) and 1 (out); bottom two: 4 (out) and 5 (in).
        assert_eq!((g.guesses, g.correct), (4, 2));
        assert!(guess(&scores, &included, 4, 4).is_err());
        assert!(guess(&[f64::NAN], &[true], 1, 0).is_err());
    }
}
