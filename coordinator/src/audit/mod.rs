//! The run's privacy-audit report: what privacy guarantee a run actually delivered, at both
//! levels, with every parameter needed to check it and the commands that recompute it.
//!
//! - **Site level** (`[site_dp]`), from the coordinator's append-only ledger
//!   (`site_dp_rounds`, `site_dp_uploads`): the trust mode and whom it protects against, the
//!   privacy unit and neighbouring relation, the sampling and its assumption, the
//!   accountant, ε per round and cumulative at the target δ and other δ, and in the
//!   distributed and local modes each site's guarantee against the coordinator itself.
//! - **Record level** (`[record_dp]`), from the DP-SGD parameters the run dictated and what
//!   each site reported: the ε every site spent (computable here when sites share a
//!   sampling rate; otherwise it depends on the site's size, which only its own ledger
//!   knows), and the sites' declines.
//!
//! The JSON (schema `fedflow.privacy-audit/1`) is documented field by field on
//! [`PrivacyAudit`]; fields are only ever added. [`to_html`] renders it as a self-contained
//! page, summary first.
//!
//! Kept as one file (about 680 lines): the report's types and the site- and record-level
//! builders that fill them are read side by side, field by field.

use std::collections::BTreeMap;

use fedflow_common::privacy::{RdpAccountant, SampledGaussian};
use fedflow_common::report::finite;
use serde::Serialize;

use crate::Result;
use crate::config::RunConfig;
use crate::store::{SiteDpRound, SiteState, Store};

mod html;

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
    /// Site-level DP, if the run had it.
    pub site_level: Option<SiteLevel>,
    /// Record-level DP, if the run had it.
    pub record_level: Option<RecordLevel>,
    /// What no guarantee here covers.
    pub not_covered: Vec<String>,
    /// Commands that recompute every figure.
    pub recompute: Vec<String>,
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
    /// (null, unbounded, when a committed round is missing from the ledger).
    pub cumulative: Vec<EpsilonAt>,
    /// Committed rounds without a ledger row (0 unless the run's DP settings were changed
    /// outside fedflow): each voids the guarantee.
    pub unrecorded_rounds: u64,
    /// Every released round as the ledger recorded it, with ε recomputed here.
    pub rounds: Vec<SiteRound>,
    /// The distributed and local modes: each site's guarantee against the coordinator.
    pub against_coordinator: Option<AgainstCoordinator>,
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
    /// Per site: rounds contributed, declines, and ε when computable here.
    pub sites: Vec<RecordSite>,
    /// The largest per-site ε computable here (null: none computable, or unbounded).
    pub worst_epsilon: Option<f64>,
    /// ε at the target δ after r rounds of a site that contributed to every round, for
    /// r = 1, 2, ... up to the rounds released (empty when ε depends on each site's size).
    pub every_round_epsilon: Vec<Option<f64>>,
    /// Where each site's authoritative figure is.
    pub authoritative: String,
}

/// One site at record level.
#[derive(Debug, Clone, Serialize)]
pub struct RecordSite {
    /// The site.
    pub site_id: String,
    /// Rounds it contributed an update to (committed).
    pub rounds_contributed: u64,
    /// Rounds it declined, with the reasons.
    pub declined: Vec<String>,
    /// Training examples it reported last.
    pub train_examples: Option<u64>,
    /// ε at the target δ, when the shared sampling rate makes it computable here.
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

/// Builds the report of `run_id` (the only run in `store` when `None`) and writes
/// [`JSON_FILE`] and [`HTML_FILE`] into `out` (created if needed; each file written
/// atomically). Returns the report.
pub fn write(store: &Store, run_id: Option<&str>, out: &std::path::Path) -> Result<PrivacyAudit> {
    let run_id = resolve_run(store, run_id)?;
    let now = fedflow_common::clock::now_ms();
    let report = build(store, &run_id, now)?;
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
    let run = store
        .run(run_id)?
        .ok_or_else(|| crate::Error::NotFound(format!("no run {run_id} in this data directory")))?;
    let cfg: RunConfig = serde_json::from_str(&run.config_json).map_err(|e| {
        crate::Error::Store(format!(
            "run {run_id}: its recorded configuration does not parse: {e}"
        ))
    })?;
    let cfg = &cfg;
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
        .map(|dp| site_level(store, run_id, cfg, dp, committed.len() as u64))
        .transpose()?;
    let record_level = cfg
        .record_dp
        .as_ref()
        .map(|dp| record_level(store, run_id, cfg, dp, &committed))
        .transpose()?;
    let fmt = |e: Option<f64>| e.map_or("∞".to_string(), |e| format!("{e:.4}"));
    let mut summary = Vec::new();
    if let Some(s) = &site_level {
        summary.push(format!(
            "site level ({} mode): ε = {} at δ = {:e} over {} released round(s), against {}",
            s.trust_mode,
            fmt(s.cumulative[0].epsilon),
            s.target.delta,
            s.rounds.len(),
            s.protects_against
        ));
    }
    if let Some(r) = &record_level {
        summary.push(format!(
            "record level (DP-SGD at every site): ε ≤ {} at δ = {:e} per site (target {})",
            r.worst_epsilon.map_or(
                "the figure in each site's own report".to_string(),
                |e| format!("{e:.4}")
            ),
            r.target.delta,
            r.target.epsilon
        ));
    }
    let summary = if summary.is_empty() {
        "no differential privacy: this run's released models carry no formal privacy \
         guarantee (ε = ∞) for sites or their records"
            .to_string()
    } else {
        summary.join("; ")
    };
    let mut not_covered = vec![
        "metrics the sites reported (training loss, validation and evaluation metrics) unless \
         they withheld them: they are computed on site data and released without noise"
            .to_string(),
        "hyper-parameter tuning and any run not recorded in this data directory: repeated runs \
         on the same data compose, and their cost is not in this report"
            .to_string(),
        "the number of training examples each site reports (its FedAvg weight, ignored under \
         site-level DP) and the fact that a site is enrolled"
            .to_string(),
    ];
    if site_level.is_some() {
        not_covered.push(
            "per-round participation figures — selected, contributions, the exact clipped \
             fraction — which the coordinator's ledger and THIS REPORT show (share the report \
             only with those the coordinator is trusted with, or drop its per-round table), and \
             round timing (a round closes as soon as every sampled site has answered, which \
             tells its sites how many were sampled)"
                .to_string(),
        );
    }
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
                "fedflow-client privacy plan --q {q} --noise-multiplier {} --steps {} \
                 --rounds R --delta {:e}   (R = the rounds a site contributed to)",
                dp.noise_multiplier,
                fedflow_common::privacy::planner::dpsgd_round_at_rate(
                    1,
                    q,
                    cfg.train.epochs as u64,
                    dp.noise_multiplier
                )?
                .steps,
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
        site_level,
        record_level,
        not_covered,
        recompute,
    })
}

fn site_level(
    store: &Store,
    run_id: &str,
    cfg: &RunConfig,
    dp: &crate::config::SiteDpSection,
    committed: u64,
) -> Result<SiteLevel> {
    use fedflow_common::privacy::dpfedavg::{Relation, SiteSampling, TrustMode};
    let ledger = store.site_dp_rounds(run_id)?;
    // Every committed round must be in the ledger; one that is not (impossible while the
    // engine refuses to resume with another [site_dp]) makes the guarantee unbounded.
    let unrecorded_rounds = committed.saturating_sub(ledger.len() as u64);
    let mut acc = RdpAccountant::default();
    let mut rounds = Vec::with_capacity(ledger.len());
    for row in ledger {
        acc.compose(&SampledGaussian {
            q: row.sampling_rate,
            z: row.noise_multiplier,
            steps: 1,
        })?;
        let (e, _) = acc.epsilon(dp.target_delta)?;
        rounds.push(SiteRound {
            ledger: row,
            epsilon_recomputed: finite(e),
        });
    }
    let mech = dp.site_dp();
    let (protects, not) = match dp.mode {
        TrustMode::Central => (
            "everyone who sees the released models (model users, other sites, outsiders)",
            "the coordinator and its operators, who see every clipped update in the clear",
        ),
        TrustMode::Distributed => (
            "everyone who sees the released models; against the coordinator only each \
             update's own share of the noise (see against_coordinator)",
            "a coordinator that publishes individual updates or skips its top-up (no secure \
             aggregation yet); sites that skip their share",
        ),
        TrustMode::Local => (
            "everyone, the coordinator included (each update carries the full noise)",
            "nothing beyond what the stated ε allows; a coordinator that skips its top-up \
             when nobody contributed",
        ),
    };
    let against_coordinator = match mech.coordinator_event()? {
        None => None,
        Some(event) => {
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
            Some(AgainstCoordinator {
                neighbouring_relation: "zero-out: the site's data replaced by data whose update \
                                        is zero (Kairouz et al. 2021); the coordinator knows \
                                        which sites sent updates"
                    .into(),
                per_update_noise_multiplier: event.z,
                sites,
                worst_epsilon: worst,
            })
        }
    };
    let event = dp.round_event(&cfg.sampling);
    let central = dp.mode == TrustMode::Central;
    let assumption = match dp.sampling(&cfg.sampling) {
        SiteSampling::Poisson(q) if central => format!(
            "each available site takes part in each round independently with probability \
             q = {q}, drawn from the coordinator's CSPRNG (seeded from the operating system) and \
             kept secret from the sites; a site that is not connected is included with \
             probability 0 ≤ q, which the bound covers; amplification by subsampling is used"
        ),
        SiteSampling::Poisson(q) => format!(
            "Poisson sampling at q = {q}, but no amplification is claimed (rate 1 in the \
             accountant): under the zero-out relation of this mode a site's own noise share \
             makes the noise depend on whether it takes part"
        ),
        SiteSampling::All => {
            "every available site in every round: no amplification (rate 1)".to_string()
        }
        SiteSampling::FixedSize if central => "a sample of the size [sampling] sets, drawn \
             uniformly from the available sites with the coordinator's CSPRNG: no amplification \
             (rate 1), and adding a site can displace another, so one site changes a round's \
             sum by up to 2C: charged with z/2"
            .to_string(),
        SiteSampling::FixedSize => "a sample of the size [sampling] sets, drawn uniformly with \
             the coordinator's CSPRNG: no amplification (rate 1); under zero-out the site takes \
             part either way, so the sensitivity stays C"
            .to_string(),
    };
    let sampling = Sampling {
        method: dp.sampling(&cfg.sampling).name().into(),
        rate: Some(event.q),
        assumption,
    };
    let relation = match dp.site_dp().relation() {
        Relation::AddRemove => "add or remove one site: hides whether a site took part",
        Relation::ZeroOut => {
            "zero-out: one site's data replaced by data whose update is zero (Kairouz et al. \
             2021): hides what a site contributed, not whether it took part"
        }
    };
    Ok(SiteLevel {
        trust_mode: dp.mode.to_string(),
        protects_against: protects.into(),
        does_not_protect_against: not.into(),
        privacy_unit: "a partner site: all of its updates in every round".into(),
        neighbouring_relation: relation.into(),
        round_event: event,
        sampling,
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
        accountant: "Rényi DP of the Poisson-subsampled Gaussian mechanism, a port of \
                     dp_accounting 0.6.0 RdpAccountant (orders 1.1 to 1024), converted with \
                     Canonne, Kamath, Steinke 2020"
            .into(),
        target: Target {
            epsilon: dp.target_epsilon,
            delta: dp.target_delta,
        },
        cumulative: at_deltas(&acc, dp.target_delta)?
            .into_iter()
            .map(|e| EpsilonAt {
                epsilon: e.epsilon.filter(|_| unrecorded_rounds == 0),
                ..e
            })
            .collect(),
        unrecorded_rounds,
        rounds,
        against_coordinator,
    })
}

fn record_level(
    store: &Store,
    run_id: &str,
    cfg: &RunConfig,
    dp: &crate::config::RecordDpSection,
    committed: &[u64],
) -> Result<RecordLevel> {
    let mut sites: BTreeMap<String, RecordSite> = BTreeMap::new();
    for &round in committed {
        for s in store.round_sites(run_id, round)? {
            let e = sites
                .entry(s.site_id.clone())
                .or_insert_with(|| RecordSite {
                    site_id: s.site_id.clone(),
                    rounds_contributed: 0,
                    declined: Vec::new(),
                    train_examples: None,
                    epsilon: None,
                });
            match s.state {
                SiteState::Uploaded => {
                    e.rounds_contributed += 1;
                    e.train_examples = s.train_examples.or(e.train_examples);
                }
                SiteState::Declined => e
                    .declined
                    .push(format!("round {round}: {}", s.reason.unwrap_or_default())),
                _ => {}
            }
        }
    }
    let every_round_epsilon = match dp.sampling_rate {
        Some(_) => (1..=committed.len() as u64)
            .map(|r| Ok(finite(dp.site_epsilon(1, cfg.train.epochs, r)?)))
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let mut worst: Option<f64> = None;
    for s in sites.values_mut() {
        // With a shared sampling rate every site's round costs the same, whatever its size.
        if dp.sampling_rate.is_some() && s.rounds_contributed > 0 {
            let e = dp.site_epsilon(1, cfg.train.epochs, s.rounds_contributed)?;
            s.epsilon = finite(e);
            worst = Some(worst.map_or(e, |w: f64| w.max(e)));
        }
    }
    let sampling = match (dp.sampling_rate, dp.expected_batch_size) {
        (Some(q), _) => Sampling {
            method: "poisson".into(),
            rate: Some(q),
            assumption: "each privacy unit joins each DP-SGD step independently with \
                         probability q, drawn from the site's CSPRNG"
                .into(),
        },
        (None, b) => Sampling {
            method: "poisson".into(),
            rate: None,
            assumption: format!(
                "each privacy unit joins each step independently with probability B / n \
                 (B = {}), so ε depends on each site's n, known only to the site",
                b.unwrap_or(0)
            ),
        },
    };
    Ok(RecordLevel {
        dp_sgd: serde_json::to_value(dp).unwrap_or_default(),
        protects_against: "everyone outside the site, the coordinator included: each site's \
                           update is DP-SGD output on its own records"
            .into(),
        privacy_unit: dp.unit.to_string(),
        neighbouring_relation: "add or remove one privacy unit at one site".into(),
        sampling,
        accountant: "the same RDP accountant, one Poisson-subsampled Gaussian event per round"
            .into(),
        target: Target {
            epsilon: dp.target_epsilon,
            delta: dp.target_delta,
        },
        sites: sites.into_values().collect(),
        worst_epsilon: worst,
        every_round_epsilon,
        authoritative: "each site's own ledger (fedflow-client privacy report), which also \
                        counts its releases to other runs and retries"
            .into(),
    })
}
