//! `fedflow-sim`: whole federations in one process (thin layer over the library).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use fedflow_sim::demo::{self, DemoConfig};
use fedflow_sim::live::{self, LiveConfig};
use fedflow_sim::privacy_audit::{self, AuditConfig, Level};
use fedflow_sim::privacy_curve::{self, CurveConfig};
use fedflow_sim::site_curve::{self, SiteCurveConfig};

mod print;
mod study;
use print::{print_live, print_table};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// fedflow simulations: a coordinator and many partner sites in one process, over real gRPC
/// on loopback.
#[derive(Debug, Parser)]
#[command(name = "fedflow-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The one-command demo: generate partner data, run a federation, and compare the global
    /// model with the centralised baseline and with each site training alone.
    Demo(DemoArgs),
    /// The privacy-utility curve of record-level DP: the demo's federation without DP and
    /// with DP-SGD at every site for each target epsilon, scored on the held-out sessions.
    PrivacyCurve(CurveArgs),
    /// The privacy-utility curve of site-level DP with many small sites: Poisson-sampled
    /// DP-FedAvg (central, adaptive clipping) per target epsilon next to non-private FedAvg,
    /// with and without server momentum, through the real round engine in one process.
    SiteCurve(SiteCurveArgs),
    /// An empirical privacy audit with one training run (Steinke, Nasr, Jagielski 2023):
    /// canaries, each included with probability 1/2, through the real DP-SGD path (record
    /// level) or the real round engine (site level); writes the empirical lower bound on
    /// epsilon next to the accountant's (empirical-audit.json), for the privacy-audit
    /// report's `--empirical`.
    PrivacyAudit(AuditArgs),
    /// The cost of update compression: the demo's federation once per compression (same
    /// data, seeds and rounds), each global model's accuracy next to the uncompressed
    /// run's, with the bytes per round up and down (compression.json).
    CompressionStudy(study::StudyArgs),
    /// A continuous federation through a drift: sites collect new sessions every period and
    /// hold a sliding window of them, the label function changes mid-run, and the publish
    /// gate keeps the served model up to date; reports the served version, a version frozen
    /// at the drift and the exact ceiling per round (live.json, live.html).
    Live(LiveArgs),
    /// Many simulated sites in this process against a coordinator elsewhere: a load
    /// generator (one per pod of deploy/kubernetes/loadtest). Ends when the run does.
    Swarm(SwarmArgs),
}

#[derive(Debug, clap::Args)]
struct LiveArgs {
    /// Output folder (coordinator/, vocab.json, run.toml, live.json, live.html).
    #[arg(long, default_value = "runs/live")]
    out: PathBuf,
    /// Partner sites.
    #[arg(long, default_value_t = 6)]
    sites: usize,
    /// Sessions all sites collect per period.
    #[arg(long, default_value_t = 3_000)]
    sessions_per_period: usize,
    /// Periods simulated.
    #[arg(long, default_value_t = 8)]
    periods: usize,
    /// The first period (1-based) with the drifted label function.
    #[arg(long, default_value_t = 4)]
    drift_period: usize,
    /// Training rounds per period.
    #[arg(long, default_value_t = 4)]
    rounds_per_period: u64,
    /// Periods of sessions each site holds.
    #[arg(long, default_value_t = 2)]
    window: usize,
    /// Simulated hours between rounds (the report's time axis).
    #[arg(long, default_value_t = 24.0)]
    round_hours: f64,
    /// Seed of the data, labels and training.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Sites that may train at the same time.
    #[arg(long, default_value_t = 1)]
    concurrent: usize,
    /// A run configuration instead of the embedded sim/examples/live.toml (made continuous,
    /// its quorum fitted to the sites).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct SiteCurveArgs {
    /// Output folder (data/, one folder per run, site-curve.json).
    #[arg(long, default_value = "runs/site-curve")]
    out: PathBuf,
    /// Partner sites.
    #[arg(long, default_value_t = 2000)]
    sites: usize,
    /// Sessions over all sites.
    #[arg(long, default_value_t = 200_000)]
    sessions: usize,
    /// Seed of the data, training and (simulation only) the coordinator's randomness.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Site-level target epsilons of the private runs.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    epsilons: Vec<f64>,
    /// delta of every target (below 1 / sites).
    #[arg(long, default_value_t = 1e-4)]
    delta: f64,
    /// Poisson site sampling rate q.
    #[arg(long, default_value_t = 0.05)]
    sampling_rate: f64,
    /// Initial clip C (adaptive clipping tracks the median update norm from there).
    #[arg(long, default_value_t = 0.5)]
    clip_norm: f64,
    /// Server momentum values (0 = plain FedAvg).
    #[arg(long, value_delimiter = ',', default_value = "0,0.9")]
    momenta: Vec<f64>,
    /// Server learning rate of the momentum runs (its effective step is lr / (1 - momentum)).
    #[arg(long, default_value_t = 1.0)]
    server_lr: f64,
    /// Sites training at the same time.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The run configuration (default: the embedded sim/examples/site_curve.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// The generated federation both commands run on.
#[derive(Debug, clap::Args)]
pub(crate) struct DataArgs {
    /// Partner sites.
    #[arg(long, default_value_t = 20)]
    pub(crate) sites: usize,
    /// Sessions over all sites.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) sessions: usize,
    /// Seed of the data, sampling and training.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
}

#[derive(Debug, clap::Args)]
struct CurveArgs {
    /// Output folder (data/, one folder per run, privacy-curve.json).
    #[arg(long, default_value = "runs/privacy-curve")]
    out: PathBuf,
    /// The accountant that calibrates the noise to each target: pld (the tighter) or rdp.
    #[arg(long, default_value = "pld")]
    accountant: String,
    #[command(flatten)]
    data: DataArgs,
    /// Target epsilons of the private runs.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    epsilons: Vec<f64>,
    /// delta of every target.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// Clipping bound C.
    #[arg(long, default_value_t = 1.0)]
    clip_norm: f64,
    /// Poisson sampling rate q shared by all sites (each site's expected batch is q·n).
    #[arg(long, default_value_t = 0.05)]
    sampling_rate: f64,
    /// An expected batch size B instead of --sampling-rate (q = B / n differs by site; the
    /// smallest site then sets the noise multiplier).
    #[arg(long)]
    batch: Option<usize>,
    /// Learning rate of the private runs (noisy gradients want a larger step than the
    /// configuration's train.learning_rate, which the non-private run uses).
    #[arg(long, default_value_t = 0.03)]
    dp_learning_rate: f64,
    /// Sites that may train at the same time.
    #[arg(long, default_value_t = 2)]
    concurrent: usize,
    /// The run configuration shared by every run (default: the embedded
    /// sim/examples/privacy_curve.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Skip the non-private reference run.
    #[arg(long)]
    skip_non_private: bool,
}

#[derive(Debug, clap::Args)]
struct AuditArgs {
    /// What is audited: record (DP-SGD at one site of the demo's data, a canary is one
    /// record) or site (site-level DP-FedAvg over many sites, a canary is one site).
    #[arg(long, default_value = "record")]
    level: String,
    /// Output folder (data/, empirical-audit.json; site level: one coordinator folder per
    /// target).
    #[arg(long, default_value = "runs/privacy-audit")]
    out: PathBuf,
    /// Target epsilons the noise is calibrated to (PLD).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    epsilons: Vec<f64>,
    /// Also audit without any noise (record level; the control).
    #[arg(long)]
    no_noise: bool,
    /// Canaries m, each included with probability 1/2.
    #[arg(long, default_value_t = 1000)]
    canaries: usize,
    /// Confidence of the empirical lower bound.
    #[arg(long, default_value_t = 0.95)]
    confidence: f64,
    /// delta (default: 1e-5 at record level, 1e-4 at site level).
    #[arg(long)]
    delta: Option<f64>,
    /// Partner sites of the generated data (default: 20 at record level, 500 at site level).
    #[arg(long)]
    sites: Option<usize>,
    /// Sessions over all sites (default: 20,000 at record level, 50,000 at site level).
    #[arg(long)]
    sessions: Option<usize>,
    /// Seed of the data, the canaries and the noise.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Poisson sampling rate q (of records, or of sites).
    #[arg(long, default_value_t = 0.05)]
    sampling_rate: f64,
    /// Rounds (default: the configuration's).
    #[arg(long)]
    rounds: Option<u64>,
    /// Clip C (site level: the initial one of adaptive clipping; default 1 at record level,
    /// 0.5 at site level).
    #[arg(long)]
    clip_norm: Option<f64>,
    /// The DP-SGD learning rate (record level; the privacy curve's).
    #[arg(long, default_value_t = 0.03)]
    dp_learning_rate: f64,
    /// Sites training at the same time (site level).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The run configuration (default: the embedded sim/examples/privacy_curve.toml at
    /// record level, sim/examples/site_curve.toml at site level).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct SwarmArgs {
    /// The coordinator: https://HOST:PORT (with --identities) or http://HOST:PORT (a
    /// coordinator serving plaintext, for load tests only).
    #[arg(long)]
    coordinator: String,
    /// Sites in this process.
    #[arg(long, default_value_t = 100)]
    sites: usize,
    /// This process's index: its sites are <prefix>-<index>-<n> (an indexed Job's
    /// JOB_COMPLETION_INDEX).
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// The sites' name prefix.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// A folder holding one certificate bundle per site name (mutual TLS).
    #[arg(long)]
    identities: Option<PathBuf>,
    /// Train for real on this many generated sessions per site (needs --vocab) instead
    /// of answering with the no-op trainer.
    #[arg(long)]
    local_sessions: Option<usize>,
    /// The federation's vocabulary (with --local-sessions).
    #[arg(long)]
    vocab: Option<PathBuf>,
    /// Training examples each no-op site reports.
    #[arg(long, default_value_t = 100)]
    noop_examples: usize,
    /// Sites that may train at the same time.
    #[arg(long, default_value_t = 1)]
    concurrent: usize,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Output folder (data/, coordinator/, run.toml, demo.json); an earlier demo's products
    /// in it are replaced.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Federated rounds (default: the embedded run configuration's, 10).
    #[arg(long)]
    rounds: Option<u64>,
    /// Local epochs per round (default: the embedded run configuration's, 2).
    #[arg(long)]
    local_epochs: Option<usize>,
    /// Most epochs for the centralised and site-alone baselines.
    #[arg(long, default_value_t = 20)]
    baseline_epochs: usize,
    /// Sites that may train at the same time.
    #[arg(long, default_value_t = 1)]
    concurrent: usize,
    /// A run configuration to use instead of the embedded coordinator/examples/run.toml (its
    /// model.vocab is replaced by the generated vocabulary).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The per-site epsilon of the DP-SGD column: the same sites' federation with
    /// record-level DP-SGD at every site (PLD-calibrated noise; the privacy curve's model).
    #[arg(long, default_value_t = 8.0)]
    dp_epsilon: f64,
    /// delta of the DP-SGD column.
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    /// Skip the DP-SGD column.
    #[arg(long)]
    no_dp: bool,
}

/// The text of a run configuration given with `--config`.
pub(crate) fn read_config(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(a) => {
            let cfg = DemoConfig {
                out: a.out,
                sites: a.data.sites,
                sessions: a.data.sessions,
                seed: a.data.seed,
                rounds: a.rounds,
                local_epochs: a.local_epochs,
                baseline_epochs: a.baseline_epochs,
                concurrent_work: a.concurrent,
                run_config: a.config.as_deref().map(read_config).transpose()?,
                dp_epsilon: (!a.no_dp).then_some(a.dp_epsilon),
                dp_delta: a.dp_delta,
                ..DemoConfig::default()
            };
            let report = demo::run(&cfg, &mut |line| eprintln!("{line}")).await?;
            print_table(&report);
        }
        Command::Swarm(a) => {
            let cfg = fedflow_sim::swarm::SwarmConfig {
                coordinator: a.coordinator,
                sites: a.sites,
                index: a.index,
                prefix: a.prefix,
                identities: a.identities,
                local_sessions: a.local_sessions,
                vocab: a.vocab,
                noop_examples: a.noop_examples,
                concurrent_work: a.concurrent,
            };
            let summaries = fedflow_sim::swarm::run(&cfg).await?;
            let contributions: usize = summaries
                .iter()
                .map(|(_, s)| s.rounds_contributed.len())
                .sum();
            println!(
                "swarm {}: {} site(s) done, {contributions} contribution(s) in all",
                cfg.index,
                summaries.len()
            );
        }
        Command::CompressionStudy(a) => study::run(a).await?,
        Command::Live(a) => {
            let cfg = LiveConfig {
                out: a.out,
                sites: a.sites,
                sessions_per_period: a.sessions_per_period,
                periods: a.periods,
                drift_period: a.drift_period,
                rounds_per_period: a.rounds_per_period,
                window: a.window,
                round_hours: a.round_hours,
                seed: a.seed,
                concurrent_work: a.concurrent,
                run_config: a.config.as_deref().map(read_config).transpose()?,
                ..LiveConfig::default()
            };
            let report = live::run(&cfg, &mut |line| eprintln!("{line}")).await?;
            print_live(&report);
        }
        Command::PrivacyCurve(a) => {
            let run_config = match &a.config {
                Some(p) => read_config(p)?,
                None => include_str!("../examples/privacy_curve.toml").to_string(),
            };
            let cfg = CurveConfig {
                out: a.out,
                sites: a.data.sites,
                sessions: a.data.sessions,
                seed: a.data.seed,
                val_fraction: DemoConfig::default().val_fraction,
                epsilons: a.epsilons,
                delta: a.delta,
                run_config,
                clip_norm: a.clip_norm,
                expected_batch_size: a.batch.unwrap_or(0),
                sampling_rate: a.batch.is_none().then_some(a.sampling_rate),
                dp_learning_rate: Some(a.dp_learning_rate),
                concurrent_work: a.concurrent,
                non_private: !a.skip_non_private,
                accountant: a
                    .accountant
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--accountant: {e}"))?,
                mutual_tls: true,
            };
            let r = privacy_curve::run(&cfg, &mut |line| eprintln!("{line}")).await?;
            println!();
            println!(
                "{:>10} {:>8} {:>17} {:>9} {:>9}",
                "target eps", "z", "site eps (range)", "accuracy", "macroF1"
            );
            for p in &r.points {
                let eps = p
                    .target_epsilon
                    .map_or("none".to_string(), |e| e.to_string());
                let z = p
                    .noise_multiplier
                    .map_or("-".to_string(), |z| format!("{z:.4}"));
                let range = match (p.min_site_epsilon, p.max_site_epsilon) {
                    (Some(lo), Some(hi)) => format!("{lo:.2}..{hi:.2}"),
                    _ => "-".to_string(),
                };
                println!(
                    "{eps:>10} {z:>8} {range:>17} {:>9.4} {:>9.4}",
                    p.scores.accuracy, p.scores.macro_f1
                );
            }
            println!(
                "delta {:e}; C {}; B {}; smallest site {} training sessions; Bayes accuracy {:.4}",
                r.delta,
                r.clip_norm,
                r.expected_batch_size,
                r.smallest_site_sessions,
                r.bayes_accuracy
            );
        }
        Command::PrivacyAudit(a) => {
            let level = match a.level.as_str() {
                "record" => Level::Record,
                "site" => Level::Site,
                other => anyhow::bail!("--level {other:?}: expected record or site"),
            };
            let record = level == Level::Record;
            let run_config = match (&a.config, record) {
                (Some(p), _) => read_config(p)?,
                (None, true) => include_str!("../examples/privacy_curve.toml").to_string(),
                (None, false) => include_str!("../examples/site_curve.toml").to_string(),
            };
            let mut targets: Vec<Option<f64>> = Vec::new();
            if a.no_noise {
                targets.push(None);
            }
            targets.extend(a.epsilons.iter().copied().map(Some));
            let cfg = AuditConfig {
                out: a.out,
                canaries: a.canaries,
                confidence: a.confidence,
                delta: a.delta.unwrap_or(if record { 1e-5 } else { 1e-4 }),
                targets,
                seed: a.seed,
                sites: a.sites.unwrap_or(if record { 20 } else { 500 }),
                sessions: a.sessions.unwrap_or(if record { 20_000 } else { 50_000 }),
                sampling_rate: a.sampling_rate,
                run_config,
                rounds: a.rounds,
                clip_norm: a.clip_norm.unwrap_or(if record { 1.0 } else { 0.5 }),
                learning_rate: a.dp_learning_rate,
                threads: a.threads,
            };
            let r = privacy_audit::run(level, &cfg, &mut |line| eprintln!("{line}"))?;
            println!();
            println!(
                "{:>10} {:>8} {:>12} {:>12} {:>16}",
                "target eps", "z", "accountant", "empirical", "right / guesses"
            );
            for p in &r.points {
                println!(
                    "{:>10} {:>8.4} {:>12} {:>12.3} {:>16}",
                    p.target_epsilon.map_or("none".into(), |e| e.to_string()),
                    p.noise_multiplier,
                    p.epsilon.map_or("inf".into(), |e| format!("{e:.3}")),
                    p.audit.epsilon_lower_bound,
                    format!("{} / {}", p.audit.best.correct, p.audit.best.guesses)
                );
            }
            println!(
                "empirical: a lower bound at {}% confidence from {} canaries, not a guarantee; \
                 {}",
                r.points
                    .first()
                    .map_or(95.0, |p| p.audit.confidence * 100.0),
                cfg.canaries,
                cfg.out.join(privacy_audit::FILE).display()
            );
        }
        Command::SiteCurve(a) => {
            let run_config = match &a.config {
                Some(p) => read_config(p)?,
                None => include_str!("../examples/site_curve.toml").to_string(),
            };
            let cfg = SiteCurveConfig {
                out: a.out,
                sites: a.sites,
                sessions: a.sessions,
                seed: a.seed,
                val_fraction: DemoConfig::default().val_fraction,
                epsilons: a.epsilons,
                delta: a.delta,
                sampling_rate: a.sampling_rate,
                clip_norm: a.clip_norm,
                momenta: a.momenta,
                server_learning_rate: a.server_lr,
                run_config,
                threads: a.threads,
            };
            let r = site_curve::run(&cfg, &mut |line| eprintln!("{line}"))?;
            println!();
            println!(
                "{:>10} {:>8} {:>9} {:>8} {:>9} {:>7} {:>9} {:>9}",
                "target eps",
                "momentum",
                "server lr",
                "z",
                "eps spent",
                "rounds",
                "accuracy",
                "macroF1"
            );
            for p in &r.points {
                println!(
                    "{:>10} {:>8} {:>9} {:>8} {:>9} {:>7} {:>9.4} {:>9.4}",
                    p.target_epsilon.map_or("none".into(), |e| e.to_string()),
                    p.server_momentum,
                    p.server_learning_rate,
                    p.noise_multiplier.map_or("-".into(), |z| format!("{z:.4}")),
                    p.epsilon_spent.map_or("-".into(), |e| format!("{e:.3}")),
                    p.rounds,
                    p.scores.accuracy,
                    p.scores.macro_f1
                );
            }
            println!(
                "{} sites, q {}, expected {} per round, delta {:e}; Bayes accuracy {:.4}",
                r.sites, r.sampling_rate, r.expected_sites, r.delta, r.bayes_accuracy
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
