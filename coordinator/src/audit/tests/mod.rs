//! The privacy-audit report's figures and sentences, on stores filled directly (no round
//! engine): seeded coordinator randomness, δ against 1/n, the record-level lower bound, and
//! what each mode says about other sites and about metrics. `reference.rs` checks the
//! figures against colluding sites against `dp_accounting`.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use fedflow_common::data::Vocab;
use fedflow_common::params::ParamSet;
use fedflow_common::privacy::audit::{AuditOutcome, AuditPoint, EmpiricalAudit, Guesses, Level};
use fedflow_common::privacy::{RdpAccountant, SampledGaussian};

use super::*;
use crate::store::{SiteDpUpload, SiteOutcome, SiteState};

mod reference;

/// Whether `got` is within `rel` of `want`, relatively.
fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(1e-300)
}

// --- Whole reports, from a store filled directly ------------------------------------------

struct Run {
    _dir: tempfile::TempDir,
    store: Store,
    cfg: RunConfig,
    /// Every released round composed, for the ledger rows' `epsilon`.
    acc: RdpAccountant,
}

fn model() -> ParamSet {
    let mut m = BTreeMap::new();
    m.insert(
        "head.weight".to_string(),
        Tensor::from_vec(vec![0.5f32; 6], (2, 3), &Device::Cpu).unwrap(),
    );
    ParamSet::from_tensors(m).unwrap()
}

/// A run "t" whose configuration ends with `dp` (the `[site_dp]` and/or `[record_dp]`
/// tables), created in a fresh store; `sites` sites have contacted the coordinator.
fn run(dp: &str, sites: usize) -> Run {
    let dir = tempfile::tempdir().unwrap();
    Vocab::from_events(["a", "b", "c"])
        .unwrap()
        .save(dir.path().join("vocab.json"))
        .unwrap();
    let text = format!(
        "[run]\nname = \"t\"\nseed = 1\nrounds = 5\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 4\nhidden_size = 4\nnum_layers = 1\n\
         [sampling]\nfraction = 1.0\nmin_selected = 1\nmin_available = 1\n\
         [rounds]\ndeadline_secs = 60\nmin_completed = 1\nheartbeat_timeout_secs = 30\n\
         [evaluation]\nevery = 0\nfinal_round = false\n{dp}"
    );
    let cfg = RunConfig::from_toml_str(&text, dir.path()).unwrap();
    let mut store = Store::open(dir.path().join("data")).unwrap();
    store
        .create_run(
            "t",
            &serde_json::to_string(&cfg).unwrap(),
            "fedavg",
            &model(),
        )
        .unwrap();
    for i in 0..sites {
        store.touch_site(&format!("site-{i:03}"), 1).unwrap();
    }
    Run {
        _dir: dir,
        store,
        cfg,
        acc: RdpAccountant::default(),
    }
}

impl Run {
    /// The ledger row of a round with `k` contributions, as the engine would write it.
    fn row(&mut self, round: u64, k: u64, seeded: bool) -> SiteDpRound {
        let dp = self.cfg.site_dp.as_ref().unwrap();
        let mech = dp.site_dp();
        let event = dp.round_event(&self.cfg.sampling);
        self.acc.compose(&event).unwrap();
        SiteDpRound {
            round,
            mode: dp.mode.to_string(),
            sampling: dp.sampling(&self.cfg.sampling).name().into(),
            sampling_rate: event.q,
            noise_multiplier: event.z,
            update_noise_multiplier: mech.update_multiplier().unwrap(),
            clip_norm: dp.clip_norm,
            expected_sites: dp.expected_sites,
            site_noise_std: mech.site_noise_std(dp.clip_norm).unwrap(),
            server_noise_std: mech.server_noise_std(dp.clip_norm, k).unwrap(),
            bit_noise_std: None,
            selected: k,
            contributions: k,
            clipped_fraction: None,
            noisy_unclipped_fraction: None,
            next_clip_norm: dp.clip_norm,
            epsilon: self.acc.epsilon(dp.target_delta).unwrap().0,
            epsilon_pld: None,
            target_delta: dp.target_delta,
            rdp: Vec::new(),
            seeded_randomness: seeded,
            recorded_at_ms: 0,
        }
    }

    /// Records an update of `site` reaching the engine (site-level runs).
    fn received(&mut self, round: u64, site: &str, task: &str) {
        let dp = self.cfg.site_dp.as_ref().unwrap();
        let upload = SiteDpUpload {
            round,
            site_id: site.into(),
            task_id: task.into(),
            delta_sha256: format!("{round}-{task}"),
            site_noise_std: dp.site_dp().site_noise_std(dp.clip_norm).unwrap(),
            clip_norm: dp.clip_norm,
        };
        self.store.record_site_dp_upload("t", &upload).unwrap();
    }

    /// Begins `round` with `sites` (name, training examples) uploading.
    fn begin(&mut self, round: u64, sites: &[(&str, u64)]) {
        let selected: Vec<(String, String)> = sites
            .iter()
            .map(|(s, _)| (s.to_string(), format!("task-{round}-{s}")))
            .collect();
        self.store.begin_round("t", round, &selected).unwrap();
        for (s, n) in sites {
            let outcome = SiteOutcome {
                train_examples: Some(*n),
                ..SiteOutcome::new(*s, SiteState::Uploaded, None)
            };
            self.store.record_site("t", round, &outcome).unwrap();
            if self.cfg.site_dp.is_some() {
                self.received(round, s, &format!("task-{round}-{s}"));
            }
        }
    }

    /// Runs and commits `round` with `sites` uploading (and its ledger row, if site-level).
    fn commit(&mut self, round: u64, sites: &[(&str, u64)], seeded: bool) {
        self.begin(round, sites);
        let row = self
            .cfg
            .site_dp
            .is_some()
            .then(|| self.row(round, sites.len() as u64, seeded));
        self.store
            .commit_round("t", round, &model(), None, None, row.as_ref())
            .unwrap();
    }

    fn report(&self) -> (PrivacyAudit, serde_json::Value, String) {
        let report = build(&self.store, "t", 0).unwrap();
        let json = serde_json::to_value(&report).unwrap();
        let html = to_html(&report).unwrap();
        (report, json, html)
    }
}

const SITES4: [(&str, u64); 4] = [
    ("site-000", 100),
    ("site-001", 100),
    ("site-002", 100),
    ("site-003", 100),
];

#[test]
fn a_distributed_run_states_its_guarantee_against_other_sites_and_the_metrics_it_leaves_out() {
    let mut r = run(
        "[site_dp]\nmode = \"distributed\"\nclip_norm = 0.5\nnoise_multiplier = 1.5\n\
         expected_sites = 4\ntarget_epsilon = 100\ntarget_delta = 1e-5\n",
        4,
    );
    for round in 1..=3 {
        r.commit(round, &SITES4, false);
    }
    let (report, json, html) = r.report();
    let site = report.site_level.as_ref().unwrap();
    let a = site.against_sites.as_ref().unwrap();
    // t = 1 and 2 (below the 4 contributions), then everyone else.
    let sizes: Vec<Option<u64>> = a.coalitions.iter().map(|c| c.colluding_sites).collect();
    assert_eq!(sizes, vec![Some(1), Some(2), None]);
    // Against one site: z·√(1 − 1/4) per round, three rounds, no amplification.
    let mut acc = RdpAccountant::default();
    acc.compose(&SampledGaussian {
        q: 1.0,
        z: 1.5 * 0.75f64.sqrt(),
        steps: 3,
    })
    .unwrap();
    let one = acc.epsilon(1e-5).unwrap().0;
    let stated = a.coalitions[0].cumulative[0].epsilon.unwrap();
    assert!(close(stated, one, 1e-12), "{stated} vs {one}");
    assert!(stated > site.cumulative[0].epsilon.unwrap());
    assert!(close(
        a.coalitions[0].min_noise_multiplier.unwrap(),
        1.5 * 0.75f64.sqrt(),
        1e-12
    ));
    assert_eq!(
        json["site_level"]["against_sites"]["coalitions"][0]["colluding_sites"],
        1
    );
    assert!(json["site_level"]["against_sites"]["coalitions"][2]["colluding_sites"].is_null());
    // The sentences: outsiders get the downstream ε, other sites the weaker one.
    assert!(
        report.summary.contains(&format!(
            "against those who see only the released models; against any one other site \
             (which knows its own noise share) only ε = {stated:.4}"
        )),
        "{}",
        report.summary
    );
    assert!(
        !report
            .summary
            .contains("everyone who sees the released models")
    );
    assert!(
        site.protects_against
            .contains("other sites, which also know their own noise shares, only at the weaker ε"),
        "{}",
        site.protects_against
    );
    assert!(!site.protects_against.contains("everyone"));
    // Metrics go out in the clear unless the site withholds them.
    assert!(
        site.does_not_protect_against.contains(
            "validation loss, accuracy and macro-F1, epochs run), computed on its data and \
             sent to the coordinator without noise unless the site withholds them"
        ),
        "{}",
        site.does_not_protect_against
    );
    assert!(html.contains("Each site against other sites"));
    assert!(
        html.contains(&format!("<td>{stated:.4}</td>")),
        "the t = 1 row"
    );
    assert!(html.contains("every other contributing site"));
    // Unseeded, few sites, δ far below 1/4: nothing to warn about.
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert!(!html.contains("<h2>Warnings</h2>"));
}

#[test]
fn local_and_central_modes_state_no_figure_against_sites_and_local_names_the_metrics() {
    let local = {
        let mut r = run(
            "[site_dp]\nmode = \"local\"\nclip_norm = 0.5\nnoise_multiplier = 1.5\n\
             expected_sites = 4\ntarget_epsilon = 100\ntarget_delta = 1e-5\n",
            4,
        );
        r.commit(1, &SITES4, false);
        r.report().0
    };
    let s = local.site_level.as_ref().unwrap();
    assert!(s.against_sites.is_none());
    assert!(s.protects_against.contains("the coordinator included"));
    assert!(s.protects_against.ends_with("for the model updates"));
    assert!(
        s.does_not_protect_against
            .contains("sent to the coordinator without noise unless the site withholds them"),
        "{}",
        s.does_not_protect_against
    );
    assert!(!s.does_not_protect_against.contains("nothing beyond"));
    let central = {
        let mut r = run(
            "[site_dp]\nclip_norm = 0.5\nnoise_multiplier = 1.5\nexpected_sites = 4\n\
             target_epsilon = 100\ntarget_delta = 1e-5\n",
            4,
        );
        r.commit(1, &SITES4, false);
        r.report().0
    };
    let s = central.site_level.as_ref().unwrap();
    assert!(s.against_sites.is_none() && s.against_coordinator.is_none());
    assert!(
        central
            .summary
            .contains("against everyone who sees the released models")
    );
}

#[test]
fn seeded_coordinator_randomness_is_reported_first_and_never_as_os_seeded() {
    let dp = "[site_dp]\nclip_norm = 0.5\nnoise_multiplier = 1.5\nsampling_rate = 0.5\n\
              expected_sites = 2\ntarget_epsilon = 100\ntarget_delta = 1e-5\n";
    let mut seeded = run(dp, 4);
    seeded.commit(1, &SITES4[..2], false);
    seeded.commit(2, &SITES4[..3], true);
    let (report, json, html) = seeded.report();
    let site = report.site_level.as_ref().unwrap();
    assert_eq!(site.seeded_rounds, 1);
    assert_eq!(json["site_level"]["seeded_rounds"], 1);
    assert!(
        site.coordinator_randomness
            .starts_with("SEEDED: in 1 of the 2 released round(s)")
    );
    assert!(
        report
            .summary
            .starts_with("WARNING: the coordinator's randomness was SEEDED in 1 of 2"),
        "{}",
        report.summary
    );
    assert!(report.warnings[0].starts_with("site level: NOT A DEPLOYMENT GUARANTEE. SEEDED"));
    assert!(
        site.sampling
            .assumption
            .contains("FIXED SEED in 1 round(s)")
    );
    let text = serde_json::to_string(&json).unwrap();
    assert!(!text.contains("seeded from the operating system"), "{text}");
    assert!(!html.contains("seeded from the operating system"));
    // On the page the warning comes right after the summary, before any figure.
    let (summary, warn, first) = (
        html.find("class=\"summary\"").unwrap(),
        html.find("<h2>Warnings</h2>").unwrap(),
        html.find("Site level (DP-FedAvg)").unwrap(),
    );
    assert!(summary < warn && warn < first);
    assert!(html.contains("<td>SEEDED</td>") && html.contains("<td>OS</td>"));

    // The same run drawn from the operating system says so, and warns of nothing.
    let mut os = run(dp, 4);
    os.commit(1, &SITES4[..2], false);
    let (report, _, _) = os.report();
    let site = report.site_level.as_ref().unwrap();
    assert_eq!(site.seeded_rounds, 0);
    assert!(
        site.sampling
            .assumption
            .contains("seeded from the operating system")
    );
    assert!(
        site.coordinator_randomness
            .contains("seeded from the operating system in every")
    );
    assert!(report.warnings.is_empty() && !report.summary.contains("SEEDED"));
}

#[test]
fn a_delta_not_below_one_over_n_is_warned_at_both_levels() {
    // Site level: δ = 0.1 with 20 sites seen is not below 1/20; 1e-3 is.
    let dp = "[site_dp]\nclip_norm = 0.5\nnoise_multiplier = 2.0\nexpected_sites = 2\n\
              target_epsilon = 100\ntarget_delta = 0.1\n\
              [record_dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nsampling_rate = 0.1\n\
              target_epsilon = 100\ntarget_delta = 0.01\n";
    let mut r = run(dp, 20);
    r.commit(1, &[("site-000", 200), ("site-001", 50)], false);
    let (report, _, html) = r.report();
    let site = report.site_level.as_ref().unwrap();
    assert_eq!(site.sites_seen, 20);
    let w = &report.warnings;
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with(
            "site level: δ = 1e-1 (the run's target) is not below 1/n for the n = 20 sites"
        ),
        "{}",
        w[0]
    );
    assert!(!w[0].contains("1e-3"), "1e-3 < 1/20: {}", w[0]);
    // Record level: δ = 0.01 is not below 1/200 (site-000) but is below 1/50 (site-001).
    assert!(
        w[1].starts_with(
            "record level: the run's δ = 1e-2 is not below 1/n for site-000 (n = 200)"
        ),
        "{}",
        w[1]
    );
    assert!(!w[1].contains("site-001"));
    assert!(w.iter().all(|w| w.contains("Dwork and Roth 2014")));
    assert!(html.contains("<h2>Warnings</h2>") && html.contains("site-000 (n = 200)"));

    // Fewer sites and larger sites: no warning.
    let mut r = run(dp, 5);
    r.commit(1, &[("site-000", 99), ("site-001", 50)], false);
    assert!(r.report().0.warnings.is_empty());
}

#[test]
fn record_level_figures_are_lower_bounds_counting_every_update_received() {
    let record = "[record_dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nsampling_rate = 0.1\n\
                  target_epsilon = 30\ntarget_delta = 1e-5\n";
    // Record level alone: a retried round's rows are replaced, so the count misses them.
    let mut r = run(record, 2);
    r.begin(1, &[("site-000", 100), ("site-001", 100)]);
    r.store.fail_round("t", 1, "deadline").unwrap();
    r.commit(1, &[("site-000", 100)], false);
    r.commit(2, &[("site-000", 100), ("site-001", 100)], false);
    let (report, json, html) = r.report();
    let rec = report.record_level.as_ref().unwrap();
    let dp = r.cfg.record_dp.as_ref().unwrap();
    let s0 = &rec.sites[0];
    assert_eq!((s0.rounds_contributed, s0.updates_received), (2, None));
    let two = dp.site_epsilon(1, r.cfg.train.epochs, 2).unwrap();
    assert!(close(s0.epsilon.unwrap(), two, 1e-12));
    assert!(
        rec.counting
            .starts_with("each site's ε here is a LOWER BOUND")
    );
    assert!(rec.counting.contains("those of rounds that were retried"));
    assert!(
        rec.counting
            .contains("past the run's target ε = 30 at δ = 1e-5")
    );
    assert!(
        report.summary.contains(&format!(
            "record level (DP-SGD at every site): ε ≤ 30 at δ = 1e-5 per site as each fedflow \
             site's own ledger enforces (it declines rounds past the run's target); from the \
             updates this coordinator counted, at least {two:.4} for the site that sent the \
             most (a lower bound: see counting)"
        )),
        "{}",
        report.summary
    );
    assert!(!report.summary.contains(&format!("ε ≤ {two:.4}")));
    assert!(json["record_level"]["sites"][0]["updates_received"].is_null());
    assert!(html.contains(&format!("≥ {two:.4}")) && html.contains("ε (lower bound)"));
    // Readable: the DP-SGD parameters as a table, commands in wrapping blocks, times in UTC.
    assert!(html.contains("<h3>DP-SGD parameters</h3>"), "{html}");
    assert!(html.contains("<td>noise multiplier</td>") && !html.contains("{\"clip_norm\""));
    assert!(
        html.contains("<pre>fedflow-client privacy plan") && html.contains("white-space:pre-wrap")
    );
    assert!(html.contains("generated 1970-01-01 00:00:00 UTC") && !html.contains("Unix ms"));

    // With site-level DP the ledger has every update received, refused ones too.
    let both = format!(
        "[site_dp]\nmode = \"local\"\nclip_norm = 0.5\nnoise_multiplier = 1.0\n\
         expected_sites = 2\ntarget_epsilon = 1000\ntarget_delta = 1e-5\n{record}"
    );
    let mut r = run(&both, 2);
    r.commit(1, &[("site-000", 100), ("site-001", 100)], false);
    r.received(2, "site-000", "refused-task");
    r.commit(2, &[("site-000", 100)], false);
    r.received(3, "site-001", "refused-again");
    let (report, _, _) = r.report();
    let rec = report.record_level.as_ref().unwrap();
    let counts: Vec<(u64, Option<u64>)> = rec
        .sites
        .iter()
        .map(|s| (s.rounds_contributed, s.updates_received))
        .collect();
    assert_eq!(counts, vec![(2, Some(3)), (1, Some(2))]);
    let dp = r.cfg.record_dp.as_ref().unwrap();
    let three = dp.site_epsilon(1, r.cfg.train.epochs, 3).unwrap();
    assert!(close(rec.sites[0].epsilon.unwrap(), three, 1e-12));
    assert!(close(rec.worst_epsilon.unwrap(), three, 1e-12));
    assert!(
        rec.counting
            .contains("every update of the site that reached the round engine")
    );
    assert!(!rec.counting.contains("retried"));
}

#[test]
fn a_site_whose_counted_updates_pass_the_target_is_warned_about() {
    let record = |target: f64| {
        format!(
            "[record_dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nsampling_rate = 0.1\n\
             target_epsilon = {target}\ntarget_delta = 1e-5\n"
        )
    };
    let probe = run(&record(30.0), 1);
    let dp = probe.cfg.record_dp.as_ref().unwrap();
    let epochs = probe.cfg.train.epochs;
    let (one, two) = (
        dp.site_epsilon(1, epochs, 1).unwrap(),
        dp.site_epsilon(1, epochs, 2).unwrap(),
    );
    // A target between one and two rounds' cost: a site counted in two rounds passed it.
    let mut r = run(&record((one + two) / 2.0), 2);
    r.commit(1, &[("site-000", 100), ("site-001", 100)], false);
    r.commit(2, &[("site-000", 100)], false);
    let w = r.report().0.warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("record level: the updates this coordinator counted already cost more")
            && w[0].contains(&format!("site-000 (at least {two:.4})"))
            && !w[0].contains("site-001"),
        "{}",
        w[0]
    );
}

#[test]
fn the_sites_own_size_is_not_called_private_to_the_site() {
    let mut r = run(
        "[record_dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nexpected_batch_size = 8\n\
         target_epsilon = 30\ntarget_delta = 1e-5\n",
        1,
    );
    r.commit(1, &[("site-000", 100)], false);
    let (report, _, html) = r.report();
    let rec = report.record_level.as_ref().unwrap();
    assert_eq!(rec.sites[0].train_examples, Some(100));
    assert!(rec.sites[0].epsilon.is_none());
    let a = &rec.sampling.assumption;
    assert!(!a.contains("known only to the site"), "{a}");
    assert!(
        a.contains("the coordinator sees only the training-example count each site reports"),
        "{a}"
    );
    assert!(
        report
            .summary
            .contains("each site's exact figure is in its own report")
    );
    assert!(html.contains("<td>in the site's report</td>"));
    // What no guarantee covers names the metrics sites send.
    assert!(report.not_covered[0].contains("validation loss, accuracy and macro-F1, epochs run"));
}

fn empirical_point(level: Level, q: f64, z: f64, steps: u64, bound: f64) -> AuditPoint {
    AuditPoint {
        level,
        target_epsilon: Some(8.0),
        noise_multiplier: z,
        sampling_rate: q,
        steps_per_round: steps,
        rounds: 5,
        delta: 1e-5,
        epsilon: Some(8.0),
        epsilon_pld: Some(8.0),
        epsilon_rdp: Some(9.0),
        audit: AuditOutcome {
            canaries: 1000,
            included: 497,
            delta: 1e-5,
            confidence: 0.95,
            grid: vec![(50, 50)],
            best: Guesses {
                k_plus: 50,
                k_minus: 50,
                guesses: 100,
                correct: 81,
            },
            epsilon_lower_bound: bound,
        },
        seconds: 1.0,
    }
}

#[test]
fn an_empirical_audit_is_attached_only_to_the_mechanism_it_audited() {
    let record = "[record_dp]\nclip_norm = 1.0\nnoise_multiplier = 1.25\nsampling_rate = 0.1\n\
                  target_epsilon = 30\ntarget_delta = 1e-5\n";
    let mut r = run(record, 2);
    r.commit(1, &[("site-000", 100), ("site-001", 100)], false);
    let steps = fedflow_common::privacy::planner::dpsgd_round_at_rate(
        1,
        0.1,
        r.cfg.train.epochs as u64,
        1.25,
    )
    .unwrap()
    .steps;
    let file = |points| EmpiricalAudit {
        schema: fedflow_common::privacy::audit::SCHEMA.into(),
        generated_at: "2026-12-03T00:00:00Z".into(),
        run_config: String::new(),
        points,
    };
    let out = tempfile::tempdir().unwrap();
    // One file with this run's record-level mechanism and another one's.
    let audits = [(
        "audit.json".to_string(),
        file(vec![
            empirical_point(Level::Record, 0.1, 1.25, steps, 1.234),
            empirical_point(Level::Record, 0.1, 2.5, steps, 0.5),
        ]),
    )];
    let report = write(&r.store, None, out.path(), &audits).unwrap();
    assert_eq!(report.empirical.len(), 1);
    assert_eq!(report.empirical[0].point.noise_multiplier, 1.25);
    assert!(report.empirical[0].meaning.contains("not a guarantee"));
    let html = std::fs::read_to_string(out.path().join(HTML_FILE)).unwrap();
    assert!(html.contains("Empirical check (a lower bound from a test, not a guarantee)"));
    assert!(html.contains("<td>1.234</td>"), "the bound is in the table");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join(JSON_FILE)).unwrap())
            .unwrap();
    assert_eq!(json["empirical"][0]["audit"]["epsilon_lower_bound"], 1.234);

    // Nothing of this run's mechanism: refused, both configurations named.
    for wrong in [
        empirical_point(Level::Record, 0.2, 1.25, steps, 1.0),
        empirical_point(Level::Record, 0.1, 1.25, steps + 1, 1.0),
        empirical_point(Level::Site, 0.1, 1.25, 1, 1.0),
    ] {
        let err = write(
            &r.store,
            None,
            out.path(),
            &[("other.json".to_string(), file(vec![wrong]))],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("other.json: none of its audits"), "{err}");
        assert!(
            err.contains("this run: Record level q = 0.1, z = 1.25"),
            "{err}"
        );
    }
    // Without any file the section is absent.
    let (plain, _, html) = r.report();
    assert!(plain.empirical.is_empty());
    assert!(!html.contains("Empirical check"));
}

#[test]
fn compression_is_stated_with_what_keeps_each_guarantee_exact() {
    let central = "[site_dp]\nclip_norm = 0.5\nnoise_multiplier = 1.5\nexpected_sites = 4\n\
                   target_epsilon = 100\ntarget_delta = 1e-5\n";
    let mut r = run(
        &format!("{central}[compression]\nvalues = \"int8\"\ntop_k = 0.1\nerror_feedback = true\n"),
        4,
    );
    r.commit(1, &SITES4, false);
    let (report, json, html) = r.report();
    let note = report.compression.as_ref().expect("compression stated");
    assert_eq!(note.encoding, "top0.1+int8/256+ef");
    for part in ["post-processing", "Error feedback", "decoded", "C = 0.5"] {
        assert!(note.statement.contains(part), "{part}: {}", note.statement);
    }
    assert_eq!(json["compression"]["encoding"], "top0.1+int8/256+ef");
    assert!(html.contains("Update compression: top0.1+int8/256+ef"));
    // Without [compression] the report says nothing about it.
    let mut plain = run(central, 4);
    plain.commit(1, &SITES4, false);
    let (report, json, html) = plain.report();
    assert!(report.compression.is_none() && json["compression"].is_null());
    assert!(!html.contains("Update compression"));
}
