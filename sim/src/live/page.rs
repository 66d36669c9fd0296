//! The live simulation's HTML page: the three lines over simulated time and the table
//! behind them.

use fedflow_common::report::{Series, escape, line_chart, page, table};

use super::{LiveReport, RECOVERY_SLACK, RoundPoint};
use crate::Result;

fn pct(x: Option<f64>) -> String {
    x.filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{:.1}", 100.0 * x))
}

/// The report's page: the three lines over simulated time and the table behind them.
pub(super) fn html(r: &LiveReport) -> Result<String> {
    let days = |p: &RoundPoint| p.hours / 24.0;
    let series = vec![
        Series {
            label: "served (published) version".into(),
            points: r
                .points
                .iter()
                .filter_map(|p| p.served_accuracy.map(|a| (days(p), a)))
                .collect(),
            dashed: false,
        },
        Series {
            label: format!("version {} frozen at the drift", r.frozen_version),
            points: r
                .points
                .iter()
                .filter_map(|p| p.frozen_accuracy.map(|a| (days(p), a)))
                .collect(),
            dashed: false,
        },
        Series {
            label: "Bayes ceiling".into(),
            points: r.points.iter().map(|p| (days(p), p.ceiling)).collect(),
            dashed: true,
        },
    ];
    let chart = line_chart(
        "Expected accuracy on each period's held-out sessions",
        "simulated days",
        "expected accuracy",
        &series,
        (900, 420),
    )?;
    let rows: Vec<Vec<String>> = r
        .points
        .iter()
        .map(|p| {
            vec![
                p.round.to_string(),
                p.period.to_string(),
                format!("{:.1}", p.hours / 24.0),
                if p.drifted { "drifted" } else { "original" }.into(),
                p.served.map_or("-".into(), |v| v.to_string()),
                pct(p.served_accuracy),
                pct(p.frozen_accuracy),
                pct(Some(p.ceiling)),
            ]
        })
        .collect();
    let recovery = match (r.recovery_rounds, r.recovery_hours) {
        (Some(n), Some(h)) => format!(
            "recovered {n} round(s) after the drift began ({:.1} simulated days)",
            h / 24.0
        ),
        _ => "did not recover within the simulation".into(),
    };
    let body = format!(
        "<h1>Continuous federation through a drift</h1>\
         <p>{} sites, each a site agent fed through its HTTP API; {} periods of {} rounds, one \
         round every {} simulated hours; each site holds the last {} period(s) of sessions. \
         The label function changes in round {} (period {}). Accuracies are expected \
         accuracies in percent (exact given the label function) on each period's held-out \
         sessions; the served version's are the agents' own answers over HTTP (the same as \
         its checkpoint's in {} of {} rounds).</p>\
         <p>Gap to the ceiling of the served version just before the drift: <b>{}</b> points; \
         worst after: <b>{}</b>. Back within {} points of the gap before, it {recovery}. The \
         frozen version {} stays <b>{}</b> points below the ceiling on average after the \
         drift. Versions published: {}.</p>{chart}{}\
         <p>The coordinator's own view (federated evaluations, the gate's decisions): \
         <code>{}</code>.</p>",
        r.sites,
        r.periods,
        r.rounds_per_period,
        r.round_hours,
        r.window,
        r.drift_round,
        r.points
            .iter()
            .find(|p| p.round == r.drift_round)
            .map_or(0, |p| p.period),
        r.points
            .iter()
            .filter(|p| p.agents_served == p.served
                && match (p.agents_accuracy, p.served_accuracy) {
                    (Some(a), Some(c)) => (a - c).abs() < 1e-9,
                    (a, c) => a.is_none() && c.is_none(),
                })
            .count(),
        r.points.len(),
        pct(Some(r.gap_before_drift)),
        pct(Some(r.worst_gap_after_drift)),
        pct(Some(RECOVERY_SLACK)),
        r.frozen_version,
        pct(Some(r.frozen_mean_gap_after_drift)),
        r.published
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        table(
            &[
                "round",
                "period",
                "day",
                "labels",
                "version served",
                "served %",
                "frozen %",
                "ceiling %"
            ],
            &rows
        ),
        escape(&r.run_report.display().to_string()),
    );
    Ok(page("fedflow live simulation", &body))
}
