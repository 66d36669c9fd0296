//! `fedflow-sim compression-study`: its arguments and what it prints.

use std::path::PathBuf;

use fedflow_sim::demo::DemoConfig;

use crate::print::print_compression;
use crate::{DataArgs, read_config};

#[derive(Debug, clap::Args)]
pub(crate) struct StudyArgs {
    /// Output folder (data/, one folder per mode, compression.json).
    #[arg(long, default_value = "runs/compression")]
    out: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Federated rounds (default: the demo's).
    #[arg(long)]
    rounds: Option<u64>,
    /// Local epochs per round (default: the demo's).
    #[arg(long)]
    local_epochs: Option<usize>,
    /// A run configuration to use instead of the demo's (its model.vocab is replaced).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Sites that may train at the same time.
    #[arg(long, default_value_t = 1)]
    concurrent: usize,
    /// The modes, the first being the reference: `none`, or VALUES[/BLOCK][:topFRACTION][+ef]
    /// with VALUES one of f32, f16, bf16, int8 (default: none, f16, bf16, int8, top 1% with
    /// f32 values without and with error feedback, top 1% int8 with error feedback).
    #[arg(long, value_delimiter = ',', value_parser = fedflow_sim::compression_study::parse_mode)]
    modes: Vec<fedflow_sim::compression_study::Mode>,
}

/// Runs the study and prints its table.
pub(crate) async fn run(a: StudyArgs) -> anyhow::Result<()> {
    let cfg = DemoConfig {
        out: a.out,
        sites: a.data.sites,
        sessions: a.data.sessions,
        seed: a.data.seed,
        rounds: a.rounds,
        local_epochs: a.local_epochs,
        concurrent_work: a.concurrent,
        run_config: a.config.as_deref().map(read_config).transpose()?,
        ..DemoConfig::default()
    };
    let modes = if a.modes.is_empty() {
        fedflow_sim::compression_study::default_modes()
    } else {
        a.modes
    };
    let results =
        fedflow_sim::compression_study::run(&cfg, &modes, &mut |l| eprintln!("{l}")).await?;
    print_compression(&results);
    println!("written: {}", cfg.out.join("compression.json").display());
    Ok(())
}
