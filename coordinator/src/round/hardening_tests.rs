//! Engine tests of the robust aggregation rules and the operator actions.

use super::tests::{SEC, SITES, T0, engine, first_value, fixture, start, submit, update};
use super::*;

/// Sites a, b, c send deltas of 0.1, 0.2 and 0.6 times the model with very different
/// weights; each rule's committed model is checked against its formula.
fn committed_change(extra: &str) -> (f32, std::path::PathBuf) {
    let f = fixture(extra);
    let mut e = engine(&f);
    let tickets = start(&mut e);
    let before = first_value(e.global().0);
    for (site, scale, n) in [
        ("site-a", 0.1, 1),
        ("site-b", 0.2, 1),
        ("site-c", 0.6, 1000),
    ] {
        let r = submit(
            &mut e,
            site,
            &tickets[site],
            &update(&f, scale),
            n,
            T0 + SEC,
        );
        assert_eq!(r, Ok(Accepted::New));
    }
    assert_eq!(e.committed_round(), 1);
    let after = first_value(e.global().0);
    ((after - before) / before, f.dir.path().join("data"))
}

#[test]
fn robust_rules_commit_the_median_and_the_trimmed_mean() {
    let (mean, _) = committed_change("");
    let weighted = (0.1 + 0.2 + 0.6 * 1000.0) / 1002.0;
    assert!((mean - weighted).abs() < 1e-5, "mean {mean} vs {weighted}");
    let (median, data) = committed_change("[aggregation]\nrule = \"median\"\n");
    assert!((median - 0.2).abs() < 1e-5, "median {median}");
    // The kept updates are gone once the round is committed.
    let left = std::fs::read_dir(data.join("aggregation")).map_or(0, |d| d.count());
    assert_eq!(left, 0);
    let (trimmed, _) =
        committed_change("[aggregation]\nrule = \"trimmed_mean\"\ntrim_fraction = 0.34\n");
    assert!((trimmed - 0.2).abs() < 1e-5, "trimmed {trimmed}");
    let (untrimmed, _) =
        committed_change("[aggregation]\nrule = \"trimmed_mean\"\ntrim_fraction = 0.0\n");
    assert!(
        (untrimmed - 0.3).abs() < 1e-5,
        "unweighted mean {untrimmed}"
    );
}

#[test]
fn a_paused_run_finishes_its_round_starts_no_other_and_stays_paused_across_a_restart() {
    let f = fixture("[evaluation]\nevery = 0\nfinal_round = false\n");
    let mut e = engine(&f);
    let tickets = start(&mut e);
    assert_eq!(e.pause("maintenance").unwrap(), Phase::Training);
    for (i, site) in SITES.iter().enumerate() {
        let u = update(&f, 0.1 * (i + 1) as f32);
        assert_eq!(
            submit(&mut e, site, &tickets[*site], &u, 10, T0 + SEC),
            Ok(Accepted::New)
        );
    }
    assert_eq!(e.committed_round(), 1, "the open round completes");
    e.tick(T0 + 2 * SEC).unwrap();
    assert_eq!(e.phase(), Phase::Paused);
    assert_eq!(
        e.poll_task("site-a", T0 + 2 * SEC).unwrap(),
        None,
        "no new round"
    );
    assert_eq!(e.pause("again").unwrap(), Phase::Paused);
    drop(e);

    let mut e = engine(&f);
    assert_eq!(e.phase(), Phase::Paused);
    let run = e.store().run("t").unwrap().unwrap();
    assert_eq!(
        run.status_reason.as_deref(),
        Some("maintenance"),
        "pausing a paused run changes nothing"
    );
    for s in SITES {
        e.site_seen(s, T0 + 3 * SEC).unwrap();
    }
    e.tick(T0 + 3 * SEC).unwrap();
    assert_eq!(e.open_round(), None);
    assert_eq!(e.resume("done").unwrap(), Phase::Waiting);
    assert!(
        e.poll_task("site-a", T0 + 3 * SEC).unwrap().is_some(),
        "round 2 starts"
    );
    assert_eq!(e.open_round(), Some(2));
}

#[test]
fn stopping_discards_the_open_round_for_good() {
    let f = fixture("");
    let mut e = engine(&f);
    let tickets = start(&mut e);
    let before = e.global().1.to_string();
    let u = update(&f, 0.5);
    assert_eq!(
        submit(&mut e, "site-a", &tickets["site-a"], &u, 10, T0 + SEC),
        Ok(Accepted::New)
    );
    assert_eq!(e.stop("enough").unwrap(), Phase::Finished);
    assert_eq!(
        e.global().1,
        before,
        "nothing from the discarded round is applied"
    );
    let rounds = e.store().rounds("t").unwrap();
    let r1 = rounds.iter().find(|r| r.round == 1).unwrap();
    assert_eq!(r1.failure_reason.as_deref(), Some("stopped: enough"));
    let late = submit(&mut e, "site-b", &tickets["site-b"], &u, 10, T0 + SEC);
    assert!(late.is_err(), "{late:?}");
    assert!(e.pause("x").is_err() && e.resume("x").is_err() && e.stop("x").is_err());
    drop(e);
    let e = engine(&f);
    assert_eq!(e.phase(), Phase::Finished, "a stopped run stays stopped");
}

#[test]
fn a_stopped_or_finished_run_never_comes_back_as_paused() {
    let f = fixture("");
    let mut e = engine(&f);
    for s in SITES {
        e.site_seen(s, T0).unwrap();
    }
    assert_eq!(e.pause("hold").unwrap(), Phase::Paused);
    assert_eq!(e.stop("end").unwrap(), Phase::Finished);
    e.tick(T0 + SEC).unwrap();
    assert_eq!(
        e.phase(),
        Phase::Finished,
        "a tick after stop leaves it finished"
    );
    assert!(
        e.resume("again").is_err(),
        "a stopped run cannot be resumed"
    );
    assert_eq!(e.poll_task("site-a", T0 + SEC).unwrap(), None);
}

#[test]
fn a_revoked_site_is_withdrawn_from_the_open_round() {
    let f = fixture("");
    let mut e = engine(&f);
    let tickets = start(&mut e);
    e.forget_site("site-c", "revoked: compromised").unwrap();
    for site in ["site-a", "site-b"] {
        let r = submit(&mut e, site, &tickets[site], &update(&f, 0.1), 10, T0 + SEC);
        assert_eq!(r, Ok(Accepted::New));
    }
    // The round did not wait for site C.
    assert_eq!(e.committed_round(), 1);
    let late = submit(
        &mut e,
        "site-c",
        &tickets["site-c"],
        &update(&f, 0.1),
        10,
        T0 + SEC,
    );
    assert!(late.is_err(), "{late:?}");
    let outcome = e
        .store()
        .round_sites("t", 1)
        .unwrap()
        .into_iter()
        .find(|s| s.site_id == "site-c")
        .unwrap();
    assert_eq!(outcome.reason.as_deref(), Some("revoked: compromised"));
    // And it is not available for the next round.
    assert_eq!(e.poll_task("site-c", T0 + 2 * SEC).unwrap(), None);
}
