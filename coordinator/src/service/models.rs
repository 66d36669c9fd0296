//! The model registry over `fedflow.v1.Admin`: `ListModels` (viewer or admin) and `Publish`
//! / `Rollback` (admin, recorded in the security audit log with the caller and reason).

use fedflow_proto::v1 as wire;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::{Command, Coordinator};
use crate::metrics::EvaluationSummary;
use crate::round::RoundEngine;
use crate::store::{Publication, RoundStatus};

/// A publication as the wire tells it.
pub(super) fn publication(p: &Publication) -> wire::Publication {
    wire::Publication {
        round: p.round,
        model_sha256: p.model_sha256.clone(),
        action: p.action.as_str().into(),
        by: p.by.clone(),
        reason: p.reason.clone(),
        published_at_unix_ms: p.published_at_ms,
    }
}

/// Every committed version of the engine's run, with its evaluation, the gate's decision,
/// whether it is (or was) published and whether its checkpoint is kept.
pub(super) fn list(engine: &RoundEngine) -> crate::Result<wire::ListModelsResponse> {
    let store = engine.store();
    let run = engine.run_id();
    let publications = store.publications(run)?;
    let decisions = store.gate_decisions(run)?;
    let kept = store.kept_rounds(run)?;
    let current = engine.published().map(|p| p.round);
    let versions = store
        .rounds(run)?
        .into_iter()
        .filter(|r| r.status == RoundStatus::Committed)
        .map(|r| {
            let eval: EvaluationSummary = r
                .evaluation_json
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok())
                .unwrap_or_default();
            wire::ModelVersion {
                round: r.round,
                model_sha256: r.model_sha256.unwrap_or_default(),
                committed_at_unix_ms: r.committed_at_ms.unwrap_or(0),
                evaluation_accuracy: eval.accuracy.unwrap_or(f64::NAN),
                evaluation_macro_f1: eval.macro_f1.unwrap_or(f64::NAN),
                evaluation_sites: eval.sites,
                published: current == Some(r.round),
                ever_published: publications.iter().any(|p| p.round == r.round),
                gate_reason: decisions
                    .iter()
                    .find(|d| d.round == r.round)
                    .map(|d| d.reason.clone())
                    .unwrap_or_default(),
                kept: kept.contains(&r.round),
            }
        })
        .collect();
    Ok(wire::ListModelsResponse {
        run_id: run.to_string(),
        versions,
        publications: publications.iter().map(publication).collect(),
    })
}

impl Coordinator {
    /// `Publish` (with a round) or `Rollback` (without), for an admin.
    pub(super) async fn change_published(
        &self,
        req: Request<()>,
        round: Option<u64>,
        reason: String,
        method: &'static str,
    ) -> Result<Response<wire::PublishResponse>, Status> {
        let (op, _guard) = self.operator(&req, true, method)?;
        super::admin::check_operator_reason(&reason)?;
        let by = op.name();
        let b = by.clone();
        let r = reason.clone();
        let result = self
            .ask(move |reply| Command::Publish(round, b, r, reply))
            .await;
        self.shared.security.log.record(
            "admin_action",
            json!({
                "action": method,
                "by": by,
                "round": round,
                "reason": reason,
                "result": match &result {
                    Ok(p) => format!("published round {}", p.round),
                    Err(e) => e.to_string(),
                },
            }),
        );
        let p = result?;
        Ok(Response::new(wire::PublishResponse {
            published: Some(publication(&p)),
        }))
    }
}
