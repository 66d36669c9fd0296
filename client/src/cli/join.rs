//! `fedflow-client join`: a partner site joins a federation and trains (or answers without
//! training) for the coordinator until its run finishes.

use std::path::PathBuf;

use clap::Args;
use fedflow_client::federation::{SiteOptions, run_site_until};
use fedflow_client::privacy::SitePrivacy;
use fedflow_client::site::SiteTrainer;
use fedflow_common::data::{LoadOptions, Vocab};

use crate::SiteDataArgs;

/// What a joining site does with training tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TrainerKind {
    /// Train on the site's data.
    Local,
    /// Answer without training (overhead measurements).
    Noop,
}

/// Arguments of `join`.
#[derive(Debug, Args)]
pub(crate) struct JoinArgs {
    /// Coordinator address: https://HOST:PORT (mutual TLS, with --identity) or
    /// http://HOST:PORT (a coordinator serving plaintext, with --insecure-plaintext).
    #[arg(long)]
    coordinator: String,
    /// This site's certificate bundle (cert.pem, key.pem, ca.pem from `fedflow-coordinator
    /// pki issue --role site`). The coordinator knows the site by this certificate.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Talk to a coordinator serving plaintext (no TLS, no authentication).
    #[arg(long)]
    insecure_plaintext: bool,
    /// This site's id (under mutual TLS it must match the certificate's, and may be left
    /// out).
    #[arg(long)]
    site_id: Option<String>,
    /// This site's data file (required by the local trainer). It is read again before every
    /// task when it changed (appended or replaced), with the same validation and the same
    /// split by session id; a task is declined while the file has a bad row.
    #[arg(long, required_if_eq("trainer", "local"))]
    data: Option<PathBuf>,
    /// The federation's event vocabulary (required by the local trainer).
    #[arg(long, required_if_eq("trainer", "local"))]
    vocab: Option<PathBuf>,
    /// What to do with training tasks: `local` trains on the site's data; `noop` returns a
    /// small deterministic delta without training or data (to measure the coordinator's own
    /// overhead).
    #[arg(long, value_enum, default_value = "local")]
    trainer: TrainerKind,
    /// Training examples a `noop` site reports (its FedAvg weight).
    #[arg(long, default_value_t = 100)]
    noop_examples: usize,
    #[command(flatten)]
    site_data: SiteDataArgs,
    /// Directory of this site's privacy ledger (created if needed). Required to take part in
    /// runs with record-level DP; keep it for the site's whole life: it is the record of
    /// every privacy spend.
    #[arg(long)]
    privacy_dir: Option<PathBuf>,
    /// The most record-level epsilon this site's ledger may ever reach (at --delta); rounds
    /// that would go past it are declined.
    #[arg(long, requires = "privacy_dir")]
    max_epsilon: Option<f64>,
    /// delta at which the site's limit is checked.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// Send metrics computed on the site's data (losses, accuracy) with DP updates and answer
    /// evaluation tasks: they are outside the DP guarantee.
    #[arg(long, conflicts_with = "withhold_metrics")]
    release_metrics: bool,
    /// Send no metric computed on the site's data in any run (losses, accuracy, macro-F1, the
    /// epoch kept, epochs run, training time, the validation count, epoch progress in
    /// heartbeats; under site-level DP also the training count), and decline evaluation tasks.
    /// For sites protected by site-level DP alone, whose guarantee covers only the update.
    #[arg(long)]
    withhold_metrics: bool,
    /// Decline training tasks in which this site would add less site-level noise itself than
    /// this multiple of the task's clip: tasks without site-level DP, central mode (the site
    /// adds no noise) and local or distributed tasks below it. Sets the per-round protection
    /// this site has against the coordinator, whatever the run configuration says.
    #[arg(long)]
    min_site_noise: Option<f64>,
    /// Keep the federation's published version installed in this folder (a model directory
    /// under `versions/`, named by `current.json`), downloading each newly published
    /// version; needs --vocab.
    #[arg(long)]
    published_dir: Option<PathBuf>,
    /// This site's working state (created if needed): the residual of compressed updates
    /// under error feedback, kept across restarts. Without it the residual is kept in memory
    /// and lost when the site restarts.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// On SIGTERM or Ctrl-C the site takes no new task and leaves; a task in progress has
    /// this many seconds to finish before it is abandoned.
    #[arg(long, default_value_t = 30.0, value_parser = parse_grace)]
    grace_secs: f64,
}

fn parse_grace(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s} is not a number of seconds >= 0")),
    }
}

fn grace(a: &JoinArgs) -> std::time::Duration {
    std::time::Duration::from_secs_f64(a.grace_secs)
}

/// Runs `join`: opens the site's data (or the no-op trainer) and its privacy ledger, then
/// works for the coordinator until the run finishes, and prints what the site did.
pub(crate) fn run(a: JoinArgs) -> anyhow::Result<()> {
    if a.trainer == TrainerKind::Noop {
        let opts = site_options(&a)?;
        println!(
            "site {}: no-op trainer; joining {}",
            opts.site_id, a.coordinator
        );
        let trainer = std::sync::Arc::new(fedflow_client::noop::NoopTrainer::new(a.noop_examples));
        let summary = tokio::runtime::Runtime::new()?.block_on(run_site_until(
            opts,
            trainer,
            crate::signal::terminated(),
            grace(&a),
        ))?;
        print_summary(&summary);
        return Ok(());
    }
    let mut opts = site_options(&a)?;
    let (Some(vocab_path), Some(data)) = (&a.vocab, &a.data) else {
        anyhow::bail!("the local trainer needs --data and --vocab");
    };
    let vocab = Vocab::load(vocab_path)?;
    opts.published = a
        .published_dir
        .clone()
        .map(|dir| fedflow_client::published::PublishedSink {
            dir,
            vocab: vocab.clone(),
        });
    let options = LoadOptions {
        skip_invalid: a.site_data.skip_invalid,
    };
    // Read again before every task when the file changed: feedback appended between rounds
    // is trained on in the next one.
    let (dataset, source) = fedflow_client::site::source::DataSource::open(
        data,
        &vocab,
        options,
        a.site_data.val_fraction,
    )?;
    println!(
        "site {}: {} training and {} validation sessions ({} of {} events unknown to the \
         vocabulary, {} of them in its out-of-vocabulary buckets); joining {}",
        opts.site_id,
        dataset.train.len(),
        dataset.validation.len(),
        dataset.stats.unknown_events,
        dataset.stats.events_total,
        dataset.stats.oov_bucket_events,
        a.coordinator
    );
    let sessions = dataset.train.len();
    let mut trainer = SiteTrainer::new(dataset, &vocab, a.site_data.device.open()?)
        .with_source(source)
        .withholding_metrics(a.withhold_metrics);
    if let Some(z) = a.min_site_noise {
        trainer = trainer.with_min_site_noise(z)?;
    }
    if let Some(dir) = &a.state_dir {
        trainer = trainer.with_state_dir(dir)?;
    }
    if let Some(dir) = &a.privacy_dir {
        let Some(max) = a.max_epsilon else {
            anyhow::bail!("--privacy-dir needs --max-epsilon (this site's limit)");
        };
        let privacy = SitePrivacy::open(dir, max, a.delta, a.release_metrics)?;
        let spent = privacy.ledger().spend()?.epsilon(a.delta)?;
        println!(
            "privacy ledger {}: epsilon {spent:.4} of {max} spent at delta {:e}",
            dir.display(),
            a.delta
        );
        if a.delta * sessions as f64 >= 1.0 {
            eprintln!(
                "warning: --delta {:e} is not below 1/n = 1/{sessions} (this site's training sessions): \
                 a mechanism publishing one session in n outright meets it, so the site's limit \
                 is weak whatever epsilon says; choose a delta well below 1/n",
                a.delta
            );
        }
        trainer = trainer.with_privacy(std::sync::Arc::new(privacy));
    }
    let trainer = std::sync::Arc::new(trainer);
    let summary = tokio::runtime::Runtime::new()?.block_on(run_site_until(
        opts,
        trainer,
        crate::signal::terminated(),
        grace(&a),
    ))?;
    print_summary(&summary);
    for (round, why) in &summary.rejected {
        println!("  round {round}: {why}");
    }
    for (round, why) in &summary.declined {
        println!("  round {round} declined: {why}");
    }
    Ok(())
}

/// The site's connection options from `join`'s flags.
fn site_options(a: &JoinArgs) -> anyhow::Result<SiteOptions> {
    Ok(SiteOptions::for_coordinator(
        &a.coordinator,
        a.identity.as_deref(),
        a.insecure_plaintext,
        a.site_id.as_deref(),
        fedflow_client::federation::SettingNames {
            site_id: "--site-id",
            identity: "--identity",
        },
    )?)
}

/// What a site prints when its run is over.
fn print_summary(summary: &fedflow_client::federation::SiteSummary) {
    println!(
        "{}: contributed to rounds {:?}; {} update(s) refused; {} reconnect(s)",
        if summary.stopped {
            "left when asked to stop"
        } else {
            "run finished"
        },
        summary.rounds_contributed,
        summary.rejected.len(),
        summary.reconnects
    );
}
