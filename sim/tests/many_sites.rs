//! The simulation at scale: 60 partner sites as tasks in one process, each with its own
//! generated data, each a real gRPC client of a real coordinator on loopback.

use std::time::Duration;

use fedflow_common::data::{SiteDataset, Vocab};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_coordinator::config::RunConfig;
use fedflow_coordinator::store::RoundStatus;
use fedflow_sim::{SimOptions, SimSite, run_federation};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_sites_run_a_federation_in_one_process() {
    const SITES: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let fed = generate(&SynthConfig {
        sites: SITES,
        total_sessions: SITES * 40,
        min_site_sessions: 20,
        seed: 21,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    vocab.save(dir.path().join("vocab.json")).unwrap();
    let toml = format!(
        "[run]\nname = \"many\"\nseed = 2\nrounds = 2\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
         [train]\nepochs = 1\nbatch_size = 16\nlearning_rate = 0.01\n\
         [sampling]\nfraction = 0.5\nmin_selected = 30\nmin_available = {SITES}\n\
         [rounds]\ndeadline_secs = 300\nmin_completed = 25\nheartbeat_timeout_secs = 60\n\
         [evaluation]\nevery = 2\n"
    );
    let cfg = RunConfig::from_toml_str(&toml, dir.path()).unwrap();
    let sites: Vec<SimSite> = fed
        .sites
        .iter()
        .map(|s| SimSite {
            name: s.name.clone(),
            dataset: SiteDataset::from_records(&s.records, &vocab, 0.2).unwrap(),
            privacy: None,
            source: None,
            published: None,
        })
        .collect();
    let opts = SimOptions {
        concurrent_work: 2,
        progress_every: Duration::from_millis(200),
        // Every site over mutual TLS with its own certificate.
        pki_dir: Some(dir.path().join("pki")),
        stop: None,
    };
    let mut views = 0;
    let outcome = run_federation(
        cfg,
        &dir.path().join("coordinator"),
        sites,
        &vocab,
        &opts,
        |_| views += 1,
    )
    .await
    .unwrap();

    assert_eq!(outcome.committed_round, 2);
    assert_eq!(outcome.sites.len(), SITES);
    assert!(views > 0, "the progress callback ran");
    // Half of the 60 sites train each round (fraction 0.5); every site evaluates at the end.
    for round in [1, 2] {
        let trained = outcome
            .sites
            .iter()
            .filter(|(_, s)| s.rounds_contributed.contains(&round))
            .count();
        assert_eq!(trained, SITES / 2, "round {round}");
    }
    assert!(
        outcome
            .sites
            .iter()
            .all(|(_, s)| s.rounds_evaluated == [2] && s.rejected.is_empty())
    );
    let committed = outcome
        .rounds
        .iter()
        .filter(|r| r.status == RoundStatus::Committed)
        .count();
    assert_eq!(committed, 3, "rounds 0, 1 and 2");
    let last = outcome.rounds.last().unwrap();
    assert_eq!(
        last.model_sha256.as_deref(),
        Some(outcome.global_sha256.as_str())
    );
    assert!(
        last.evaluation_json
            .as_deref()
            .unwrap()
            .contains("\"sites\":60")
    );
    // Every run gets its privacy-audit report; this one has no DP and says so.
    assert!(outcome.privacy_audit.is_file());
    assert!(
        outcome
            .privacy_summary
            .starts_with("no differential privacy"),
        "{}",
        outcome.privacy_summary
    );
    // And its run report: self-contained (no scripts, styles or images fetched), eight
    // charts, a table row per round, a link to the privacy-audit report next to it.
    let html = std::fs::read_to_string(&outcome.run_report).unwrap();
    assert!(html.contains("<h1>Run report: "), "{html}");
    assert_eq!(
        html.matches("<svg").count(),
        8,
        "accuracy, loss, per site, participation, norm, bytes, durations, publish gate"
    );
    assert!(html.contains("<h2>Bytes per round</h2>"));
    assert!(html.contains("Publish gate: candidate and published version"));
    for external in ["<script", "<link", "<img", "src=", "@import"] {
        assert!(
            !html.contains(external),
            "the report fetches something: {external}"
        );
    }
    let (registry, rounds) = html.split_once("<h2>Rounds</h2>").unwrap();
    assert_eq!(
        rounds.matches("<tr>").count(),
        1 + 2,
        "header and rounds 1-2"
    );
    // The default gate publishes the first version evaluated by enough sites: round 2.
    assert!(
        registry.contains("<h2>Published versions</h2>"),
        "{registry}"
    );
    assert!(
        registry.contains("id=\"published\">Version <b>2</b> is published"),
        "{registry}"
    );
    assert!(html.contains("href=\"privacy-audit.html\""));
    assert!(html.contains("Latest federated evaluation (round 2, 60 sites"));
    render_in_a_browser(&outcome.run_report);
}

/// Renders `page` in headless Chromium (installed from Debian's packages by
/// tests/browser/install-chromium.sh when missing): the browser must parse it into the
/// same eight charts, and its screenshot must be a full-size image with content (a blank or
/// broken page compresses to almost nothing).
fn render_in_a_browser(page: &std::path::Path) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/browser/install-chromium.sh");
    let found = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "no headless browser: {}",
        String::from_utf8_lossy(&found.stderr)
    );
    let browser = String::from_utf8(found.stdout).unwrap().trim().to_string();
    let url = format!("file://{}", page.display());
    let profile = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(&browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let dom = String::from_utf8(run(&["--dump-dom"])).unwrap();
    assert_eq!(
        dom.matches("<svg").count(),
        8,
        "the browser sees the eight charts"
    );
    let png = page.with_extension("png");
    run(&[
        "--window-size=1200,2800",
        &format!("--screenshot={}", png.display()),
    ]);
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h) = (
        u32::from_be_bytes(bytes[16..20].try_into().unwrap()),
        u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
    );
    assert_eq!((w, h), (1200, 2800));
    assert!(
        bytes.len() > 60_000,
        "a nearly empty screenshot: {} bytes",
        bytes.len()
    );
}

/// Site-level DP in distributed mode over real gRPC: Poisson-sampled sites clip and noise
/// their deltas in the client, the coordinator checks, tops up and records; the audit report
/// written at the end agrees with what the sites did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_sites_run_distributed_site_level_dp_over_grpc() {
    const SITES: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let fed = generate(&SynthConfig {
        sites: SITES,
        total_sessions: SITES * 30,
        min_site_sessions: 20,
        seed: 23,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    vocab.save(dir.path().join("vocab.json")).unwrap();
    let toml = format!(
        "[run]\nname = \"sitedp\"\nseed = 3\nrounds = 3\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
         [train]\nepochs = 1\nbatch_size = 16\nlearning_rate = 0.01\n\
         [sampling]\nmin_selected = 1\nmin_available = {SITES}\n\
         [rounds]\ndeadline_secs = 300\nmin_completed = 1\nheartbeat_timeout_secs = 60\n\
         [evaluation]\nevery = 0\nfinal_round = false\n\
         [site_dp]\nmode = \"distributed\"\nclip_norm = 0.05\nnoise_multiplier = 1.0\n\
         sampling_rate = 0.5\nexpected_sites = 20\ntarget_epsilon = 100\ntarget_delta = 1e-3\n"
    );
    let cfg = RunConfig::from_toml_str(&toml, dir.path()).unwrap();
    let sites: Vec<SimSite> = fed
        .sites
        .iter()
        .map(|s| SimSite {
            name: s.name.clone(),
            dataset: SiteDataset::from_records(&s.records, &vocab, 0.2).unwrap(),
            privacy: None,
            source: None,
            published: None,
        })
        .collect();
    let opts = SimOptions {
        concurrent_work: 2,
        progress_every: Duration::from_millis(200),
        pki_dir: None,
        stop: None,
    };
    let outcome = run_federation(
        cfg,
        &dir.path().join("coordinator"),
        sites,
        &vocab,
        &opts,
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(outcome.committed_round, 3);
    // No site was refused: every clipped, noised update is within the norm bound.
    assert!(outcome.sites.iter().all(|(_, s)| s.rejected.is_empty()));
    let audit: serde_json::Value = serde_json::from_slice(
        &std::fs::read(outcome.privacy_audit.with_file_name("privacy-audit.json")).unwrap(),
    )
    .unwrap();
    let site = &audit["site_level"];
    assert_eq!(site["trust_mode"], "distributed");
    let rounds = site["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    for (i, r) in rounds.iter().enumerate() {
        let round = (i + 1) as u64;
        let contributed = outcome
            .sites
            .iter()
            .filter(|(_, s)| s.rounds_contributed.contains(&round))
            .count() as u64;
        assert_eq!(
            r["contributions"].as_u64().unwrap(),
            contributed,
            "round {round}"
        );
        // Each site added z·C/√20; the coordinator topped the rest up to (z·C)².
        let share = r["site_noise_std"].as_f64().unwrap();
        assert!((share - 0.05 / 20f64.sqrt()).abs() < 1e-12);
        let top = r["server_noise_std"].as_f64().unwrap();
        let total = contributed as f64 * share * share + top * top;
        assert!(
            (total - 0.05f64.powi(2)).abs() < 1e-12 || (top == 0.0 && contributed > 20),
            "round {round}: {total}"
        );
    }
    // Against the coordinator: every site that sent an update is listed with its count.
    let against = site["against_coordinator"]["sites"].as_array().unwrap();
    let senders = outcome
        .sites
        .iter()
        .filter(|(_, s)| !s.rounds_contributed.is_empty())
        .count();
    assert_eq!(against.len(), senders);
}

/// `fedflow-sim site-curve` in miniature: the private run's ledger ends at its target ε
/// (z from the planner for exactly the configured rounds), and the curve is written.
#[test]
fn the_site_curve_spends_exactly_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fedflow_sim::site_curve::SiteCurveConfig {
        out: dir.path().to_path_buf(),
        sites: 30,
        sessions: 3000,
        seed: 4,
        val_fraction: 0.2,
        epsilons: vec![5.0],
        delta: 1e-3,
        sampling_rate: 0.3,
        clip_norm: 0.5,
        momenta: vec![0.0],
        server_learning_rate: 1.0,
        run_config: "[run]\nname = \"curve\"\nrounds = 3\n\
                     [model]\nvocab = \"vocab.json\"\nembed_dim = 4\nhidden_size = 4\n\
                     num_layers = 1\ndropout = 0.0\n[train]\nepochs = 1\nbatch_size = 16\n"
            .into(),
        threads: 2,
    };
    let report = fedflow_sim::site_curve::run(&cfg, &mut |_| {}).unwrap();
    assert_eq!(report.points.len(), 2);
    assert_eq!(report.expected_sites, 9.0);
    let (plain, private) = (&report.points[0], &report.points[1]);
    assert!(plain.target_epsilon.is_none() && plain.epsilon_spent.is_none());
    assert_eq!((plain.rounds, private.rounds), (3, 3));
    let spent = private.epsilon_spent.unwrap();
    assert!(spent <= 5.0 && spent > 5.0 * 0.999, "{spent}");
    assert!(private.scores.accuracy > 0.0 && private.scores.sessions > 0);
    assert!(dir.path().join("site-curve.json").is_file());
}
