//! Run configuration tests: the example file, every validation message, the privacy
//! sections.

use super::*;

/// A temporary directory holding `vocab.json` with 3 events (vocab_size 5).
fn dir_with_vocab() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    Vocab::from_events(["view", "click", "buy"])
        .unwrap()
        .save(dir.path().join("vocab.json"))
        .unwrap();
    dir
}

const MINIMAL: &str = "[run]\nname = \"pilot-1\"\n\n[model]\nvocab = \"vocab.json\"\n";

/// Parses `MINIMAL` plus `extra` and returns the error message, which must name `field`.
fn check_rejected(extra: &str, field: &str) {
    let dir = dir_with_vocab();
    let text = format!("{MINIMAL}{extra}");
    let text = merge_tables(&text);
    let err = RunConfig::from_toml_str(&text, dir.path())
        .expect_err(&format!("accepted:\n{text}"))
        .to_string();
    assert!(err.contains(field), "{field:?} not named in: {err}");
    assert!(err.starts_with("run config <memory>: "), "{err}");
}

/// Lets a test append keys to `[run]` or `[model]` by repeating the header: moves the
/// keys after a repeated header into the first one (a repeated key replaces the earlier
/// value), so the TOML stays valid.
fn merge_tables(text: &str) -> String {
    let mut tables: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('[') {
            if !tables.iter().any(|(h, _)| h == line) {
                tables.push((line.to_owned(), Vec::new()));
            }
            let i = tables.iter().position(|(h, _)| h == line).unwrap();
            let t = tables.remove(i);
            tables.push(t);
        } else if !line.trim().is_empty() {
            // A repeated key replaces the earlier one.
            let key = |l: &str| l.split('=').next().unwrap().trim().to_owned();
            let lines = &mut tables.last_mut().unwrap().1;
            lines.retain(|l| key(l) != key(line));
            lines.push(line.to_owned());
        }
    }
    tables
        .into_iter()
        .map(|(h, lines)| format!("{h}\n{}\n", lines.join("\n")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `text` with the commented block that starts at `# [header` (up to the next blank
/// line) switched on, except its lines setting a key in `skip`.
fn uncommented(text: &str, header: &str, skip: &[&str]) -> String {
    let mut inside = false;
    text.lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with(&format!("# [{header}")) {
                inside = true;
            } else if t.is_empty() {
                inside = false;
            }
            let skipped = skip.iter().any(|k| t.starts_with(&format!("# {k} =")));
            if inside && !skipped {
                t.trim_start_matches("# ").to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn site_dp_block_of_the_example_parses_and_bad_values_are_named() {
    let dir = dir_with_vocab();
    let vocab = dir.path().join("vocab.json");
    let text = uncommented(EXAMPLE_TOML, "site_dp", &[]);
    let c = RunConfig::with_vocab(&text, &vocab).unwrap();
    let dp = c.site_dp.as_ref().expect("[site_dp] parsed");
    assert_eq!(
        dp.mode,
        fedflow_common::privacy::dpfedavg::TrustMode::Central
    );
    assert_eq!((dp.sampling_rate, dp.expected_sites), (Some(0.05), 100.0));
    assert_eq!(dp.adaptive_clipping.as_ref().unwrap().bit_noise_std, 5.0);
    // Rounds within the target: that many fit, one more does not.
    let fit = dp.rounds_within_target(&c.sampling).unwrap();
    use fedflow_common::privacy::planner::{Accounting, epsilon_by};
    let eps = |a: Accounting, r: u64| {
        epsilon_by(a, &[dp.round_event(&c.sampling)], r, dp.target_delta).unwrap()
    };
    assert!(
        eps(Accounting::Pld, fit) <= dp.target_epsilon
            && eps(Accounting::Pld, fit + 1) > dp.target_epsilon
    );
    // RDP alone would allow fewer.
    assert!(eps(Accounting::Rdp, fit) > dp.target_epsilon, "{fit}");
    assert!(RunConfig::demo(&vocab).unwrap().site_dp.is_none());
    // What a round is charged, by mode and sampling.
    use fedflow_common::privacy::dpfedavg::TrustMode;
    let all = SamplingConfig::default();
    let fixed = SamplingConfig {
        count: Some(10),
        ..SamplingConfig::default()
    };
    let poisson = dp.round_event(&all);
    assert_eq!((poisson.q, poisson.z), (0.05, 1.0), "Poisson: amplified");
    let mut central_fixed = dp.clone();
    central_fixed.sampling_rate = None;
    let e = central_fixed.round_event(&all);
    assert_eq!((e.q, e.z), (1.0, 1.0), "everyone available");
    let e = central_fixed.round_event(&fixed);
    assert_eq!(
        (e.q, e.z),
        (1.0, 0.5),
        "a fixed-size sample: sensitivity 2C"
    );
    let mut local = central_fixed.clone();
    local.mode = TrustMode::Local;
    local.adaptive_clipping = None;
    let e = local.round_event(&fixed);
    assert_eq!(
        (e.q, e.z),
        (1.0, 1.0),
        "zero-out: the site takes part either way"
    );
    local.sampling_rate = Some(0.05);
    assert_eq!(
        local.round_event(&all).q,
        1.0,
        "no amplification under zero-out"
    );
    for (from, to, field) in [
        ("mode = \"central\"", "mode = \"secret\"", "mode"),
        ("clip_norm = 1.0", "clip_norm = -1.0", "site_dp: clip_norm"),
        (
            "sampling_rate = 0.05",
            "sampling_rate = 1.5",
            "site_dp.sampling_rate",
        ),
        (
            "expected_sites = 100",
            "expected_sites = 0",
            "expected_sites",
        ),
        (
            "target_delta = 1e-4",
            "target_delta = 0.0",
            "site_dp.target_delta",
        ),
        // z too small for one round within the target.
        (
            "noise_multiplier = 1.0",
            "noise_multiplier = 0.1",
            "site_dp.target_epsilon",
        ),
        // Adaptive clipping in local mode is refused (the bit would leak).
        ("mode = \"central\"", "mode = \"local\"", "mode = central"),
    ] {
        // Only in the [site_dp] block (the commented [record_dp] one has the same keys).
        let at = text.find("\n[site_dp]").unwrap();
        let bad = format!("{}{}", &text[..at], text[at..].replacen(from, to, 1));
        assert_ne!(bad, text, "{from}");
        let e = RunConfig::with_vocab(&bad, &vocab).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
}

#[test]
fn compression_block_of_the_example_parses_and_bad_combinations_are_named() {
    use fedflow_common::compress::ValueCodec;
    let dir = dir_with_vocab();
    let vocab = dir.path().join("vocab.json");
    let text = uncommented(EXAMPLE_TOML, "compression", &[]);
    let c = RunConfig::with_vocab(&text, &vocab).unwrap();
    let comp = c.compression();
    assert_eq!(comp.name(), "top0.01+int8/256+ef");
    assert_eq!(comp.values, ValueCodec::Int8);
    assert!(RunConfig::demo(&vocab).unwrap().compression().is_none());
    // It survives the stored form.
    let back = RunConfig::with_vocab(&c.to_toml_string().unwrap(), &vocab).unwrap();
    assert_eq!(back.compression(), comp);
    check_rejected("[compression]\nvalues = \"int4\"\n", "int4");
    check_rejected("[compression]\ntop_k = 0.0\n", "compression.top_k");
    check_rejected(
        "[compression]\nerror_feedback = true\n",
        "compression.error_feedback",
    );
    check_rejected(
        "[compression]\nvalues = \"int8\"\nblock_size = 0\n",
        "compression.block_size",
    );
    check_rejected("[compression]\nvalue = \"f16\"\n", "value");
    check_rejected(
        "[compression]\ntop_k = 0.1\n[aggregation]\nrule = \"median\"\n",
        "compression.top_k cannot be combined with aggregation.rule",
    );
    let distributed = "[compression]\nvalues = \"f16\"\n[site_dp]\nmode = \"distributed\"\n\
                       clip_norm = 1.0\nnoise_multiplier = 1.0\nexpected_sites = 10\n\
                       target_epsilon = 10.0\ntarget_delta = 1e-4\n";
    check_rejected(distributed, "site_dp.mode = \"distributed\"");
    // Dense codecs go with robust rules, and central mode takes any codec.
    for extra in [
        "[compression]\nvalues = \"int8\"\n[aggregation]\nrule = \"median\"\n",
        &distributed.replace("distributed", "central"),
    ] {
        let text = merge_tables(&format!("{MINIMAL}{extra}"));
        RunConfig::from_toml_str(&text, dir.path()).unwrap();
    }
}

#[test]
fn record_dp_block_of_the_example_parses_and_bad_values_are_named() {
    let dir = dir_with_vocab();
    let vocab = dir.path().join("vocab.json");
    // The example's commented [record_dp] block, switched on (with a batch size).
    let text = uncommented(EXAMPLE_TOML, "record_dp", &["sampling_rate"]);
    let c = RunConfig::with_vocab(&text, &vocab).unwrap();
    let dp = c.record_dp.as_ref().expect("[record_dp] parsed");
    // The smallest site that fits the budget: it does, one unit fewer does not.
    let (epochs, rounds) = (c.train.epochs, c.run.rounds);
    let n = dp.min_units_within_target(epochs, rounds).unwrap().unwrap();
    assert!(dp.site_epsilon(n, epochs, rounds).unwrap() <= dp.target_epsilon);
    assert!(dp.site_epsilon(n - 1, epochs, rounds).unwrap() > dp.target_epsilon);
    // With a shared sampling rate every site size spends the same.
    let shared = RunConfig::with_vocab(
        &text.replacen("expected_batch_size = 64", "sampling_rate = 0.05", 1),
        &vocab,
    )
    .unwrap();
    let shared = shared.record_dp.unwrap();
    assert_eq!(shared.dp_sgd().sampling_rate, Some(0.05));
    let (a, b) = (
        shared.site_epsilon(300, epochs, rounds).unwrap(),
        shared.site_epsilon(30_000, epochs, rounds).unwrap(),
    );
    assert_eq!(a, b);
    assert_eq!(dp.dp_sgd(), fedflow_common::train::DpSgdConfig::default());
    assert_eq!((dp.target_epsilon, dp.target_delta), (8.0, 1e-5));
    assert!(RunConfig::demo(&vocab).unwrap().record_dp.is_none());
    for (from, to, field) in [
        ("clip_norm = 1.0", "clip_norm = 0.0", "record_dp.clip_norm"),
        (
            "noise_multiplier = 1.0",
            "noise_multiplier = -1.0",
            "record_dp.noise_multiplier",
        ),
        (
            "target_delta = 1e-5",
            "target_delta = 1.5",
            "record_dp.target_delta",
        ),
        (
            "target_epsilon = 8.0",
            "target_epsilon = 0.0",
            "record_dp.target_epsilon",
        ),
    ] {
        let bad = text.replacen(from, to, 1);
        let e = RunConfig::with_vocab(&bad, &vocab).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
}

#[test]
fn example_file_parses_and_validates() {
    let dir = dir_with_vocab();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/run.toml");
    let copy = dir.path().join("run.toml");
    std::fs::copy(&example, &copy).unwrap();
    let c = RunConfig::load(&copy).unwrap();
    assert_eq!(c.run.name, "demo");
    assert_eq!(c.run.rounds, 10);
    assert_eq!(c.train.epochs, 2);
    assert_eq!(c.sampling.fraction, 1.0);
    assert_eq!(c.sampling.min_available, 20);
    assert_eq!(c.model.vocab_size, Some(5));
    assert_eq!(c.model_config().unwrap().vocab_size, 5);
    assert_eq!(crate::strategy::build(&c, &[]).unwrap().name(), "fedavg");
    // Every key the example sets is its default except the demo's choices.
    assert_eq!(
        c.model.model_config().unwrap(),
        ModelConfig {
            vocab_size: 5,
            ..ModelConfig::default()
        }
    );
    assert_eq!(
        c.rounds,
        RoundsSection {
            min_completed: 16,
            ..RoundsSection::default()
        }
    );
    assert_eq!(c.evaluation, EvaluationSection::default());
    assert_eq!(c.transport, TransportSection::default());
    assert_eq!(c.limits, LimitsSection::default());
    assert_eq!(c.aggregation, AggregationSection::default());
}

#[test]
fn limits_and_aggregation_are_validated_naming_the_field() {
    let dir = dir_with_vocab();
    for (extra, field) in [
        (
            "[limits]\nmax_concurrent_calls = 0\n",
            "limits.max_concurrent_calls",
        ),
        (
            "[limits]\nrequests_per_second = 0.0\n",
            "limits.requests_per_second",
        ),
        ("[limits]\nrequest_burst = 0\n", "limits.request_burst"),
        (
            "[aggregation]\nrule = \"trimmed_mean\"\ntrim_fraction = 0.5\n",
            "aggregation.trim_fraction",
        ),
        ("[aggregation]\nrule = \"mode\"\n", "rule"),
        (
            "[aggregation]\nrule = \"median\"\n[site_dp]\nmode = \"central\"\nclip_norm = 1.0\n\
             noise_multiplier = 1.0\nexpected_sites = 10\ntarget_epsilon = 8.0\ntarget_delta = 1e-5\n",
            "aggregation.rule",
        ),
    ] {
        let text = format!("{MINIMAL}{extra}");
        let e = RunConfig::from_toml_str(&text, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    let c = RunConfig::from_toml_str(
        &format!("{MINIMAL}[aggregation]\nrule = \"trimmed_mean\"\ntrim_fraction = 0.2\n"),
        dir.path(),
    )
    .unwrap();
    assert_eq!(c.aggregation.rule, AggregationRule::TrimmedMean);
}

#[test]
fn demo_is_the_example_with_the_given_vocabulary() {
    let dir = dir_with_vocab();
    let vocab = dir.path().join("vocab.json");
    let demo = RunConfig::demo(&vocab).unwrap();
    let copy = dir.path().join("run.toml");
    std::fs::write(&copy, EXAMPLE_TOML).unwrap();
    assert_eq!(demo, RunConfig::load(&copy).unwrap());
    assert!(demo.model.vocab.is_absolute());
}

#[test]
fn minimal_file_gets_defaults() {
    let dir = dir_with_vocab();
    let c = RunConfig::from_toml_str(MINIMAL, dir.path()).unwrap();
    assert_eq!(c.run.seed, 0);
    assert_eq!(c.run.rounds, 10);
    assert_eq!(c.run.strategy, StrategyKind::Fedavg);
    assert_eq!(c.run.server_learning_rate(), 1.0);
    assert_eq!(c.run.server_momentum(), 0.0);
    assert_eq!(c.model.vocab_size, Some(5));
    assert_eq!(
        ModelSection {
            vocab_size: None,
            vocab: PathBuf::new(),
            ..c.model.clone()
        },
        ModelSection::new("")
    );
    assert_eq!(c.train, TrainSection::default());
    assert_eq!(c.train.epochs, 1);
    assert_eq!(c.train.patience, 0, "early stopping defaults off");
    assert_eq!(c.sampling, SamplingConfig::default());
    assert_eq!(c.rounds, RoundsSection::default());
    assert_eq!(c.evaluation, EvaluationSection::default());
    assert_eq!(c.transport.chunk_bytes, 1 << 20);
    assert_eq!(c.transport.max_model_bytes, 1 << 30);
}

#[test]
fn bad_values_name_their_field() {
    for (extra, field) in [
        (
            "[rounds]\ndeadline_secs = 0",
            "rounds.deadline_secs: 0 must be at least 1",
        ),
        ("[run]\nrounds = 0", "run.rounds"),
        ("[run]\nname = \"a b\"", "run.name"),
        ("[run]\nname = \"..\"", "run.name"),
        // The store refuses a leading dot in run ids, so the config does too.
        ("[run]\nname = \".pilot\"", "must not start with '.'"),
        ("[run]\nname = \"\"", "run.name"),
        (
            &format!("[run]\nname = \"{}\"", "x".repeat(129)),
            "run.name",
        ),
        ("[run]\nserver_momentum = 0.5", "run.server_momentum"),
        (
            "[run]\nstrategy = \"fedavgm\"\nserver_momentum = 1.0",
            "run.server_momentum",
        ),
        (
            "[run]\nstrategy = \"fedavgm\"\nserver_learning_rate = 0.0",
            "run.server_learning_rate",
        ),
        ("[run]\nstrategy = \"fedprox\"", "fedprox"),
        ("[model]\ndropout = 1.5", "model.dropout"),
        (
            "[model]\nencoder = \"transformer\"\nnum_heads = 5",
            "model.num_heads",
        ),
        ("[train]\nepochs = 0", "train.epochs"),
        ("[train]\nlearning_rate = -1.0", "train.learning_rate"),
        ("[train]\nfedprox_mu = -0.1", "train.fedprox_mu"),
        ("[train]\noptimizer = \"adam\"", "adam"),
        ("[sampling]\nfraction = 0.0", "sampling.fraction"),
        ("[sampling]\ncount = 0", "sampling.count"),
        (
            "[rounds]\nheartbeat_timeout_secs = 600",
            "rounds.heartbeat_timeout_secs",
        ),
        ("[rounds]\nmin_completed = 0", "rounds.min_completed"),
        (
            "[rounds]\nmin_completed = 3\n[sampling]\nmin_selected = 2\nmin_available = 4",
            "rounds.min_completed: 3 exceeds sampling.min_selected 2",
        ),
        (
            "[rounds]\nmin_completed = 3\n[sampling]\ncount = 2\nmin_selected = 3\n\
             min_available = 4",
            "sampling.count",
        ),
        ("[rounds]\non_quorum_failure = \"wait\"", "wait"),
        (
            "[evaluation]\nevery = 11\nfinal_round = false",
            "evaluation.every",
        ),
        ("[transport]\nchunk_bytes = 1024", "transport.chunk_bytes"),
        (
            "[transport]\nchunk_bytes = 8388608",
            "transport.chunk_bytes",
        ),
        (
            "[transport]\nmax_model_bytes = 4096",
            "transport.max_model_bytes",
        ),
    ] {
        check_rejected(&format!("\n{extra}\n"), field);
    }
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    for (extra, key) in [
        ("[rounds]\ndeadline = 5", "deadline"),
        ("[model]\nhiden_size = 32", "hiden_size"),
        ("[train]\nepohcs = 3", "epohcs"),
        ("[sampling]\nfracton = 0.5", "fracton"),
        ("[telemetry]\nenabled = true", "telemetry"),
    ] {
        let dir = dir_with_vocab();
        let text = merge_tables(&format!("{MINIMAL}\n{extra}\n"));
        let err = RunConfig::from_toml_str(&text, dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("unknown field `{key}`")), "{err}");
        assert!(err.contains("line"), "no location in: {err}");
    }
}

#[test]
fn missing_required_keys_are_named() {
    let dir = dir_with_vocab();
    let err = RunConfig::from_toml_str("[model]\nvocab = \"vocab.json\"\n", dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("run"), "{err}");
    let err = RunConfig::from_toml_str("[run]\nname = \"x\"\n[model]\n", dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocab"), "{err}");
}

#[test]
fn relative_vocab_path_resolves_against_the_config_directory() {
    let dir = dir_with_vocab();
    let sub = dir.path().join("configs");
    std::fs::create_dir(&sub).unwrap();
    let text = "[run]\nname = \"r\"\n[model]\nvocab = \"../vocab.json\"\n";
    std::fs::write(sub.join("run.toml"), text).unwrap();
    let c = RunConfig::load(sub.join("run.toml")).unwrap();
    assert!(c.model.vocab.is_absolute());
    assert_eq!(
        std::fs::canonicalize(&c.model.vocab).unwrap(),
        std::fs::canonicalize(dir.path().join("vocab.json")).unwrap()
    );
    // Resolved against the file's directory, not the working directory.
    let err = RunConfig::from_toml_str(text, dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.vocab"), "{err}");
    // An absolute path is kept.
    let abs = dir.path().join("vocab.json");
    let text = format!("[run]\nname = \"r\"\n[model]\nvocab = {:?}\n", abs);
    let c = RunConfig::from_toml_str(&text, "/nonexistent").unwrap();
    assert_eq!(c.model.vocab, std::path::absolute(&abs).unwrap());
}

#[test]
fn load_names_the_file() {
    let dir = dir_with_vocab();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, format!("{MINIMAL}[rounds]\ndeadline_secs = 0\n")).unwrap();
    let err = RunConfig::load(&path).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "run config {}: rounds.deadline_secs: 0 must be at least 1",
            path.display()
        )
    );
    let err = RunConfig::load(dir.path().join("absent.toml")).unwrap_err();
    assert!(err.to_string().contains("absent.toml"), "{err}");
}

#[test]
fn vocab_size_comes_from_the_vocabulary() {
    let dir = dir_with_vocab();
    let ok = merge_tables(&format!("{MINIMAL}[model]\nvocab_size = 5\n"));
    assert_eq!(
        RunConfig::from_toml_str(&ok, dir.path())
            .unwrap()
            .model
            .vocab_size,
        Some(5)
    );
    let bad = merge_tables(&format!("{MINIMAL}[model]\nvocab_size = 100\n"));
    let err = RunConfig::from_toml_str(&bad, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.vocab_size: 100 conflicts with the vocabulary"),
        "{err}"
    );
    assert!(err.contains("5 ids"), "{err}");
}

#[test]
fn toml_round_trip() {
    let dir = dir_with_vocab();
    let text = merge_tables(&format!(
        "{MINIMAL}[run]\nseed = 7\nstrategy = \"fedavgm\"\nserver_momentum = 0.5\n\
         [train]\nfedprox_mu = 0.01\nlearning_rate = 0.1\noptimizer = \"sgd\"\n\
         seed_policy = \"per_round\"\n[sampling]\ncount = 3\nfraction = 0.3\n\
         [rounds]\non_quorum_failure = \"pause\"\n[model]\nencoder = \"gru\"\n"
    ));
    let c = RunConfig::from_toml_str(&text, dir.path()).unwrap();
    let written = c.to_toml_string().unwrap();
    let back = RunConfig::from_toml_str(&written, "/elsewhere").unwrap();
    assert_eq!(back, c, "{written}");
    assert_eq!(back.to_toml_string().unwrap(), written);
    assert_eq!(
        crate::strategy::build(&back, &[]).unwrap().name(),
        "fedavgm"
    );

    let demo = RunConfig::demo(dir.path().join("vocab.json")).unwrap();
    let back = RunConfig::from_toml_str(&demo.to_toml_string().unwrap(), "/").unwrap();
    assert_eq!(back, demo);
}

#[test]
fn model_section_covers_every_model_config_key() {
    // Fails when ModelConfig gains a field that [model] does not accept.
    let mut table = toml::Table::try_from(ModelConfig::default()).unwrap();
    table.insert("vocab".into(), "v.json".into());
    let section: ModelSection = table.try_into().unwrap();
    assert_eq!(
        section.model_config().unwrap(),
        ModelConfig::default(),
        "defaults differ"
    );
}

#[test]
fn train_section_maps_to_train_config() {
    let s = TrainSection::default();
    let t = s.train_config(9);
    let d = TrainConfig::default();
    assert_eq!(
        t,
        TrainConfig {
            epochs: 1,
            patience: 0,
            seed: 9,
            ..d
        }
    );
}

#[test]
fn local_seeds_follow_the_policy() {
    let dir = dir_with_vocab();
    let mut c = RunConfig::from_toml_str(MINIMAL, dir.path()).unwrap();
    c.run.seed = 11;
    let seed = |c: &RunConfig, r, s| c.local_train_config(r, s).seed;
    assert_ne!(seed(&c, 1, "a"), seed(&c, 1, "b"));
    assert_ne!(seed(&c, 1, "a"), seed(&c, 2, "a"));
    assert_eq!(seed(&c, 3, "a"), seed(&c, 3, "a"));
    // Fixed values: the derivation must never change between releases.
    assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    c.train.seed_policy = SeedPolicy::PerRound;
    assert_eq!(seed(&c, 1, "a"), seed(&c, 1, "b"));
    assert_ne!(seed(&c, 1, "a"), seed(&c, 2, "a"));
    c.train.seed_policy = SeedPolicy::Fixed;
    assert_eq!(seed(&c, 1, "a"), 11);
    assert_eq!(seed(&c, 2, "b"), 11);
}

#[test]
fn evaluation_schedule() {
    let dir = dir_with_vocab();
    let mut c = RunConfig::from_toml_str(MINIMAL, dir.path()).unwrap();
    c.evaluation.every = 3;
    let rounds: Vec<u64> = (1..=10).filter(|&r| c.evaluates_after(r)).collect();
    assert_eq!(rounds, [3, 6, 9, 10]);
    c.evaluation.final_round = false;
    let rounds: Vec<u64> = (1..=10).filter(|&r| c.evaluates_after(r)).collect();
    assert_eq!(rounds, [3, 6, 9]);
    // every = 0: the final round only, or never.
    c.evaluation.every = 0;
    assert_eq!(c.validate(), Ok(()));
    assert!((1..=10).all(|r| !c.evaluates_after(r)));
    c.evaluation.final_round = true;
    let rounds: Vec<u64> = (1..=10).filter(|&r| c.evaluates_after(r)).collect();
    assert_eq!(rounds, [10]);
}

#[test]
fn validate_catches_changes_after_loading() {
    let dir = dir_with_vocab();
    let mut c = RunConfig::from_toml_str(MINIMAL, dir.path()).unwrap();
    assert_eq!(c.validate(), Ok(()));
    c.run.seed = u64::MAX;
    assert!(c.validate().unwrap_err().starts_with("run.seed:"));
    c.run.seed = 0;
    c.model.vocab_size = None;
    assert!(c.validate().unwrap_err().starts_with("model.vocab_size:"));
}

#[test]
fn schedule_publish_and_retention_are_validated_naming_the_field() {
    check_rejected("[schedule]\nmode = \"forever\"\n", "mode");
    check_rejected("[schedule]\nevery = 3\n", "every");
    check_rejected("[publish]\ntolerance = 1.5\n", "publish.tolerance");
    check_rejected("[publish]\nmin_sites = 0\n", "publish.min_sites");
    check_rejected("[publish]\nrule = \"every\"\nevery = 0\n", "publish.every");
    check_rejected("[publish]\nmetric = \"loss\"\n", "metric");
    check_rejected("[retention]\nkeep = 3\n", "keep");
    check_rejected(
        "[schedule]\nmode = \"continuous\"\n[evaluation]\nevery = 0\n",
        "evaluation.every",
    );
    let dir = dir_with_vocab();
    // Continuous: run.rounds does not end it, retention keeps 20 by default, the last
    // "round" is never the final evaluation.
    let c = RunConfig::from_toml_str(
        &format!("{MINIMAL}[schedule]\nmode = \"continuous\"\n"),
        dir.path(),
    )
    .unwrap();
    assert!(!c.finished_after(1_000_000));
    assert_eq!(c.retention.keep_last(&c.schedule), Some(DEFAULT_KEEP_LAST));
    let fixed = RunConfig::from_toml_str(MINIMAL, dir.path()).unwrap();
    assert!(fixed.finished_after(10) && !fixed.finished_after(9));
    assert_eq!(fixed.retention.keep_last(&fixed.schedule), None);
    assert_eq!(fixed.publish.rule, PublishRule::Evaluation);
}
