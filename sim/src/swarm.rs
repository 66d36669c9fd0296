//! `fedflow-sim swarm`: many simulated partner sites in one process against a coordinator
//! elsewhere — the load generator of a federation of thousands of sites, run by several
//! processes (e.g. the pods of an indexed Kubernetes Job, each with its own index).
//!
//! Each site is a real `run_site` loop over gRPC: the no-op trainer (the coordinator's own
//! overhead, as the overhead benchmark measures it) or the real trainer on generated data.
//! Site names are `<prefix>-<index>-<n>`, so processes with different indices never collide.
//! Over mutual TLS each site presents the bundle `<identities>/<name>/`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use fedflow_client::federation::{SiteOptions, SiteSummary, run_site};
use fedflow_client::noop::NoopTrainer;
use fedflow_client::site::SiteTrainer;
use fedflow_common::data::{SiteDataset, Vocab};
use fedflow_common::synth::{SynthConfig, generate};

use crate::{Error, Result};

/// What a swarm does.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// The coordinator: `https://HOST:PORT` (with `identities`) or `http://HOST:PORT`.
    pub coordinator: String,
    /// Sites in this process.
    pub sites: usize,
    /// This process's index (its sites are named `<prefix>-<index>-<n>`).
    pub index: usize,
    /// The names' prefix.
    pub prefix: String,
    /// A folder with one certificate bundle per site name (mutual TLS); `None`: plaintext.
    pub identities: Option<PathBuf>,
    /// Train for real on generated data (this many sessions per site) instead of the
    /// no-op trainer.
    pub local_sessions: Option<usize>,
    /// The federation's vocabulary (needed with `local_sessions`).
    pub vocab: Option<PathBuf>,
    /// Training examples each no-op site reports.
    pub noop_examples: usize,
    /// Sites that may train at the same time (the real trainer).
    pub concurrent_work: usize,
}

/// Runs the swarm until the coordinator's run finishes; every site's summary, by name.
pub async fn run(cfg: &SwarmConfig) -> Result<Vec<(String, SiteSummary)>> {
    if cfg.sites == 0 {
        return Err(Error::Other("swarm: --sites must be at least 1".into()));
    }
    let names: Vec<String> = (0..cfg.sites)
        .map(|n| format!("{}-{}-{n}", cfg.prefix, cfg.index))
        .collect();
    let permits = Arc::new(tokio::sync::Semaphore::new(cfg.concurrent_work.max(1)));
    let data = match cfg.local_sessions {
        None => None,
        Some(sessions) => {
            let vocab_path = cfg.vocab.as_ref().ok_or_else(|| {
                Error::Other("swarm: the real trainer needs --vocab (the federation's)".into())
            })?;
            let vocab = Vocab::load(vocab_path)?;
            let fed = generate(&SynthConfig {
                sites: cfg.sites,
                total_sessions: sessions * cfg.sites,
                min_site_sessions: (sessions / 2).max(1),
                seed: cfg.index as u64,
                ..SynthConfig::default()
            })?;
            Some((vocab, fed))
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (n, name) in names.iter().enumerate() {
        let mut o = SiteOptions::new(cfg.coordinator.clone(), name.clone());
        if let Some(dir) = &cfg.identities {
            o.tls = Some(
                fedflow_client::tls::Bundle::load(&dir.join(name)).map_err(|e| Error::Site {
                    site: name.clone(),
                    source: e.into(),
                })?,
            );
        }
        o.work_permits = Some(permits.clone());
        o.max_backoff = Duration::from_secs(10);
        let name = name.clone();
        match &data {
            None => {
                let trainer = Arc::new(NoopTrainer::new(cfg.noop_examples));
                tasks.spawn(async move { (name, run_site(o, trainer).await) });
            }
            Some((vocab, fed)) => {
                let site = &fed.sites[n % fed.sites.len()];
                let dataset = SiteDataset::from_records(&site.records, vocab, 0.2)?;
                let trainer = Arc::new(SiteTrainer::new(dataset, vocab, Device::Cpu));
                tasks.spawn(async move { (name, run_site(o, trainer).await) });
            }
        }
    }
    let mut out = Vec::with_capacity(names.len());
    while let Some(done) = tasks.join_next().await {
        let (name, summary) = done.map_err(|e| Error::Other(format!("a site task failed: {e}")))?;
        match summary {
            Ok(s) => out.push((name, s)),
            Err(source) => return Err(Error::Site { site: name, source }),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
