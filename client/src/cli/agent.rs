//! `fedflow-client agent --config site.toml`: the site's long-running service.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use fedflow_client::agent::config::AgentConfig;

/// Arguments of `agent`.
#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The site's configuration (see client/examples/site.toml).
    #[arg(long)]
    config: PathBuf,
    /// Listen here instead of the file's http.listen (a non-loopback address still needs
    /// http.token_file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Join this coordinator instead of the file's coordinator.url.
    #[arg(long)]
    coordinator: Option<String>,
}

/// Runs the agent until interrupted (Ctrl-C or SIGTERM); it keeps serving predictions
/// after the federation's run ends.
pub(crate) fn run(a: AgentArgs) -> anyhow::Result<()> {
    let mut cfg = AgentConfig::load(&a.config)?;
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
            "agent: API on http://{}, {} sessions in the feedback store, serving {}; joining {}",
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
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut running = true;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
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
        println!("agent: stopping");
        agent.shutdown().await;
        anyhow::Ok(())
    })
}
