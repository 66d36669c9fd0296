//! The privacy-audit report as one self-contained HTML page (inline SVG charts, no scripts,
//! no network), summary first.

use fedflow_common::report::{Series, escape, line_chart, page, table};

use super::{EpsilonAt, PrivacyAudit, RecordLevel, SiteLevel};
use crate::Result;

fn fmt_eps(e: Option<f64>) -> String {
    e.map_or_else(|| "∞".to_string(), |e| format!("{e:.4}"))
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "–".to_string(), |v| v.to_string())
}

fn deltas_table(rows: &[EpsilonAt]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                format!("{:e}", r.delta),
                fmt_eps(r.epsilon),
                format!("{}", r.order),
            ]
        })
        .collect();
    table(&["δ", "ε", "RDP order"], &rows)
}

fn facts(items: &[(&str, String)]) -> String {
    let mut out = String::from("<ul>");
    for (k, v) in items {
        out.push_str(&format!("<li><b>{}</b>: {}</li>", escape(k), escape(v)));
    }
    out.push_str("</ul>");
    out
}

/// A JSON object of parameters as a two-column table (nested values as compact JSON; null
/// as "not set").
fn parameters_table(params: &serde_json::Value) -> String {
    let rows: Vec<Vec<String>> = match params.as_object() {
        Some(o) => o
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    serde_json::Value::Null => "not set".to_string(),
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                vec![k.replace('_', " "), value]
            })
            .collect(),
        None => vec![vec!["value".into(), params.to_string()]],
    };
    table(&["parameter", "value"], &rows)
}

/// The report as a self-contained HTML page.
pub fn to_html(r: &PrivacyAudit) -> Result<String> {
    let mut body = format!(
        "<h1>Privacy audit: run {}</h1><div class=\"summary\"><p class=\"big\">{}</p>\
         <p>Run status: {}{}; {} of {} configured round(s) released.</p></div>",
        escape(&r.run.run_id),
        escape(&r.summary),
        escape(&r.run.status),
        r.run
            .status_reason
            .as_ref()
            .map_or(String::new(), |s| format!(" ({})", escape(s))),
        r.run.committed_rounds,
        r.run.configured_rounds
    );
    if !r.warnings.is_empty() {
        body.push_str("<div class=\"warn\"><h2>Warnings</h2><ul>");
        for w in &r.warnings {
            body.push_str(&format!("<li><b>{}</b></li>", escape(w)));
        }
        body.push_str("</ul></div>");
    }
    if let Some(s) = &r.site_level {
        body.push_str(&site_section(s)?);
    }
    if let Some(rec) = &r.record_level {
        body.push_str(&record_section(rec)?);
    }
    if !r.empirical.is_empty() {
        body.push_str(&empirical_section(&r.empirical));
    }
    if let Some(c) = &r.compression {
        body.push_str(&format!(
            "<h2>Update compression: {}</h2><p>{}</p>",
            escape(&c.encoding),
            escape(&c.statement)
        ));
    }
    body.push_str("<h2>Not covered by any guarantee above</h2><ul>");
    for n in &r.not_covered {
        body.push_str(&format!("<li>{}</li>", escape(n)));
    }
    body.push_str("</ul><h2>Recompute every figure</h2>");
    for c in &r.recompute {
        body.push_str(&format!("<pre>{}</pre>", escape(c)));
    }
    body.push_str(&format!(
        "<p class=\"small\">{} · schema {} · generated {}</p>",
        escape(&r.code_version),
        r.schema,
        fedflow_common::clock::utc(r.generated_unix_ms)
    ));
    Ok(page(&format!("Privacy audit: {}", r.run.run_id), &body))
}

/// The attached one-run audits: a lower bound from a test per row, labelled as such.
fn empirical_section(checks: &[super::empirical::EmpiricalCheck]) -> String {
    let mut out =
        String::from("<h2>Empirical check (a lower bound from a test, not a guarantee)</h2>");
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            let p = &c.point;
            vec![
                format!("{:?}", p.level).to_lowercase(),
                format!("{}", p.sampling_rate),
                format!("{:.4}", p.noise_multiplier),
                format!("{} × {}", p.steps_per_round, p.rounds),
                format!("{:e}", p.delta),
                p.audit.canaries.to_string(),
                format!("{} / {}", p.audit.best.correct, p.audit.best.guesses),
                format!("{}%", p.audit.confidence * 100.0),
                format!("{:.3}", p.audit.epsilon_lower_bound),
                fmt_eps(p.epsilon),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "level",
            "q",
            "z",
            "steps × rounds",
            "δ",
            "canaries",
            "right / guesses",
            "confidence",
            "empirical lower bound on ε",
            "accountant's ε",
        ],
        &rows,
    ));
    for c in checks {
        out.push_str(&format!(
            "<p class=\"small\">{} (audited {}): {}</p>",
            escape(&c.source),
            escape(&c.audited_at),
            escape(&c.meaning)
        ));
    }
    out
}

fn site_section(s: &SiteLevel) -> Result<String> {
    let mut out = String::from("<h2>Site level (DP-FedAvg)</h2>");
    out.push_str(&facts(&[
        ("trust mode", s.trust_mode.clone()),
        ("protects against", s.protects_against.clone()),
        (
            "does not protect against",
            s.does_not_protect_against.clone(),
        ),
        ("privacy unit", s.privacy_unit.clone()),
        ("neighbouring relation", s.neighbouring_relation.clone()),
        (
            "sampling",
            format!(
                "{} (rate {}): {}",
                s.sampling.method,
                opt(s.sampling.rate),
                s.sampling.assumption
            ),
        ),
        ("coordinator randomness", s.coordinator_randomness.clone()),
        ("mechanism", s.mechanism.name.clone()),
        (
            "charged per round",
            format!(
                "the Poisson-subsampled Gaussian mechanism with q = {}, noise multiplier {} \
                 (noise std over the sensitivity)",
                s.round_event.q, s.round_event.z
            ),
        ),
        (
            "parameters",
            format!(
                "C = {} (initial), z = {}, expected sites = {}{}",
                s.mechanism.clip_norm,
                s.mechanism.noise_multiplier,
                s.mechanism.expected_sites,
                s.mechanism
                    .adaptive_clipping
                    .as_ref()
                    .map_or(String::new(), |a| format!(", adaptive clipping {a}"))
            ),
        ),
        ("weighting", s.mechanism.weighting.clone()),
        ("noise", s.mechanism.noise.clone()),
        ("accountant", s.accountant.clone()),
        (
            "target",
            format!("ε = {} at δ = {:e}", s.target.epsilon, s.target.delta),
        ),
    ]));
    let series = vec![
        Series {
            label: "cumulative ε by RDP (site level)".into(),
            points: s
                .rounds
                .iter()
                .filter_map(|r| r.epsilon_recomputed.map(|e| (r.ledger.round as f64, e)))
                .collect(),
            dashed: false,
        },
        Series {
            label: "cumulative ε by PLD (as recorded)".into(),
            points: s
                .rounds
                .iter()
                .filter_map(|r| r.ledger.epsilon_pld.map(|e| (r.ledger.round as f64, e)))
                .collect(),
            dashed: false,
        },
        Series {
            label: "target".into(),
            points: vec![
                (1.0, s.target.epsilon),
                (s.rounds.len().max(1) as f64, s.target.epsilon),
            ],
            dashed: true,
        },
    ];
    out.push_str(&line_chart(
        &format!("site-level ε at δ = {:e}", s.target.delta),
        "round",
        "ε",
        &series,
        (900, 340),
    )?);
    out.push_str("<h3>Cumulative guarantee</h3>");
    out.push_str(&deltas_table(&s.cumulative));
    out.push_str(&format!(
        "<p>The smaller of two valid bounds at each δ, the one the run's budget is enforced \
         on. At δ = {:e}: Rényi DP alone ε = {}, privacy loss distributions alone ε = {}.</p>",
        s.target.delta,
        fmt_eps(s.cumulative_rdp.first().and_then(|e| e.epsilon)),
        fmt_eps(s.cumulative_pld.first().and_then(|e| e.epsilon)),
    ));
    out.push_str("<h3>Per round (the coordinator's ledger)</h3>");
    let rows: Vec<Vec<String>> = s
        .rounds
        .iter()
        .map(|r| {
            let l = &r.ledger;
            vec![
                l.round.to_string(),
                l.sampling.clone(),
                format!("{}", l.sampling_rate),
                format!("{:.4}", l.noise_multiplier),
                format!("{:.4}", l.clip_norm),
                format!("{:.3e}", l.site_noise_std),
                format!("{:.3e}", l.server_noise_std),
                l.selected.to_string(),
                l.contributions.to_string(),
                l.clipped_fraction
                    .map_or("–".into(), |c| format!("{:.0}%", 100.0 * c)),
                fmt_eps(r.epsilon_recomputed),
                if l.seeded_randomness { "SEEDED" } else { "OS" }.into(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "round",
            "sampling",
            "q",
            "z",
            "C",
            "site noise std",
            "server noise std",
            "selected",
            "contributions",
            "clipped",
            "ε after",
            "randomness",
        ],
        &rows,
    ));
    if let Some(a) = &s.against_coordinator {
        out.push_str("<h3>Each site against the coordinator</h3>");
        out.push_str(&format!(
            "<p>{} Per update: Gaussian mechanism with multiplier {:.4}, no amplification. \
             Worst site: ε = {} at δ = {:e}.</p>",
            escape(&a.neighbouring_relation),
            a.per_update_noise_multiplier,
            fmt_eps(a.worst_epsilon),
            s.target.delta
        ));
        let rows: Vec<Vec<String>> = a
            .sites
            .iter()
            .map(|x| {
                vec![
                    escape(&x.site_id),
                    x.updates.to_string(),
                    fmt_eps(x.epsilon),
                ]
            })
            .collect();
        out.push_str(&table(&["site", "updates seen", "ε"], &rows));
    }
    if let Some(a) = &s.against_sites {
        out.push_str("<h3>Each site against other sites</h3>");
        out.push_str(&format!(
            "<p>{} {}.</p>",
            escape(&a.neighbouring_relation),
            escape(&a.assumption)
        ));
        let rows: Vec<Vec<String>> = a
            .coalitions
            .iter()
            .map(|c| {
                vec![
                    c.colluding_sites.map_or_else(
                        || "every other contributing site".to_string(),
                        |t| t.to_string(),
                    ),
                    c.min_noise_multiplier
                        .map_or("–".into(), |z| format!("{z:.4}")),
                    fmt_eps(c.cumulative[0].epsilon),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "colluding sites t",
                "smallest multiplier of a round",
                &format!("ε at δ = {:e}", s.target.delta),
            ],
            &rows,
        ));
    }
    Ok(out)
}

fn record_section(r: &RecordLevel) -> Result<String> {
    let mut out = String::from("<h2>Record level (DP-SGD at every site)</h2>");
    out.push_str(&facts(&[
        ("protects against", r.protects_against.clone()),
        ("privacy unit", r.privacy_unit.clone()),
        ("neighbouring relation", r.neighbouring_relation.clone()),
        (
            "sampling",
            format!(
                "{} (rate {}): {}",
                r.sampling.method,
                opt(r.sampling.rate),
                r.sampling.assumption
            ),
        ),
        ("accountant", r.accountant.clone()),
        (
            "target",
            format!(
                "ε = {} at δ = {:e} per site",
                r.target.epsilon, r.target.delta
            ),
        ),
        ("what is counted", r.counting.clone()),
        ("authoritative figures", r.authoritative.clone()),
        ("counts (FedAvg weights)", r.counts.clone()),
    ]));
    out.push_str("<h3>DP-SGD parameters</h3>");
    out.push_str(&parameters_table(&r.dp_sgd));
    if !r.every_round_epsilon.is_empty() {
        let rounds = r.every_round_epsilon.len();
        let series = vec![
            Series {
                label: "record-level ε of a site in every round".into(),
                points: r
                    .every_round_epsilon
                    .iter()
                    .enumerate()
                    .filter_map(|(i, e)| e.map(|e| ((i + 1) as f64, e)))
                    .collect(),
                dashed: false,
            },
            Series {
                label: "target per site".into(),
                points: vec![(1.0, r.target.epsilon), (rounds as f64, r.target.epsilon)],
                dashed: true,
            },
        ];
        out.push_str(&line_chart(
            &format!("record-level ε at δ = {:e}", r.target.delta),
            "round",
            "ε",
            &series,
            (900, 340),
        )?);
    }
    let rows: Vec<Vec<String>> = r
        .sites
        .iter()
        .map(|s| {
            vec![
                escape(&s.site_id),
                s.rounds_contributed.to_string(),
                opt(s.updates_received),
                opt(s.train_examples),
                s.epsilon
                    .map_or("in the site's report".into(), |e| format!("≥ {e:.4}")),
                escape(&s.declined.join("; ")),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "site",
            "rounds contributed",
            "updates received",
            "examples",
            "ε (lower bound)",
            "declined",
        ],
        &rows,
    ));
    Ok(out)
}
