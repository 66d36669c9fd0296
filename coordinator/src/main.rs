//! `fedflow-coordinator`: the coordinator's command line (thin layer over the library).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::params::ParamSet;
use fedflow_coordinator::config::RunConfig;
use fedflow_coordinator::round::RoundEngine;
use fedflow_coordinator::service::{Coordinator, serve};
use fedflow_coordinator::store::Store;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// fedflow coordinator: runs federated rounds over gRPC.
#[derive(Debug, Parser)]
#[command(name = "fedflow-coordinator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// Serve without TLS. Required until TLS lands; refused on non-loopback addresses.
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// Check a run config file and print it with every default filled in.
    CheckConfig {
        /// The run's TOML file.
        config: PathBuf,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { config } => {
            let cfg = RunConfig::load(&config)?;
            print!("{}", cfg.to_toml_string()?);
        }
        Command::Serve {
            config,
            data,
            listen,
            insecure_plaintext,
        } => {
            if !insecure_plaintext {
                bail!(
                    "TLS is not available yet: pass --insecure-plaintext to serve without it (loopback only)"
                );
            }
            if !listen.ip().is_loopback() {
                bail!("refusing plaintext on {listen}: it is not a loopback address");
            }
            let cfg = RunConfig::load(&config)?;
            let initial = {
                let model = AttentionFlowModel::new(
                    &cfg.model_config()?,
                    &candle_core::Device::Cpu,
                    cfg.run.seed,
                )?;
                ParamSet::from_varmap(model.varmap())?
            };
            let store = Store::open(&data)
                .with_context(|| format!("opening the data directory {}", data.display()))?;
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
            let coordinator = Coordinator::spawn(engine, cfg)?;
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            serve(listener, coordinator, shutdown).await?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
