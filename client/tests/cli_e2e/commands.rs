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

    // --explain N: per event name, mean attributions over the first N sessions.
    let explained: serde_json::Value = serde_json::from_str(&ok(&[
        "evaluate",
        "--model",
        p(&model),
        "--json",
        "--explain",
        "10",
        "--data",
        &sites[0],
    ]))
    .unwrap();
    let rows = explained["explanations"].as_array().unwrap();
    let records = fedflow_common::data::read_sessions(&sites[0], &Default::default())
        .unwrap()
        .records;
    let events: usize = records[..10].iter().map(|r| r.events.len()).sum();
    let counted: u64 = rows
        .iter()
        .map(|r| r["occurrences"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, events as u64);
    let pulls: Vec<f64> = rows
        .iter()
        .map(|r| r["to_label_1"].as_f64().unwrap())
        .collect();
    assert!(
        pulls.windows(2).all(|w| w[0] >= w[1]),
        "sorted by the pull to label 1"
    );
    assert!(
        rows.iter()
            .all(|r| r["to_predicted"].as_f64().unwrap().is_finite())
    );
}

#[test]
fn generated_buckets_keep_new_event_names_apart_and_validate_counts_them() {
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
        "100",
        "--oov-buckets",
        "16",
    ]);
    let vocab = data.join("vocab.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&vocab).unwrap()).unwrap();
    assert_eq!(v["oov_buckets"], 16, "{v}");
    // Two new event names (one twice) next to known ones.
    let file = dir.path().join("new.csv");
    std::fs::write(
        &file,
        "session_id,events,label
         s1,opened_help chat_v2_opened searched,4
         s2,opened_help voice_search chat_v2_opened,2
",
    )
    .unwrap();
    let out = ok(&["data", "validate", p(&file), "--vocab", p(&vocab), "--json"]);
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let s = &r["stats"];
    assert_eq!(
        (
            &s["unknown_events"],
            &s["oov_bucket_events"],
            &s["distinct_unknown_names"]
        ),
        (&3.into(), &3.into(), &2.into()),
        "{r}"
    );
    let text = ok(&["data", "validate", p(&file), "--vocab", p(&vocab)]);
    assert!(
        text.contains("3 unknown: 2 distinct names, 3 in out-of-vocabulary buckets"),
        "{text}"
    );
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
    // Both accountants' figures; PLD (the default) is the tighter and the one stated.
    assert_eq!(fwd["accountant"], "pld");
    assert_eq!(fwd["epsilon_pld"].as_f64().unwrap(), eps);
    assert!(eps < fwd["epsilon_rdp"].as_f64().unwrap(), "{fwd}");
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
    // Solved with RDP instead, the same target needs more noise.
    let z_rdp = plan(&[
        "--rounds",
        "20",
        "--target-epsilon",
        "4",
        "--accountant",
        "rdp",
    ]);
    assert!(
        z_rdp["noise_multiplier"].as_f64().unwrap() > z_val,
        "{z_rdp}"
    );
    assert!(z_rdp["epsilon_rdp"].as_f64().unwrap() <= 4.0);
    // Inverse for rounds: the last round within the target.
    let r = plan(&[
        "--noise-multiplier",
        "1.0",
        "--target-epsilon",
        &format!("{eps}"),
    ]);
    assert_eq!(r["solved_for"], "rounds");
    assert_eq!(r["rounds"], 20);
    // A noisy count per round costs on top, exactly one Gaussian per round.
    let counted = plan(&[
        "--noise-multiplier",
        "1.0",
        "--rounds",
        "20",
        "--count-noise-multiplier",
        "5",
    ]);
    let with_count = counted["epsilon_pld"].as_f64().unwrap();
    let want = fedflow_common::privacy::planner::epsilon_by(
        fedflow_common::privacy::planner::Accounting::Pld,
        &[
            fedflow_common::privacy::SampledGaussian {
                q: 0.032,
                z: 1.0,
                steps: 32,
            },
            fedflow_common::privacy::SampledGaussian {
                q: 1.0,
                z: 5.0,
                steps: 1,
            },
        ],
        20,
        1e-5,
    )
    .unwrap();
    assert!(
        with_count > eps && (with_count - want).abs() < 1e-9,
        "{counted}"
    );
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

/// The privacy-audit report's site-level recompute command, run through this binary, gives
/// the ε the report states (the coordinator's ledger written by hand for three rounds).
#[test]
fn the_audit_reports_recompute_command_reproduces_its_epsilon() {
    use fedflow_coordinator::store::{SiteDpRound, Store};
    let dir = tempfile::tempdir().unwrap();
    let vocab = fedflow_common::data::Vocab::from_events(["a", "b"]).unwrap();
    vocab.save(dir.path().join("vocab.json")).unwrap();
    let toml = "[run]\nname = \"audit\"\nrounds = 3\n[model]\nvocab = \"vocab.json\"\n\
                embed_dim = 4\nhidden_size = 4\nnum_layers = 1\n\
                [site_dp]\nclip_norm = 1.0\nnoise_multiplier = 1.3\nsampling_rate = 0.02\n\
                expected_sites = 50\ntarget_epsilon = 5\ntarget_delta = 1e-6\n";
    let cfg = fedflow_coordinator::config::RunConfig::from_toml_str(toml, dir.path()).unwrap();
    let model = fedflow_common::model::AttentionFlowModel::new(
        &cfg.model_config().unwrap(),
        &candle_core::Device::Cpu,
        0,
    )
    .unwrap();
    let initial = fedflow_common::params::ParamSet::from_varmap(model.varmap()).unwrap();
    let mut store = Store::open(dir.path().join("data")).unwrap();
    store
        .create_run(
            "audit",
            &serde_json::to_string(&cfg).unwrap(),
            "fedavg",
            &initial,
        )
        .unwrap();
    let event = cfg.site_dp.as_ref().unwrap().round_event(&cfg.sampling);
    let mut acc = fedflow_common::privacy::RdpAccountant::default();
    for round in 1..=3 {
        acc.compose(&event).unwrap();
        store.begin_round("audit", round, &[]).unwrap();
        let record = SiteDpRound {
            round,
            mode: "central".into(),
            sampling: "poisson".into(),
            sampling_rate: event.q,
            noise_multiplier: event.z,
            update_noise_multiplier: event.z,
            clip_norm: 1.0,
            expected_sites: 50.0,
            site_noise_std: 0.0,
            server_noise_std: 1.3,
            bit_noise_std: None,
            selected: 0,
            contributions: 0,
            clipped_fraction: None,
            noisy_unclipped_fraction: None,
            next_clip_norm: 1.0,
            epsilon: acc.epsilon(1e-6).unwrap().0,
            epsilon_pld: None,
            target_delta: 1e-6,
            rdp: acc.rdp().to_vec(),
            seeded_randomness: false,
            recorded_at_ms: 0,
        };
        store
            .commit_round("audit", round, &initial, None, None, Some(&record))
            .unwrap();
    }
    let report = fedflow_coordinator::audit::build(&store, "audit", 0).unwrap();
    let stated = report.site_level.as_ref().unwrap().cumulative[0]
        .epsilon
        .unwrap();
    let command = &report.recompute[1];
    // "fedflow-client privacy plan ...": the arguments after the program name.
    let mut args: Vec<&str> = command.split_whitespace().skip(1).collect();
    args.push("--json");
    let plan: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let recomputed = plan["epsilon"].as_f64().unwrap();
    assert!(
        (recomputed - stated).abs() < 1e-9 * stated,
        "{command}: {recomputed} vs {stated}"
    );
}

#[test]
fn data_import_fills_an_agents_store_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fedflow_common::data::Vocab::from_events(["opened_help", "searched"])
        .unwrap()
        .save(d.join("vocab.json"))
        .unwrap();
    let config = d.join("site.toml");
    std::fs::write(
        &config,
        "[site]\nid = \"s\"\ndata_dir = \"data\"\nvocab = \"vocab.json\"\n\
         [coordinator]\nurl = \"http://127.0.0.1:9\"\ninsecure_plaintext = true\n",
    )
    .unwrap();
    let good = d.join("good.csv");
    std::fs::write(
        &good,
        "session_id,events,label\ns1,opened_help searched,4\ns2,searched,2\ns3,opened_help,5\n",
    )
    .unwrap();
    let out = ok(&["data", "import", p(&good), "--config", p(&config)]);
    assert!(out.contains("3 sessions stored, 0 already there"), "{out}");
    let out = ok(&["data", "import", p(&good), "--config", p(&config)]);
    assert!(out.contains("0 sessions stored, 3 already there"), "{out}");
    let stored = || {
        fedflow_client::agent::store::FeedbackStore::open(d.join("data/feedback"))
            .unwrap()
            .snapshot()
            .unwrap()
            .records
    };
    let before = stored();
    assert_eq!(before.len(), 3);
    for (name, text, reason) in [
        (
            "bad.csv",
            "session_id,events,label\ns4,searched,3\ns5,searched,9\n",
            "bad.csv:3",
        ),
        (
            "conflict.csv",
            "session_id,events,label\ns6,searched,3\ns1,searched,1\n",
            "record 2: its session_id is already stored with other content",
        ),
    ] {
        let f = d.join(name);
        std::fs::write(&f, text).unwrap();
        let out = client(&["data", "import", p(&f), "--config", p(&config)]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(reason), "{name}: {err}");
        assert_eq!(stored(), before, "{name} changed the store");
    }
}

#[test]
fn a_vocabulary_is_built_from_session_files_leaving_rare_names_out() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.csv");
    let b = dir.path().join("b.jsonl");
    // searched x4, opened_help x3, escalated x2, one_off x1.
    std::fs::write(
        &a,
        "session_id,events,label\ns1,opened_help searched searched,4\ns2,searched escalated one_off,2\n",
    )
    .unwrap();
    std::fs::write(
        &b,
        "{\"session_id\": \"s3\", \"events\": [\"opened_help\", \"searched\", \"escalated\"], \"label\": 3}\n\
         {\"session_id\": \"s4\", \"events\": [\"opened_help\"], \"label\": 5}\n",
    )
    .unwrap();
    let out_path = dir.path().join("vocab.json");
    let out = ok(&[
        "data",
        "vocab",
        "build",
        p(&a),
        p(&b),
        "--out",
        p(&out_path),
        "--min-count",
        "2",
        "--oov-buckets",
        "8",
    ]);
    assert!(
        out.contains("3 event names from 4 sessions (10 events); 1 of 4"),
        "{out}"
    );
    let vocab = fedflow_common::data::Vocab::load(&out_path).unwrap();
    // Most frequent first; the one-off name is not in it, and lands in a bucket.
    let names: Vec<&str> = vocab.event_names().iter().map(String::as_str).collect();
    assert_eq!(names, ["searched", "opened_help", "escalated"]);
    assert_eq!(vocab.oov_buckets(), 8);
    assert!(vocab.is_oov_bucket(vocab.encode("one_off")));
    // The same files give the same vocabulary; an existing --out is refused; a bad row is
    // an error naming its file and line.
    let again = dir.path().join("again.json");
    ok(&[
        "data",
        "vocab",
        "build",
        p(&b),
        p(&a),
        "--out",
        p(&again),
        "--min-count",
        "2",
        "--oov-buckets",
        "8",
    ]);
    assert_eq!(
        std::fs::read(&out_path).unwrap(),
        std::fs::read(&again).unwrap()
    );
    let refused = client(&["data", "vocab", "build", p(&a), "--out", p(&out_path)]);
    assert!(!refused.status.success());
    std::fs::write(&a, "session_id,events,label\ns1,searched,9\n").unwrap();
    let bad = client(&[
        "data",
        "vocab",
        "build",
        p(&a),
        "--out",
        p(&dir.path().join("x.json")),
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("a.csv:2:"), "{err}");
}
