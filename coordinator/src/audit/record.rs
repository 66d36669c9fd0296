//! The record-level section of the privacy-audit report: the DP-SGD parameters the run
//! dictated and what the coordinator saw of each site. The coordinator sees only part of
//! what a site released, so its per-site figures are lower bounds; each site's own ledger
//! holds the exact figure.

use std::collections::BTreeMap;

use fedflow_common::report::finite;

use super::{RecordLevel, RecordSite, Sampling, Target};
use crate::Result;
use crate::config::{RecordDpSection, RunConfig};
use crate::store::{SiteState, Store};

fn site_entry<'a>(
    sites: &'a mut BTreeMap<String, RecordSite>,
    site_id: &str,
) -> &'a mut RecordSite {
    sites
        .entry(site_id.to_string())
        .or_insert_with(|| RecordSite {
            site_id: site_id.to_string(),
            rounds_contributed: 0,
            updates_received: None,
            declined: Vec::new(),
            train_examples: None,
            epsilon: None,
        })
}

/// The record-level section of `run_id`'s report (`committed`: its committed rounds).
pub(super) fn record_level(
    store: &Store,
    run_id: &str,
    cfg: &RunConfig,
    dp: &RecordDpSection,
    committed: &[u64],
) -> Result<RecordLevel> {
    let mut sites: BTreeMap<String, RecordSite> = BTreeMap::new();
    for &round in committed {
        for s in store.round_sites(run_id, round)? {
            let e = site_entry(&mut sites, &s.site_id);
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
    // With site-level DP the coordinator's ledger has every update that reached the round
    // engine, refused and retried rounds' ones included: each is a DP-SGD release too.
    let received = cfg.site_dp.is_some();
    if received {
        for s in sites.values_mut() {
            s.updates_received = Some(0);
        }
        for u in store.site_dp_uploads(run_id)? {
            let e = site_entry(&mut sites, &u.site_id);
            *e.updates_received.get_or_insert(0) += 1;
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
        let counted = s.rounds_contributed.max(s.updates_received.unwrap_or(0));
        if dp.sampling_rate.is_some() && counted > 0 {
            let e = dp.site_epsilon(1, cfg.train.epochs, counted)?;
            s.epsilon = finite(e);
            worst = Some(worst.map_or(e, |w: f64| w.max(e)));
        }
    }
    let counted_here = if received {
        "every update of the site that reached the round engine (updates_received, from the \
         site-level ledger, refused ones and those of re-run rounds included)"
    } else {
        "the site's updates in the rounds this coordinator committed (rounds_contributed)"
    };
    let counting = format!(
        "each site's ε here is a LOWER BOUND on what it spent in this run: it charges {counted_here}, \
         but the site also paid for updates this count misses ({}uploads refused while they \
         arrived, which only the security audit log records); a fedflow site declines any \
         round that would take its own ledger, all runs together, past the run's target ε = \
         {} at δ = {:e}, and its ledger (fedflow-client privacy report) has the exact figure",
        if received {
            ""
        } else {
            "those of rounds that were retried, whose rows are replaced, updates refused by the \
             round engine, and "
        },
        dp.target_epsilon,
        dp.target_delta
    );
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
                 (B = {}), so ε depends on each site's number n of privacy units: the \
                 coordinator sees only the training-example count each site reports (the \
                 examples column), which it cannot verify and which is not the number of \
                 units under user-level DP, so each site's figure is in its own report",
                b.unwrap_or(0)
            ),
        },
    };
    Ok(RecordLevel {
        dp_sgd: serde_json::to_value(dp).unwrap_or_default(),
        protects_against: "everyone outside the site, the coordinator included, for the \
                           site's model updates: each is DP-SGD output on its own records \
                           (what else a site sends is in not_covered)"
            .into(),
        privacy_unit: dp.unit.to_string(),
        neighbouring_relation: "add or remove one privacy unit at one site".into(),
        sampling,
        accountant: "the sites' accountants, one Poisson-subsampled Gaussian event per round: \
                     the smaller of the RDP and PLD bounds, as a site's ledger states and \
                     enforces it"
            .into(),
        target: Target {
            epsilon: dp.target_epsilon,
            delta: dp.target_delta,
        },
        counting,
        sites: sites.into_values().collect(),
        worst_epsilon: worst,
        every_round_epsilon,
        authoritative: "each site's own ledger (fedflow-client privacy report), which also \
                        counts its releases to other runs and retries"
            .into(),
        counts: if dp.count_noise_multiplier > 0.0 {
            format!(
                "noisy: each site sends round(n + N(0, z²)) with z = {} as its FedAvg weight (n \
                 its privacy units; a Gaussian mechanism of sensitivity 1), charged to its \
                 ledger with every update and included in the figures here; FedAvg weights \
                 by these noisy counts",
                dp.count_noise_multiplier
            )
        } else {
            "in the clear (record_dp.count_noise_multiplier = 0): each site's exact number of \
             training examples goes out with every update as its FedAvg weight, outside the \
             guarantee"
                .into()
        },
    })
}
