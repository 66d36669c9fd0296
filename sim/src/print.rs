//! What `fedflow-sim`'s commands print: the demo's table and the live run's summary.

use fedflow_sim::compression_study::ModeResult;
use fedflow_sim::demo::DemoReport;
use fedflow_sim::live::LiveReport;

/// The live run's summary.
pub(crate) fn print_live(r: &LiveReport) {
    println!();
    println!(
        "{:>5} {:>6} {:>8} {:>7} {:>8} {:>8} {:>8}",
        "round", "period", "labels", "served", "served%", "frozen%", "ceiling%"
    );
    for p in &r.points {
        println!(
            "{:>5} {:>6} {:>8} {:>7} {:>8} {:>8} {:>8.1}",
            p.round,
            p.period,
            if p.drifted { "drifted" } else { "original" },
            p.served.map_or("-".into(), |v| v.to_string()),
            p.served_accuracy
                .map_or("-".into(), |a| format!("{:.1}", 100.0 * a)),
            p.frozen_accuracy
                .map_or("-".into(), |a| format!("{:.1}", 100.0 * a)),
            100.0 * p.ceiling
        );
    }
    println!();
    println!(
        "gap to the ceiling of the served version: {:.1} points before the drift (which began \
         in round {}), {:.1} at worst after; the frozen version {} averages {:.1} below after it",
        100.0 * r.gap_before_drift,
        r.drift_round,
        100.0 * r.worst_gap_after_drift,
        r.frozen_version,
        100.0 * r.frozen_mean_gap_after_drift
    );
    match (r.recovery_rounds, r.recovery_hours) {
        (Some(n), Some(h)) => println!(
            "recovered {n} round(s) after the drift began ({:.1} simulated days)",
            h / 24.0
        ),
        _ => println!("the served version did not recover within the simulation"),
    }
    println!("federated run: {:.0} s", r.seconds);
    println!("report: {}", r.html.display());
    println!("the coordinator's run report: {}", r.run_report.display());
}

/// The demo's per-site table and what follows it.
pub(crate) fn print_table(r: &DemoReport) {
    let dp_head = r
        .private
        .as_ref()
        .map(|p| format!(" | {:>17}", format!("DP-SGD eps={}", p.target_epsilon)));
    let dp_sub = dp_head
        .as_ref()
        .map(|_| format!(" | {:>8} {:>8}", "accuracy", "macroF1"));
    let dp = |s: Option<&fedflow_sim::demo::Scores>| {
        s.map_or(String::new(), |s| {
            format!(" | {:>8.4} {:>8.4}", s.accuracy, s.macro_f1)
        })
    };
    let width = 76 + if r.private.is_some() { 20 } else { 0 };
    println!();
    println!(
        "{:<10} {:>6} | {:>17} | {:>17} | {:>17}{}",
        "",
        "",
        "federated (FedAvg)",
        "centralised",
        "site alone",
        dp_head.clone().unwrap_or_default()
    );
    println!(
        "{:<10} {:>6} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8}{}",
        "site",
        "val",
        "accuracy",
        "macroF1",
        "accuracy",
        "macroF1",
        "accuracy",
        "macroF1",
        dp_sub.clone().unwrap_or_default()
    );
    println!("{}", "-".repeat(width));
    for s in &r.sites {
        println!(
            "{:<10} {:>6} | {:>8.4} {:>8.4} | {:>8.4} {:>8.4} | {:>8.4} {:>8.4}{}",
            s.site,
            s.federated.sessions,
            s.federated.accuracy,
            s.federated.macro_f1,
            s.centralised.accuracy,
            s.centralised.macro_f1,
            s.alone.accuracy,
            s.alone.macro_f1,
            dp(s.private.as_ref())
        );
    }
    println!("{}", "-".repeat(width));
    println!(
        "{:<10} {:>6} | {:>8.4} {:>8.4} | {:>8.4} {:>8.4} | {:>8.4} {:>8.4}{}",
        "overall",
        r.federated.sessions,
        r.federated.accuracy,
        r.federated.macro_f1,
        r.centralised.accuracy,
        r.centralised.macro_f1,
        r.alone.accuracy,
        r.alone.macro_f1,
        dp(r.private.as_ref().map(|p| &p.scores))
    );
    println!();
    println!(
        "Bayes-optimal accuracy of this data (the ceiling): {:.4}",
        r.bayes_accuracy
    );
    println!(
        "federated - centralised: {:+.2} accuracy points; federated - site alone: {:+.2}",
        100.0 * (r.federated.accuracy - r.centralised.accuracy),
        100.0 * (r.federated.accuracy - r.alone.accuracy)
    );
    if let Some(e) = &r.coordinator_evaluation {
        println!(
            "the coordinator's federated evaluation of round {}: {} sites, accuracy {:.4}",
            r.rounds,
            e.sites,
            e.accuracy.unwrap_or(f64::NAN)
        );
    }
    println!(
        "time: federated run {:.0} s, centralised {:.0} s, sites alone {:.0} s",
        r.seconds.federated, r.seconds.centralised, r.seconds.alone
    );
    println!("privacy-audit report: {}", r.privacy_audit.display());
    if let Some(p) = &r.private {
        println!(
            "DP-SGD column: every site trains with DP-SGD within epsilon = {} at delta = {:e} \
             (z = {:.4}, PLD-calibrated; largest site epsilon spent {}); {} rounds in {:.0} s",
            p.target_epsilon,
            p.delta,
            p.noise_multiplier,
            p.max_site_epsilon
                .map_or("-".to_string(), |e| format!("{e:.3}")),
            p.rounds,
            p.seconds
        );
        println!("  its configuration: {}", p.configuration);
        println!("  its privacy-audit report: {}", p.privacy_audit.display());
        println!(
            "  DP-SGD - federated: {:+.2} accuracy points",
            100.0 * (p.scores.accuracy - r.federated.accuracy)
        );
    }
    println!(
        "outputs in {}: data/, coordinator/ (database, checkpoints, reports/), dp/ (the private \
         run), run.toml, demo.json",
        r.out.display()
    );
}

/// Prints the compression study's table: accuracy next to the reference, bytes per round.
pub(crate) fn print_compression(results: &[ModeResult]) {
    println!(
        "{:<16} {:<22} {:>9} {:>8} {:>14} {:>9} {:>14}",
        "mode", "compression", "accuracy", "points", "upload B/rnd", "fewer", "download B/rnd"
    );
    for r in results {
        println!(
            "{:<16} {:<22} {:>9.4} {:>+8.2} {:>14.0} {:>8.1}x {:>14.0}",
            r.name,
            r.compression,
            r.scores.accuracy,
            r.accuracy_change_points,
            r.upload_bytes_per_round,
            r.upload_reduction,
            r.download_bytes_per_round
        );
    }
}
