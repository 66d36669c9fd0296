//! The JSON `fedflow-ctl` prints with `--json`: stable, versioned schemas for scripts.
//!
//! Every document has a `schema` member (`fedflow.status/1`, `fedflow.runs/1`,
//! `fedflow.rounds/1`, `fedflow.sites/1`, `fedflow.revocations/1`, `fedflow.models/1`);
//! fields are only ever
//! added within a version. Times are Unix milliseconds; a metric that was not measured is
//! `null`; states and phases are lowercase words. Strings hold exactly what the coordinator
//! sent; characters a terminal would act on are `\uXXXX`-escaped in the printed text.
//!
//! `fedflow.status/1`:
//! `{schema, run_id, phase ("waiting"|"training"|"evaluating"|"paused"|"finished"),
//! status_reason, round: {current, committed, total}, deadline_unix_ms (null when no round
//! is open), seconds_to_deadline, sites_connected, global_model_sha256, now_unix_ms,
//! sites: [{site_id, state ("selected"|"downloading"|"training"|"uploading"|"evaluating"|
//! "uploaded"|"late"|"dropped"|"rejected"|"declined"), reason, epoch, epochs, bytes_done,
//! last_seen_unix_ms}], latest: {round, updates, train_examples, train_loss,
//! local_validation_loss, local_validation_accuracy, local_validation_macro_f1,
//! evaluated_sites, evaluation_examples, evaluation_loss, evaluation_accuracy,
//! evaluation_macro_f1} | null, privacy: {mode, epsilon_spent, target_epsilon,
//! target_delta} | null, continuous, published: {round, model_sha256, action, by, reason,
//! published_at_unix_ms, seconds_since} | null}`.
//!
//! `fedflow.models/1`: `{schema, run_id, versions: [{round, model_sha256,
//! committed_at_unix_ms, evaluation_accuracy, evaluation_macro_f1, evaluation_sites,
//! published, ever_published, gate_reason, kept}], publications: [{round, model_sha256,
//! action ("gate"|"publish"|"rollback"), by, reason, published_at_unix_ms}]}`.

use fedflow_proto::v1 as wire;
use serde_json::{Value, json};

/// `doc` as one line of JSON, safe to print on a terminal: the characters `serde_json`
/// writes as they are but a terminal would act on (DEL, C1 controls, bidirectional
/// overrides) are written as `\uXXXX` escapes, which encode the same value.
pub(crate) fn print(doc: &Value) -> String {
    fedflow_common::text::json_safe(&doc.to_string()).into_owned()
}

fn num(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

/// Lowercase name of a phase.
pub(crate) fn phase(p: i32) -> &'static str {
    match wire::RunPhase::try_from(p).unwrap_or(wire::RunPhase::Unspecified) {
        wire::RunPhase::Waiting => "waiting",
        wire::RunPhase::Training => "training",
        wire::RunPhase::Evaluating => "evaluating",
        wire::RunPhase::Paused => "paused",
        wire::RunPhase::Finished => "finished",
        wire::RunPhase::Unspecified => "unknown",
    }
}

/// Lowercase name of a site's state in the round.
pub(crate) fn site_state(s: i32) -> &'static str {
    use wire::SiteRoundState as S;
    match S::try_from(s).unwrap_or(S::Unspecified) {
        S::Selected => "selected",
        S::Downloading => "downloading",
        S::Training => "training",
        S::Uploading => "uploading",
        S::Evaluating => "evaluating",
        S::Uploaded => "uploaded",
        S::Late => "late",
        S::Dropped => "dropped",
        S::Rejected => "rejected",
        S::Declined => "declined",
        S::Unspecified => "unknown",
    }
}

fn metrics(m: &wire::RoundMetrics) -> Value {
    json!({
        "round": m.round,
        "updates": m.updates,
        "train_examples": m.train_examples,
        "train_loss": num(m.train_loss),
        "local_validation_loss": num(m.local_validation_loss),
        "local_validation_accuracy": num(m.local_validation_accuracy),
        "local_validation_macro_f1": num(m.local_validation_macro_f1),
        "evaluated_sites": m.evaluated_sites,
        "evaluation_examples": m.evaluation_examples,
        "evaluation_loss": num(m.evaluation_loss),
        "evaluation_accuracy": num(m.evaluation_accuracy),
        "evaluation_macro_f1": num(m.evaluation_macro_f1),
    })
}

/// `fedflow.status/1`.
pub(crate) fn status(s: &wire::RunStatus) -> Value {
    let deadline = (s.deadline_unix_ms > 0).then_some(s.deadline_unix_ms);
    json!({
        "schema": "fedflow.status/1",
        "run_id": s.run_id,
        "phase": phase(s.phase),
        "status_reason": s.status_reason,
        "round": {
            "current": s.current_round,
            "committed": s.committed_round,
            "total": s.total_rounds,
        },
        "deadline_unix_ms": deadline,
        "seconds_to_deadline": deadline.map(|d| ((d - s.now_unix_ms) as f64 / 1000.0).max(0.0)),
        "sites_connected": s.sites_connected,
        "global_model_sha256": s.global_model_sha256,
        "now_unix_ms": s.now_unix_ms,
        "sites": s.sites.iter().map(|p| json!({
            "site_id": p.site_id,
            "state": site_state(p.state),
            "reason": p.reason,
            "epoch": p.epoch,
            "epochs": p.epochs,
            "bytes_done": p.bytes_done,
            "last_seen_unix_ms": p.last_seen_unix_ms,
        })).collect::<Vec<_>>(),
        "latest": s.latest.as_ref().filter(|m| m.round > 0).map(metrics),
        "continuous": s.continuous,
        "published": s.published.as_ref().map(|p| {
            let mut v = publication(p);
            v["seconds_since"] =
                json!(((s.now_unix_ms - p.published_at_unix_ms) as f64 / 1000.0).max(0.0));
            v
        }),
        "privacy": s.privacy.as_ref().map(|p| json!({
            "mode": p.mode,
            "epsilon_spent": num(p.epsilon_spent),
            "target_epsilon": p.target_epsilon,
            "target_delta": p.target_delta,
        })),
    })
}

/// `fedflow.runs/1`.
pub(crate) fn runs(r: &wire::ListRunsResponse) -> Value {
    json!({
        "schema": "fedflow.runs/1",
        "runs": r.runs.iter().map(|r| json!({
            "run_id": r.run_id,
            "status": r.status,
            "status_reason": r.status_reason,
            "strategy": r.strategy,
            "created_unix_ms": r.created_unix_ms,
            "total_rounds": r.total_rounds,
            "committed_round": r.committed_round,
        })).collect::<Vec<_>>(),
    })
}

/// `fedflow.rounds/1`.
pub(crate) fn rounds(r: &wire::ListRoundsResponse) -> Value {
    json!({
        "schema": "fedflow.rounds/1",
        "run_id": r.run_id,
        "rounds": r.rounds.iter().map(|x| json!({
            "round": x.round,
            "status": x.status,
            "started_unix_ms": x.started_unix_ms,
            "committed_unix_ms": (x.committed_unix_ms > 0).then_some(x.committed_unix_ms),
            "model_sha256": x.model_sha256,
            "failure_reason": x.failure_reason,
            "selected": x.selected,
            "uploaded": x.uploaded,
            "late": x.late,
            "dropped": x.dropped,
            "rejected": x.rejected,
            "declined": x.declined,
            "metrics": x.metrics.as_ref().map(metrics),
        })).collect::<Vec<_>>(),
    })
}

/// `fedflow.sites/1`.
pub(crate) fn sites(r: &wire::ListSitesResponse) -> Value {
    json!({
        "schema": "fedflow.sites/1",
        "sites": r.sites.iter().map(|s| json!({
            "site_id": s.site_id,
            "first_seen_unix_ms": s.first_seen_unix_ms,
            "last_seen_unix_ms": s.last_seen_unix_ms,
            "rounds_contributed": s.rounds_contributed,
            "rejected": s.rejected,
            "late": s.late,
            "dropped": s.dropped,
            "declined": s.declined,
            "certificate_not_after_unix_ms": (s.certificate_not_after_unix_ms > 0)
                .then_some(s.certificate_not_after_unix_ms),
        })).collect::<Vec<_>>(),
    })
}

/// `fedflow.revocations/1`.
pub(crate) fn revocations(r: &wire::ListRevocationsResponse) -> Value {
    json!({
        "schema": "fedflow.revocations/1",
        "revocations": r.revocations.iter().map(|x| json!({
            "kind": x.kind,
            "role": x.role,
            "value": x.value,
            "reason": x.reason,
            "revoked_by": x.revoked_by,
            "revoked_at_ms": x.revoked_at_ms,
        })).collect::<Vec<_>>(),
    })
}

fn publication(p: &wire::Publication) -> Value {
    json!({
        "round": p.round,
        "model_sha256": p.model_sha256,
        "action": p.action,
        "by": p.by,
        "reason": p.reason,
        "published_at_unix_ms": p.published_at_unix_ms,
    })
}

/// `fedflow.models/1`.
pub(crate) fn models(r: &wire::ListModelsResponse) -> Value {
    json!({
        "schema": "fedflow.models/1",
        "run_id": r.run_id,
        "versions": r.versions.iter().map(|v| json!({
            "round": v.round,
            "model_sha256": v.model_sha256,
            "committed_at_unix_ms": v.committed_at_unix_ms,
            "evaluation_accuracy": num(v.evaluation_accuracy),
            "evaluation_macro_f1": num(v.evaluation_macro_f1),
            "evaluation_sites": v.evaluation_sites,
            "published": v.published,
            "ever_published": v.ever_published,
            "gate_reason": v.gate_reason,
            "kept": v.kept,
        })).collect::<Vec<_>>(),
        "publications": r.publications.iter().map(publication).collect::<Vec<_>>(),
    })
}
