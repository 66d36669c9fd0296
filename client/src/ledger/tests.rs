//! Ledger tests: crash safety, the one-unit rule, how entries are charged.

use super::*;

pub(super) fn entry(round: u64, task: &str) -> NewEntry {
    NewEntry {
        run_id: "run-1".into(),
        round,
        task_id: task.into(),
        unit: PrivacyUnit::Session,
        units: 1000,
        clip_norm: 1.0,
        expected_batch_size: 50,
        epochs: 1,
        event: SampledGaussian {
            q: 0.05,
            z: 1.1,
            steps: 20,
        },
        metrics_released: false,
        count: None,
    }
}

#[test]
fn entries_survive_reopening_and_compose() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut l = Ledger::open(dir.path()).unwrap();
        l.record(&entry(1, "t1"), b"update one").unwrap();
        l.record(&entry(2, "t2"), b"update two").unwrap();
        l.mark_released("run-1", 1, "t1").unwrap();
    }
    let mut l = Ledger::open(dir.path()).unwrap();
    let e = l.entries().unwrap();
    assert_eq!(e.len(), 2);
    assert!(e[0].released && !e[1].released);
    assert_eq!(e[1].update_sha256, sha256_hex(b"update two"));
    let mut want = RdpAccountant::default();
    want.compose(&SampledGaussian {
        q: 0.05,
        z: 1.1,
        steps: 40,
    })
    .unwrap();
    let (ours, theirs) = (
        l.accountant().unwrap().epsilon(1e-5).unwrap(),
        want.epsilon(1e-5).unwrap(),
    );
    assert!((ours.0 - theirs.0).abs() < 1e-12);
    // The unacknowledged update is kept byte for byte; the acknowledged one is gone.
    let (_, bytes) = l.find("run-1", 2, "t2").unwrap().unwrap();
    assert_eq!(bytes.as_deref(), Some(&b"update two"[..]));
    assert_eq!(l.find("run-1", 1, "t1").unwrap().unwrap().1, None);
    assert!(l.find("run-1", 3, "t3").unwrap().is_none());
}

/// Writes an entry as a ledger from before units were kept apart could hold it
/// (bypassing [`Ledger::record`]'s one-unit rule).
fn insert_legacy(l: &Ledger, round: u64, unit: &str, q: f64, z: f64, steps: u64) {
    l.conn
        .execute(
            "INSERT INTO entries (recorded_unix_ms, run_id, round, task_id, unit, units,
                clip_norm, noise_multiplier, expected_batch_size, epochs, q, steps,
                update_sha256, metrics_released)
             VALUES (0, 'old', ?1, ?2, ?3, 1000, 1.0, ?4, 50, 1, ?5, ?6, 'x', 0)",
            params![round as i64, format!("t{round}"), unit, z, q, steps as i64],
        )
        .unwrap();
}

const REFERENCE: &str = include_str!("../../../common/tests/privacy/replace_one_fixtures.json");

fn num(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) if s == "inf" => Some(f64::INFINITY),
        v => Some(v.as_f64().expect("a number")),
    }
}

#[test]
fn a_ledger_refuses_a_second_privacy_unit() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    assert_eq!(l.unit().unwrap(), None);
    let user = NewEntry {
        unit: PrivacyUnit::User,
        ..entry(1, "t1")
    };
    l.record(&user, b"user-level").unwrap();
    let refused = l.record(&entry(2, "t2"), b"session-level");
    let Err(Error::Ledger { reason, .. }) = refused else {
        panic!("{refused:?}");
    };
    assert!(
        reason.contains("user-level releases") && reason.contains("one privacy unit"),
        "{reason}"
    );
    assert_eq!(l.entries().unwrap().len(), 1);
    assert_eq!(l.unit().unwrap(), Some(PrivacyUnit::User));
    assert!(l.find("run-1", 2, "t2").unwrap().is_none());
}

#[test]
fn every_unit_is_charged_by_the_stated_rule_as_the_reference_computes_it() {
    // Ledgers mixing units (as written before the one-unit rule) and ledgers of one unit,
    // against the reference computed from dp_accounting's RDP values
    // (common/tests/privacy/make_replace_one_fixtures.py).
    let fx: serde_json::Value = serde_json::from_str(REFERENCE).unwrap();
    let ledgers = fx["ledgers"].as_array().unwrap();
    assert_eq!(ledgers.len(), 3);
    let mut charges = Charges::default();
    for (i, case) in ledgers.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let rows = case["entries"].as_array().unwrap();
        for (r, e) in rows.iter().enumerate() {
            insert_legacy(
                &l,
                r as u64 + 1,
                e["unit"].as_str().unwrap(),
                e["q"].as_f64().unwrap(),
                e["z"].as_f64().unwrap(),
                e["steps"].as_u64().unwrap(),
            );
        }
        let entries = l.entries().unwrap();
        let delta = case["delta"].as_f64().unwrap();
        for (unit, name) in [
            (PrivacyUnit::Session, "session"),
            (PrivacyUnit::User, "user"),
        ] {
            for (relation, key) in [
                (Relation::AddRemove, "add_remove"),
                (Relation::ReplaceOne, "replace_one"),
            ] {
                let want = num(&case["bounds"][name][key]);
                let ours = bound(&entries, unit, relation, &mut charges)
                    .unwrap()
                    .map(|acc| acc.epsilon(delta).unwrap().0);
                match (ours, want) {
                    (Some(a), Some(b)) => assert!(
                        (a - b).abs() <= 1e-6 * b,
                        "ledger {i}, {name} {key}: {a} vs {b}"
                    ),
                    (None, None) => {}
                    other => panic!("ledger {i}, {name} {key}: {other:?}"),
                }
            }
        }
        // The figure the site's limit is checked against is the stated unit's add/remove
        // bound, by the same rule: for the mixed ledger, each user-level release counts as
        // a substitution of a session's user, not as an add/remove of one session.
        let stated = if i == 1 { "user" } else { "session" };
        let (eps, _) = l.accountant().unwrap().epsilon(delta).unwrap();
        let want = num(&case["bounds"][stated]["add_remove"]).unwrap();
        assert!(
            (eps - want).abs() <= 1e-6 * want,
            "ledger {i}: {eps} vs {want}"
        );
        if i == 0 {
            let mut naive = RdpAccountant::default();
            for e in &entries {
                naive.compose(&e.event()).unwrap();
            }
            assert!(naive.epsilon(delta).unwrap().0 < 0.8 * eps);
        }
    }
}

#[test]
fn a_task_is_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    l.record(&entry(1, "t1"), b"first").unwrap();
    let again = l.record(&entry(1, "t1"), b"second");
    assert!(matches!(again, Err(Error::Ledger { .. })), "{again:?}");
    assert_eq!(l.entries().unwrap().len(), 1);
    // The recorded bytes are untouched by the refused second release.
    let (_, bytes) = l.find("run-1", 1, "t1").unwrap().unwrap();
    assert_eq!(bytes.as_deref(), Some(&b"first"[..]));
}

#[test]
fn a_noisy_count_is_recorded_and_charged_with_its_update() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    l.record(&entry(1, "t1"), b"clear").unwrap();
    let clear = l.spend().unwrap();
    let count = CountRelease {
        noise_multiplier: 5.0,
        released: 1003,
    };
    l.record(
        &NewEntry {
            count: Some(count),
            ..entry(2, "t2")
        },
        b"noisy",
    )
    .unwrap();
    let entries = l.entries().unwrap();
    assert_eq!((entries[0].count, entries[1].count), (None, Some(count)));
    // Two updates and one count: exactly the events both accountants compose.
    let spent = l.spend().unwrap();
    let mut expected = RdpAccountant::default();
    let mut pld = Vec::new();
    for e in [entry(1, "a").event, entry(2, "b").event, count.event()] {
        expected.compose(&e).unwrap();
        pld.push(e);
    }
    let (rdp, _) = spent.rdp.epsilon(1e-5).unwrap();
    assert!(
        (rdp - expected.epsilon(1e-5).unwrap().0).abs() < 1e-12,
        "{rdp}"
    );
    let want = PldAccountant::of(pld).unwrap().epsilon(1e-5);
    assert!((spent.pld_epsilon(1e-5).unwrap() - want).abs() < 1e-9);
    // The count costs something: more than the two updates alone.
    let mut two = clear.clone();
    two.compose(&entry(2, "b").event).unwrap();
    assert!(spent.epsilon(1e-5).unwrap() > two.epsilon(1e-5).unwrap());
    // It survives reopening (the columns are real, not derived).
    drop(l);
    let l = Ledger::open(dir.path()).unwrap();
    assert_eq!(l.entries().unwrap()[1].count, Some(count));
}

#[test]
fn a_ledger_made_before_noisy_counts_gains_the_columns_and_keeps_its_entries() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(DB_FILE);
    {
        let conn = Connection::open(&db).unwrap();
        // The table as it was before the count columns.
        let old = SCHEMA
            .replace("    count_noise_multiplier REAL,\n", "")
            .replace("    released_count      INTEGER,\n", "");
        assert!(!old.contains("released_count"));
        conn.execute_batch(&old).unwrap();
        conn.execute(
            "INSERT INTO entries (recorded_unix_ms, run_id, round, task_id, unit, units,
                clip_norm, noise_multiplier, expected_batch_size, epochs, q, steps,
                update_sha256, metrics_released)
             VALUES (1, 'r', 1, 't', 'session', 100, 1.0, 1.1, 5, 1, 0.05, 20, 'x', 0)",
            [],
        )
        .unwrap();
    }
    let l = Ledger::open(dir.path()).unwrap();
    let e = l.entries().unwrap();
    assert_eq!((e.len(), e[0].count), (1, None));
}
