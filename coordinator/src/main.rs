//! `fedflow-coordinator`: the coordinator's command line (thin layer over the library).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fedflow_coordinator::config::RunConfig;
use fedflow_coordinator::round::RoundEngine;
use fedflow_coordinator::security::Transport;
use fedflow_coordinator::service::{Coordinator, enrolment, serve_with_health};
use fedflow_coordinator::store::Store;

mod cli;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    /// mimalloc's `mi_option_set` (the C library is linked in by the `mimalloc` crate).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// mimalloc's `mi_option_purge_delay`: ordinal 15 of `mi_option_t` in mimalloc v2 and v3
/// alike (mimalloc keeps option numbers stable and leaves deprecated ones in place).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Makes mimalloc hand freed memory back to the OS at once instead of after its default
/// delay (1 s in mimalloc v3; `MIMALLOC_PURGE_DELAY` in the environment overrides it).
///
/// The coordinator frees model-sized buffers in bursts (the mean, the previous global
/// model, transfer chunks), and with the delay, freed and newly allocated model-sized
/// memory stayed resident side by side: the overhead benchmark's peak with the 10M-parameter
/// model was about 30 MB higher, and its growth with the number of sites larger.
fn purge_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` only stores the value in mimalloc's option table; the
        // option number and the value are valid for every mimalloc version in use.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

/// fedflow coordinator: runs federated rounds over gRPC.
#[derive(Debug, Parser)]
#[command(name = "fedflow-coordinator", version, about)]
struct Cli {
    /// Log lines as human-readable text or as JSON objects (one per line, with the run
    /// and round ids as fields).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run (or resume) the run described by a config file and serve partner sites.
    Serve {
        /// The run's TOML file (see coordinator/examples/run.toml).
        #[arg(long)]
        config: PathBuf,
        /// Data directory: database and checkpoints (created if missing; reused to resume).
        #[arg(long)]
        data: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// The coordinator's certificate bundle (cert.pem, key.pem, and ca.pem, the
        /// federation CA every caller's certificate must chain to): serve with mutual TLS.
        /// Create it with `pki init` and `pki server`.
        #[arg(long, conflicts_with = "insecure_plaintext")]
        tls: Option<PathBuf>,
        /// Serve without TLS and without authentication: anyone who can connect can claim to
        /// be any site and use the admin service. Refused on non-loopback addresses unless
        /// --allow-insecure-remote is also given.
        #[arg(long)]
        insecure_plaintext: bool,
        /// With --insecure-plaintext, serve on a non-loopback address anyway.
        #[arg(long, requires = "insecure_plaintext")]
        allow_insecure_remote: bool,
        /// Also serve Prometheus metrics over plain HTTP on this address (`GET /metrics`);
        /// keep it on a monitoring network. No metric names a site.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Keep serving after the run has finished (status and reports stay reachable over
        /// the Admin service) until interrupted. Without it, `serve` exits a few seconds
        /// after the run finishes, once sites have been told.
        #[arg(long)]
        stay_up: bool,
        /// On SIGTERM or Ctrl-C, `serve` stops taking connections and new calls, lets the
        /// calls in progress (transfers, long polls) finish for at most this many seconds,
        /// then exits 0. Every committed state is on disk already; a restart resumes the
        /// open round.
        #[arg(long, default_value_t = 10)]
        grace_secs: u64,
        /// Also serve gRPC health alone (`grpc.health.v1`), in plaintext, here: for probes
        /// that present no client certificate (Kubernetes' gRPC probes, `fedflow-ctl
        /// health` in a container health check). It tells only whether the coordinator is
        /// ready; keep it on a network only the probes reach.
        #[arg(long)]
        health_listen: Option<SocketAddr>,
        /// Also serve online enrolment here: TLS with the server certificate only (a new
        /// site has no certificate yet), answering nothing but the redemption of one-time
        /// tokens an admin issued (`fedflow-ctl enrol-token`). Needs --tls and --enrol-ca.
        #[arg(long, requires_all = ["tls", "enrol_ca"])]
        enrol_listen: Option<SocketAddr>,
        /// The PKI directory whose CA signs the certificates of sites enrolling online (its
        /// ca.key must be readable here: prefer a CA used for sites only).
        #[arg(long, requires = "enrol_listen")]
        enrol_ca: Option<PathBuf>,
        /// Validity of the certificates issued online, in days.
        #[arg(long, default_value_t = 365, requires = "enrol_listen")]
        enrol_days: u32,
    },
    /// Write a run's report (run-report.html: accuracy, loss, participation, update norms,
    /// durations and epsilon per round, as charts; self-contained).
    Report {
        /// The coordinator's data directory.
        #[arg(long)]
        data: PathBuf,
        /// The run (default: the only run in the data directory).
        #[arg(long)]
        run: Option<String>,
        /// Output folder (default: DATA/reports/RUN, next to the privacy-audit report).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write the hand-over package for a new partner site into the new directory --out: the
    /// federation's CA certificate, the vocabulary, a site.toml pointing at --address, and
    /// TERMS.md, the run's terms in plain words (what leaves a site; the privacy promised,
    /// with what it costs sites of a few sizes).
    Handover {
        /// The run's TOML file.
        #[arg(long)]
        config: PathBuf,
        /// The federation's CA certificate (ca.pem of the PKI directory).
        #[arg(long)]
        ca: PathBuf,
        /// The coordinator's address as sites reach it, https://HOST:PORT.
        #[arg(long)]
        address: String,
        /// The package directory to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Back up the data directory, also while `serve` runs: a consistent snapshot of the
    /// database, the checkpoints it records (hash-checked) and the security audit log, in
    /// the new directory --out (complete once it exists; `backup.json` describes it).
    Backup {
        /// The coordinator's data directory.
        #[arg(long)]
        data: PathBuf,
        /// The backup directory to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into a new data directory (empty or absent), after checking every
    /// checkpoint's hash and the audit log's chain; `serve --data` it to resume.
    Restore {
        /// The backup directory.
        #[arg(long)]
        from: PathBuf,
        /// The data directory to create.
        #[arg(long)]
        data: PathBuf,
    },
    /// Write a model version as a model directory (model.safetensors, model.json with both
    /// hashes, vocab.json): the format `fedflow-client evaluate` loads, and a warm start's
    /// `[init] model_dir`.
    Export {
        /// The coordinator's data directory (read-only: works while the coordinator runs).
        #[arg(long)]
        data: PathBuf,
        /// The run (default: the only run in the data directory).
        #[arg(long)]
        run: Option<String>,
        /// The version: a committed round.
        #[arg(
            long,
            conflicts_with = "published",
            required_unless_present = "published"
        )]
        round: Option<u64>,
        /// The version: the published one.
        #[arg(long)]
        published: bool,
        /// The model directory to write (refused if it exists and is not empty).
        #[arg(long)]
        out: PathBuf,
        /// Replace a non-empty --out.
        #[arg(long)]
        force: bool,
    },
    /// The federation's certificate authority: create it, issue certificates.
    #[command(subcommand)]
    Pki(cli::security::Pki),
    /// The security audit log (DATA/security-audit.jsonl, or a PKI's issued.jsonl).
    #[command(subcommand)]
    AuditLog(AuditLogCommand),
    /// Check a run config file and print it with every default filled in.
    CheckConfig {
        /// The run's TOML file.
        config: PathBuf,
    },
    /// Write a run's privacy-audit report (privacy-audit.json and privacy-audit.html): the
    /// guarantee the run delivered at site and record level, per round and cumulative.
    PrivacyReport {
        /// The coordinator's data directory.
        #[arg(long)]
        data: PathBuf,
        /// The run (default: the only run in the data directory).
        #[arg(long)]
        run: Option<String>,
        /// Output folder (default: DATA/reports/RUN).
        #[arg(long)]
        out: Option<PathBuf>,
        /// An empirical audit of this run's mechanism (empirical-audit.json from
        /// `fedflow-sim privacy-audit`) to show next to the accountant's figures; refused
        /// unless it audited the same sampling rate, noise and steps. Repeatable.
        #[arg(long)]
        empirical: Vec<PathBuf>,
    },
}

/// `audit-log` subcommands.
#[derive(Debug, Subcommand)]
enum AuditLogCommand {
    /// Verify the hash chain; names the first tampered or damaged line (exit status 1).
    Verify {
        /// The log file.
        file: PathBuf,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pki(cmd) => cli::security::pki(cmd)?,
        Command::Handover {
            config,
            ca,
            address,
            out,
        } => {
            let cfg = RunConfig::load(&config)?;
            fedflow_coordinator::handover::write(&cfg, &ca, &address, &out)?;
            println!(
                "wrote the hand-over package for run {} into {}: ca.pem, vocab.json, site.toml, {}",
                cfg.run.name,
                out.display(),
                fedflow_coordinator::handover::TERMS_FILE
            );
        }
        Command::Backup { data, out } => {
            let m = fedflow_coordinator::backup::backup(&data, &out)
                .with_context(|| format!("backing up {}", data.display()))?;
            for r in &m.runs {
                println!(
                    "run {}: committed round {} (model sha256 {})",
                    r.run_id, r.committed_round, r.model_sha256
                );
            }
            println!(
                "backed up {} into {}: {} checkpoint(s), {} bytes; {} audit record(s)",
                data.display(),
                out.display(),
                m.checkpoints,
                m.checkpoint_bytes,
                m.audit_records
            );
        }
        Command::Restore { from, data } => {
            let m = fedflow_coordinator::backup::restore(&from, &data)
                .with_context(|| format!("restoring {}", from.display()))?;
            println!(
                "restored {} into {}: {} run(s), {} checkpoint(s), {} audit record(s) verified; \
                 serve --data {} resumes",
                from.display(),
                data.display(),
                m.runs.len(),
                m.checkpoints,
                m.audit_records,
                data.display()
            );
        }
        Command::Export {
            data,
            run,
            round,
            published,
            out,
            force,
        } => {
            let store = Store::open_read_only(&data)
                .with_context(|| format!("opening the data directory {}", data.display()))?;
            let run = fedflow_coordinator::audit::resolve_run(&store, run.as_deref())?;
            let version = match (round, published) {
                (Some(r), _) => fedflow_coordinator::versions::Version::Round(r),
                (None, _) => fedflow_coordinator::versions::Version::Published,
            };
            let (round, card) =
                fedflow_coordinator::versions::export(&store, &run, version, &out, force)?;
            println!(
                "run {run} round {round} exported to {} (parameters sha256 {}, vocabulary                  sha256 {})",
                out.display(),
                card.params_sha256,
                card.vocab_sha256
            );
        }
        Command::Report { data, run, out } => {
            let store = Store::open_read_only(&data)
                .with_context(|| format!("opening the data directory {}", data.display()))?;
            let run = fedflow_coordinator::audit::resolve_run(&store, run.as_deref())?;
            let out = out.unwrap_or_else(|| data.join("reports").join(&run));
            let path = fedflow_coordinator::run_report::write(&store, &run, &out)?;
            println!("wrote {}", path.display());
        }
        Command::AuditLog(AuditLogCommand::Verify { file }) => {
            cli::security::verify_audit_log(&file)?
        }
        Command::PrivacyReport {
            data,
            run,
            out,
            empirical,
        } => {
            let empirical = empirical
                .iter()
                .map(|p| {
                    fedflow_common::privacy::audit::EmpiricalAudit::load(p)
                        .map(|a| (p.display().to_string(), a))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let store = Store::open_read_only(&data)
                .with_context(|| format!("opening the data directory {}", data.display()))?;
            let run = fedflow_coordinator::audit::resolve_run(&store, run.as_deref())?;
            let out = out.unwrap_or_else(|| data.join("reports").join(&run));
            let report = fedflow_coordinator::audit::write(&store, Some(&run), &out, &empirical)?;
            println!("{}", report.summary);
            for warning in &report.warnings {
                println!("warning: {warning}");
            }
            println!(
                "wrote {} and {}",
                out.join(fedflow_coordinator::audit::JSON_FILE).display(),
                out.join(fedflow_coordinator::audit::HTML_FILE).display()
            );
        }
        Command::CheckConfig { config } => {
            let cfg = RunConfig::load(&config)?;
            print!("{}", cfg.to_toml_string()?);
            if let Some(dp) = &cfg.record_dp {
                let (epochs, rounds) = (cfg.train.epochs, cfg.run.rounds);
                eprintln!(
                    "record-level DP over {rounds} rounds of {epochs} epoch(s), at delta {:e}:",
                    dp.target_delta
                );
                for n in [100, 300, 1_000, 3_000, 10_000, 100_000] {
                    eprintln!(
                        "  a site with {n:>7} {}s spends epsilon {:.4}",
                        dp.unit,
                        dp.site_epsilon(n, epochs, rounds)?
                    );
                }
                match dp.min_units_within_target(epochs, rounds)? {
                    Some(n) => eprintln!(
                        "  sites need at least {n} {}s to stay within epsilon {} for the whole run; \
                         smaller ones will decline rounds",
                        dp.unit, dp.target_epsilon
                    ),
                    None => eprintln!("  no site size stays within epsilon {}", dp.target_epsilon),
                }
            }
            let compression = cfg.compression();
            if compression.is_lossy() {
                // The layout of an update follows from the architecture alone.
                let model = fedflow_common::model::AttentionFlowModel::new(
                    &cfg.model_config()?,
                    &candle_core::Device::Cpu,
                    0,
                )?;
                let spec = fedflow_common::params::ParamSet::from_varmap(model.varmap())?.spec();
                let plain = fedflow_common::compress::Compression::NONE.update_bytes(&spec)?;
                let sent = compression.update_bytes(&spec)?;
                eprintln!(
                    "updates compressed as {}: {sent} bytes each, {:.1}x fewer than the {plain} \
                     bytes of an uncompressed update{}",
                    compression.name(),
                    plain as f64 / sent as f64,
                    if compression.error_feedback {
                        "; sites keep error feedback's residual in --state-dir"
                    } else {
                        ""
                    }
                );
            }
            if let Some(dp) = &cfg.site_dp {
                let e = dp.round_event(&cfg.sampling);
                let fit = dp.rounds_within_target(&cfg.sampling)?;
                eprintln!(
                    "site-level DP ({} mode): each round costs the Gaussian mechanism with z = {} \
                     at sampling rate {}; {} of the {} configured rounds fit epsilon {} at delta {:e}{}",
                    dp.mode,
                    e.z,
                    e.q,
                    fit.min(cfg.run.rounds),
                    cfg.run.rounds,
                    dp.target_epsilon,
                    dp.target_delta,
                    if fit < cfg.run.rounds {
                        " (the run will end at the budget)"
                    } else {
                        ""
                    }
                );
            }
        }
        Command::Serve {
            config,
            data,
            listen,
            tls,
            insecure_plaintext,
            allow_insecure_remote,
            metrics_listen,
            stay_up,
            grace_secs,
            health_listen,
            enrol_listen,
            enrol_ca,
            enrol_days,
        } => {
            let transport = match (tls, insecure_plaintext) {
                (Some(bundle), _) => Transport::MutualTls(bundle),
                (None, true) => {
                    if !listen.ip().is_loopback() && !allow_insecure_remote {
                        bail!(
                            "refusing plaintext on {listen}: it is not a loopback address, and \
                             anyone who can reach it could pose as any site. Serve with --tls \
                             (see `fedflow-coordinator pki --help`), or add \
                             --allow-insecure-remote if you really mean it"
                        );
                    }
                    tracing::warn!(
                        "serving WITHOUT TLS or authentication (--insecure-plaintext): any \
                         caller can pose as any site and use the admin service"
                    );
                    Transport::InsecurePlaintext
                }
                (None, false) => bail!(
                    "serve needs --tls BUNDLE (mutual TLS; create one with `fedflow-coordinator \
                     pki init` and `pki server`) or, for loopback experiments, --insecure-plaintext"
                ),
            };
            let cfg = RunConfig::load(&config)?;
            let store = Store::open(&data)
                .with_context(|| format!("opening the data directory {}", data.display()))?;
            let (initial, source) = fedflow_coordinator::versions::initial_model(&cfg, &store)?;
            if let Some(s) = source {
                tracing::info!(
                    "run {} starts from {} (sha256 {})",
                    cfg.run.name,
                    s.what,
                    s.sha256
                );
            }
            fedflow_coordinator::memtrace::probe(format_args!("startup-initial-model"));
            let engine = RoundEngine::open(store, cfg.clone(), initial)?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            // The bound address, so that `--listen 127.0.0.1:0` tells which port it got.
            let bound = listener.local_addr().unwrap_or(listen);
            println!(
                "run `{}`: {} of {} rounds committed; serving on {bound}",
                engine.run_id(),
                engine.committed_round(),
                cfg.run.rounds
            );
            let coordinator = Coordinator::spawn(engine, cfg, &transport)?;
            fedflow_coordinator::memtrace::probe(format_args!("startup-serving"));
            if let Some(addr) = metrics_listen {
                let metrics = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} for metrics"))?;
                println!(
                    "metrics on http://{}/metrics",
                    metrics.local_addr().unwrap_or(addr)
                );
                let c = coordinator.clone();
                tokio::spawn(async move {
                    let stop = terminated();
                    if let Err(e) =
                        fedflow_coordinator::service::serve_metrics(metrics, c, stop).await
                    {
                        tracing::error!("the metrics endpoint stopped: {e}");
                    }
                });
            }
            // SIGHUP: read the server certificate and the revocations again.
            {
                let c = coordinator.clone();
                let mut hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        match c.reload().await {
                            Ok(r) => {
                                if let Some(t) = &r.tls {
                                    warn_if_expiring(t.not_after);
                                }
                                tracing::info!(
                                    certificate = r.tls.as_ref().map(|t| t.serial.as_str()),
                                    revocations = r.revocations,
                                    "reloaded the server certificate and the revocations"
                                );
                            }
                            Err(e) => tracing::error!(
                                "reload refused, still serving the previous certificate: {e}"
                            ),
                        }
                    }
                });
            }
            if let Some(not_after) = coordinator.certificate_not_after() {
                warn_if_expiring(not_after);
            }
            let finished = run_finished(coordinator.clone());
            let (signalled, signal) = tokio::sync::oneshot::channel::<()>();
            let shutdown = async move {
                tokio::select! {
                    () = terminated() => {
                        tracing::info!(
                            "stopping: no new connections or calls; calls in progress have \
                             {grace_secs}s to finish"
                        );
                        let _ = signalled.send(());
                    }
                    () = finished, if !stay_up => {
                        tracing::info!("the run has finished; shutting down (--stay-up keeps serving)");
                    }
                }
            };
            let health = match health_listen {
                Some(addr) => {
                    let l = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr} for health"))?;
                    println!(
                        "gRPC health (plaintext) on {}",
                        l.local_addr().unwrap_or(addr)
                    );
                    Some(l)
                }
                None => None,
            };
            let enrolment = match (enrol_listen, enrol_ca) {
                (Some(addr), Some(ca)) => {
                    let ca = fedflow_coordinator::security::pki::Ca::load(&ca)?;
                    let l = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr} for enrolment"))?;
                    println!("enrolment on {}", l.local_addr().unwrap_or(addr));
                    let service =
                        enrolment::EnrolmentService::new(coordinator.clone(), ca, enrol_days);
                    Some(tokio::spawn(async move {
                        let pending = std::future::pending::<()>();
                        if let Err(e) = enrolment::serve_enrolment(l, service, pending).await {
                            tracing::error!("{e}");
                        }
                    }))
                }
                _ => None,
            };
            let served = serve_with_health(listener, health, coordinator, shutdown);
            tokio::pin!(served);
            let grace_over = async move {
                if signal.await.is_ok() {
                    tokio::time::sleep(std::time::Duration::from_secs(grace_secs)).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                done = &mut served => done?,
                () = grace_over => tracing::warn!(
                    "the grace period is over: exiting with calls in progress (a restart \
                     resumes the open round)"
                ),
            }
            if let Some(e) = enrolment {
                e.abort();
            }
            println!("serve: stopped");
        }
    }
    Ok(())
}

/// How long before its certificate expires the coordinator starts warning.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// Warns when the server certificate expires within [`EXPIRY_WARNING_DAYS`].
fn warn_if_expiring(not_after: i64) {
    let days = (not_after - fedflow_common::clock::now_ms() / 1000) / 86_400;
    if days < EXPIRY_WARNING_DAYS {
        tracing::warn!(
            days,
            "the server certificate expires in {days} day(s): issue a new one (`pki server`) \
             into the --tls bundle and send SIGHUP"
        );
    }
}

/// Resolves at the first Ctrl-C or SIGTERM (what Kubernetes and systemd send).
async fn terminated() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// How long `serve` keeps answering after its run finished, so that sites polling for
/// work hear that the run is over instead of finding the coordinator gone.
const LINGER_AFTER_FINISH: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves [`LINGER_AFTER_FINISH`] after the run has finished (checked twice a second).
async fn run_finished(coordinator: fedflow_coordinator::service::Coordinator) {
    let mut every = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        every.tick().await;
        match coordinator.inspect(|e, _| Ok(e.phase())).await {
            Ok(fedflow_coordinator::round::Phase::Finished) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::error!("cannot read the run's state: {e}");
            }
        }
    }
    tokio::time::sleep(LINGER_AFTER_FINISH).await;
}

fn main() -> ExitCode {
    purge_freed_memory_at_once();
    // rustls needs a process-wide crypto provider for the server side (ring: no C build).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Text from sites and operators reaches log lines: the text log escapes every message
    // and field (one event, one line, no terminal control sequences), the JSON log is
    // escaped by construction and made safe to print as well.
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            // Colour only on a terminal: a log written to a file stays plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .fmt_fields(fedflow_coordinator::security::logs::text_fields())
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(fedflow_coordinator::security::logs::SafeJson(
                std::io::stderr,
            ))
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
