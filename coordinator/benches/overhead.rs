//! Coordinator overhead benchmark: the real `fedflow-coordinator serve` binary, as its own
//! process on 127.0.0.1 port 0, against N no-op sites (`fedflow_client::noop::NoopTrainer`,
//! tokio tasks of this process, each with its own gRPC connection) for a few rounds. Reports
//! the median round time (begin → commit, from the coordinator's database) and the
//! coordinator's peak RSS during the rounds (`VmHWM` of its process, reset through
//! `/proc/<pid>/clear_refs` once it has started) next to the model's size.
//!
//! ```sh
//! cargo bench -p fedflow-coordinator --bench overhead -- --sites 10,100,1000 --model small,10m --rounds 3 [--json]
//! cargo bench -p fedflow-coordinator --bench overhead -- --sites 10 --model 10m --compression int8,f32:top0.01
//! ```
//!
//! `--compression` runs each case once per `[compression]` of the run (`none`, or
//! `VALUES[:topFRACTION]` with VALUES one of f32, f16, bf16, int8): the sites send the
//! compressed no-op delta, the coordinator decodes every update into the round.
//!
//! Models: `small` is the default LSTM (embed 64, hidden 64, 2 layers: 73,285 parameters);
//! `10m` is the same architecture with hidden size 900 (9,975,705 parameters, 39.9 MB);
//! `100m` with hidden size 2880 (about 100M parameters, 400 MB).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedflow_client::federation::{SiteOptions, run_site};
use fedflow_client::noop::NoopTrainer;
use fedflow_common::data::Vocab;
use fedflow_common::params::SafetensorsLayout;
use fedflow_coordinator::store::Store;

/// One benchmark case's result.
#[derive(Debug, serde::Serialize)]
struct CaseResult {
    sites: usize,
    model: String,
    compression: String,
    upload_bytes_per_round: f64,
    parameters: usize,
    model_bytes: u64,
    rounds: usize,
    round_seconds: Vec<f64>,
    median_round_seconds: f64,
    wall_seconds: f64,
    startup_rss_bytes: u64,
    startup_peak_rss_bytes: u64,
    peak_rss_bytes: u64,
    peak_rss_over_model: f64,
}

fn hidden_size(model: &str) -> Result<usize> {
    match model {
        "small" => Ok(64),
        "10m" => Ok(900),
        "100m" => Ok(2880),
        other => bail!("unknown model `{other}`: use small, 10m or 100m"),
    }
}

/// The `[compression]` table of a `--compression` mode (empty for `none`).
fn compression_toml(mode: &str) -> Result<String> {
    if mode == "none" {
        return Ok(String::new());
    }
    let (values, top_k) = match mode.split_once(":top") {
        Some((v, f)) => (v, Some(f.parse::<f64>()?)),
        None => (mode, None),
    };
    if fedflow_common::compress::ValueCodec::parse(values).is_none() {
        bail!("unknown codec `{values}`: use f32, f16, bf16 or int8");
    }
    Ok(format!(
        "\n[compression]\nvalues = \"{values}\"\n{}",
        top_k.map_or(String::new(), |f| format!("top_k = {f}\n"))
    ))
}

fn run_toml(vocab: &Path, hidden: usize, sites: usize, rounds: usize, compression: &str) -> String {
    let text = format!(
        r#"[run]
name = "bench"
seed = 42
rounds = {rounds}
strategy = "fedavg"

[model]
vocab = "{vocab}"
encoder = "lstm"
embed_dim = 64
hidden_size = {hidden}
num_layers = 2
dropout = 0.2
num_classes = 5
max_seq_len = 100

[train]
epochs = 1
batch_size = 64
learning_rate = 0.002

[sampling]
fraction = 1.0
min_selected = {sites}
min_available = {sites}

[rounds]
deadline_secs = 3600
min_completed = {sites}
on_quorum_failure = "pause"
heartbeat_timeout_secs = 600
"#,
        vocab = vocab.display()
    );
    text + compression
}

/// `VmHWM` (peak) and `VmRSS` (current) of `pid`, in bytes.
fn memory_of(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed status line")?
            .parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// Starts the coordinator and returns it with the address it announced.
fn start_coordinator(config: &Path, data: &Path) -> Result<(Child, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedflow-coordinator"))
        .args(["serve", "--config"])
        .arg(config)
        .arg("--data")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--insecure-plaintext"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start fedflow-coordinator")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let Some(line) = lines.next() else {
            bail!("the coordinator exited before announcing its address");
        };
        let line = line?;
        if let Some(at) = line.split("serving on ").nth(1) {
            break at.trim().to_string();
        }
    };
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, addr))
}

fn stop(child: &mut Child) -> Result<()> {
    // SIGINT: the coordinator's graceful shutdown (ctrl-c).
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    child.wait()?;
    Ok(())
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run_case(
    runtime: &tokio::runtime::Runtime,
    sites: usize,
    model: &str,
    rounds: usize,
    compression: &str,
) -> Result<CaseResult> {
    let dir = tempfile::tempdir()?;
    let vocab_path = dir.path().join("vocab.json");
    Vocab::from_events((0..98).map(|i| format!("event-{i}")))?.save(&vocab_path)?;
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        run_toml(
            &vocab_path,
            hidden_size(model)?,
            sites,
            rounds,
            &compression_toml(compression)?,
        ),
    )?;
    let data = dir.path().join("data");

    let (mut child, addr) = start_coordinator(&config, &data)?;
    let pid = child.id();
    let (startup_peak, startup_rss) = memory_of(pid)?;
    // Reset the peak (VmHWM) so that what follows measures the rounds alone.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .context("cannot reset the coordinator's peak RSS")?;
    let started = Instant::now();
    let noop = Arc::new(NoopTrainer::new(100));
    let outcome = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..sites {
            let mut opts = SiteOptions::new(format!("http://{addr}"), format!("site-{i:04}"));
            opts.poll_wait = Duration::from_secs(10);
            tasks.spawn(run_site(opts, noop.clone()));
        }
        let mut refused = 0;
        while let Some(r) = tasks.join_next().await {
            let summary = r??;
            refused += summary.rejected.len();
        }
        anyhow::Ok(refused)
    });
    let wall = started.elapsed().as_secs_f64();
    let memory = memory_of(pid);
    stop(&mut child)?;
    let refused = outcome?;
    let (peak_rss, _) = memory?;
    if refused > 0 {
        bail!("{refused} update(s) were refused");
    }

    let store = Store::open(&data)?;
    let records = store.rounds("bench")?;
    let uploads: Vec<u64> = records
        .iter()
        .filter(|r| r.round > 0)
        .filter_map(|r| r.metrics_json.as_deref())
        .filter_map(|j| {
            serde_json::from_str::<fedflow_coordinator::metrics::TrainingSummary>(j).ok()
        })
        .map(|m| m.upload_bytes)
        .collect();
    let round_seconds: Vec<f64> = records
        .iter()
        .filter(|r| r.round > 0)
        .filter_map(|r| {
            r.committed_at_ms
                .map(|c| (c - r.started_at_ms) as f64 / 1000.0)
        })
        .collect();
    if round_seconds.len() != rounds {
        bail!("{} of {rounds} rounds were committed", round_seconds.len());
    }
    let checkpoint = store.model_checkpoint_path("bench", 0);
    let model_bytes = std::fs::metadata(&checkpoint)?.len();
    let layout = SafetensorsLayout::read(&mut std::fs::File::open(&checkpoint)?)?;
    Ok(CaseResult {
        sites,
        model: model.to_string(),
        compression: compression.to_string(),
        upload_bytes_per_round: uploads.iter().sum::<u64>() as f64 / uploads.len().max(1) as f64,
        parameters: layout.spec.num_elements(),
        model_bytes,
        rounds,
        median_round_seconds: median(&round_seconds),
        round_seconds,
        wall_seconds: wall,
        startup_rss_bytes: startup_rss,
        startup_peak_rss_bytes: startup_peak,
        peak_rss_bytes: peak_rss,
        peak_rss_over_model: peak_rss as f64 / model_bytes as f64,
    })
}

fn list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|e| anyhow::anyhow!("`{x}`: {e}"))
        })
        .collect()
}

fn main() -> Result<()> {
    let mut sites = vec![10, 100, 1000];
    let mut models = vec!["small".to_string(), "10m".to_string()];
    let mut rounds = 3;
    let mut json = false;
    let mut compressions = vec!["none".to_string()];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--sites" => sites = list(&args.next().context("--sites needs a value")?)?,
            "--model" => models = list(&args.next().context("--model needs a value")?)?,
            "--rounds" => rounds = args.next().context("--rounds needs a value")?.parse()?,
            "--json" => json = true,
            "--compression" => {
                compressions = list(&args.next().context("--compression needs a value")?)?
            }
            // `cargo bench` passes --bench; ignore it and other harness flags.
            _ => {}
        }
    }
    // `cargo bench` builds the coordinator binary with the bench profile (release settings)
    // and points CARGO_BIN_EXE_* at target/release; say which binary is measured.
    let binary = env!("CARGO_BIN_EXE_fedflow-coordinator");
    eprintln!("coordinator binary: {binary}");
    if cfg!(debug_assertions) {
        eprintln!("warning: this is not an optimised build; run it with `cargo bench`");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let mut results = Vec::new();
    if !json {
        println!(
            "| sites | model | compression | parameters | model MB | upload MB per round | rounds | median round s | min–max s | coordinator RSS after start MB (start peak) | coordinator peak RSS in rounds MB | peak / model |"
        );
        println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    for model in &models {
        for &n in &sites {
            for compression in &compressions {
                let r = run_case(&runtime, n, model, rounds, compression)
                    .with_context(|| format!("case {n} sites, model {model}, {compression}"))?;
                if !json {
                    let mb = |b: u64| b as f64 / 1e6;
                    let min = r
                        .round_seconds
                        .iter()
                        .copied()
                        .fold(f64::INFINITY, f64::min);
                    let max = r.round_seconds.iter().copied().fold(0.0, f64::max);
                    println!(
                        "| {} | {} | {} | {} | {:.1} | {:.1} | {} | {:.2} | {:.2}–{:.2} | {:.0} ({:.0}) | {:.0} | {:.2} |",
                        r.sites,
                        r.model,
                        r.compression,
                        r.parameters,
                        mb(r.model_bytes),
                        r.upload_bytes_per_round / 1e6,
                        r.rounds,
                        r.median_round_seconds,
                        min,
                        max,
                        mb(r.startup_rss_bytes),
                        mb(r.startup_peak_rss_bytes),
                        mb(r.peak_rss_bytes),
                        r.peak_rss_over_model
                    );
                }
                results.push(r);
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}
