//! End-to-end tests of the `fedflow-client` binary: real files, real training, exit codes.

use std::path::Path;
use std::process::{Command, Output};

fn client(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedflow-client"))
        .args(args)
        .output()
        .expect("run fedflow-client")
}

fn ok(args: &[&str]) -> String {
    let out = client(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn generate_validate_train_evaluate_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fed");
    ok(&[
        "data",
        "generate",
        "--out",
        p(&data),
        "--sites",
        "3",
        "--sessions",
        "1500",
        "--seed",
        "3",
    ]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap();
    let bayes = manifest["bayes_accuracy"].as_f64().unwrap();
    assert!((0.5..1.0).contains(&bayes), "bayes accuracy {bayes}");
    let sites: Vec<String> = manifest["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| p(&data.join(s["file"].as_str().unwrap())).to_string())
        .collect();
    assert_eq!(sites.len(), 3);
    let total: u64 = manifest["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sessions"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 1500);

    let vocab = data.join("vocab.json");
    let report = ok(&[
        "data",
        "validate",
        &sites[0],
        "--vocab",
        p(&vocab),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["stats"]["unknown_events"], 0);

    let model = dir.path().join("model");
    let mut args = vec![
        "train",
        "--vocab",
        p(&vocab),
        "--out",
        p(&model),
        "--epochs",
        "2",
        "--seed",
        "1",
        "--json",
        "--data",
    ];
    args.extend(sites.iter().map(String::as_str));
    let summary: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    for f in [
        "model.safetensors",
        "model.json",
        "vocab.json",
        "metrics.json",
    ] {
        assert!(model.join(f).exists(), "{f} missing");
    }
    let trained_acc = summary["validation"]["accuracy"].as_f64().unwrap();

    // Evaluating the saved model on the same held-out split reproduces training's numbers.
    let mut args = vec![
        "evaluate",
        "--model",
        p(&model),
        "--validation-only",
        "--json",
        "--data",
    ];
    args.extend(sites.iter().map(String::as_str));
    let eval: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_eq!(eval["metrics"]["examples"], summary["validation_sessions"]);
    assert_eq!(eval["skipped_rows"], 0);
    assert!((eval["metrics"]["accuracy"].as_f64().unwrap() - trained_acc).abs() < 1e-12);
}

#[test]
fn a_bad_row_fails_with_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = dir.path().join("vocab.json");
    std::fs::write(
        &vocab,
        r#"{"format": "fedflow-vocab/1", "pad_id": 0, "unk_id": 1, "events": {"opened_help": 2, "searched": 3}}"#,
    )
    .unwrap();
    let data = dir.path().join("site.csv");
    std::fs::write(
        &data,
        "session_id,events,label\ns1,opened_help searched,4\ns2,opened_help,7\n",
    )
    .unwrap();
    let out = client(&["data", "validate", p(&data), "--vocab", p(&vocab)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("site.csv:3:"), "{err}");
    assert!(err.contains("label"), "{err}");

    // With --skip-invalid the row is counted and the rest accepted.
    let out = ok(&[
        "data",
        "validate",
        p(&data),
        "--vocab",
        p(&vocab),
        "--skip-invalid",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["stats"]["sessions"], 1);
    assert_eq!(r["skipped"][0][0], 3);
}

#[test]
fn asking_for_a_gpu_this_build_lacks_says_how_to_get_it() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fed");
    ok(&[
        "data",
        "generate",
        "--out",
        p(&data),
        "--sites",
        "1",
        "--sessions",
        "200",
    ]);
    let out = client(&[
        "train",
        "--vocab",
        p(&data.join("vocab.json")),
        "--out",
        p(&dir.path().join("m")),
        "--device",
        "cuda:0",
        "--data",
        p(&data.join("sites/site-000.csv")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features cuda"), "{err}");
}

#[test]
fn privacy_plan_solves_for_noise_and_rounds_and_reports_json() {
    let plan = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "privacy",
            "plan",
            "--batch-size",
            "64",
            "--dataset-size",
            "2000",
            "--epochs",
            "1",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    // Forward: a given z and rounds.
    let fwd = plan(&["--noise-multiplier", "1.0", "--rounds", "20"]);
    assert_eq!(fwd["q"], 0.032);
    assert_eq!(fwd["steps_per_round"], 32);
    let eps = fwd["epsilon"].as_f64().unwrap();
    assert!(eps > 0.0 && eps.is_finite());
    // Inverse for z: its forward epsilon meets the target, just.
    let z = plan(&["--rounds", "20", "--target-epsilon", "4"]);
    assert_eq!(z["solved_for"], "noise_multiplier");
    let z_val = z["noise_multiplier"].as_f64().unwrap();
    assert!(z["epsilon"].as_f64().unwrap() <= 4.0);
    let check = plan(&[
        "--noise-multiplier",
        &format!("{}", z_val * 0.999),
        "--rounds",
        "20",
    ]);
    assert!(check["epsilon"].as_f64().unwrap() > 4.0, "{check}");
    // Inverse for rounds: the last round within the target.
    let r = plan(&[
        "--noise-multiplier",
        "1.0",
        "--target-epsilon",
        &format!("{eps}"),
    ]);
    assert_eq!(r["solved_for"], "rounds");
    assert_eq!(r["rounds"], 20);
    // Contradictory or missing arguments fail with a message.
    let out = client(&["privacy", "plan", "--q", "0.1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--steps"));
}

#[test]
fn privacy_report_needs_a_ledger_and_writes_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = client(&["privacy", "report", "--privacy-dir", p(dir.path())]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ledger"));
    // An empty ledger (a site that joined but never trained) reports zero spend.
    fedflow_client::ledger::Ledger::open(dir.path()).unwrap();
    let text = ok(&[
        "privacy",
        "report",
        "--privacy-dir",
        p(dir.path()),
        "--max-epsilon",
        "4",
    ]);
    assert!(text.contains("0 release(s); epsilon = 0.0000"), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("privacy-report.json")).unwrap())
            .unwrap();
    assert_eq!(json["schema"], "fedflow.site-privacy-report/1");
    assert!(
        std::fs::read_to_string(dir.path().join("privacy-report.html"))
            .unwrap()
            .contains("<svg")
    );
}
