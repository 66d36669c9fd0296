//! `fedflow-client`: the partner-site command line (thin layer over `fedflow_client`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use fedflow_client::local::{self, DataFormat, EvalSplit, TrainFile, TrainOptions};
use fedflow_common::data::{LoadOptions, Vocab};
use fedflow_common::device::DeviceChoice;
use fedflow_common::model::EncoderKind;
use fedflow_common::synth::SynthConfig;
use fedflow_common::train::{EpochReport, EvalMetrics, OptimizerKind, TrainConfig};

#[path = "cli/agent.rs"]
mod agent_cli;
#[path = "cli/join.rs"]
mod join_cli;
#[path = "cli/ledger.rs"]
mod ledger_cli;
#[path = "cli/privacy.rs"]
mod privacy_cli;
#[path = "cli/signal.rs"]
mod signal;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// fedflow partner-site client: data tools, local training, and joining a federation.
#[derive(Debug, Parser)]
#[command(name = "fedflow-client", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Partner-site data: generate a synthetic federation, validate files.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train the model locally on one site's data, or on several sites pooled.
    Train(TrainArgs),
    /// Evaluate a saved model on data files.
    Evaluate(EvaluateArgs),
    /// Fine-tune a saved (published) model on one site's files, as the agent's
    /// personalisation does, and compare both on the site's validation split.
    Personalise(PersonaliseArgs),
    /// Join a federation: train for the coordinator at ADDR until its run finishes.
    Join(join_cli::JoinArgs),
    /// Make this site's private key and a certificate request, so that the key never
    /// leaves the site: send DIR/request.pem to the federation's operator, who signs it
    /// (`fedflow-coordinator pki sign`); put the cert.pem and ca.pem you get back into DIR,
    /// which is then the site's certificate bundle (`join --identity DIR`).
    EnrolRequest {
        /// The site id (the operator signs the request under this name).
        #[arg(long)]
        name: String,
        /// The bundle directory to create (key.pem, request.pem).
        #[arg(long)]
        out: PathBuf,
    },
    /// Enrol online with a one-time token from the federation's operator: make this site's
    /// key and request in DIR (the key never leaves it), redeem the token at the
    /// coordinator's enrolment port, and write the certificate and ca.pem it sends into DIR,
    /// which is then the site's certificate bundle.
    Enrol {
        /// The enrolment port, https://HOST:PORT (`serve --enrol-listen`).
        #[arg(long)]
        coordinator: String,
        /// The federation CA's certificate, from the hand-over package.
        #[arg(long)]
        ca: PathBuf,
        /// The site id the token was issued for.
        #[arg(long)]
        name: String,
        /// A file holding the token (`-` for standard input), so it appears in no process
        /// list or shell history.
        #[arg(long)]
        token_file: PathBuf,
        /// The bundle directory to create (key.pem, request.pem, cert.pem, ca.pem).
        #[arg(long)]
        dir: PathBuf,
    },
    /// The site agent: join the federation and train on the feedback the application posts
    /// to the local HTTP API, which also serves predictions of the published version.
    Agent(agent_cli::AgentArgs),
    /// Differential privacy: plan DP-SGD parameters, write the site's privacy report.
    #[command(subcommand)]
    Privacy(privacy_cli::PrivacyCommand),
    /// The privacy ledger: journal it to other storage, back it up, restore it.
    #[command(subcommand)]
    Ledger(ledger_cli::LedgerCommand),
    /// The centralised baseline: one model trained on all sites' data pooled, no federation.
    ///
    /// Generates a 20-site federation, trains the pooled model and compares it with the
    /// bag-of-events model and the Bayes-optimal ceiling. The federated demo is `fedflow-sim
    /// demo`.
    Baseline(BaselineArgs),
}

/// Flags on reading a site's data files, shared by the subcommands that load them.
#[derive(Debug, Args)]
pub(crate) struct SiteDataArgs {
    /// Fraction of sessions held out for validation (by hashed session id); with `evaluate
    /// --validation-only`, give the fraction used at training time.
    #[arg(long, default_value_t = local::DEFAULT_VAL_FRACTION)]
    pub(crate) val_fraction: f64,
    /// Where to train or evaluate: auto, cpu, cuda[:N], metal.
    #[arg(long, default_value = "auto")]
    pub(crate) device: DeviceChoice,
    /// Skip and count invalid rows instead of failing.
    #[arg(long)]
    pub(crate) skip_invalid: bool,
}

/// Arguments of `baseline`.
#[derive(Debug, Args)]
struct BaselineArgs {
    /// Output directory (data/, model/, baseline.json).
    #[arg(long, default_value = "runs/baseline")]
    out: PathBuf,
    /// Number of partner sites.
    #[arg(long, default_value_t = 20)]
    sites: usize,
    /// Total sessions.
    #[arg(long, default_value_t = 40_000)]
    sessions: usize,
    /// Maximum epochs (early stopping usually ends sooner).
    #[arg(long, default_value_t = 20)]
    epochs: usize,
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Generate realistic partner data for N sites (with its Bayes-optimal accuracy).
    Generate(GenerateArgs),
    /// Validate data files against a vocabulary: every row, with line numbers.
    Validate(ValidateArgs),
    /// Import a CSV or JSON Lines file into a site agent's feedback store (the agent may be
    /// running): every row is validated first, and a file with a bad row imports nothing.
    Import(ImportArgs),
    /// The federation's vocabulary.
    #[command(subcommand)]
    Vocab(VocabCommand),
}

#[derive(Debug, Subcommand)]
enum VocabCommand {
    /// Build the vocabulary from real session files: every event name seen at least
    /// --min-count times (rarer names stay out, so they are not shared with every site).
    Build(VocabBuildArgs),
}

#[derive(Debug, Args)]
struct VocabBuildArgs {
    /// Session files (.csv, .jsonl); every row is validated.
    #[arg(required = true, num_args = 1..)]
    files: Vec<PathBuf>,
    /// Where to write vocab.json (refused if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Keep names seen at least this many times.
    #[arg(long, default_value_t = 5)]
    min_count: usize,
    /// Hashed out-of-vocabulary buckets for names the vocabulary lacks.
    #[arg(long, default_value_t = 0)]
    oov_buckets: u32,
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// The file (.csv or .jsonl).
    file: PathBuf,
    /// The agent's configuration (its site.data_dir holds the store).
    #[arg(long)]
    config: PathBuf,
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// Output directory (vocab.json, sites/, manifest.json).
    #[arg(long)]
    out: PathBuf,
    /// Number of partner sites.
    #[arg(long, default_value_t = 20)]
    sites: usize,
    /// Total sessions over all sites (sizes follow a power law).
    #[arg(long, default_value_t = 40_000)]
    sessions: usize,
    /// Dirichlet concentration of per-site label mixes (smaller = more skew).
    #[arg(long, default_value_t = 1.0)]
    label_alpha: f64,
    /// Probability that a label is replaced by a uniformly random one.
    #[arg(long, default_value_t = 0.1)]
    label_noise: f64,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// File format of the site files.
    #[arg(long, value_enum, default_value_t = FormatArg::Csv)]
    format: FormatArg,
    /// Hashed out-of-vocabulary buckets in vocab.json: extra embedding rows that keep event
    /// names the vocabulary does not list apart (0: they all become the unknown id).
    #[arg(long, default_value_t = 0)]
    oov_buckets: u32,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Csv,
    Jsonl,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    /// Data files (.csv, .jsonl).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The federation's event vocabulary.
    #[arg(long)]
    vocab: PathBuf,
    /// Skip and count invalid rows instead of failing at the first.
    #[arg(long)]
    skip_invalid: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Data files; several are pooled (the centralised baseline).
    #[arg(long = "data", required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// The federation's event vocabulary.
    #[arg(long)]
    vocab: PathBuf,
    /// Output directory: model.safetensors, model.json, vocab.json, metrics.json.
    #[arg(long)]
    out: PathBuf,
    /// TOML file with [model] and [train] tables; flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Sequence encoder.
    #[arg(long)]
    encoder: Option<EncoderKind>,
    /// Passes over the data.
    #[arg(long)]
    epochs: Option<usize>,
    /// Sessions per step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate.
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Optimiser: adamw or sgd (with momentum).
    #[arg(long)]
    optimizer: Option<OptimizerKind>,
    /// Weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Early-stopping patience in epochs (0 disables).
    #[arg(long)]
    patience: Option<usize>,
    /// Dropout probability.
    #[arg(long)]
    dropout: Option<f64>,
    /// Seed for initialisation, shuffling and dropout.
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    site_data: SiteDataArgs,
    /// Also fit the bag-of-events baseline on the same split.
    #[arg(long)]
    baseline: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct EvaluateArgs {
    /// Model directory written by `train`.
    #[arg(long)]
    model: PathBuf,
    /// Data files.
    #[arg(long = "data", required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Evaluate only the validation split of the files (the part training held out).
    #[arg(long)]
    validation_only: bool,
    #[command(flatten)]
    site_data: SiteDataArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Also explain the model: per event name, the mean integrated-gradients attribution
    /// over the first N sessions (to the predicted label, to label 1 and to label 5).
    #[arg(long, value_name = "N")]
    explain: Option<usize>,
}

#[derive(Debug, Args)]
struct PersonaliseArgs {
    /// Model directory (e.g. `fedflow-coordinator export --published`).
    #[arg(long)]
    model: PathBuf,
    /// The site's data files.
    #[arg(long = "data", required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Fraction of sessions held out for validation (by hashed session id).
    #[arg(long, default_value_t = local::DEFAULT_VAL_FRACTION)]
    val_fraction: f64,
    /// The settings, as the `[personalisation]` table of site.toml (a TOML file).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write the fine-tuned model here when it is the better one.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn print_metrics(m: &EvalMetrics) {
    println!(
        "sessions {}  loss {:.4}  accuracy {:.4}  macro-F1 {:.4}",
        m.examples, m.loss, m.accuracy, m.macro_f1
    );
    println!("confusion (rows: true label 1-5, columns: predicted):");
    for (i, row) in m.confusion.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|c| format!("{c:>6}")).collect();
        println!("  {} |{}", i + 1, cells.join(""));
    }
}

fn print_epoch(e: &EpochReport) {
    let val = e
        .validation
        .as_ref()
        .map(|v| {
            format!(
                " | val loss {:.4} acc {:.4} F1 {:.4}",
                v.loss, v.accuracy, v.macro_f1
            )
        })
        .unwrap_or_default();
    println!(
        "epoch {:>3}: loss {:.4} acc {:.4}{val}{} | {:.1}s, {:.0} sessions/s",
        e.epoch,
        e.train_loss,
        e.train_accuracy,
        if e.improved { " *" } else { "" },
        e.seconds,
        e.samples_per_sec
    );
}

/// Replaces `slot` with `value` when the flag was given.
fn overlay<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Data(DataCommand::Generate(a)) => {
            let cfg = SynthConfig {
                sites: a.sites,
                total_sessions: a.sessions,
                label_alpha: a.label_alpha,
                label_noise: a.label_noise,
                seed: a.seed,
                ..SynthConfig::default()
            };
            let format = match a.format {
                FormatArg::Csv => DataFormat::Csv,
                FormatArg::Jsonl => DataFormat::Jsonl,
            };
            let m = local::generate(&a.out, &cfg, format)?;
            if a.oov_buckets > 0 {
                let path = a.out.join("vocab.json");
                Vocab::load(&path)?
                    .with_oov_buckets(a.oov_buckets)?
                    .save(&path)?;
            }
            println!(
                "generated {} sessions for {} sites in {} (Bayes-optimal accuracy {:.4})",
                m.sessions,
                m.sites.len(),
                a.out.display(),
                m.bayes_accuracy
            );
        }
        Command::Data(DataCommand::Import(a)) => {
            let cfg = fedflow_client::agent::config::AgentConfig::load(&a.config)?;
            let r = fedflow_client::agent::store::import(
                &a.file,
                &cfg.site
                    .data_dir
                    .join(fedflow_client::agent::run::FEEDBACK_DIR),
            )?;
            println!(
                "{}: {} sessions stored, {} already there",
                a.file.display(),
                r.stored,
                r.duplicates
            );
        }
        Command::Data(DataCommand::Vocab(VocabCommand::Build(a))) => {
            if a.out.exists() {
                anyhow::bail!("{} exists: choose another --out", a.out.display());
            }
            let (vocab, r) = local::build_vocab(&a.files, a.min_count, a.oov_buckets)?;
            vocab.save(&a.out)?;
            println!(
                "{}: {} event names from {} sessions ({} events); {} of {} distinct names seen \
                 fewer than {} times left out; {} out-of-vocabulary buckets; sha256 {}",
                a.out.display(),
                r.kept,
                r.sessions,
                r.events,
                r.left_out,
                r.distinct,
                a.min_count,
                a.oov_buckets,
                fedflow_common::model::vocab_sha256(&vocab)
            );
        }
        Command::Data(DataCommand::Validate(a)) => {
            let vocab = Vocab::load(&a.vocab)?;
            let options = LoadOptions {
                skip_invalid: a.skip_invalid,
            };
            for f in &a.files {
                let r = local::validate(f, &vocab, &options)?;
                if a.json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    let s = &r.stats;
                    println!(
                        "{}: ok, {} sessions ({} train / {} validation), {} events ({} unknown: {} distinct names, {} in out-of-vocabulary buckets), mean length {:.1}, max {}, labels 1-5 {:?}, {} rows skipped",
                        f.display(),
                        s.sessions,
                        s.train,
                        s.validation,
                        s.events_total,
                        s.unknown_events,
                        s.distinct_unknown_names,
                        s.oov_bucket_events,
                        s.mean_len,
                        s.max_len,
                        s.class_counts,
                        r.skipped.len()
                    );
                    for (line, reason) in &r.skipped {
                        println!("  skipped line {line}: {reason}");
                    }
                }
            }
        }
        Command::Train(a) => {
            let mut file = match &a.config {
                Some(p) => TrainFile::load(p)?,
                None => TrainFile::default(),
            };
            // Flags override the file, which overrides the defaults.
            let t = &mut file.train;
            overlay(&mut t.epochs, a.epochs);
            overlay(&mut t.batch_size, a.batch_size);
            overlay(&mut t.learning_rate, a.learning_rate);
            overlay(&mut t.optimizer, a.optimizer);
            overlay(&mut t.weight_decay, a.weight_decay);
            overlay(&mut t.patience, a.patience);
            overlay(&mut t.seed, a.seed);
            overlay(&mut file.model.encoder, a.encoder);
            overlay(&mut file.model.dropout, a.dropout);
            let opts = TrainOptions {
                data: a.data,
                vocab: a.vocab,
                out: a.out.clone(),
                model: file.model,
                train: file.train,
                val_fraction: a.site_data.val_fraction,
                device: a.site_data.device,
                skip_invalid: a.site_data.skip_invalid,
                baseline: a.baseline,
            };
            let json = a.json;
            let summary = local::train_local(&opts, &mut |e| {
                if !json {
                    print_epoch(e)
                }
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!(
                    "trained on {} sessions ({} validation) on {} in {:.1}s; kept epoch {}{}",
                    summary.train_sessions,
                    summary.validation_sessions,
                    summary.device,
                    summary.train_seconds,
                    summary.best_epoch,
                    if summary.stopped_early {
                        " (stopped early)"
                    } else {
                        ""
                    }
                );
                if let Some(v) = &summary.validation {
                    print_metrics(v);
                }
                if let Some(b) = summary.baseline_accuracy {
                    println!(
                        "bag-of-events baseline accuracy on the same validation sessions: {b:.4}"
                    );
                }
                println!("model saved to {}", a.out.display());
            }
        }
        Command::Baseline(a) => {
            let synth = SynthConfig {
                sites: a.sites,
                total_sessions: a.sessions,
                ..SynthConfig::default()
            };
            let tc = TrainConfig {
                epochs: a.epochs,
                ..TrainConfig::default()
            };
            println!(
                "generating {} sessions for {} partner sites into {}",
                a.sessions,
                a.sites,
                a.out.join("data").display()
            );
            let d = local::pooled_baseline(&a.out, &synth, &tc, &mut print_epoch)?;
            let v = d
                .training
                .validation
                .as_ref()
                .context("the baseline has validation data")?;
            println!();
            println!("held-out sessions: {}", d.training.validation_sessions);
            println!(
                "  Bayes-optimal accuracy (ceiling, all sessions): {:.4}",
                d.manifest.bayes_accuracy
            );
            println!(
                "  LSTM (pooled, centralised):                     {:.4}  macro-F1 {:.4}",
                v.accuracy, v.macro_f1
            );
            if let Some(b) = d.training.baseline_accuracy {
                println!("  bag-of-events baseline:                         {b:.4}");
            }
            println!(
                "model: {}   summary: {}",
                a.out.join("model").display(),
                a.out.join("baseline.json").display()
            );
        }
        Command::Join(a) => join_cli::run(a)?,
        Command::EnrolRequest { name, out } => {
            let request = fedflow_client::enrol::make_request(&name, &out)?;
            println!(
                "made {} (mode 0600, stays here) and the request {}: send the request to the \
                 federation's operator; put the cert.pem and ca.pem you get back into {}",
                out.join(fedflow_client::enrol::KEY_FILE).display(),
                request.display(),
                out.display()
            );
        }
        Command::Enrol {
            coordinator,
            ca,
            name,
            token_file,
            dir,
        } => {
            let token = if token_file.as_os_str() == "-" {
                let mut t = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
                    .context("reading the token from standard input")?;
                t
            } else {
                std::fs::read_to_string(&token_file)
                    .with_context(|| format!("reading {}", token_file.display()))?
            };
            let ca_pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let e = runtime.block_on(fedflow_client::enrol::redeem(
                &coordinator,
                &ca_pem,
                &name,
                &token,
                &dir,
            ))?;
            println!(
                "enrolled {} (certificate {}, valid until Unix {}): {} is this site's \
                 certificate bundle (join --identity {0}, or coordinator.identity in site.toml)",
                e.site,
                e.serial,
                e.not_after,
                dir.display()
            );
        }
        Command::Agent(a) => agent_cli::run(a)?,
        Command::Personalise(a) => {
            let cfg = match &a.config {
                None => fedflow_client::personalise::PersonaliseConfig::default(),
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    let cfg: fedflow_client::personalise::PersonaliseConfig = toml::from_str(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                    cfg.validate("")
                        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                    cfg
                }
            };
            let r =
                local::personalise_model(&a.model, &a.data, a.val_fraction, &cfg, a.out.as_deref())
                    .with_context(|| format!("personalising {}", a.model.display()))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                if let (Some(p), Some(f)) = (&r.published, &r.personalised) {
                    println!(
                        "validation ({} sessions): published accuracy {:.4} macro-F1 {:.4}; \
                         personalised {:.4} macro-F1 {:.4} (epoch {} of {})",
                        r.validation_sessions,
                        p.accuracy,
                        p.macro_f1,
                        f.accuracy,
                        f.macro_f1,
                        r.best_epoch,
                        r.epochs_run
                    );
                }
                match (&r.reason, r.chosen, &a.out) {
                    (_, true, Some(out)) => {
                        println!(
                            "the personalised model is better: written to {}",
                            out.display()
                        )
                    }
                    (_, true, None) => println!("the personalised model is better"),
                    (Some(why), false, _) => println!("kept the published model: {why}"),
                    (None, false, _) => println!("kept the published model"),
                }
            }
        }
        Command::Privacy(cmd) => privacy_cli::run(cmd)?,
        Command::Ledger(cmd) => ledger_cli::run(cmd)?,
        Command::Evaluate(a) => {
            let split = if a.validation_only {
                EvalSplit::Validation
            } else {
                EvalSplit::All
            };
            let r = local::evaluate(
                &a.model,
                &a.data,
                split,
                a.site_data.val_fraction,
                a.site_data.device,
                a.site_data.skip_invalid,
            )
            .with_context(|| format!("evaluating {}", a.model.display()))?;
            let explained = a
                .explain
                .map(|n| {
                    local::explain_events(
                        &a.model,
                        &a.data,
                        split,
                        a.site_data.val_fraction,
                        a.site_data.device,
                        n,
                    )
                })
                .transpose()?;
            if a.json {
                let mut v = serde_json::to_value(&r)?;
                if let Some(e) = &explained {
                    v["explanations"] = serde_json::to_value(e)?;
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_metrics(&r.metrics);
                if r.skipped_rows > 0 {
                    println!(
                        "{} invalid rows were skipped and are not covered",
                        r.skipped_rows
                    );
                }
                if let Some(e) = &explained {
                    println!("mean attribution per occurrence (integrated gradients):");
                    println!(
                        "  {:<24} {:>6} {:>10} {:>10} {:>10}",
                        "event", "count", "predicted", "label 1", "label 5"
                    );
                    for x in e {
                        println!(
                            "  {:<24} {:>6} {:>10.4} {:>10.4} {:>10.4}",
                            x.event, x.occurrences, x.to_predicted, x.to_label_1, x.to_label_5
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
