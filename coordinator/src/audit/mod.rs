//! The run's privacy-audit report: what privacy guarantee a run actually delivered, at both
//! levels, with every parameter needed to check it and the commands that recompute it.
//!
//! - **Site level** (`[site_dp]`, [`site`]), from the coordinator's append-only ledger
//!   (`site_dp_rounds`, `site_dp_uploads`): the trust mode and whom it protects against, the
//!   privacy unit and neighbouring relation, the sampling and its assumption, where the
//!   coordinator's randomness came from, the accountant, ε per round and cumulative at the
//!   target δ and other δ, in the distributed and local modes each site's guarantee against
//!   the coordinator itself, and in the distributed mode against other sites (which know
//!   their own noise shares).
//! - **Record level** (`[record_dp]`, [`record`]), from the DP-SGD parameters the run
//!   dictated and what the coordinator saw of each site: a lower bound on the ε every site
//!   spent (computable here when sites share a sampling rate; otherwise it depends on the
//!   site's number of privacy units), and the sites' declines. Each site's own ledger holds
//!   the exact figure.
//! - **Warnings** a reader must see before any figure: the coordinator's randomness seeded
//!   (simulations, tests), and a δ that is not below 1/n.
//!
//! The JSON (schema `fedflow.privacy-audit/1`) is documented field by field on
//! [`PrivacyAudit`]; fields are only ever added. [`to_html`] renders it as a self-contained
//! page, summary and warnings first. This file holds the report's types and the parts that
//! span both levels (summary, warnings, what is not covered, the commands); each level's
//! builder is its own module.

use fedflow_common::privacy::{RdpAccountant, SampledGaussian};
use serde::Serialize;

use crate::Result;
use crate::config::RunConfig;
use crate::store::{SiteDpRound, Store};

mod caveats;
pub mod compression;
pub mod empirical;
mod html;
pub mod record;
pub mod site;
#[cfg(test)]
mod tests;

pub use html::to_html;

/// The schema identifier of the JSON report.
pub const SCHEMA: &str = "fedflow.privacy-audit/1";

pub use fedflow_common::privacy::{EpsilonAt, REPORT_DELTAS as OTHER_DELTAS};

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct PrivacyAudit {
    /// [`SCHEMA`].
    pub schema: &'static str,
    /// When it was generated (Unix ms).
    pub generated_unix_ms: i64,
    /// The code that computed it (`fedflow-coordinator <version>`).
    pub code_version: String,
    /// The run.
    pub run: RunInfo,
    /// One line: what the run guarantees, at which level.
    pub summary: String,
    /// What a reader must know before trusting any figure below: the coordinator's
    /// randomness seeded (a simulation or test, not a deployment), a δ not below 1/n for
    /// the sites (site level) or a site's reported examples (record level). Empty when none
    /// applies.
    pub warnings: Vec<String>,
    /// Site-level DP, if the run had it.
    pub site_level: Option<SiteLevel>,
    /// Record-level DP, if the run had it.
    pub record_level: Option<RecordLevel>,
    /// How the sites compressed their updates and why every guarantee above still holds
    /// (absent when the run sends plain updates).
    pub compression: Option<compression::CompressionNote>,
    /// What no guarantee here covers.
    pub not_covered: Vec<String>,
    /// Commands that recompute every figure.
    pub recompute: Vec<String>,
    /// Empirical one-run audits of this run's mechanism, when any were attached: lower
    /// bounds from a test, next to the accountant's ε (empty when none).
    pub empirical: Vec<empirical::EmpiricalCheck>,
}

/// The run the report is about.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// Its id.
    pub run_id: String,
    /// `running`, `paused`, `finished` or `stopped`.
    pub status: String,
    /// Why it has that status (e.g. the budget stop), if recorded.
    pub status_reason: Option<String>,
    /// Rounds committed (released).
    pub committed_rounds: u64,
    /// Rounds configured.
    pub configured_rounds: u64,
}

/// Site-level DP-FedAvg.
#[derive(Debug, Clone, Serialize)]
pub struct SiteLevel {
    /// `central`, `distributed` or `local`.
    pub trust_mode: String,
    /// Whom the downstream guarantee protects against.
    pub protects_against: String,
    /// Whom it does not.
    pub does_not_protect_against: String,
    /// The privacy unit.
    pub privacy_unit: String,
    /// The neighbouring relation of the downstream guarantee.
    pub neighbouring_relation: String,
    /// The event every round is charged (q, z normalised by the sensitivity, 1 step).
    pub round_event: SampledGaussian,
    /// The sampling method, its rate and the assumption behind the accounting.
    pub sampling: Sampling,
    /// The mechanism's parameters.
    pub mechanism: SiteMechanism,
    /// The accountant.
    pub accountant: String,
    /// The run's target.
    pub target: Target,
    /// Downstream ε after all released rounds, at the target δ and at [`OTHER_DELTAS`]
    /// (null, unbounded, when a committed round is missing from the ledger): the smaller of
    /// the RDP and PLD bounds, the one the run's budget is enforced on.
    pub cumulative: Vec<EpsilonAt>,
    /// The same by the RDP accountant alone.
    pub cumulative_rdp: Vec<EpsilonAt>,
    /// The same by the PLD accountant alone (`order` is 0: PLD has none).
    pub cumulative_pld: Vec<EpsilonAt>,
    /// Committed rounds without a ledger row (0 unless the run's DP settings were changed
    /// outside fedflow): each voids the guarantee.
    pub unrecorded_rounds: u64,
    /// Released rounds whose coordinator-side randomness (site sampling, the noise top-up,
    /// adaptive clipping's bit noise) came from a fixed seed (simulations and tests) instead
    /// of the operating system, as the ledger recorded (`seeded_randomness`).
    pub seeded_rounds: u64,
    /// Where the coordinator's randomness came from, and what a seed means for the
    /// guarantee.
    pub coordinator_randomness: String,
    /// The sites this coordinator has seen (every run in its data directory): the
    /// population a site-level δ is compared with (δ should be well below 1 / sites).
    pub sites_seen: u64,
    /// Every released round as the ledger recorded it, with ε recomputed here.
    pub rounds: Vec<SiteRound>,
    /// The distributed and local modes: each site's guarantee against the coordinator.
    pub against_coordinator: Option<AgainstCoordinator>,
    /// The distributed mode: each site's guarantee against other sites, which see the
    /// released models and know their own noise shares (null in the central and local
    /// modes, where the guarantee downstream already holds against sites).
    pub against_sites: Option<AgainstSites>,
}

/// Sampling of sites (or records).
#[derive(Debug, Clone, Serialize)]
pub struct Sampling {
    /// `poisson`, `all` or `fixed`.
    pub method: String,
    /// The rate the accountant used (1 = no amplification; null when it differs by site).
    pub rate: Option<f64>,
    /// What the accounting assumes and how the implementation meets it.
    pub assumption: String,
}

/// DP-FedAvg's parameters.
#[derive(Debug, Clone, Serialize)]
pub struct SiteMechanism {
    /// Its name and reference.
    pub name: String,
    /// The initial clip C.
    pub clip_norm: f64,
    /// The configured noise multiplier z (noise std over C; the multiplier charged is
    /// `round_event.z`, z/2 for a fixed-size sample in central mode).
    pub noise_multiplier: f64,
    /// The fixed denominator.
    pub expected_sites: f64,
    /// Weighting.
    pub weighting: String,
    /// Adaptive clipping, if on: target quantile, learning rate, bit noise std.
    pub adaptive_clipping: Option<serde_json::Value>,
    /// Who adds which noise.
    pub noise: String,
}

/// A target (ε, δ).
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// ε.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
}

/// One released round.
#[derive(Debug, Clone, Serialize)]
pub struct SiteRound {
    /// The ledger row.
    #[serde(flatten)]
    pub ledger: SiteDpRound,
    /// Cumulative ε after it at the target δ, recomputed from the rows' parameters (null:
    /// unbounded).
    pub epsilon_recomputed: Option<f64>,
}

/// Each site's guarantee against the coordinator (zero-out relation, no amplification).
#[derive(Debug, Clone, Serialize)]
pub struct AgainstCoordinator {
    /// The relation.
    pub neighbouring_relation: String,
    /// The noise multiplier of one update against the coordinator (the site's own noise
    /// over its clip).
    pub per_update_noise_multiplier: f64,
    /// Per site: updates the coordinator saw and ε at the target δ.
    pub sites: Vec<SiteAgainstCoordinator>,
    /// The largest of them (null: unbounded).
    pub worst_epsilon: Option<f64>,
}

/// One site against the coordinator.
#[derive(Debug, Clone, Serialize)]
pub struct SiteAgainstCoordinator {
    /// The site.
    pub site_id: String,
    /// Updates the coordinator saw from it.
    pub updates: u64,
    /// ε at the target δ (null: unbounded).
    pub epsilon: Option<f64>,
}

/// The coalition sizes t for which the distributed mode's guarantee against colluding
/// sites is stated (those below a run's largest number of contributions), besides "every
/// other contributing site".
pub const COLLUDING_SITES: [u64; 4] = [1, 2, 5, 10];

/// Each site's guarantee against other sites in the distributed mode (see
/// [`site::colluding_multiplier`]).
#[derive(Debug, Clone, Serialize)]
pub struct AgainstSites {
    /// The relation (zero-out, as downstream).
    pub neighbouring_relation: String,
    /// What the figures assume and how each round is charged.
    pub assumption: String,
    /// One entry per coalition size: t = 1 first, every other contributing site last.
    pub coalitions: Vec<Coalition>,
}

/// A site's guarantee against t colluding sites.
#[derive(Debug, Clone, Serialize)]
pub struct Coalition {
    /// t: how many sites (never the protected one) pool their noise shares; null: every
    /// other site that contributed to a round.
    pub colluding_sites: Option<u64>,
    /// The smallest noise multiplier any released round carries against them (null: no
    /// round released).
    pub min_noise_multiplier: Option<f64>,
    /// ε after all released rounds at the target δ and at [`OTHER_DELTAS`] (null:
    /// unbounded, or a committed round is missing from the ledger).
    pub cumulative: Vec<EpsilonAt>,
}

/// Record-level DP-SGD at the sites.
#[derive(Debug, Clone, Serialize)]
pub struct RecordLevel {
    /// The DP-SGD parameters the run dictated.
    pub dp_sgd: serde_json::Value,
    /// Whom it protects against.
    pub protects_against: String,
    /// The privacy unit.
    pub privacy_unit: String,
    /// The neighbouring relation.
    pub neighbouring_relation: String,
    /// Sampling of records.
    pub sampling: Sampling,
    /// The accountant.
    pub accountant: String,
    /// The run's per-site target.
    pub target: Target,
    /// What the per-site figures count, and why each is a lower bound on what the site
    /// spent.
    pub counting: String,
    /// Per site: rounds contributed, updates received, declines, and a lower bound on its
    /// ε when computable here.
    pub sites: Vec<RecordSite>,
    /// The largest per-site lower bound computable here (null: none computable, or
    /// unbounded).
    pub worst_epsilon: Option<f64>,
    /// ε at the target δ after r rounds of a site that contributed to every round, for
    /// r = 1, 2, ... up to the rounds released (empty when ε depends on each site's size).
    pub every_round_epsilon: Vec<Option<f64>>,
    /// Where each site's authoritative figure is.
    pub authoritative: String,
    /// How each site's count of privacy units (its FedAvg weight) was released: noisy and
    /// charged with the updates, or in the clear, outside the guarantee.
    pub counts: String,
}

/// One site at record level.
#[derive(Debug, Clone, Serialize)]
pub struct RecordSite {
    /// The site.
    pub site_id: String,
    /// Rounds it contributed an update to (committed).
    pub rounds_contributed: u64,
    /// Every update of the site that reached the round engine, refused ones and those of
    /// re-run rounds included, when the run has site-level DP (whose ledger records them);
    /// null otherwise.
    pub updates_received: Option<u64>,
    /// Rounds it declined, with the reasons.
    pub declined: Vec<String>,
    /// Training examples it reported last (unverified; not its number of privacy units
    /// under user-level DP).
    pub train_examples: Option<u64>,
    /// A lower bound on its ε at the target δ, when the shared sampling rate makes it
    /// computable here: the cost of the updates counted (`updates_received` when recorded,
    /// else `rounds_contributed`; see [`RecordLevel::counting`]).
    pub epsilon: Option<f64>,
}

fn at_deltas(acc: &RdpAccountant, target_delta: f64) -> Result<Vec<EpsilonAt>> {
    let mut deltas = vec![target_delta];
    deltas.extend(OTHER_DELTAS.iter().filter(|d| **d != target_delta));
    Ok(deltas
        .into_iter()
        .map(|delta| acc.epsilon_at(delta))
        .collect::<std::result::Result<_, _>>()?)
}

/// The file names [`write()`] uses.
pub const JSON_FILE: &str = "privacy-audit.json";
/// See [`JSON_FILE`].
pub const HTML_FILE: &str = "privacy-audit.html";

/// Builds the report of `run_id` (the only run in `store` when `None`), with the empirical
/// audits in `empirical` (each a file name and its content) that match the run, and writes
/// [`JSON_FILE`] and [`HTML_FILE`] into `out` (created if needed; each file written
/// atomically). Returns the report.
pub fn write(
    store: &Store,
    run_id: Option<&str>,
    out: &std::path::Path,
    empirical: &[(String, fedflow_common::privacy::audit::EmpiricalAudit)],
) -> Result<PrivacyAudit> {
    let run_id = resolve_run(store, run_id)?;
    let now = fedflow_common::clock::now_ms();
    let report = build_with(store, &run_id, now, empirical)?;
    std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    let json = serde_json::to_string_pretty(&report)?;
    fedflow_common::fsio::write_atomic(&out.join(JSON_FILE), json.as_bytes())?;
    fedflow_common::fsio::write_atomic(&out.join(HTML_FILE), to_html(&report)?.as_bytes())?;
    Ok(report)
}

/// `run_id`, or the only run in `store` when `None` (an error naming the runs otherwise).
pub fn resolve_run(store: &Store, run_id: Option<&str>) -> Result<String> {
    Ok(match run_id {
        Some(r) => r.to_string(),
        None => {
            let runs = store.runs()?;
            match runs.as_slice() {
                [one] => one.run_id.clone(),
                [] => {
                    return Err(crate::Error::NotFound(
                        "this data directory has no run".into(),
                    ));
                }
                many => {
                    return Err(crate::Error::BadRequest(format!(
                        "this data directory has {} runs ({}); name one with --run",
                        many.len(),
                        many.iter()
                            .map(|r| r.run_id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
    })
}

/// Builds the report of `run_id` from `store`, with the run's configuration as the store
/// recorded it when the run was created.
pub fn build(store: &Store, run_id: &str, now_ms: i64) -> Result<PrivacyAudit> {
    build_with(store, run_id, now_ms, &[])
}

/// [`build`], with the empirical audits in `empirical` that match the run attached.
fn build_with(
    store: &Store,
    run_id: &str,
    now_ms: i64,
    empirical: &[(String, fedflow_common::privacy::audit::EmpiricalAudit)],
) -> Result<PrivacyAudit> {
    let run = store
        .run(run_id)?
        .ok_or_else(|| crate::Error::NotFound(format!("no run {run_id} in this data directory")))?;
    let cfg: &RunConfig = &serde_json::from_str(&run.config_json).map_err(|e| {
        crate::Error::Store(format!(
            "run {run_id}: its recorded configuration does not parse: {e}"
        ))
    })?;
    let empirical = empirical::checks(cfg, empirical)?;
    let rounds = store.rounds(run_id)?;
    let committed: Vec<u64> = rounds
        .iter()
        .filter(|r| r.status == crate::store::RoundStatus::Committed && r.round > 0)
        .map(|r| r.round)
        .collect();
    let info = RunInfo {
        run_id: run_id.to_string(),
        status: run.status.to_string(),
        status_reason: run.status_reason.clone(),
        committed_rounds: committed.len() as u64,
        configured_rounds: cfg.run.rounds,
    };
    let site_level = cfg
        .site_dp
        .as_ref()
        .map(|dp| site::site_level(store, run_id, cfg, dp, committed.len() as u64))
        .transpose()?;
    let record_level = cfg
        .record_dp
        .as_ref()
        .map(|dp| record::record_level(store, run_id, cfg, dp, &committed))
        .transpose()?;
    let summary = summary(site_level.as_ref(), record_level.as_ref());
    let warnings = caveats::warnings(site_level.as_ref(), record_level.as_ref());
    let noisy_counts = cfg
        .record_dp
        .as_ref()
        .map(|dp| dp.count_noise_multiplier)
        .filter(|&z| z > 0.0);
    let not_covered = caveats::not_covered(site_level.as_ref(), noisy_counts);
    let data = store.dir().display().to_string();
    let mut recompute = vec![format!(
        "fedflow-coordinator privacy-report --data {data} --run {run_id} --out OUT_DIR"
    )];
    if let Some(s) = &site_level {
        recompute.push(format!(
            "fedflow-client privacy plan --q {} --noise-multiplier {} --steps 1 --rounds {} \
             --delta {:e}",
            s.round_event.q,
            s.round_event.z,
            s.rounds.len().max(1),
            s.target.delta
        ));
    }
    if let Some(dp) = &cfg.record_dp {
        recompute.push(match dp.sampling_rate {
            Some(q) => format!(
                "fedflow-client privacy plan --q {q} --noise-multiplier {} --steps {}{} \
                 --rounds R --delta {:e}   (R = the updates a site released in this run; \
                 its own ledger counts them)",
                dp.noise_multiplier,
                fedflow_common::privacy::planner::dpsgd_round_at_rate(
                    1,
                    q,
                    cfg.train.epochs as u64,
                    dp.noise_multiplier
                )?
                .steps,
                if dp.count_noise_multiplier > 0.0 {
                    format!(" --count-noise-multiplier {}", dp.count_noise_multiplier)
                } else {
                    String::new()
                },
                dp.target_delta
            ),
            None => format!(
                "fedflow-client privacy report --privacy-dir SITE_PRIVACY_DIR --delta {:e}   \
                 (at each site: its ledger is authoritative)",
                dp.target_delta
            ),
        });
    }
    Ok(PrivacyAudit {
        schema: SCHEMA,
        generated_unix_ms: now_ms,
        code_version: format!("fedflow-coordinator {}", env!("CARGO_PKG_VERSION")),
        run: info,
        summary,
        warnings,
        site_level,
        record_level,
        compression: compression::note(cfg),
        not_covered,
        recompute,
        empirical,
    })
}

/// ε for a sentence (∞ when unbounded).
fn fmt_eps(e: Option<f64>) -> String {
    e.map_or("∞".to_string(), |e| format!("{e:.4}"))
}

/// The report's one line: each level's headline figure and whom it holds against.
fn summary(site: Option<&SiteLevel>, record: Option<&RecordLevel>) -> String {
    let mut parts = Vec::new();
    if let Some(s) = site {
        let head = format!(
            "site level ({} mode): ε = {} at δ = {:e} over {} released round(s)",
            s.trust_mode,
            fmt_eps(s.cumulative[0].epsilon),
            s.target.delta,
            s.rounds.len(),
        );
        let one_site = s.against_sites.as_ref().and_then(|a| {
            a.coalitions
                .iter()
                .find(|c| c.colluding_sites == Some(1))
                .or(a.coalitions.last())
        });
        parts.push(match one_site {
            Some(c) => format!(
                "{head} against those who see only the released models; against {} only \
                 ε = {}, and against the coordinator each update's own share (see \
                 against_sites and against_coordinator)",
                match c.colluding_sites {
                    Some(1) => "any one other site (which knows its own noise share)",
                    _ => "the other contributing sites together (which know their own shares)",
                },
                fmt_eps(c.cumulative[0].epsilon)
            ),
            None => format!("{head}, against {}", s.protects_against),
        });
        if s.seeded_rounds > 0 {
            parts.insert(
                0,
                format!(
                    "WARNING: the coordinator's randomness was SEEDED in {} of {} round(s) (a \
                 simulation or test, not the operating system): see warnings",
                    s.seeded_rounds,
                    s.rounds.len()
                ),
            );
        }
    }
    if let Some(r) = record {
        parts.push(format!(
            "record level (DP-SGD at every site): ε ≤ {} at δ = {:e} per site as each \
             fedflow site's own ledger enforces (it declines rounds past the run's target); \
             {}",
            r.target.epsilon,
            r.target.delta,
            match r.worst_epsilon {
                Some(e) => format!(
                    "from the updates this coordinator counted, at least {e:.4} for the \
                     site that sent the most (a lower bound: see counting)"
                ),
                None => "each site's exact figure is in its own report".to_string(),
            }
        ));
    }
    if parts.is_empty() {
        "no differential privacy: this run's released models carry no formal privacy \
         guarantee (ε = ∞) for sites or their records"
            .to_string()
    } else {
        parts.join("; ")
    }
}
