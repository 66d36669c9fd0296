//! `fedflow-client agent --config site.toml`: the site's long-running service; `agent pin`,
//! `unpin` and `versions` choose the version it serves, locally.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use fedflow_client::agent::config::AgentConfig;
use fedflow_client::published::{PinTarget, PublishedSink};

/// Arguments of `agent`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct AgentArgs {
    #[command(subcommand)]
    command: Option<VersionCommand>,
    /// The site's configuration (see client/examples/site.toml).
    #[arg(long, required = true)]
    config: Option<PathBuf>,
    /// Listen here instead of the file's http.listen (a non-loopback address still needs
    /// http.token_file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Join this coordinator instead of the file's coordinator.url.
    #[arg(long)]
    coordinator: Option<String>,
    /// On SIGTERM or Ctrl-C the agent takes no new task; a task in progress has this many
    /// seconds to finish before it is abandoned; then the API stops.
    #[arg(long, default_value_t = 30)]
    grace_secs: u64,
}

/// Which version the agent serves, chosen at the site (a running agent follows within a
/// second).
#[derive(Debug, Subcommand)]
enum VersionCommand {
    /// Serve a kept version whatever the federation publishes, until `unpin`.
    Pin {
        /// The site's configuration.
        #[arg(long)]
        config: PathBuf,
        /// The version of this round (`versions` lists the kept ones).
        #[arg(
            long,
            required_unless_present = "previous",
            conflicts_with = "previous"
        )]
        round: Option<u64>,
        /// The version published before the current one: a rollback.
        #[arg(long)]
        previous: bool,
    },
    /// Serve the federation's published version again.
    Unpin {
        /// The site's configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// The kept versions: published, previous, pinned.
    Versions {
        /// The site's configuration.
        #[arg(long)]
        config: PathBuf,
    },
}

fn sink_of(config: &std::path::Path) -> anyhow::Result<PublishedSink> {
    let cfg = AgentConfig::load(config)?;
    Ok(PublishedSink {
        dir: cfg
            .site
            .data_dir
            .join(fedflow_client::agent::run::PUBLISHED_DIR),
        vocab: fedflow_common::data::Vocab::load(&cfg.site.vocab)?,
    })
}

fn versions(command: VersionCommand) -> anyhow::Result<()> {
    match command {
        VersionCommand::Pin {
            config,
            round,
            previous,
        } => {
            let target = match round {
                Some(r) if !previous => PinTarget::Round(r),
                _ => PinTarget::Previous,
            };
            let v = sink_of(&config)?.pin(target)?;
            println!(
                "pinned version {} ({}): the agent serves it until `agent unpin`",
                v.round,
                &v.model_sha256[..12.min(v.model_sha256.len())]
            );
        }
        VersionCommand::Unpin { config } => {
            if sink_of(&config)?.unpin()? {
                println!("unpinned: the agent serves the federation's published version");
            } else {
                println!("no version was pinned");
            }
        }
        VersionCommand::Versions { config } => {
            let sink = sink_of(&config)?;
            for (what, v) in [
                ("published", sink.current()?),
                ("previous", sink.previous()?),
                ("pinned", sink.pinned()?),
            ] {
                match v {
                    Some(v) => println!(
                        "{what:<10} round {:<6} sha256 {}  {}",
                        v.round, v.model_sha256, v.path
                    ),
                    None => println!("{what:<10} -"),
                }
            }
        }
    }
    Ok(())
}

/// Runs the agent until interrupted (Ctrl-C or SIGTERM); it keeps serving predictions
/// after the federation's run ends.
pub(crate) fn run(a: AgentArgs) -> anyhow::Result<()> {
    if let Some(command) = a.command {
        return versions(command);
    }
    let config = a
        .config
        .expect("clap requires --config without a subcommand");
    let mut cfg = AgentConfig::load(&config)?;
    if let Some(url) = a.coordinator {
        cfg.coordinator.url = url;
    }
    if let Some(listen) = a.listen {
        cfg.http.listen = listen;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("--listen: {e}"))?;
    }
    tokio::runtime::Runtime::new()?.block_on(async move {
        let mut agent = fedflow_client::agent::run::start(&cfg, None).await?;
        let counts = agent.state.store.counts()?;
        println!(
            "agent: API on {}://{}, {} sessions in the feedback store, serving {}; joining {}",
            if agent.https { "https" } else { "http" },
            agent.http_addr,
            counts.sessions,
            agent
                .state
                .served
                .current()
                .map_or("nothing yet".to_string(), |m| format!(
                    "version {}",
                    m.round
                )),
            cfg.coordinator.url
        );
        let terminated = crate::signal::terminated();
        tokio::pin!(terminated);
        let mut running = true;
        loop {
            tokio::select! {
                () = &mut terminated => break,
                done = &mut agent.federation, if running => {
                    running = false;
                    match done {
                        Ok(Ok(s)) => println!(
                            "the federation's run ended: {} round(s) contributed; still serving",
                            s.rounds_contributed.len()
                        ),
                        Ok(Err(e)) => eprintln!("the federation loop stopped: {e}; still serving"),
                        Err(e) => eprintln!("the federation loop failed: {e}; still serving"),
                    }
                }
            }
        }
        println!(
            "agent: stopping (a task in progress has {}s to finish)",
            a.grace_secs
        );
        if !agent
            .stop(std::time::Duration::from_secs(a.grace_secs))
            .await
        {
            println!("agent: the task in progress was abandoned");
        }
        anyhow::Ok(())
    })
}
