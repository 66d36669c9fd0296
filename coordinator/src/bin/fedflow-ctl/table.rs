//! The tables `fedflow-ctl` prints for people. Every string from the coordinator (site
//! ids, reasons, statuses: text that sites and operators chose) goes through [`cell`] or
//! [`reason`]: escaped, so a control sequence in it never reaches the terminal, and reasons
//! cut so a table stays readable.

use std::fmt::Write;

use fedflow_common::text;
use fedflow_proto::v1 as wire;

use crate::json::{phase, site_state};

/// Longest reason shown in a table cell, in characters (`--json` has them whole).
const REASON_CHARS: usize = 60;

/// Longest run status reason shown in the status header line.
const STATUS_REASON_CHARS: usize = 200;

/// A string from the coordinator, safe to print (escaped).
fn cell(s: &str) -> String {
    text::escape(s).into_owned()
}

/// A reason from the coordinator, safe to print and cut to `max` characters.
fn reason(s: &str, max: usize) -> String {
    text::shorten(s, max)
}

/// Left-aligned columns, two spaces apart.
fn grid(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(l, "{c:<w$}  ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn f(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "-".into()
    }
}

fn bytes(n: u64) -> String {
    match n {
        0 => "-".into(),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
    }
}

/// The status of the run, for a person.
pub(crate) fn status(s: &wire::RunStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {}: {}{}",
        cell(&s.run_id),
        phase(s.phase),
        if s.status_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", reason(&s.status_reason, STATUS_REASON_CHARS))
        }
    );
    let round = match (s.current_round, s.continuous) {
        (0, true) => format!("{} rounds committed (continuous)", s.committed_round),
        (r, true) => format!("round {r} (continuous)"),
        (0, false) => format!(
            "{} of {} rounds committed",
            s.committed_round, s.total_rounds
        ),
        (r, false) => format!("round {r} of {}", s.total_rounds),
    };
    let deadline = if s.deadline_unix_ms > 0 {
        format!(
            ", {:.0}s to the deadline",
            ((s.deadline_unix_ms - s.now_unix_ms) as f64 / 1000.0).max(0.0)
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "{round}{deadline}; {} site(s) connected",
        s.sites_connected
    );
    if let Some(m) = s.latest.as_ref().filter(|m| m.round > 0) {
        let _ = writeln!(
            out,
            "latest: round {} train loss {}; evaluation loss {} accuracy {} macro-F1 {} ({} sites)",
            m.round,
            f(m.train_loss, 4),
            f(m.evaluation_loss, 4),
            f(m.evaluation_accuracy, 4),
            f(m.evaluation_macro_f1, 4),
            m.evaluated_sites
        );
    }
    match &s.published {
        Some(p) => {
            let _ = writeln!(
                out,
                "published: version {} ({}, by {}) {} ago",
                p.round,
                cell(&p.action),
                cell(&p.by),
                age(s.now_unix_ms - p.published_at_unix_ms)
            );
        }
        None => out.push_str("published: none yet\n"),
    }
    if let Some(p) = &s.privacy {
        let _ = writeln!(
            out,
            "site-level privacy ({}): epsilon {} of {} spent at delta {:e}",
            cell(&p.mode),
            f(p.epsilon_spent, 3),
            p.target_epsilon,
            p.target_delta
        );
    }
    if !s.sites.is_empty() {
        let rows: Vec<Vec<String>> = s
            .sites
            .iter()
            .map(|p| {
                vec![
                    cell(&p.site_id),
                    site_state(p.state).to_string(),
                    if p.epochs > 0 {
                        format!("{}/{}", p.epoch, p.epochs)
                    } else {
                        "-".into()
                    },
                    bytes(p.bytes_done),
                    reason(&p.reason, REASON_CHARS),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&grid(&["SITE", "STATE", "EPOCH", "BYTES", "REASON"], &rows));
    }
    out
}

/// A duration in milliseconds, for a person (`42s`, `3m 5s`, `2h 10m`, `4d 3h`).
pub(crate) fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The model versions, for a person (newest last), then the publication history.
pub(crate) fn models(r: &wire::ListModelsResponse, now_ms: i64) -> String {
    let rows: Vec<Vec<String>> = r
        .versions
        .iter()
        .map(|v| {
            vec![
                v.round.to_string(),
                if v.published {
                    "published".into()
                } else if v.ever_published {
                    "was published".into()
                } else {
                    "-".into()
                },
                f(v.evaluation_accuracy, 4),
                f(v.evaluation_macro_f1, 4),
                v.evaluation_sites.to_string(),
                if v.kept { "kept" } else { "pruned" }.into(),
                cell(&v.model_sha256.chars().take(12).collect::<String>()),
                reason(&v.gate_reason, REASON_CHARS),
            ]
        })
        .collect();
    let mut out = format!("run {}\n", cell(&r.run_id));
    out.push_str(&grid(
        &[
            "VERSION",
            "STATE",
            "ACCURACY",
            "MACRO-F1",
            "SITES",
            "CHECKPOINT",
            "SHA256",
            "GATE",
        ],
        &rows,
    ));
    if !r.publications.is_empty() {
        let rows: Vec<Vec<String>> = r
            .publications
            .iter()
            .map(|p| {
                vec![
                    p.round.to_string(),
                    cell(&p.action),
                    cell(&p.by),
                    format!("{} ago", age(now_ms - p.published_at_unix_ms)),
                    reason(&p.reason, REASON_CHARS),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&grid(
            &["PUBLISHED", "ACTION", "BY", "WHEN", "REASON"],
            &rows,
        ));
    }
    out
}

/// Runs, for a person.
pub(crate) fn runs(r: &wire::ListRunsResponse) -> String {
    let rows: Vec<Vec<String>> = r
        .runs
        .iter()
        .map(|x| {
            vec![
                cell(&x.run_id),
                cell(&x.status),
                format!("{}/{}", x.committed_round, x.total_rounds),
                cell(&x.strategy),
                reason(&x.status_reason, REASON_CHARS),
            ]
        })
        .collect();
    grid(&["RUN", "STATUS", "ROUNDS", "STRATEGY", "REASON"], &rows)
}

/// Rounds, for a person.
pub(crate) fn rounds(r: &wire::ListRoundsResponse) -> String {
    let rows: Vec<Vec<String>> = r
        .rounds
        .iter()
        .map(|x| {
            let m = x.metrics.unwrap_or_default();
            let secs = if x.committed_unix_ms > 0 {
                format!(
                    "{:.1}",
                    (x.committed_unix_ms - x.started_unix_ms) as f64 / 1000.0
                )
            } else {
                "-".into()
            };
            let round = match x.failed_attempt {
                0 => x.round.to_string(),
                n => format!("{} (try {n})", x.round),
            };
            vec![
                round,
                cell(&x.status),
                format!("{}/{}", x.uploaded, x.selected),
                format!("{}/{}/{}/{}", x.late, x.dropped, x.rejected, x.declined),
                f(m.train_loss, 4),
                f(m.evaluation_loss, 4),
                f(m.evaluation_accuracy, 4),
                f(m.evaluation_accuracy_median, 4),
                secs,
                reason(&x.failure_reason, REASON_CHARS),
            ]
        })
        .collect();
    let mut out = format!("run {}\n", cell(&r.run_id));
    out.push_str(&grid(
        &[
            "ROUND",
            "STATUS",
            "UPLOADED",
            "LATE/DROP/REJ/DECL",
            "TRAIN LOSS",
            "EVAL LOSS",
            "EVAL ACC",
            "MEDIAN",
            "SECONDS",
            "REASON",
        ],
        &rows,
    ));
    out
}

/// Sites, for a person.
pub(crate) fn sites(r: &wire::ListSitesResponse) -> String {
    let rows: Vec<Vec<String>> = r
        .sites
        .iter()
        .map(|s| {
            vec![
                cell(&s.site_id),
                s.rounds_contributed.to_string(),
                s.rejected.to_string(),
                s.late.to_string(),
                s.dropped.to_string(),
                s.declined.to_string(),
                s.last_seen_unix_ms.to_string(),
                match s.certificate_not_after_unix_ms {
                    0 => "-".to_string(),
                    t => (t - fedflow_common::clock::now_ms())
                        .div_euclid(86_400_000)
                        .to_string(),
                },
            ]
        })
        .collect();
    grid(
        &[
            "SITE",
            "ROUNDS",
            "REJECTED",
            "LATE",
            "DROPPED",
            "DECLINED",
            "LAST SEEN (ms)",
            "CERT DAYS LEFT",
        ],
        &rows,
    )
}

/// Revocations, for a person.
pub(crate) fn revocations(r: &wire::ListRevocationsResponse) -> String {
    let rows: Vec<Vec<String>> = r
        .revocations
        .iter()
        .map(|x| {
            vec![
                cell(&x.kind),
                if x.role.is_empty() {
                    cell(&x.value)
                } else {
                    format!("{} {}", cell(&x.role), cell(&x.value))
                },
                reason(&x.reason, REASON_CHARS),
                cell(&x.revoked_by),
            ]
        })
        .collect();
    grid(&["KIND", "WHAT", "REASON", "BY"], &rows)
}
