//! The empirical section of the privacy-audit report: one-run audits (Steinke, Nasr,
//! Jagielski 2023; `fedflow-sim privacy-audit`) of this run's configuration, each a lower
//! bound on ε from a test, shown next to the accountant's ε and never in its place.
//!
//! An audit is attached only when it audited exactly this run's mechanism: the same level,
//! sampling rate, noise multiplier and noisy releases per round (the parameters ε depends
//! on); anything else is refused with both configurations named.

use fedflow_common::privacy::audit::{AuditPoint, EmpiricalAudit, Level};
use serde::Serialize;

use crate::config::RunConfig;
use crate::{Error, Result};

/// One attached audit.
#[derive(Debug, Clone, Serialize)]
pub struct EmpiricalCheck {
    /// The file it came from.
    pub source: String,
    /// When the audit was run.
    pub audited_at: String,
    /// The audited configuration and its outcome, as the file states them.
    #[serde(flatten)]
    pub point: AuditPoint,
    /// What the figure means.
    pub meaning: String,
}

/// The mechanism of `cfg` at `level`: (q, z, noisy releases per round), if it has one.
fn mechanism(cfg: &RunConfig, level: Level) -> Result<Option<(f64, f64, u64)>> {
    Ok(match level {
        Level::Record => match &cfg.record_dp {
            Some(dp) => match dp.sampling_rate {
                Some(q) => Some((
                    q,
                    dp.noise_multiplier,
                    fedflow_common::privacy::planner::dpsgd_round_at_rate(
                        1,
                        q,
                        cfg.train.epochs as u64,
                        dp.noise_multiplier,
                    )?
                    .steps,
                )),
                // q = B / n differs by site: no single configuration to match.
                None => None,
            },
            None => None,
        },
        Level::Site => cfg.site_dp.as_ref().map(|dp| {
            let e = dp.round_event(&cfg.sampling);
            (e.q, e.z, e.steps)
        }),
    })
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-300)
}

/// The checks of `files` (each a path and its loaded audit) that match `cfg`; an error when
/// a file has none.
pub fn checks(cfg: &RunConfig, files: &[(String, EmpiricalAudit)]) -> Result<Vec<EmpiricalCheck>> {
    let mut out = Vec::new();
    for (source, audit) in files {
        let mut matched = 0;
        for p in &audit.points {
            let Some((q, z, steps)) = mechanism(cfg, p.level)? else {
                continue;
            };
            if same(q, p.sampling_rate) && same(z, p.noise_multiplier) && steps == p.steps_per_round
            {
                matched += 1;
                out.push(EmpiricalCheck {
                    source: source.clone(),
                    audited_at: audit.generated_at.clone(),
                    point: p.clone(),
                    meaning: format!(
                        "A lower bound on ε from a test with {} canaries at {}% confidence, \
                         over {} round(s): if the mechanism satisfies the accountant's ε, the \
                         test's bound exceeds it with probability at most {}%. It is not a \
                         guarantee, and a bound far below the accountant's ε does not mean \
                         the true ε is smaller: one-run audits are not tight for subsampled \
                         Gaussian mechanisms.",
                        p.audit.canaries,
                        p.audit.confidence * 100.0,
                        p.rounds,
                        ((1.0 - p.audit.confidence) * 100.0).round()
                    ),
                });
            }
        }
        if matched == 0 {
            let audited: Vec<String> = audit
                .points
                .iter()
                .map(|p| {
                    format!(
                        "{:?} level q = {}, z = {}, {} step(s) per round",
                        p.level, p.sampling_rate, p.noise_multiplier, p.steps_per_round
                    )
                })
                .collect();
            let ours: Vec<String> = [Level::Record, Level::Site]
                .into_iter()
                .filter_map(|l| {
                    mechanism(cfg, l).ok().flatten().map(|(q, z, s)| {
                        format!("{l:?} level q = {q}, z = {z}, {s} step(s) per round")
                    })
                })
                .collect();
            return Err(Error::BadRequest(format!(
                "{source}: none of its audits is of this run's mechanism (audited: {}; this \
                 run: {})",
                audited.join("; "),
                if ours.is_empty() {
                    "no mechanism with one sampling rate".to_string()
                } else {
                    ours.join("; ")
                }
            )));
        }
    }
    Ok(out)
}
