//! Store tests: schema, crash safety (a real `abort()` in a child process), resume.

use std::collections::BTreeMap;
use std::process::Command;

use candle_core::{Device, Tensor};

use super::privacy::SiteDpRound;
use super::*;

const CRASH_ENV: &str = "FEDFLOW_STORE_TEST_CRASH_AT";
const CRASH_DIR_ENV: &str = "FEDFLOW_STORE_TEST_CRASH_DIR";

/// Aborts the process (as `kill -9` would, without unwinding or flushing) when the
/// crash test's child asked to die at `name`.
pub(super) fn crash_point(name: &str) {
    if std::env::var(CRASH_ENV).as_deref() == Ok(name) {
        std::process::abort();
    }
}

fn model(seed: f32) -> ParamSet {
    let mut m = BTreeMap::new();
    let w: Vec<f32> = (0..12).map(|i| seed + i as f32 * 0.25).collect();
    m.insert(
        "head.weight".to_string(),
        Tensor::from_vec(w, (3, 4), &Device::Cpu).unwrap(),
    );
    m.insert(
        "head.bias".to_string(),
        Tensor::new(&[seed, -seed, 0.5], &Device::Cpu).unwrap(),
    );
    ParamSet::from_tensors(m).unwrap()
}

fn sel(sites: &[&str]) -> Vec<(String, String)> {
    sites
        .iter()
        .map(|s| (s.to_string(), format!("task-{s}")))
        .collect()
}

fn files(dir: &Path, run_id: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join(CHECKPOINT_DIR).join(run_id))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn fresh_open_creates_schema_and_reopen_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let version: i64 = store
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let mode: String = store
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let fk: i64 = store
        .conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(fk, 1);
    let sync: i64 = store
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "synchronous=FULL");
    assert!(store.runs().unwrap().is_empty());
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert!(store.runs().unwrap().is_empty());
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    let msg = err_text(Store::open(dir.path()));
    assert!(
        msg.contains(&format!("schema version {}", SCHEMA_VERSION + 1)),
        "{msg}"
    );
    assert!(msg.contains("newer"), "{msg}");
}

#[test]
fn a_version_1_database_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(super::SCHEMA_V1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
    }
    let mut store = Store::open(dir.path()).unwrap();
    let version: i64 = store
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    assert!(
        store.revocations().unwrap().is_empty(),
        "the v3 table exists"
    );
    store
        .create_run("old", "{}", "fedavg", &model(1.0))
        .unwrap();
    assert!(store.site_dp_rounds("old").unwrap().is_empty());
}

fn dp_round(round: u64) -> SiteDpRound {
    SiteDpRound {
        round,
        mode: "central".into(),
        sampling: "poisson".into(),
        sampling_rate: 0.1,
        noise_multiplier: 1.0,
        update_noise_multiplier: 1.0,
        clip_norm: 0.5,
        expected_sites: 10.0,
        site_noise_std: 0.0,
        server_noise_std: 0.5,
        bit_noise_std: None,
        selected: 9,
        contributions: 8,
        clipped_fraction: Some(0.25),
        noisy_unclipped_fraction: None,
        next_clip_norm: 0.5,
        epsilon: 0.7,
        epsilon_pld: None,
        target_delta: 1e-5,
        rdp: vec![0.1, f64::INFINITY],
        seeded_randomness: false,
        recorded_at_ms: 0,
    }
}

#[test]
fn a_version_3_ledger_gains_the_seeding_column_and_keeps_it_per_round() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(super::SCHEMA_V1).unwrap();
        conn.execute_batch(super::privacy::SCHEMA_V2).unwrap();
        conn.execute_batch(super::revocations::SCHEMA_V3).unwrap();
        conn.pragma_update(None, "user_version", 3).unwrap();
    }
    let mut store = Store::open(dir.path()).unwrap();
    store.create_run("r", "{}", "fedavg", &model(1.0)).unwrap();
    for (round, seeded) in [(1, false), (2, true)] {
        store.begin_round("r", round, &sel(&["a"])).unwrap();
        let row = SiteDpRound {
            seeded_randomness: seeded,
            ..dp_round(round)
        };
        store
            .commit_round("r", round, &model(round as f32), None, None, Some(&row))
            .unwrap();
    }
    let rows = store.site_dp_rounds("r").unwrap();
    assert_eq!(
        rows.iter().map(|r| r.seeded_randomness).collect::<Vec<_>>(),
        vec![false, true]
    );
}

#[test]
fn the_privacy_ledger_is_written_with_the_commit_and_is_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.create_run("r", "{}", "fedavg", &model(1.0)).unwrap();
    store.begin_round("r", 1, &sel(&["a"])).unwrap();
    store
        .commit_round("r", 1, &model(2.0), None, None, Some(&dp_round(1)))
        .unwrap();
    let rows = store.site_dp_rounds("r").unwrap();
    assert_eq!(rows.len(), 1);
    let mut want = dp_round(1);
    want.recorded_at_ms = rows[0].recorded_at_ms;
    assert_eq!(rows[0], want, "read back as written, infinity included");
    // A second record for the same round cannot be committed (the round is committed), and
    // the ledger refuses updates and deletes outright.
    assert!(
        store
            .commit_round("r", 1, &model(3.0), None, None, Some(&dp_round(1)))
            .is_err()
    );
    for sql in [
        "UPDATE site_dp_rounds SET epsilon = 0",
        "DELETE FROM site_dp_rounds",
    ] {
        let e = store.conn.execute(sql, []).unwrap_err().to_string();
        assert!(e.contains("append-only"), "{sql}: {e}");
    }
    // A failed commit (a record of another round) leaves the round open and the ledger as
    // it was.
    store.begin_round("r", 2, &sel(&["a"])).unwrap();
    assert!(
        store
            .commit_round("r", 2, &model(3.0), None, None, Some(&dp_round(1)))
            .is_err()
    );
    assert_eq!(store.site_dp_rounds("r").unwrap().len(), 1);
    assert_eq!(store.resume_point("r").unwrap().round, 1);
    assert_eq!(store.resume_point("r").unwrap().open_round, Some(2));
}

#[test]
fn second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path()).unwrap();
    let msg = err_text(Store::open(dir.path()));
    assert!(msg.contains("in use by another process"), "{msg}");
}

#[test]
fn full_cycle_survives_reopen_with_identical_model() {
    let dir = tempfile::tempdir().unwrap();
    let initial = model(1.0);
    let next = model(2.0);
    let velocity = model(-0.5);
    {
        let mut store = Store::open(dir.path()).unwrap();
        store
            .create_run("run-1", r#"{"rounds":3}"#, "fedavgm", &initial)
            .unwrap();
        let r0 = store.resume_point("run-1").unwrap();
        assert_eq!(r0.round, 0);
        assert_eq!(r0.model_sha256, initial.sha256_hex().unwrap());
        assert!(r0.strategy_state.is_none());

        store
            .begin_round("run-1", 1, &sel(&["a", "b", "c"]))
            .unwrap();
        store.touch_site("a", 10).unwrap();
        store.touch_site("a", 5).unwrap();
        store
            .record_site(
                "run-1",
                1,
                &SiteOutcome {
                    train_examples: Some(120),
                    weight: Some(120.0),
                    metrics_json: Some(r#"{"loss":0.5}"#.into()),
                    delta_sha256: Some("ab".repeat(32)),
                    ..SiteOutcome::new("a", SiteState::Uploaded, None)
                },
            )
            .unwrap();
        store
            .record_site(
                "run-1",
                1,
                &SiteOutcome::new("b", SiteState::Rejected, Some("non-finite".into())),
            )
            .unwrap();
        let hash = store
            .commit_round(
                "run-1",
                1,
                &next,
                Some(&velocity),
                Some(r#"{"loss":0.5}"#),
                None,
            )
            .unwrap();
        assert_eq!(hash, next.sha256_hex().unwrap());
    }
    let mut store = Store::open(dir.path()).unwrap();
    let resume = store.resume_point("run-1").unwrap();
    assert_eq!(resume.round, 1);
    assert_eq!(resume.open_round, None);
    assert_eq!(resume.model_sha256, next.sha256_hex().unwrap());
    assert_eq!(
        resume.model.to_safetensors_bytes().unwrap(),
        next.to_safetensors_bytes().unwrap()
    );
    assert_eq!(
        resume.strategy_state.unwrap().sha256_hex().unwrap(),
        velocity.sha256_hex().unwrap()
    );
    assert_eq!(
        files(dir.path(), "run-1"),
        [
            "round-000000.safetensors",
            "round-000001.safetensors",
            "round-000001.strategy.safetensors"
        ]
    );

    let runs = store.runs().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Running);
    assert_eq!(runs[0].strategy, "fedavgm");
    let rounds = store.rounds("run-1").unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|r| r.status == RoundStatus::Committed));
    assert_eq!(rounds[1].metrics_json.as_deref(), Some(r#"{"loss":0.5}"#));
    let sites = store.round_sites("run-1", 1).unwrap();
    let states: Vec<_> = sites
        .iter()
        .map(|s| (s.site_id.as_str(), s.state))
        .collect();
    assert_eq!(
        states,
        [
            ("a", SiteState::Uploaded),
            ("b", SiteState::Rejected),
            ("c", SiteState::Selected)
        ]
    );
    assert_eq!(sites[0].task_id.as_deref(), Some("task-a"));
    assert_eq!(sites[0].train_examples, Some(120));
    assert_eq!(sites[1].reason.as_deref(), Some("non-finite"));
    let seen = store.sites().unwrap();
    assert_eq!((seen[0].first_seen_ms, seen[0].last_seen_ms), (5, 10));
    let json = serde_json::to_string(&sites[0]).unwrap();
    assert!(json.contains(r#""state":"uploaded""#), "{json}");

    store
        .set_run_status("run-1", RunStatus::Finished, Some("all rounds done"))
        .unwrap();
    let run = store.run("run-1").unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Finished);
    assert_eq!(run.status_reason.as_deref(), Some("all rounds done"));
    let msg = err_text(store.begin_round("run-1", 2, &sel(&["a"])));
    assert!(msg.contains("finished"), "{msg}");
}

#[test]
fn uncommitted_round_is_not_committed_after_reopen_and_reruns_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let initial = model(1.0);
    {
        let mut store = Store::open(dir.path()).unwrap();
        store.create_run("r", "{}", "fedavg", &initial).unwrap();
        store.begin_round("r", 1, &sel(&["a", "b"])).unwrap();
        store
            .record_site("r", 1, &SiteOutcome::new("a", SiteState::Uploaded, None))
            .unwrap();
    }
    let mut store = Store::open(dir.path()).unwrap();
    let resume = store.resume_point("r").unwrap();
    assert_eq!(resume.round, 0);
    assert_eq!(resume.open_round, Some(1));
    assert_eq!(resume.model_sha256, initial.sha256_hex().unwrap());
    assert_eq!(store.rounds("r").unwrap()[1].status, RoundStatus::Open);

    store.begin_round("r", 1, &sel(&["c"])).unwrap();
    let sites = store.round_sites("r", 1).unwrap();
    assert_eq!(sites.len(), 1);
    assert_eq!(sites[0].site_id, "c");
    assert_eq!(sites[0].state, SiteState::Selected);
    store
        .commit_round("r", 1, &model(3.0), None, None, None)
        .unwrap();
    assert_eq!(store.resume_point("r").unwrap().round, 1);
}

#[test]
fn failed_round_can_be_begun_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.create_run("r", "{}", "fedavg", &model(1.0)).unwrap();
    store.begin_round("r", 1, &sel(&["a"])).unwrap();
    store.fail_round("r", 1, "too few updates").unwrap();
    let round = &store.rounds("r").unwrap()[1];
    assert_eq!(round.status, RoundStatus::Failed);
    assert_eq!(round.failure_reason.as_deref(), Some("too few updates"));
    let msg = err_text(store.commit_round("r", 1, &model(2.0), None, None, None));
    assert!(msg.contains("is failed, not open"), "{msg}");
    store.begin_round("r", 1, &sel(&["a"])).unwrap();
    assert_eq!(store.rounds("r").unwrap()[1].failure_reason, None);
    store
        .commit_round("r", 1, &model(2.0), None, None, None)
        .unwrap();
}

#[test]
fn orphan_checkpoint_is_ignored_and_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let initial = model(1.0);
    {
        let mut store = Store::open(dir.path()).unwrap();
        store.create_run("r", "{}", "fedavg", &initial).unwrap();
        store.begin_round("r", 1, &sel(&["a"])).unwrap();
    }
    // A commit that wrote its file and died before the transaction, plus a temporary of
    // a write that died before its rename, and a run directory whose creation never
    // committed.
    let run_dir = dir.path().join(CHECKPOINT_DIR).join("r");
    model(9.0)
        .save(run_dir.join("round-000001.safetensors"))
        .unwrap();
    std::fs::write(run_dir.join(".round-000001.safetensors.tmp-1-0"), b"half").unwrap();
    std::fs::write(run_dir.join("NOTES.txt"), b"operator's file").unwrap();
    let ghost = dir.path().join(CHECKPOINT_DIR).join("ghost");
    std::fs::create_dir_all(&ghost).unwrap();
    model(7.0)
        .save(ghost.join("round-000000.safetensors"))
        .unwrap();

    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(
        files(dir.path(), "r"),
        ["NOTES.txt", "round-000000.safetensors"]
    );
    assert!(!ghost.exists());
    let resume = store.resume_point("r").unwrap();
    assert_eq!(resume.round, 0);
    assert_eq!(resume.model_sha256, initial.sha256_hex().unwrap());
    store.begin_round("r", 1, &sel(&["a"])).unwrap();
    store
        .commit_round("r", 1, &model(2.0), None, None, None)
        .unwrap();
    assert_eq!(
        store.resume_point("r").unwrap().model_sha256,
        model(2.0).sha256_hex().unwrap()
    );
}

#[test]
fn tampered_checkpoint_fails_resume_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.create_run("r", "{}", "fedavg", &model(1.0)).unwrap();
    store.begin_round("r", 1, &sel(&["a"])).unwrap();
    store
        .commit_round("r", 1, &model(2.0), None, None, None)
        .unwrap();
    let path = dir
        .path()
        .join(CHECKPOINT_DIR)
        .join("r")
        .join("round-000001.safetensors");
    // Same size, still valid safetensors, different values: only the hash can tell.
    model(5.0).save(&path).unwrap();
    let msg = err_text(store.resume_point("r"));
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("corrupt"), "{msg}");

    std::fs::remove_file(&path).unwrap();
    let msg = err_text(store.resume_point("r"));
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn commit_twice_never_begun_and_out_of_order_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.create_run("r", "{}", "fedavg", &model(1.0)).unwrap();

    let msg = err_text(store.commit_round("r", 1, &model(2.0), None, None, None));
    assert!(msg.contains("never begun"), "{msg}");
    let msg =
        err_text(store.record_site("r", 1, &SiteOutcome::new("a", SiteState::Uploaded, None)));
    assert!(msg.contains("never begun"), "{msg}");
    assert_eq!(files(dir.path(), "r"), ["round-000000.safetensors"]);

    let msg = err_text(store.begin_round("r", 2, &sel(&["a"])));
    assert!(msg.contains("next is 1"), "{msg}");
    let msg = err_text(store.begin_round("r", 1, &sel(&["a", "a"])));
    assert!(msg.contains("selected twice"), "{msg}");

    store.begin_round("r", 1, &sel(&["a"])).unwrap();
    store
        .commit_round("r", 1, &model(2.0), None, None, None)
        .unwrap();
    let msg = err_text(store.commit_round("r", 1, &model(3.0), None, None, None));
    assert!(msg.contains("is committed, not open"), "{msg}");
    // The committed checkpoint was not overwritten by the refused commit.
    assert_eq!(
        store.resume_point("r").unwrap().model_sha256,
        model(2.0).sha256_hex().unwrap()
    );
    let msg = err_text(store.begin_round("r", 1, &sel(&["a"])));
    assert!(msg.contains("next is 2"), "{msg}");
    let msg = err_text(store.create_run("r", "{}", "fedavg", &model(1.0)));
    assert!(msg.contains("already exists"), "{msg}");
    let msg = err_text(store.resume_point("nope"));
    assert!(msg.contains("unknown run nope"), "{msg}");
}

#[test]
fn bad_run_ids_and_json_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    for bad in ["", "../x", "a/b", ".hidden", "white space"] {
        let msg = err_text(store.create_run(bad, "{}", "fedavg", &model(1.0)));
        assert!(msg.contains("run id"), "{bad}: {msg}");
    }
    let msg = err_text(store.create_run("r", "{nope", "fedavg", &model(1.0)));
    assert!(msg.contains("config_json is not valid JSON"), "{msg}");
    assert!(store.runs().unwrap().is_empty());
}

/// The child half of [`crash_mid_commit_resumes_at_last_committed_round`]: with
/// `CRASH_DIR_ENV` set, that test re-executes this binary filtered to itself, and the child
/// commits a round that the crash point aborts. It never returns normally.
fn crash_child(dir: &str) -> ! {
    let mut store = Store::open(dir).unwrap();
    store
        .create_run("crash", "{}", "fedavg", &model(1.0))
        .unwrap();
    store.begin_round("crash", 1, &sel(&["a", "b"])).unwrap();
    let _ = store.commit_round("crash", 1, &model(2.0), None, None, None);
    // Reached only if the crash point failed to fire; the parent sees this exit code.
    std::process::exit(3)
}

#[test]
fn crash_mid_commit_resumes_at_last_committed_round() {
    if let Ok(dir) = std::env::var(CRASH_DIR_ENV) {
        crash_child(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "store::tests::crash_mid_commit_resumes_at_last_committed_round",
            "--exact",
            "--test-threads=1",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .env(CRASH_ENV, "commit_after_files")
        .output()
        .unwrap();
    assert!(
        !status.status.success() && status.status.code() != Some(3),
        "the child should have aborted at the crash point: {status:?}"
    );
    // The child died after writing round 1's checkpoint, before recording it.
    assert_eq!(
        files(dir.path(), "crash"),
        ["round-000000.safetensors", "round-000001.safetensors"]
    );
    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(files(dir.path(), "crash"), ["round-000000.safetensors"]);
    let resume = store.resume_point("crash").unwrap();
    assert_eq!(resume.round, 0);
    assert_eq!(resume.open_round, Some(1));
    assert_eq!(resume.model_sha256, model(1.0).sha256_hex().unwrap());
    store.begin_round("crash", 1, &sel(&["b"])).unwrap();
    store
        .commit_round("crash", 1, &model(2.0), None, None, None)
        .unwrap();
    assert_eq!(store.resume_point("crash").unwrap().round, 1);
}

#[test]
fn revocations_are_stored_once_and_append_only() {
    use crate::security::{Revoked, Role};
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let site = Revoked::Identity(Role::Site, "site-a".into());
    let serial = Revoked::Serial("0a1b".into());
    assert!(store.revoke(&site, "left", "admin ops").unwrap());
    assert!(
        !store.revoke(&site, "again", "admin ops").unwrap(),
        "already revoked"
    );
    assert!(store.revoke(&serial, "rotated", "admin ops").unwrap());
    assert!(store.is_revoked(&serial).unwrap());
    assert!(
        !store
            .is_revoked(&Revoked::Identity(Role::Viewer, "site-a".into()))
            .unwrap()
    );
    let err = store
        .conn
        .execute("DELETE FROM revocations", [])
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let list = store.revocations().unwrap();
    assert_eq!(
        list.iter()
            .map(|r| (&r.revoked, r.reason.as_str()))
            .collect::<Vec<_>>(),
        [(&site, "left"), (&serial, "rotated")]
    );
}

#[test]
fn failed_attempts_and_refused_updates_are_kept_when_a_round_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.create_run("r", "{}", "fedavg", &model(1.0)).unwrap();
    for why in ["too few updates", "the aggregate was refused: not finite"] {
        store.begin_round("r", 1, &sel(&["a", "b"])).unwrap();
        store.fail_round("r", 1, why).unwrap();
    }
    store.begin_round("r", 1, &sel(&["a"])).unwrap();
    store.count_rejection("r", 1, "b", "wrong base").unwrap();
    store.count_rejection("r", 1, "b", "late").unwrap();
    store.count_rejection("r", 1, "c", "not selected").unwrap();
    store
        .commit_round("r", 1, &model(2.0), None, None, None)
        .unwrap();
    let attempts = store.failed_attempts("r").unwrap();
    assert_eq!(
        attempts
            .iter()
            .map(|a| (a.round, a.attempt, a.reason.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (1, 1, "too few updates"),
            (1, 2, "the aggregate was refused: not finite")
        ]
    );
    assert!(attempts.iter().all(|a| a.failed_at_ms >= a.started_at_ms));
    assert_eq!(
        store.rejections_by_round("r").unwrap(),
        BTreeMap::from([(1, 3)])
    );
    let counts = store.site_outcome_counts().unwrap();
    assert_eq!(counts["b"].rejected, 2);
    assert_eq!(counts["c"].rejected, 1);
    assert_eq!(counts["a"].rejected, 0);
}
