//! What the privacy-audit report says around its figures: the warnings a reader must see
//! first, and what no guarantee in it covers.

use super::{RecordLevel, SiteLevel};

/// Whether `delta` is not below 1/`n` (`n` > 0).
fn not_below_inverse(delta: f64, n: u64) -> bool {
    n > 0 && delta * n as f64 >= 1.0
}

/// Why δ ≥ 1/n makes ε meaningless, with the reference.
const WHY_DELTA: &str = "at such a δ a mechanism that publishes the complete data of a \
     randomly chosen one of them still qualifies (Dwork and Roth 2014, The Algorithmic \
     Foundations of Differential Privacy, §2.3), so ε at that δ says little: read ε at a δ \
     well below 1/n";

/// The warnings of a report, most serious first: seeded coordinator randomness, δ not below
/// 1/n at site level, sites whose counted updates already pass the record-level target,
/// and δ not below 1/n at record level.
pub(super) fn warnings(site: Option<&SiteLevel>, record: Option<&RecordLevel>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(s) = site {
        if s.seeded_rounds > 0 {
            out.push(format!(
                "site level: NOT A DEPLOYMENT GUARANTEE. {}",
                s.coordinator_randomness
            ));
        }
        let n = s.sites_seen;
        let deltas: Vec<String> = s
            .cumulative
            .iter()
            .filter(|e| not_below_inverse(e.delta, n))
            .map(|e| {
                if e.delta == s.target.delta {
                    format!("{:e} (the run's target)", e.delta)
                } else {
                    format!("{:e}", e.delta)
                }
            })
            .collect();
        if !deltas.is_empty() {
            out.push(format!(
                "site level: δ = {} is not below 1/n for the n = {n} sites this coordinator \
                 has seen: {WHY_DELTA}",
                deltas.join(", ")
            ));
        }
    }
    if let Some(r) = record {
        let small: Vec<String> = r
            .sites
            .iter()
            .filter_map(|s| {
                let n = s.train_examples?;
                not_below_inverse(r.target.delta, n).then(|| format!("{} (n = {n})", s.site_id))
            })
            .collect();
        let over: Vec<String> = r
            .sites
            .iter()
            .filter_map(|s| {
                let e = s.epsilon?;
                (e > r.target.epsilon).then(|| format!("{} (at least {e:.4})", s.site_id))
            })
            .collect();
        if !over.is_empty() {
            out.push(format!(
                "record level: the updates this coordinator counted already cost more than \
                 the run's target ε = {} for {}: such a site did not enforce the target (not \
                 a fedflow site, its ledger was lost, or another party used its identity), so \
                 no per-site bound holds for it",
                r.target.epsilon,
                over.join(", ")
            ));
        }
        if !small.is_empty() {
            out.push(format!(
                "record level: the run's δ = {:e} is not below 1/n for {} (n: the training \
                 examples the site reported; under user-level privacy it has fewer units, so \
                 1/units is larger still): {WHY_DELTA}",
                r.target.delta,
                small.join(", ")
            ));
        }
    }
    out
}

/// What no guarantee of the report covers.
pub(super) fn not_covered(site: Option<&SiteLevel>, noisy_counts: Option<f64>) -> Vec<String> {
    let mut out = vec![
        "metrics and timings the sites reported with their updates and evaluations (training \
         loss, validation loss, accuracy and macro-F1, epochs run, training seconds) unless \
         they withheld them: they are computed on site data and sent to the coordinator \
         without noise"
            .to_string(),
        "hyper-parameter tuning and any run not recorded in this data directory: repeated runs \
         on the same data compose, and their cost is not in this report"
            .to_string(),
        match noisy_counts {
            None => "the number of training examples each site reports with every update (its \
                     FedAvg weight, ignored under site-level DP; the coordinator knows it) and \
                     the fact that a site is enrolled"
                .to_string(),
            // The count is covered by the record-level guarantee; enrolment is not.
            Some(_) => "the fact that a site is enrolled (its count of privacy units goes out \
                        noisy and is covered at record level, see there)"
                .to_string(),
        },
    ];
    if site.is_some() {
        out.push(
            "per-round participation figures — selected, contributions, the exact clipped \
             fraction — which the coordinator's ledger and THIS REPORT show (share the report \
             only with those the coordinator is trusted with, or drop its per-round table), and \
             round timing (a round closes as soon as every sampled site has answered, which \
             tells its sites how many were sampled)"
                .to_string(),
        );
    }
    out
}
