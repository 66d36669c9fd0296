//! The README's first command, `fedflow-sim demo`, run as a binary with the smallest
//! federation its flags allow: it must finish its rounds and write every product the README
//! lists.

use std::process::Command;

#[test]
fn the_readme_demo_runs_to_the_end_and_writes_its_products() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_fedflow-sim"))
        .arg("demo")
        .arg("--out")
        .arg(&out_dir)
        // Three sites: the demo's quorum (four fifths of the sites, rounded up to four) is
        // capped at the sites it selects, so a federation smaller than four runs too.
        .args(["--sites", "3", "--sessions", "300", "--seed", "5"])
        .args([
            "--rounds",
            "2",
            "--local-epochs",
            "1",
            "--baseline-epochs",
            "1",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "demo failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // Its progress (stderr, not a terminal here) ends with the run finished.
    assert!(
        stderr.contains("run finished: 2 rounds committed"),
        "stderr:\n{stderr}"
    );
    // The per-site table on stdout, one row per site and the overall row.
    assert!(stdout.contains("overall"), "stdout:\n{stdout}");
    for product in ["data", "coordinator", "run.toml", "demo.json"] {
        assert!(out_dir.join(product).exists(), "{product} is missing");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("demo.json")).unwrap()).unwrap();
    assert_eq!(report["rounds"], 2, "{report}");
    assert_eq!(report["sites"].as_array().unwrap().len(), 3, "{report}");
    let sha = report["global_sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64, "{sha}");
    let acc = report["federated"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "federated accuracy {acc}");
    let audit = report["privacy_audit"].as_str().unwrap();
    assert!(std::path::Path::new(audit).exists(), "{audit} is missing");
    // The DP-SGD column: the same sites with record-level DP at epsilon 8, every site's
    // ledger within it, and a privacy-audit report with its record-level section.
    assert!(stdout.contains("DP-SGD eps=8"), "stdout:\n{stdout}");
    let private = &report["private"];
    assert_eq!(private["target_epsilon"], 8.0, "{report}");
    assert_eq!(private["rounds"], 2, "{report}");
    let spent = private["max_site_epsilon"].as_f64().unwrap();
    assert!(spent > 0.0 && spent <= 8.0, "{spent}");
    assert!(private["noise_multiplier"].as_f64().unwrap() > 0.0);
    for site in report["sites"].as_array().unwrap() {
        let acc = site["private"]["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{site}");
    }
    let html = std::path::Path::new(private["privacy_audit"].as_str().unwrap());
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(html.with_file_name("privacy-audit.json")).unwrap())
            .unwrap();
    // Over mutual TLS, as the non-private run: its federation PKI is there.
    assert!(
        out_dir.join("dp/eps-8/pki").is_dir(),
        "the private run had no PKI"
    );
    let dp = &json["record_level"];
    assert!(dp.is_object(), "no record-level section: {json}");
    assert_eq!(dp["target"]["epsilon"], 8.0, "{dp}");
}
