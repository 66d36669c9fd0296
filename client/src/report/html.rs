//! The site privacy report as a self-contained HTML page: the summary first, then the
//! bounds per unit, ε over the releases and the per-release table.

use fedflow_common::report::{Series, escape, line_chart, page, table};

use super::{SitePrivacyReport, fmt_eps};
use crate::Result;

/// The report as a self-contained HTML page.
pub fn to_html(r: &SitePrivacyReport) -> Result<String> {
    let (eps, delta, max) = (
        r.cumulative.epsilon,
        r.cumulative.delta,
        r.budget.max_epsilon,
    );
    let mut body = String::new();
    body.push_str("<h1>Site privacy report</h1>");
    body.push_str(&format!(
        "<div class=\"summary\"><p class=\"big\">ε = {} at δ = {delta:e}</p><p>{}</p>\
         <p>Record-level differential privacy of every model update this site released{}: {} \
         update(s), privacy unit <b>{}</b> ({}).{}</p>{}</div>",
        fmt_eps(eps),
        if !r.releases.is_empty() && r.releases.iter().all(|x| x.entry.count.is_some()) {
            " and of the noisy count of units sent with each"
        } else {
            ""
        },
        match (r.cumulative.epsilon_pld, r.cumulative.stated_by) {
            (Some(_), "pld") => format!(
                "By privacy loss distributions (PLD); Rényi DP gives the looser ε = {} for the \
                 same releases. Both are valid upper bounds.",
                fmt_eps(r.cumulative.epsilon_rdp)
            ),
            (Some(p), _) => format!(
                "By Rényi DP; privacy loss distributions give ε = {} for the same releases.",
                fmt_eps(Some(p))
            ),
            (None, _) => "By Rényi DP (the only accountant that charges this ledger's mixed \
                          privacy units)."
                .to_string(),
        },
        r.releases.len(),
        r.privacy_unit,
        escape(&r.neighbouring_relation),
        match (max, eps) {
            (Some(m), Some(e)) if e <= m => format!(" Within the site's limit of ε = {m}."),
            (Some(m), _) =>
                format!(" <span class=\"warn\">Beyond the site's limit of ε = {m}.</span>"),
            (None, _) => String::new(),
        },
        r.warnings
            .iter()
            .map(|w| format!("<p class=\"warn\">Warning: {}</p>", escape(w)))
            .collect::<String>()
    ));
    let mut series = vec![Series {
        label: "cumulative ε".into(),
        points: r
            .releases
            .iter()
            .enumerate()
            .filter_map(|(i, x)| x.epsilon_after.map(|e| ((i + 1) as f64, e)))
            .collect(),
        dashed: false,
    }];
    if let Some(m) = max {
        series.push(Series {
            label: "site limit".into(),
            points: vec![(1.0, m), (r.releases.len().max(1) as f64, m)],
            dashed: true,
        });
    }
    body.push_str("<h2>ε over releases</h2>");
    body.push_str(&line_chart(
        &format!("cumulative ε at δ = {delta:e}"),
        "release (ledger entry)",
        "ε",
        &series,
        (900, 360),
    )?);
    body.push_str("<h2>Per release</h2>");
    let rows: Vec<Vec<String>> = r
        .releases
        .iter()
        .map(|x| {
            let e = &x.entry;
            vec![
                e.id.to_string(),
                escape(&e.run_id),
                e.round.to_string(),
                e.unit.to_string(),
                e.units.to_string(),
                format!("{}", e.clip_norm),
                format!("{}", e.noise_multiplier),
                e.expected_batch_size.to_string(),
                format!("{:.5}", e.q),
                e.steps.to_string(),
                if e.metrics_released {
                    "yes".into()
                } else {
                    "no".into()
                },
                fmt_eps(x.epsilon_after),
                format!("{}", x.order_after),
            ]
        })
        .collect();
    body.push_str(&table(
        &[
            "entry",
            "run",
            "round",
            "unit",
            "n",
            "C",
            "z",
            "B",
            "q",
            "steps",
            "metrics released",
            "ε after",
            "order",
        ],
        &rows,
    ));
    body.push_str("<h2>Bounds per privacy unit</h2>");
    let per_unit: Vec<Vec<String>> = r
        .bounds
        .iter()
        .map(|b| {
            vec![
                b.unit.to_string(),
                b.relation.to_string(),
                b.epsilon
                    .map_or_else(|| "no bound".to_string(), |e| format!("{e:.4}")),
                escape(&b.rule),
            ]
        })
        .collect();
    body.push_str(&table(
        &[
            "unit",
            "neighbours",
            &format!("ε at δ = {delta:e}"),
            "how releases are charged",
        ],
        &per_unit,
    ));
    body.push_str("<h2>Caveats</h2><ul>");
    for c in &r.caveats {
        body.push_str(&format!("<li>{}</li>", escape(c)));
    }
    body.push_str("</ul>");
    body.push_str("<h2>Guarantee at other δ</h2>");
    let others: Vec<Vec<String>> = r
        .cumulative
        .other_deltas
        .iter()
        .map(|o| {
            vec![
                format!("{:e}", o.delta),
                fmt_eps(o.epsilon),
                format!("{}", o.order),
            ]
        })
        .collect();
    body.push_str(&table(&["δ", "ε", "order"], &others));
    body.push_str("<h2>Mechanism, sampling, accountant</h2><ul>");
    for (k, v) in [
        ("mechanism", &r.mechanism),
        ("sampling", &r.sampling),
        ("accountant", &r.accountant),
    ] {
        for (field, value) in v.as_object().into_iter().flatten() {
            if field == "orders" {
                continue;
            }
            let text = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_string);
            body.push_str(&format!(
                "<li><b>{k} {}</b>: {}</li>",
                escape(field),
                escape(&text)
            ));
        }
    }
    body.push_str("</ul><h2>Not covered</h2><ul>");
    for n in &r.not_covered {
        body.push_str(&format!("<li>{}</li>", escape(n)));
    }
    body.push_str(&format!(
        "</ul><h2>Recompute</h2><pre>{}</pre><p class=\"small\">Code: {}. Ledger: <code>{}</code>. \
         Generated {}.</p>",
        escape(&r.recompute),
        escape(&r.code_version),
        escape(&r.ledger),
        fedflow_common::clock::utc(r.generated_unix_ms)
    ));
    Ok(page("fedflow site privacy report", &body))
}
