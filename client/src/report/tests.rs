//! Site privacy report tests: the figures against the accountants, and the caveats.

use super::*;
use crate::ledger::NewEntry;
use fedflow_common::privacy::SampledGaussian;

fn entry(round: u64, unit: PrivacyUnit, metrics: bool) -> NewEntry {
    NewEntry {
        run_id: "run-<1>".into(),
        round,
        task_id: format!("t{round}"),
        unit,
        units: 500,
        clip_norm: 1.0,
        expected_batch_size: 25,
        epochs: 1,
        event: SampledGaussian {
            q: 0.05,
            z: 1.2,
            steps: 20,
        },
        metrics_released: metrics,
        count: None,
    }
}

#[test]
fn the_report_states_the_guarantee_the_ledger_implies() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut l = Ledger::open(dir.path()).unwrap();
        for r in 1..=3 {
            l.record(
                &entry(r, PrivacyUnit::User, false),
                format!("u{r}").as_bytes(),
            )
            .unwrap();
        }
    }
    let r = site_report(dir.path(), 1e-6, Some(2.0)).unwrap();
    let mut acc = RdpAccountant::default();
    acc.compose(&SampledGaussian {
        q: 0.05,
        z: 1.2,
        steps: 60,
    })
    .unwrap();
    let (want, order) = acc.epsilon(1e-6).unwrap();
    assert_eq!(r.schema, SCHEMA);
    assert_eq!(r.privacy_unit, PrivacyUnit::User);
    assert!(r.neighbouring_relation.contains("end user"));
    // RDP as the reference computes it; PLD of the same releases, tighter; the smaller
    // is stated and checked against the limit.
    assert!((r.cumulative.epsilon_rdp.unwrap() - want).abs() < 1e-12);
    let mut pld = fedflow_common::privacy::pld::PldAccountant::default();
    pld.compose(&SampledGaussian {
        q: 0.05,
        z: 1.2,
        steps: 60,
    })
    .unwrap();
    let tight = pld.epsilon(1e-6);
    assert_eq!(r.cumulative.epsilon_pld, Some(tight));
    assert!(tight < want);
    assert_eq!(
        (r.cumulative.epsilon, r.cumulative.stated_by),
        (Some(tight), "pld")
    );
    assert_eq!(r.cumulative.order, order);
    assert_eq!(r.cumulative.within_budget, Some(tight <= 2.0));
    assert_eq!(r.cumulative.other_deltas.len(), OTHER_DELTAS.len());
    assert_eq!(r.releases.len(), 3);
    // Cumulative epsilon grows release by release and ends at the total.
    let eps: Vec<f64> = r
        .releases
        .iter()
        .map(|x| x.epsilon_after.unwrap())
        .collect();
    assert!(eps.windows(2).all(|w| w[0] < w[1]) && (eps[2] - want).abs() < 1e-12);
    for o in &r.cumulative.other_deltas {
        assert!(o.epsilon.unwrap() <= pld.epsilon(o.delta), "{o:?}");
    }
    assert!(
        r.not_covered
            .iter()
            .any(|n| n.contains("none were released"))
    );
    assert!(r.recompute.contains("--delta 1e-6") && r.recompute.contains("--max-epsilon 2"));
    assert_eq!(r.accountant["orders"].as_array().unwrap().len(), 156);
    // JSON keeps the documented top-level keys.
    let json = serde_json::to_value(&r).unwrap();
    for key in [
        "schema",
        "privacy_unit",
        "mechanism",
        "sampling",
        "accountant",
        "budget",
        "cumulative",
        "releases",
        "not_covered",
        "recompute",
        "code_version",
    ] {
        assert!(json.get(key).is_some(), "missing {key}");
    }
    assert_eq!(json["sampling"]["method"], "poisson");
    assert_eq!(json["releases"][0]["round"], 1);
    // The HTML has the summary first, the chart, one table row per release, escaped ids.
    let html = to_html(&r).unwrap();
    let (summary, chart) = (
        html.find("class=\"summary\"").unwrap(),
        html.find("<svg").unwrap(),
    );
    assert!(summary < chart);
    assert!(html.contains(&format!("ε = {:.4}", r.cumulative.epsilon.unwrap())));
    assert!(html.contains("<pre>fedflow-client privacy report") && html.contains(" UTC."));
    assert_eq!(html.matches("run-&lt;1&gt;").count(), 3);
    assert!(!html.contains("run-<1>"));
}

#[test]
fn the_report_states_n_public_floating_point_and_small_delta_caveats() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut l = Ledger::open(dir.path()).unwrap();
        for r in 1..=2 {
            let mut e = entry(r, PrivacyUnit::Session, false);
            e.units = 1000;
            l.record(&e, format!("s{r}").as_bytes()).unwrap();
        }
    }
    let r = site_report(dir.path(), 1e-5, None).unwrap();
    let replace = r
        .bounds
        .iter()
        .find(|b| b.unit == PrivacyUnit::Session && b.relation == Relation::ReplaceOne)
        .unwrap();
    let (add, rep) = (r.cumulative.epsilon.unwrap(), replace.epsilon.unwrap());
    assert!(rep > add, "{rep} vs {add}");
    let n_public = r
        .caveats
        .iter()
        .find(|c| c.contains("n is public"))
        .unwrap();
    assert!(n_public.contains("replace-one"), "{n_public}");
    assert!(n_public.contains(&format!("{rep:.4}")), "{n_public}");
    let float = r
        .caveats
        .iter()
        .find(|c| c.contains("Floating-point"))
        .unwrap();
    assert!(float.contains("Mironov 2012") && float.contains("Jin et al. 2022"));
    // delta 1e-5 is below 1/1000, but the other deltas include 1e-3 = 1/n.
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(r.warnings[0].contains("1e-3") && r.warnings[0].contains("1/1000"));
    let weak = site_report(dir.path(), 1e-3, None).unwrap();
    assert!(
        weak.warnings[0].contains("not below 1/n = 1/1000"),
        "{:?}",
        weak.warnings
    );
    let html = to_html(&weak).unwrap();
    assert!(html.contains("every model update this site released"));
    assert!(!html.contains("everything this site released"));
    assert!(html.contains("Warning: delta = 1e-3 is not below"));
    // What still goes out is listed, not claimed covered.
    for what in [
        "heartbeats",
        "declines a task",
        "number of validation sessions",
    ] {
        assert!(r.not_covered.iter().any(|n| n.contains(what)), "{what}");
    }
}

#[test]
fn noisy_counts_are_charged_and_the_report_says_they_are_covered() {
    let dir = tempfile::tempdir().unwrap();
    let count = crate::ledger::CountRelease {
        noise_multiplier: 4.0,
        released: 997,
    };
    {
        let mut l = Ledger::open(dir.path()).unwrap();
        for r in 1..=2 {
            let mut e = entry(r, PrivacyUnit::Session, false);
            e.units = 1000;
            e.count = Some(count);
            l.record(&e, format!("s{r}").as_bytes()).unwrap();
        }
    }
    let r = site_report(dir.path(), 1e-5, None).unwrap();
    // Both DP-SGD rounds and both counts, by both accountants.
    let events = [
        entry(1, PrivacyUnit::Session, false).event,
        count.event(),
        entry(2, PrivacyUnit::Session, false).event,
        count.event(),
    ];
    let mut rdp = RdpAccountant::default();
    for e in &events {
        rdp.compose(e).unwrap();
    }
    let want_rdp = rdp.epsilon(1e-5).unwrap().0;
    assert!((r.cumulative.epsilon_rdp.unwrap() - want_rdp).abs() < 1e-9);
    assert!((r.releases[1].epsilon_after.unwrap() - want_rdp).abs() < 1e-9);
    let want_pld = fedflow_common::privacy::pld::PldAccountant::of(events)
        .unwrap()
        .epsilon(1e-5);
    assert!((r.cumulative.epsilon_pld.unwrap() - want_pld).abs() < 1e-9);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["releases"][0]["count"]["released"], 997);
    let caveat = r
        .caveats
        .iter()
        .find(|c| c.contains("went out noisy"))
        .unwrap();
    assert!(
        caveat.contains("z = 4") && caveat.contains("covers everything"),
        "{caveat}"
    );
    assert!(!r.caveats.iter().any(|c| c.contains("n is public")));
    let html = to_html(&r).unwrap();
    assert!(html.contains("and of the noisy count of units sent with each"));
}

#[test]
fn released_metrics_and_mixed_units_weaken_what_is_claimed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut l = Ledger::open(dir.path()).unwrap();
        l.record(&entry(1, PrivacyUnit::User, true), b"a").unwrap();
        l.record_legacy(&entry(2, PrivacyUnit::Session, false), b"b")
            .unwrap();
    }
    let r = site_report(dir.path(), 1e-5, None).unwrap();
    assert_eq!(r.privacy_unit, PrivacyUnit::Session);
    assert!(r.neighbouring_relation.contains("no user-level bound"));
    // Per unit: the session bound exists (and is the cumulative figure), the user one not.
    let find = |u, rel| {
        r.bounds
            .iter()
            .find(|b| b.unit == u && b.relation == rel)
            .unwrap()
    };
    let session = find(PrivacyUnit::Session, Relation::AddRemove);
    assert_eq!(session.epsilon, r.cumulative.epsilon);
    assert!(
        session.rule.contains("changes one user's unit"),
        "{}",
        session.rule
    );
    let user = find(PrivacyUnit::User, Relation::AddRemove);
    assert_eq!(user.epsilon, None);
    assert!(user.rule.contains("no user-level bound"), "{}", user.rule);
    assert!(to_html(&r).unwrap().contains("no bound"));
    assert!(
        r.not_covered
            .iter()
            .any(|n| n.contains("1 of 2 updates") && n.contains("NOT covered"))
    );
    assert_eq!(r.cumulative.within_budget, None);
    // An empty ledger reports zero spend.
    let empty = tempfile::tempdir().unwrap();
    let r = site_report(empty.path(), 1e-5, Some(1.0)).unwrap();
    assert_eq!(r.cumulative.epsilon, Some(0.0));
    assert!(to_html(&r).unwrap().contains("<svg"));
}
