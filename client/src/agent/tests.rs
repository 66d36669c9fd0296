//! The feedback store and the training source over it.

use std::sync::Arc;

use fedflow_common::data::{SessionRecord, Vocab};

use super::source::StoreSource;
use super::store::{Appended, FeedbackStore, Refusal};
use crate::site::source::{SiteSource, TaskStart};

fn rec(id: &str, events: &[&str], label: u8, user: Option<&str>) -> SessionRecord {
    let mut r = SessionRecord::new(id, events, label);
    r.user_id = user.map(str::to_string);
    r
}

fn all(store: &FeedbackStore) -> Vec<SessionRecord> {
    store.snapshot().unwrap().records
}

#[test]
fn batches_are_stored_once_duplicates_acknowledged_and_conflicts_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = FeedbackStore::open(dir.path()).unwrap();
    let a = rec("s1", &["opened_help", "searched"], 4, Some("u1"));
    let b = rec("s2", &["opened_help"], 2, None);
    assert_eq!(
        store.append(&[a.clone(), b.clone()], 1_000).unwrap(),
        Ok(Appended {
            stored: 2,
            duplicates: 0
        })
    );
    let g = store.generation().unwrap();
    // The same session again (alone, or twice in one batch next to a new one).
    assert_eq!(
        store.append(std::slice::from_ref(&a), 2_000).unwrap(),
        Ok(Appended {
            stored: 0,
            duplicates: 1
        })
    );
    assert_eq!(store.generation().unwrap(), g, "nothing changed");
    let c = rec("s3", &["searched"], 5, None);
    assert_eq!(
        store.append(&[c.clone(), c.clone()], 3_000).unwrap(),
        Ok(Appended {
            stored: 1,
            duplicates: 1
        })
    );
    // A conflicting re-send anywhere in a batch: refused, naming its position, and the
    // batch's new sessions are not stored either.
    let mut changed = a.clone();
    changed.label = 1;
    let d = rec("s4", &["searched"], 3, None);
    assert_eq!(
        store.append(&[d.clone(), changed], 4_000).unwrap(),
        Err(Refusal::Conflict { index: 1 })
    );
    assert_eq!(all(&store), [a.clone(), b.clone(), c.clone()]);
    // Invalid sessions: refused before anything is written, with the reason.
    let empty = SessionRecord {
        events: vec![],
        ..d.clone()
    };
    let bad_label = rec("s5", &["searched"], 9, None);
    for (batch, want) in [
        (vec![d.clone(), empty], "session 1: events is empty"),
        (vec![bad_label], "session 0: label 9 is outside 1..=5"),
    ] {
        let err = store.append(&batch, 5_000).unwrap().unwrap_err();
        assert_eq!(err.to_string(), want);
    }
    assert_eq!(all(&store).len(), 3);
    // Reopened (as after a crash), everything acknowledged is there.
    drop(store);
    let store = FeedbackStore::open(dir.path()).unwrap();
    assert_eq!(all(&store), [a, b, c]);
}

#[test]
fn erasure_and_retention_delete_and_say_how_many() {
    let dir = tempfile::tempdir().unwrap();
    let store = FeedbackStore::open(dir.path()).unwrap();
    let batch: Vec<SessionRecord> = (0..6)
        .map(|i| {
            let user = ["u1", "u2"][i % 2];
            rec(&format!("s{i}"), &["searched"], 3, Some(user))
        })
        .collect();
    for (i, r) in batch.iter().enumerate() {
        store
            .append(std::slice::from_ref(r), 1_000 * i as i64)
            .unwrap()
            .unwrap();
    }
    let g = store.generation().unwrap();
    assert_eq!(store.erase_user("u2").unwrap(), 3);
    assert!(store.generation().unwrap() > g);
    assert_eq!(store.erase_user("u2").unwrap(), 0);
    let ids = |s: &FeedbackStore| all(s).into_iter().map(|r| r.session_id).collect::<Vec<_>>();
    assert_eq!(ids(&store), ["s0", "s2", "s4"]);
    // Older than 2.5 s at t = 5 s: s0 and s2 (received at 0 and 2 s) go, s4 (4 s) stays.
    assert_eq!(
        store.enforce_retention(Some(2_500), None, 5_000).unwrap(),
        2
    );
    assert_eq!(ids(&store), ["s4"]);
    store
        .append(&[rec("s9", &["searched"], 1, None)], 6_000)
        .unwrap()
        .unwrap();
    assert_eq!(store.enforce_retention(None, Some(1), 6_000).unwrap(), 1);
    assert_eq!(ids(&store), ["s9"], "the newest is kept");
}

#[test]
fn the_source_snapshots_the_store_before_tasks_and_counts_what_arrived_since_training() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FeedbackStore::open(dir.path()).unwrap());
    let vocab = Vocab::from_events(["opened_help", "searched"]).unwrap();
    let batch = |from: usize, n: usize| -> Vec<SessionRecord> {
        (from..from + n)
            .map(|i| rec(&format!("s{i}"), &["opened_help", "searched"], 3, None))
            .collect()
    };
    store.append(&batch(0, 40), 0).unwrap().unwrap();
    let (first, source) = StoreSource::open(store.clone(), &vocab, 0.25).unwrap();
    assert_eq!(first.train.len() + first.validation.len(), 40);
    assert_eq!(
        store.counts().unwrap().since_last_snapshot,
        40,
        "nothing trained yet"
    );
    assert_eq!(source.poll(TaskStart::Training(1)).unwrap(), None);
    assert_eq!(store.counts().unwrap().since_last_snapshot, 0);
    store.append(&batch(40, 10), 1).unwrap().unwrap();
    let c = store.counts().unwrap();
    assert_eq!((c.sessions, c.since_last_snapshot), (50, 10));
    // An evaluation takes the new sessions in but does not count as training on them.
    let grown = source.poll(TaskStart::Evaluation(1)).unwrap().unwrap();
    assert_eq!(grown.train.len() + grown.validation.len(), 50);
    assert_eq!(store.counts().unwrap().since_last_snapshot, 10);
    assert_eq!(source.poll(TaskStart::Training(2)).unwrap(), None);
    assert_eq!(store.counts().unwrap().since_last_snapshot, 0);
    // Sessions keep their split as the store grows (the hashed split of a data file).
    let same = fedflow_common::data::SiteDataset::from_records(&all(&store), &vocab, 0.25).unwrap();
    assert_eq!(grown.validation, same.validation);
    assert!(
        first
            .validation
            .iter()
            .all(|s| grown.validation.contains(s))
    );
}

#[test]
fn the_example_site_config_parses_and_bad_fields_are_named() {
    use super::config::AgentConfig;
    let base = std::path::Path::new("/srv/site");
    let text = include_str!("../../examples/site.toml");
    let c = AgentConfig::parse(text, base).unwrap();
    assert_eq!(c.site.data_dir, base.join("site-data"));
    assert_eq!(
        c.coordinator.identity.as_deref(),
        Some(base.join("bundle").as_path())
    );
    assert_eq!(c.http.listen.to_string(), "127.0.0.1:8088");
    assert!(c.privacy.is_none() && c.personalisation.is_none());
    let p = AgentConfig::parse(&format!("{text}\n[personalisation]\nepochs = 3"), base)
        .unwrap()
        .personalisation
        .unwrap();
    assert_eq!(p.epochs, 3);
    assert_eq!(
        p.patience,
        crate::personalise::PersonaliseConfig::default().patience
    );
    let with = |extra: &str| AgentConfig::parse(&format!("{text}\n{extra}"), base);
    for (extra, field) in [
        (
            "[privacy]\ndir = \"l\"\nmax_epsilon = -1.0",
            "privacy.max_epsilon",
        ),
        (
            "[privacy]\ndir = \"l\"\nmax_epsilon = 1.0\ndelta = 1.0",
            "privacy.delta",
        ),
        (
            "[privacy]\ndir = \"l\"\nmax_epsilon = 1.0\ncolour = 1",
            "unknown field `colour`",
        ),
        (
            "[personalisation]\ntuning_fraction = 0",
            "personalisation.tuning_fraction",
        ),
        ("[personalisation]\nepoch = 3", "unknown field `epoch`"),
    ] {
        let err = with(extra).unwrap_err();
        assert!(err.contains(field), "{extra}: {err}");
    }
    for (from, to, field) in [
        (
            "listen = \"127.0.0.1:8088\"",
            "listen = \"0.0.0.0:8088\"",
            "http.tls_cert",
        ),
        (
            "listen = \"127.0.0.1:8088\"",
            "listen = \"0.0.0.0:8088\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"",
            "http.token_file or http.tls_client_ca",
        ),
        (
            "# tls_cert = \"api/cert.pem\"",
            "tls_cert = \"api/cert.pem\"",
            "http.tls_key",
        ),
        (
            "# tls_client_ca = \"api/clients-ca.pem\"",
            "tls_client_ca = \"ca.pem\"",
            "http.tls_client_ca",
        ),
        ("max_events = 1000", "max_events = 0", "http.max_events"),
        (
            "val_fraction = 0.2",
            "val_fraction = 1.5",
            "training.val_fraction",
        ),
        ("device = \"cpu\"", "device = \"tpu\"", "device"),
        (
            "unknown_events = \"accept\"",
            "unknown_events = \"maybe\"",
            "unknown_events",
        ),
        (
            "# max_sessions = 1000000",
            "max_sessions = 0",
            "retention.max_sessions",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let err = AgentConfig::parse(&text.replace(from, to), base).unwrap_err();
        assert!(err.contains(field), "{to}: {err}");
    }
}

#[test]
fn the_site_id_comes_from_the_certificate_and_a_contradiction_is_refused_by_name() {
    use super::config::AgentConfig;
    use super::run::site_options;
    let pki = fedflow_tests::Pki::new();
    let bundle = pki.bundle("site-a");
    let cfg = |id: &str, url: &str, identity: bool| {
        let text = format!(
            "[site]\n{id}data_dir = \"d\"\nvocab = \"v.json\"\n[coordinator]\nurl = \"{url}\"\n{}",
            if identity {
                format!("identity = \"{}\"\n", bundle.display())
            } else {
                "insecure_plaintext = true\n".to_string()
            }
        );
        AgentConfig::parse(&text, std::path::Path::new("/")).unwrap()
    };
    let o = site_options(&cfg("", "https://127.0.0.1:1", true)).unwrap();
    assert_eq!(o.site_id, "site-a");
    assert!(o.tls.is_some());
    let err = site_options(&cfg("id = \"site-b\"\n", "https://127.0.0.1:1", true))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("site.id site-b does not match the certificate"),
        "{err}"
    );
    let err = site_options(&cfg("", "http://127.0.0.1:1", false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("site.id is required without coordinator.identity"),
        "{err}"
    );
    let o = site_options(&cfg("id = \"site-c\"\n", "http://127.0.0.1:1", false)).unwrap();
    assert_eq!((o.site_id.as_str(), o.tls.is_none()), ("site-c", true));
}
