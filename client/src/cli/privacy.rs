//! `fedflow-client privacy ...`: the privacy planner and the site privacy report.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use fedflow_client::report::{site_report, to_html};
use fedflow_common::privacy::SampledGaussian;
use fedflow_common::privacy::planner::{
    Accounting, UNLIMITED_ROUNDS, epsilon, epsilon_by, noise_for_epsilon_by, rounds_for_epsilon_by,
};

/// Privacy planning and reporting.
#[derive(Debug, Subcommand)]
pub(crate) enum PrivacyCommand {
    /// Plan DP-SGD before a run: epsilon for given parameters, or (with --target-epsilon) the
    /// noise multiplier or number of rounds that meets a target.
    Plan(PlanArgs),
    /// Write this site's privacy report (JSON and HTML) from its ledger.
    Report(ReportArgs),
}

/// Arguments of `privacy plan`.
#[derive(Debug, Args)]
pub(crate) struct PlanArgs {
    /// Sampling rate q; or give --batch-size and --dataset-size.
    #[arg(long)]
    q: Option<f64>,
    /// Expected batch size B (with --dataset-size: q = B / n).
    #[arg(long)]
    batch_size: Option<u64>,
    /// Number of privacy units n at the site.
    #[arg(long)]
    dataset_size: Option<u64>,
    /// Noise multiplier z; leave out with --target-epsilon to search for it.
    #[arg(long)]
    noise_multiplier: Option<f64>,
    /// DP-SGD steps per round; or give --epochs (steps = epochs * ceil(n / B)).
    #[arg(long)]
    steps: Option<u64>,
    /// Local epochs per round (needs --batch-size and --dataset-size).
    #[arg(long)]
    epochs: Option<u64>,
    /// Rounds; leave out with --target-epsilon and --noise-multiplier to search for it.
    #[arg(long)]
    rounds: Option<u64>,
    /// delta.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// Target epsilon: solve for the noise multiplier (if not given) or the rounds.
    #[arg(long)]
    target_epsilon: Option<f64>,
    /// The accountant that solves for the target: pld (privacy loss distributions, the
    /// tighter; what a site's limit is checked against when it is the smaller) or rdp.
    /// Both figures are printed either way.
    #[arg(long, default_value = "pld")]
    accountant: String,
    /// The noise multiplier of the noisy count each round releases with its update (a run's
    /// `record_dp.count_noise_multiplier`): one Gaussian mechanism (q = 1, one step) per
    /// round, composed with the DP-SGD. Not with a search for the noise multiplier.
    #[arg(long)]
    count_noise_multiplier: Option<f64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `privacy report`.
#[derive(Debug, Args)]
pub(crate) struct ReportArgs {
    /// The site's privacy directory (its ledger), as given to `join --privacy-dir`.
    #[arg(long)]
    privacy_dir: PathBuf,
    /// delta at which epsilon is stated.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// The site's limit, to compare against.
    #[arg(long)]
    max_epsilon: Option<f64>,
    /// Where to write privacy-report.json and privacy-report.html (default: the privacy dir).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub(crate) fn run(cmd: PrivacyCommand) -> anyhow::Result<()> {
    match cmd {
        PrivacyCommand::Plan(a) => plan(a),
        PrivacyCommand::Report(a) => report(a),
    }
}

fn plan(a: PlanArgs) -> anyhow::Result<()> {
    let q = match (a.q, a.batch_size, a.dataset_size) {
        (Some(q), _, _) => q,
        (None, Some(b), Some(n)) if n > 0 => (b as f64 / n as f64).min(1.0),
        _ => bail!("give --q, or --batch-size and --dataset-size"),
    };
    let steps = match (a.steps, a.epochs, a.batch_size, a.dataset_size) {
        (Some(s), _, _, _) => s,
        (None, Some(e), Some(b), Some(n)) if b > 0 => e * n.div_ceil(b),
        _ => bail!("give --steps, or --epochs with --batch-size and --dataset-size"),
    };
    let accounting: Accounting = a
        .accountant
        .parse()
        .map_err(|e| anyhow::anyhow!("--accountant: {e}"))?;
    let count = match a.count_noise_multiplier {
        Some(c) if !(c.is_finite() && c > 0.0) => {
            bail!("--count-noise-multiplier {c}: must be a positive number")
        }
        Some(_) if a.noise_multiplier.is_none() => bail!(
            "--count-noise-multiplier: give --noise-multiplier (the search for it charges \
             DP-SGD alone)"
        ),
        c => c.map(|z| SampledGaussian {
            q: 1.0,
            z,
            steps: 1,
        }),
    };
    let (z, rounds, solved) = match (a.target_epsilon, a.noise_multiplier, a.rounds) {
        (None, Some(z), r) => (z, r.unwrap_or(1), None),
        (Some(t), None, r) => {
            let r = r.unwrap_or(1);
            (
                noise_for_epsilon_by(accounting, q, steps, r, a.delta, t)?,
                r,
                Some("noise_multiplier"),
            )
        }
        (Some(t), Some(z), None) => {
            let mut round = vec![SampledGaussian { q, z, steps }];
            round.extend(count);
            let r = rounds_for_epsilon_by(accounting, &round, a.delta, t)?;
            if r == 0 {
                bail!(
                    "even one round exceeds epsilon {t} at delta {}: raise the noise multiplier",
                    a.delta
                );
            }
            (z, r, Some("rounds"))
        }
        (Some(_), Some(_), Some(_)) => {
            bail!(
                "with --target-epsilon leave out --noise-multiplier or --rounds (the one to solve for)"
            )
        }
        (None, None, _) => bail!("give --noise-multiplier, or --target-epsilon to search for it"),
    };
    let unlimited = rounds == UNLIMITED_ROUNDS;
    let mut events = vec![SampledGaussian { q, z, steps }];
    events.extend(count);
    let counted = if unlimited { 1 } else { rounds };
    let spent = epsilon(&events, counted, a.delta).context("computing epsilon")?;
    let pld = epsilon_by(Accounting::Pld, &events, counted, a.delta)
        .context("computing epsilon by PLD")?;
    let finite = |e: f64| e.is_finite().then_some(e);
    // With PLD (the default) the figure stated is the smaller of the two valid bounds, as a
    // site's ledger and the coordinator's state it.
    let chosen = match accounting {
        Accounting::Pld => pld.min(spent.epsilon),
        Accounting::Rdp => spent.epsilon,
    };
    let out = serde_json::json!({
        "q": q,
        "noise_multiplier": z,
        "steps_per_round": steps,
        "count_noise_multiplier": a.count_noise_multiplier,
        "rounds": if unlimited { None } else { Some(rounds) },
        "delta": a.delta,
        "epsilon": finite(chosen),
        "epsilon_pld": finite(pld),
        "epsilon_rdp": finite(spent.epsilon),
        "optimal_order": spent.order,
        "solved_for": solved,
        "target_epsilon": a.target_epsilon,
        "accountant": accounting,
        "accountants": {
            "pld": "privacy loss distributions, Poisson-subsampled Gaussian (dp_accounting 0.6.0 PLDAccountant port, discretisation 1e-4)",
            "rdp": "RDP, Poisson-subsampled Gaussian (dp_accounting 0.6.0 RdpAccountant port)",
        },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        if let Some(what) = solved {
            println!("solved for {what}");
        }
        println!(
            "q = {q:.6}, noise multiplier z = {z:.6}, {steps} steps per round, {} rounds",
            if unlimited {
                "unlimited".to_string()
            } else {
                rounds.to_string()
            }
        );
        println!(
            "epsilon = {pld:.6} at delta = {:e} by PLD; {:.6} by RDP (optimal order {}){}",
            a.delta,
            spent.epsilon,
            spent.order,
            if solved.is_some() {
                format!(" — solved with {}", a.accountant)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn report(a: ReportArgs) -> anyhow::Result<()> {
    if !a.privacy_dir.join("ledger.sqlite").is_file() {
        bail!(
            "no ledger at {}: give the directory this site joined with (--privacy-dir)",
            a.privacy_dir.join("ledger.sqlite").display()
        );
    }
    let r = site_report(&a.privacy_dir, a.delta, a.max_epsilon)?;
    let out = a.out.unwrap_or_else(|| a.privacy_dir.clone());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("privacy-report.json");
    let html = out.join("privacy-report.html");
    fedflow_common::fsio::write_atomic(&json, serde_json::to_string_pretty(&r)?.as_bytes())?;
    fedflow_common::fsio::write_atomic(&html, to_html(&r)?.as_bytes())?;
    let eps = r.cumulative.epsilon;
    println!(
        "{} release(s); epsilon = {} at delta = {:e} ({}-level)",
        r.releases.len(),
        eps.map_or("inf".to_string(), |e| format!("{e:.4}")),
        a.delta,
        r.privacy_unit
    );
    for b in r
        .bounds
        .iter()
        .filter(|b| b.relation == fedflow_client::ledger::Relation::ReplaceOne)
    {
        println!(
            "  replace one {}: epsilon = {} at delta = {:e} (n is sent with every update: see \
             the report's caveats)",
            b.unit,
            b.epsilon
                .map_or("no bound".to_string(), |e| format!("{e:.4}")),
            a.delta
        );
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    println!("wrote {} and {}", json.display(), html.display());
    Ok(())
}
