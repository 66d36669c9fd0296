//! `fedflow-sim live` run as a binary on a small federation of site agents fed over HTTP: a
//! continuous run through a change of the label function, stopped after its last period,
//! whose publish gate keeps the served version close to the ceiling while a version frozen
//! at the drift falls behind; the agents answer with the published version, as its
//! checkpoint does.

use std::process::Command;

#[test]
fn a_continuous_run_through_a_drift_keeps_the_served_version_near_the_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("live");
    let out = Command::new(env!("CARGO_BIN_EXE_fedflow-sim"))
        .arg("live")
        .arg("--out")
        .arg(&out_dir)
        .args([
            "--sites",
            "3",
            "--sessions-per-period",
            "900",
            "--seed",
            "5",
        ])
        .args(["--periods", "5", "--drift-period", "3"])
        .args(["--rounds-per-period", "3", "--window", "1"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "live failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // The continuous run went on until the simulation stopped it after round 15.
    assert!(
        stderr.contains("run finished: 15 rounds committed"),
        "stderr:\n{stderr}"
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("live.json")).unwrap()).unwrap();
    assert_eq!(r["drift_round"], 7, "{r}");
    let points = r["points"].as_array().unwrap();
    assert_eq!(points.len(), 15);

    // What was served in a round was published after an earlier round, and versions only
    // move forward; the gate published some versions, not necessarily all.
    let published: Vec<u64> = r["published"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(published.windows(2).all(|w| w[0] < w[1]), "{published:?}");
    assert!(published.len() >= 5, "{published:?}");
    for p in points {
        let round = p["round"].as_u64().unwrap();
        if let Some(v) = p["served"].as_u64() {
            assert!(v < round && published.contains(&v), "{p}");
        }
        let ceiling = p["ceiling"].as_f64().unwrap();
        assert!((0.6..0.9).contains(&ceiling), "{p}");
        // The frozen line starts at the drift.
        assert_eq!(p["frozen_accuracy"].is_null(), round < 7, "{p}");
        // Every agent served the published version; its answers over HTTP score what its
        // checkpoint scores.
        assert_eq!(p["agents_served"], p["served"], "{p}");
        match (p["agents_accuracy"].as_f64(), p["served_accuracy"].as_f64()) {
            (Some(a), Some(c)) => assert!((a - c).abs() < 1e-9, "{p}"),
            (None, None) => {}
            other => panic!("{other:?}: {p}"),
        }
    }
    // The agents' stores hold the last window (one period, withdrawn as it left).
    for site in std::fs::read_dir(out_dir.join("agents")).unwrap() {
        let store = fedflow_client::agent::store::FeedbackStore::open(
            site.unwrap().path().join("data/feedback"),
        )
        .unwrap();
        let held = store.counts().unwrap().sessions;
        assert!(held > 0 && held < 900, "{held}");
    }

    // The drift hurts a model that stays as it was; the federation adapts.
    let frozen_gap = r["frozen_mean_gap_after_drift"].as_f64().unwrap();
    assert!(frozen_gap > 0.15, "{r}");
    let last = &points[14];
    let (served, frozen) = (
        last["served_accuracy"].as_f64().unwrap(),
        last["frozen_accuracy"].as_f64().unwrap(),
    );
    assert!(served > frozen + 0.1, "{last}");
    assert!(r["recovery_rounds"].as_u64().is_some(), "{r}");

    // The page charts it; the coordinator's run report charts the gate's own figures.
    let html = std::fs::read_to_string(out_dir.join("live.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("frozen at the drift"));
    let run_report = std::fs::read_to_string(r["run_report"].as_str().unwrap()).unwrap();
    assert!(
        run_report.contains("Publish gate: candidate and published version"),
        "the run report lacks the gate's chart"
    );
    assert!(stdout.contains("recovered"), "stdout:\n{stdout}");
}
