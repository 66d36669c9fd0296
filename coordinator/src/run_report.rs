//! The run report: one self-contained HTML page (inline CSS and SVG charts drawn here with
//! `plotters`; nothing fetched when it is opened) with how a run went — accuracy and loss
//! per round, globally and per site, participation, the size of each round's global
//! update, round durations and, under site-level DP, epsilon over rounds (from the same
//! ledger as the privacy-audit report, which it links to). Built from the store alone:
//! `fedflow-coordinator report --data DIR`, and written by the demo.

use fedflow_common::clock::utc;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use fedflow_common::params::ParamSet;
use fedflow_common::report::{Series, line_chart, page, table};

use crate::metrics::{EvaluationSummary, SiteReport, TrainingSummary};
use crate::store::{RoundStatus, SiteState, Store};
use crate::{Error, Result};

/// The report's file name (next to the privacy-audit report, in `DATA/reports/RUN/`).
pub const REPORT_FILE: &str = "run-report.html";

/// Per-site evaluation series drawn at most (the table lists every site).
const MAX_SITE_SERIES: usize = 12;

/// One round, as the report shows it.
#[derive(Debug, Clone, Default)]
struct RoundRow {
    round: u64,
    status: String,
    train: TrainingSummary,
    eval: Option<EvaluationSummary>,
    selected: u64,
    uploaded: u64,
    late_or_dropped: u64,
    declined_or_rejected: u64,
    seconds: Option<f64>,
    update_norm: Option<f64>,
    epsilon: Option<f64>,
    /// Updates clipped to the run's bound on update norms.
    clipped: u64,
}

/// Text from the store (names, statuses, reasons an operator or the engine wrote) as HTML:
/// control and invisible formatting characters made visible (`fedflow_common::text`), then
/// markup escaped.
fn escape(text: &str) -> String {
    fedflow_common::report::escape(&fedflow_common::text::escape(text))
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(|| "–".into(), |x| format!("{x:.digits$}"))
}

fn series(label: &str, points: Vec<(f64, f64)>) -> Series {
    Series {
        label: label.into(),
        points,
        dashed: false,
    }
}

/// Writes the report of `run_id` to `out/run-report.html` (atomically) and returns its
/// path.
pub fn write(store: &Store, run_id: &str, out: &Path) -> Result<std::path::PathBuf> {
    let html = build(store, run_id)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let path = out.join(REPORT_FILE);
    fedflow_common::fsio::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

/// The published version, how long ago it was published, and every change of it.
fn registry_section(store: &Store, run_id: &str, now_ms: i64) -> Result<String> {
    let mut out = String::from("<h2>Published versions</h2>");
    let history = store.publications(run_id)?;
    match history.last() {
        None => out.push_str("<p>No version has been published.</p>"),
        Some(p) => {
            let _ = write!(
                out,
                "<p id=\"published\">Version <b>{}</b> is published (by {}, {}), {:.1} hours \
                 before this report was made.</p>",
                p.round,
                escape(&p.by),
                utc(p.published_at_ms),
                (now_ms - p.published_at_ms).max(0) as f64 / 3_600_000.0
            );
            out.push_str(
                "<table><tr><th>version</th><th>action</th><th>by</th><th>when</th>\
                 <th>reason</th></tr>",
            );
            for p in &history {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    p.round,
                    p.action.as_str(),
                    escape(&p.by),
                    utc(p.published_at_ms),
                    escape(&p.reason)
                );
            }
            out.push_str("</table>");
        }
    }
    let decisions = store.gate_decisions(run_id)?;
    let point = |v: fn(&crate::store::GateDecision) -> Option<f64>| {
        decisions
            .iter()
            .filter_map(|d| v(d).filter(|x| x.is_finite()).map(|x| (d.round as f64, x)))
            .collect::<Vec<_>>()
    };
    let (candidate, baseline) = (point(|d| d.candidate), point(|d| d.baseline));
    if !candidate.is_empty() {
        out.push_str(
            "<p>Each candidate's federated evaluation next to the published version's,              measured again by the same sites on the same data in the same evaluation phase              (the gate's metric, weighted over those sites). When the sites' data changes,              the published version's figure moves with it.</p>",
        );
        out.push_str(&line_chart(
            "Publish gate: candidate and published version",
            "round",
            "gate metric",
            &[
                series("candidate", candidate),
                series("published version, measured again", baseline),
            ],
            (900, 320),
        )?);
    }
    Ok(out)
}

/// The report's HTML.
pub fn build(store: &Store, run_id: &str) -> Result<String> {
    let run = store
        .run(run_id)?
        .ok_or_else(|| Error::NotFound(format!("no run named {run_id:?}")))?;
    let cfg: serde_json::Value = serde_json::from_str(&run.config_json).unwrap_or_default();
    let total_rounds = cfg["run"]["rounds"].as_u64().unwrap_or(0);
    let epsilons: BTreeMap<u64, f64> = store
        .site_dp_rounds(run_id)?
        .into_iter()
        .map(|r| (r.round, r.epsilon))
        .collect();

    let mut rows = Vec::new();
    let mut per_site: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut previous: Option<ParamSet> = None;
    let mut initial_norm = None;
    for r in store.rounds(run_id)? {
        // The global update of a committed round: its model minus the previous one.
        let model = match (r.status, &r.model_sha256) {
            (RoundStatus::Committed, Some(_)) => {
                ParamSet::load(store.model_checkpoint_path(run_id, r.round)).ok()
            }
            _ => None,
        };
        let update_norm = match (&previous, &model) {
            (Some(p), Some(m)) => ParamSet::delta(m, p).and_then(|d| d.l2_norm()).ok(),
            _ => None,
        };
        // A failed round leaves the previous model in place; a committed round whose
        // checkpoint retention deleted has no norm, and neither has the one after it.
        if r.status == RoundStatus::Committed {
            previous = model;
        }
        if r.round == 0 {
            initial_norm = previous.as_ref().and_then(|m| m.l2_norm().ok());
            continue;
        }
        for e in store.evaluations(run_id, r.round)? {
            let m: SiteReport = serde_json::from_str(&e.metrics_json).unwrap_or_default();
            if let Some(acc) = m.validation_accuracy {
                per_site
                    .entry(e.site_id)
                    .or_default()
                    .push((r.round as f64, acc));
            }
        }
        let sites = store.round_sites(run_id, r.round)?;
        let count =
            |f: &dyn Fn(SiteState) -> bool| sites.iter().filter(|s| f(s.state)).count() as u64;
        rows.push(RoundRow {
            round: r.round,
            status: r.status.as_str().to_string(),
            train: r
                .metrics_json
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok())
                .unwrap_or_default(),
            eval: r
                .evaluation_json
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok()),
            selected: sites.len() as u64,
            uploaded: count(&|s| s == SiteState::Uploaded),
            late_or_dropped: count(&|s| matches!(s, SiteState::Late | SiteState::Dropped)),
            declined_or_rejected: count(&|s| {
                matches!(s, SiteState::Declined | SiteState::Rejected)
            }),
            seconds: r
                .committed_at_ms
                .map(|c| (c - r.started_at_ms) as f64 / 1000.0),
            update_norm,
            epsilon: epsilons.get(&r.round).copied(),
            clipped: sites.iter().filter(|s| s.clipped == Some(true)).count() as u64,
        });
    }

    let committed: Vec<&RoundRow> = rows.iter().filter(|r| r.status == "committed").collect();
    let pts = |f: &dyn Fn(&RoundRow) -> Option<f64>| -> Vec<(f64, f64)> {
        committed
            .iter()
            .filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.round as f64, v)))
            .collect()
    };
    let size = (900, 340);
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Run report: {}</h1><p>Status <b>{}</b>{}; {} of {} rounds committed; strategy {}; \
         aggregation {}; created {}. Privacy: {}.</p>",
        escape(run_id),
        escape(run.status.as_str()),
        run.status_reason
            .as_deref()
            .map(|r| format!(" ({})", escape(r)))
            .unwrap_or_default(),
        committed.len(),
        total_rounds,
        escape(&run.strategy),
        escape(cfg["aggregation"]["rule"].as_str().unwrap_or("mean")),
        utc(run.created_at_ms),
        if cfg.get("site_dp").is_some_and(|v| !v.is_null())
            || cfg.get("record_dp").is_some_and(|v| !v.is_null())
        {
            format!(
                "differential privacy is on; the guarantee delivered is in the \
                 <a href=\"{}\">privacy-audit report</a>",
                crate::audit::HTML_FILE
            )
        } else {
            format!(
                "no differential privacy (see the <a href=\"{}\">privacy-audit report</a>)",
                crate::audit::HTML_FILE
            )
        }
    );
    let last_eval = committed
        .iter()
        .rev()
        .find_map(|r| r.eval.clone().map(|e| (r.round, e)));
    if let Some((round, e)) = &last_eval {
        let _ = write!(
            body,
            "<p id=\"summary\">Latest federated evaluation (round {round}, {} sites, {} \
             sessions): accuracy <b>{}</b>, macro-F1 <b>{}</b>, loss {} (weighted by each \
             site's validation sessions, at most {} each); over sites, accuracy median \
             <b>{}</b>, from {} to {}.</p>",
            e.sites,
            e.examples,
            fmt(e.accuracy, 4),
            fmt(e.macro_f1, 4),
            fmt(e.loss, 4),
            cfg["aggregation"]["max_examples"]
                .as_u64()
                .unwrap_or(crate::config::DEFAULT_MAX_EXAMPLES),
            fmt(e.accuracy_spread.map(|s| s.median), 4),
            fmt(e.accuracy_spread.map(|s| s.min), 4),
            fmt(e.accuracy_spread.map(|s| s.max), 4)
        );
    }
    // The bound on every update (site-level DP has its own, stated in the audit report).
    let bound = cfg["aggregation"]["max_update_norm"]
        .as_f64()
        .or(initial_norm)
        .filter(|_| cfg.get("site_dp").is_none_or(|v| v.is_null()));
    if let Some(b) = bound {
        let refuse = cfg["aggregation"]["on_large_update"].as_str() == Some("refuse");
        let _ = write!(
            body,
            "<p id=\"influence\">Bounded influence: every update's L2 norm is held to {} \
             ({}; above it an update is {}), every site's count to {} examples. So a \
             round's mean delta moves the model by at most that norm (times the server \
             learning rate), a median or trimmed mean of k updates by at most √k times it. \
             Updates clipped in this run: {}.</p>",
            fmt(Some(b), 4),
            if cfg["aggregation"]["max_update_norm"].is_f64() {
                "aggregation.max_update_norm"
            } else {
                "the initial model's norm"
            },
            if refuse { "refused" } else { "clipped to it" },
            cfg["aggregation"]["max_examples"]
                .as_u64()
                .unwrap_or(crate::config::DEFAULT_MAX_EXAMPLES),
            rows.iter().map(|r| r.clipped).sum::<u64>()
        );
    }

    body.push_str("<h2>Accuracy per round</h2>");
    body.push_str(&line_chart(
        "Global model",
        "round",
        "accuracy / macro-F1",
        &[
            series(
                "evaluation accuracy",
                pts(&|r| r.eval.as_ref().and_then(|e| e.accuracy)),
            ),
            series(
                "evaluation accuracy, median over sites",
                pts(&|r| {
                    r.eval
                        .as_ref()
                        .and_then(|e| e.accuracy_spread.map(|s| s.median))
                }),
            ),
            series(
                "evaluation macro-F1",
                pts(&|r| r.eval.as_ref().and_then(|e| e.macro_f1)),
            ),
            series(
                "local validation accuracy (training)",
                pts(&|r| r.train.local_validation_accuracy),
            ),
        ],
        size,
    )?);
    body.push_str("<h2>Loss per round</h2>");
    body.push_str(&line_chart(
        "Global model",
        "round",
        "cross-entropy",
        &[
            series("training loss (sites' mean)", pts(&|r| r.train.train_loss)),
            series(
                "evaluation loss",
                pts(&|r| r.eval.as_ref().and_then(|e| e.loss)),
            ),
        ],
        size,
    )?);
    if !per_site.is_empty() {
        body.push_str("<h2>Accuracy per site</h2>");
        let site_series: Vec<Series> = per_site
            .iter()
            .take(MAX_SITE_SERIES)
            .map(|(s, p)| series(s, p.clone()))
            .collect();
        body.push_str(&line_chart(
            "Each site's evaluation of the global model",
            "round",
            "accuracy",
            &site_series,
            size,
        )?);
        if per_site.len() > MAX_SITE_SERIES {
            let _ = write!(
                body,
                "<p>{} of {} sites drawn.</p>",
                MAX_SITE_SERIES,
                per_site.len()
            );
        }
    }
    body.push_str("<h2>Participation per round</h2>");
    let all = |f: &dyn Fn(&RoundRow) -> f64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (r.round as f64, f(r))).collect()
    };
    body.push_str(&line_chart(
        "Sites per round",
        "round",
        "sites",
        &[
            series("selected", all(&|r| r.selected as f64)),
            series("uploaded", all(&|r| r.uploaded as f64)),
            series("late or dropped", all(&|r| r.late_or_dropped as f64)),
            series(
                "declined or rejected",
                all(&|r| r.declined_or_rejected as f64),
            ),
        ],
        size,
    )?);
    body.push_str("<h2>Global update norm</h2><p>L2 norm of each committed round's change to the global model.</p>");
    body.push_str(&line_chart(
        "||global(r) - global(r-1)||",
        "round",
        "L2 norm",
        &[
            series("update norm", pts(&|r| r.update_norm)),
            series(
                "bound on one update's norm",
                bound.map_or_else(Vec::new, |b| pts(&|_| Some(b))),
            ),
        ],
        size,
    )?);
    body.push_str("<h2>Bytes per round</h2>");
    let compression = cfg
        .get("compression")
        .filter(|c| !c.is_null())
        .and_then(|c| serde_json::from_value::<crate::config::CompressionSection>(c.clone()).ok())
        .map_or_else(
            || "plain f32 updates".to_string(),
            |c| format!("updates compressed as {}", c.compression().name()),
        );
    let _ = write!(
        body,
        "<p>Update bytes the coordinator folded into each round ({}), and the global model's \
         size times the sites given a task (each downloads it once).</p>",
        escape(&compression)
    );
    body.push_str(&line_chart(
        "Transfer volume",
        "round",
        "MB",
        &[
            series("uploads", all(&|r| r.train.upload_bytes as f64 / 1e6)),
            series("downloads", all(&|r| r.train.download_bytes as f64 / 1e6)),
        ],
        size,
    )?);
    body.push_str("<h2>Round durations</h2>");
    body.push_str(&line_chart(
        "From start to commit",
        "round",
        "seconds",
        &[series("duration", pts(&|r| r.seconds))],
        size,
    )?);
    if !epsilons.is_empty() {
        body.push_str("<h2>Site-level privacy spent</h2>");
        body.push_str(&line_chart(
            "Cumulative epsilon (site level)",
            "round",
            "epsilon",
            &[series(
                "epsilon",
                epsilons.iter().map(|(r, e)| (*r as f64, *e)).collect(),
            )],
            size,
        )?);
        let _ = write!(
            body,
            "<p>Per round, with every parameter, in the <a href=\"{}\">privacy-audit report</a>.</p>",
            crate::audit::HTML_FILE
        );
    }
    body.push_str(&registry_section(
        store,
        run_id,
        fedflow_common::clock::now_ms(),
    )?);
    body.push_str("<h2>Rounds</h2>");
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.round.to_string(),
                escape(&r.status),
                format!("{}/{}", r.uploaded, r.selected),
                r.late_or_dropped.to_string(),
                r.declined_or_rejected.to_string(),
                fmt(r.train.train_loss, 4),
                fmt(r.eval.as_ref().and_then(|e| e.loss), 4),
                fmt(r.eval.as_ref().and_then(|e| e.accuracy), 4),
                fmt(r.eval.as_ref().and_then(|e| e.macro_f1), 4),
                fmt(r.update_norm, 4),
                format!("{:.3}", r.train.upload_bytes as f64 / 1e6),
                format!("{:.3}", r.train.download_bytes as f64 / 1e6),
                fmt(r.seconds, 1),
                fmt(r.epsilon, 3),
            ]
        })
        .collect();
    body.push_str(&table(
        &[
            "round",
            "status",
            "uploaded",
            "late/dropped",
            "declined/rejected",
            "train loss",
            "eval loss",
            "eval accuracy",
            "eval macro-F1",
            "update norm",
            "upload MB",
            "download MB",
            "seconds",
            "epsilon",
        ],
        &table_rows,
    ));
    Ok(page(
        &format!(
            "fedflow run report: {}",
            fedflow_common::text::escape(run_id)
        ),
        &body,
    ))
}

#[cfg(test)]
mod tests {
    use crate::round::tests::{SEC, SITES, T0, engine, fixture, start, submit, update};

    #[test]
    fn the_report_states_the_bound_on_updates_and_how_many_were_clipped() {
        let f = fixture("[aggregation]\nmax_update_norm = 0.5\nmax_examples = 700\n");
        let mut e = engine(&f);
        let tickets = start(&mut e);
        assert!(
            f.initial.l2_norm().unwrap() > 0.5,
            "a whole-model update is clipped"
        );
        for (i, s) in SITES.iter().enumerate() {
            let scale = if i == 0 { 1.0 } else { 1e-3 };
            submit(&mut e, s, &tickets[*s], &update(&f, scale), 10, T0 + SEC).unwrap();
        }
        assert_eq!(e.committed_round(), 1);
        let html = super::build(e.store(), "t").unwrap();
        let at = html.find("id=\"influence\"").expect("the bound is stated");
        let paragraph = &html[at..at + html[at..].find("</p>").unwrap()];
        assert!(paragraph.contains("held to 0.5000"), "{paragraph}");
        assert!(
            paragraph.contains("aggregation.max_update_norm"),
            "{paragraph}"
        );
        assert!(paragraph.contains("clipped to it"), "{paragraph}");
        assert!(paragraph.contains("to 700 examples"), "{paragraph}");
        assert!(
            paragraph.contains("Updates clipped in this run: 1."),
            "{paragraph}"
        );
        // The bytes the round moved: every update folded in, the model to every site.
        let round = &e.store().rounds("t").unwrap()[1];
        let m: crate::metrics::TrainingSummary =
            serde_json::from_str(round.metrics_json.as_ref().unwrap()).unwrap();
        let values = f.initial.num_elements() as u64;
        assert_eq!(m.upload_bytes, SITES.len() as u64 * values * 4);
        let model = f.initial.to_safetensors_bytes().unwrap().len() as u64;
        assert_eq!(m.download_bytes, SITES.len() as u64 * model);
        assert!(html.contains("<h2>Bytes per round</h2>"));
        assert!(html.contains("plain f32 updates"));
    }
}
