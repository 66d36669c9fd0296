//! `fedflow.v1.Admin`: views for operators and the round-status CLI (roles viewer and admin)
//! and operator actions (role admin: pause, resume, stop, revoke). Every answer is computed
//! on the engine thread, so it is consistent with the round state at one instant; every
//! action is recorded in the security audit log. Operators' reasons are short plain text
//! (`fedflow_common::text`), serials are hex as fedflow prints them, and an admin does not
//! revoke the identity or certificate it calls with unless it says `force`.

use fedflow_proto::v1 as wire;
use fedflow_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use serde_json::json;

use super::auth::Operator;
use super::{Command, Coordinator, RunAction};
use crate::Error;
use crate::metrics::{EvaluationSummary, TrainingSummary};
use crate::round::{LiveState, Phase, RoundEngine, RunView};
use crate::security::{Revoked, Role};
use crate::store::{RoundRecord, RunRecord, SiteState};

fn nan(v: Option<f64>) -> f64 {
    v.unwrap_or(f64::NAN)
}

fn phase(p: Phase) -> wire::RunPhase {
    match p {
        Phase::Waiting => wire::RunPhase::Waiting,
        Phase::Training => wire::RunPhase::Training,
        Phase::Evaluating => wire::RunPhase::Evaluating,
        Phase::Paused => wire::RunPhase::Paused,
        Phase::Finished => wire::RunPhase::Finished,
    }
}

fn live_state(s: LiveState) -> wire::SiteRoundState {
    match s {
        LiveState::Selected => wire::SiteRoundState::Selected,
        LiveState::Downloading => wire::SiteRoundState::Downloading,
        LiveState::Training => wire::SiteRoundState::Training,
        LiveState::Uploading => wire::SiteRoundState::Uploading,
        LiveState::Evaluating => wire::SiteRoundState::Evaluating,
        LiveState::Uploaded => wire::SiteRoundState::Uploaded,
        LiveState::Late => wire::SiteRoundState::Late,
        LiveState::Dropped => wire::SiteRoundState::Dropped,
        LiveState::Rejected => wire::SiteRoundState::Rejected,
        LiveState::Declined => wire::SiteRoundState::Declined,
    }
}

/// A round's stored training and evaluation summaries as wire metrics.
fn round_metrics(r: &RoundRecord) -> wire::RoundMetrics {
    let train: TrainingSummary = r
        .metrics_json
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default();
    let eval: Option<EvaluationSummary> = r
        .evaluation_json
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok());
    let e = eval.clone().unwrap_or_default();
    wire::RoundMetrics {
        round: r.round,
        updates: train.updates,
        train_examples: train.train_examples,
        train_loss: nan(train.train_loss),
        local_validation_loss: nan(train.local_validation_loss),
        local_validation_accuracy: nan(train.local_validation_accuracy),
        local_validation_macro_f1: nan(train.local_validation_macro_f1),
        evaluated_sites: e.sites,
        evaluation_examples: e.examples,
        evaluation_loss: nan(e.loss),
        evaluation_accuracy: nan(e.accuracy),
        evaluation_macro_f1: nan(e.macro_f1),
        evaluation_accuracy_min: nan(e.accuracy_spread.map(|s| s.min)),
        evaluation_accuracy_median: nan(e.accuracy_spread.map(|s| s.median)),
        evaluation_accuracy_max: nan(e.accuracy_spread.map(|s| s.max)),
        evaluation_loss_median: nan(e.loss_spread.map(|s| s.median)),
        evaluation_macro_f1_median: nan(e.macro_f1_spread.map(|s| s.median)),
    }
}

fn status(engine: &RoundEngine, now_ms: i64) -> crate::Result<wire::RunStatus> {
    let view: RunView = engine.view(now_ms);
    let store = engine.store();
    let run = store.run(&view.run_id)?;
    let rounds = store.rounds(&view.run_id)?;
    let latest = rounds
        .iter()
        .rev()
        .find(|r| r.round > 0 && r.metrics_json.is_some())
        .map(round_metrics);
    Ok(wire::RunStatus {
        run_id: view.run_id,
        phase: phase(view.phase) as i32,
        status_reason: run.and_then(|r| r.status_reason).unwrap_or_default(),
        total_rounds: view.total_rounds,
        committed_round: view.committed_round,
        current_round: view.current_round.unwrap_or(0),
        deadline_unix_ms: view.deadline_ms.unwrap_or(0),
        global_model_sha256: view.global_sha256,
        sites: view
            .sites
            .into_iter()
            .map(|s| wire::SiteProgress {
                site_id: s.site_id,
                state: live_state(s.state) as i32,
                reason: s.reason.unwrap_or_default(),
                epoch: s.epoch,
                epochs: s.epochs,
                bytes_done: s.bytes_done,
                last_seen_unix_ms: s.last_seen_ms.unwrap_or(0),
            })
            .collect(),
        latest,
        sites_connected: view.sites_connected as u32,
        now_unix_ms: now_ms,
        published: engine.published().map(super::models::publication),
        continuous: engine.config().schedule.continuous(),
        privacy: match (&engine.config().site_dp, engine.site_dp_spent()?) {
            (Some(dp), Some(spent)) => Some(wire::PrivacySpent {
                mode: dp.mode.to_string(),
                epsilon_spent: spent,
                target_epsilon: dp.target_epsilon,
                target_delta: dp.target_delta,
            }),
            _ => None,
        },
    })
}

/// Total rounds from a run's stored configuration (0 if it cannot be read).
fn total_rounds(run: &RunRecord) -> u64 {
    serde_json::from_str::<serde_json::Value>(&run.config_json)
        .ok()
        .and_then(|v| v["run"]["rounds"].as_u64())
        .unwrap_or(0)
}

fn run_summary(engine: &RoundEngine, run: RunRecord) -> crate::Result<wire::RunSummary> {
    let committed = engine
        .store()
        .rounds(&run.run_id)?
        .iter()
        .filter(|r| r.status == crate::store::RoundStatus::Committed)
        .map(|r| r.round)
        .max()
        .unwrap_or(0);
    Ok(wire::RunSummary {
        total_rounds: total_rounds(&run),
        committed_round: committed,
        status: run.status.to_string(),
        status_reason: run.status_reason.unwrap_or_default(),
        strategy: run.strategy,
        created_unix_ms: run.created_at_ms,
        run_id: run.run_id,
    })
}

fn rounds(engine: &RoundEngine, run_id: &str) -> crate::Result<wire::ListRoundsResponse> {
    let store = engine.store();
    let mut out = Vec::new();
    let rejected = store.rejections_by_round(run_id)?;
    let mut attempts = store.failed_attempts(run_id)?.into_iter().peekable();
    for r in store.rounds(run_id)? {
        // The round's earlier attempts, which failed; a failed latest attempt is the
        // round's own row.
        while let Some(a) = attempts.next_if(|a| a.round <= r.round) {
            let latest = a.round == r.round
                && r.status == crate::store::RoundStatus::Failed
                && attempts.peek().is_none_or(|n| n.round != r.round);
            if !latest {
                out.push(wire::RoundSummary {
                    round: a.round,
                    status: "failed".into(),
                    started_unix_ms: a.started_at_ms,
                    failure_reason: a.reason,
                    failed_attempt: a.attempt,
                    // No metrics: a failed attempt released nothing.
                    metrics: Some(round_metrics(&RoundRecord {
                        metrics_json: None,
                        evaluation_json: None,
                        ..r.clone()
                    })),
                    ..Default::default()
                });
            }
        }
        let mut s = wire::RoundSummary {
            rejected: rejected.get(&r.round).copied().unwrap_or(0),
            round: r.round,
            status: r.status.to_string(),
            started_unix_ms: r.started_at_ms,
            committed_unix_ms: r.committed_at_ms.unwrap_or(0),
            model_sha256: r.model_sha256.clone().unwrap_or_default(),
            failure_reason: r.failure_reason.clone().unwrap_or_default(),
            metrics: Some(round_metrics(&r)),
            ..Default::default()
        };
        for site in store.round_sites(run_id, r.round)? {
            s.selected += u32::from(site.task_id.is_some());
            match site.state {
                SiteState::Selected => {}
                SiteState::Uploaded => s.uploaded += 1,
                SiteState::Late => s.late += 1,
                SiteState::Dropped => s.dropped += 1,
                SiteState::Rejected => s.rejected += 1,
                SiteState::Declined => s.declined += 1,
            }
        }
        out.push(s);
    }
    Ok(wire::ListRoundsResponse {
        run_id: run_id.to_string(),
        rounds: out,
    })
}

fn sites(engine: &RoundEngine) -> crate::Result<wire::ListSitesResponse> {
    let store = engine.store();
    let counts = store.site_outcome_counts()?;
    let sites = store
        .sites()?
        .into_iter()
        .map(|s| {
            let c = counts.get(&s.site_id).copied().unwrap_or_default();
            wire::SiteSummary {
                site_id: s.site_id,
                first_seen_unix_ms: s.first_seen_ms,
                last_seen_unix_ms: s.last_seen_ms,
                rounds_contributed: c.uploaded,
                rejected: c.rejected,
                late: c.late,
                dropped: c.dropped,
                declined: c.declined,
                certificate_not_after_unix_ms: 0,
            }
        })
        .collect();
    Ok(wire::ListSitesResponse { sites })
}

#[tonic::async_trait]
impl Admin for Coordinator {
    async fn get_status(
        &self,
        req: Request<wire::GetStatusRequest>,
    ) -> Result<Response<wire::RunStatus>, Status> {
        let _call = self.operator(&req, false, "GetStatus")?;
        let s = self.inspect(status).await?;
        Ok(Response::new(s))
    }

    async fn list_runs(
        &self,
        req: Request<wire::ListRunsRequest>,
    ) -> Result<Response<wire::ListRunsResponse>, Status> {
        let _call = self.operator(&req, false, "ListRuns")?;
        let runs = self
            .inspect(|e, _| {
                let runs = e.store().runs()?;
                runs.into_iter()
                    .map(|r| run_summary(e, r))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        Ok(Response::new(wire::ListRunsResponse { runs }))
    }

    async fn list_rounds(
        &self,
        req: Request<wire::ListRoundsRequest>,
    ) -> Result<Response<wire::ListRoundsResponse>, Status> {
        let _call = self.operator(&req, false, "ListRounds")?;
        let run_id = req.into_inner().run_id;
        if !run_id.is_empty() {
            fedflow_common::names::check_name(&run_id)
                .map_err(|e| Error::BadRequest(format!("run_id: {e}")))?;
        }
        let known = self
            .inspect(move |e, _| {
                let id = if run_id.is_empty() {
                    e.run_id().to_string()
                } else {
                    run_id
                };
                match e.store().run(&id)? {
                    None => Err(Error::NotFound(format!("no run named {id:?}"))),
                    Some(_) => rounds(e, &id),
                }
            })
            .await?;
        Ok(Response::new(known))
    }

    async fn list_models(
        &self,
        req: Request<wire::ListModelsRequest>,
    ) -> Result<Response<wire::ListModelsResponse>, Status> {
        let _call = self.operator(&req, false, "ListModels")?;
        let m = self.inspect(|e, _| super::models::list(e)).await?;
        Ok(Response::new(m))
    }

    async fn publish(
        &self,
        req: Request<wire::PublishRequest>,
    ) -> Result<Response<wire::PublishResponse>, Status> {
        let (meta, ext, body) = req.into_parts();
        let req = Request::from_parts(meta, ext, ());
        self.change_published(req, Some(body.round), body.reason, "Publish")
            .await
    }

    async fn rollback(
        &self,
        req: Request<wire::RunActionRequest>,
    ) -> Result<Response<wire::PublishResponse>, Status> {
        let (meta, ext, body) = req.into_parts();
        let req = Request::from_parts(meta, ext, ());
        self.change_published(req, None, body.reason, "Rollback")
            .await
    }

    async fn list_sites(
        &self,
        req: Request<wire::ListSitesRequest>,
    ) -> Result<Response<wire::ListSitesResponse>, Status> {
        let _call = self.operator(&req, false, "ListSites")?;
        let mut s = self.inspect(|e, _| sites(e)).await?;
        let certs = self.site_certificates();
        for site in &mut s.sites {
            site.certificate_not_after_unix_ms = certs
                .get(&site.site_id)
                .map_or(0, |secs| secs.saturating_mul(1000));
        }
        Ok(Response::new(s))
    }

    async fn pause_run(
        &self,
        req: Request<wire::RunActionRequest>,
    ) -> Result<Response<wire::RunActionResponse>, Status> {
        self.act(req, RunAction::Pause, "PauseRun").await
    }

    async fn resume_run(
        &self,
        req: Request<wire::RunActionRequest>,
    ) -> Result<Response<wire::RunActionResponse>, Status> {
        self.act(req, RunAction::Resume, "ResumeRun").await
    }

    async fn stop_run(
        &self,
        req: Request<wire::RunActionRequest>,
    ) -> Result<Response<wire::RunActionResponse>, Status> {
        self.act(req, RunAction::Stop, "StopRun").await
    }

    async fn revoke(
        &self,
        req: Request<wire::RevokeRequest>,
    ) -> Result<Response<wire::RevokeResponse>, Status> {
        let (op, _guard) = self.operator(&req, true, "Revoke")?;
        let r = req.into_inner();
        let what = match (r.name.is_empty(), r.serial.is_empty()) {
            (false, true) => {
                let role = Role::parse(&r.role).ok_or_else(|| {
                    Error::BadRequest(format!("role {:?}: use site, viewer or admin", r.role))
                })?;
                fedflow_common::names::check_name(&r.name)
                    .map_err(|e| Error::BadRequest(format!("name: {e}")))?;
                Revoked::Identity(role, r.name)
            }
            (true, false) => Revoked::Serial(check_serial(&r.serial)?),
            _ => {
                return Err(Error::BadRequest(
                    "name (with role) or serial, exactly one of them".into(),
                )
                .into());
            }
        };
        check_operator_reason(&r.reason)?;
        // An admin revoking the identity or the certificate it calls with locks itself out
        // (and, as the last admin, everyone): only on purpose.
        if let Operator::Verified(id) = &op {
            let own = match &what {
                Revoked::Identity(role, name) => *role == id.role && *name == id.name,
                Revoked::Serial(serial) => *serial == id.serial,
            };
            if own && !r.force {
                return Err(Error::Refused(format!(
                    "that is the {} this call is made with ({id}): revoking it locks you out; \
                     set force (fedflow-ctl revoke --force) if that is what you mean",
                    match what {
                        Revoked::Identity(..) => "identity",
                        Revoked::Serial(_) => "certificate",
                    }
                ))
                .into());
            }
        }
        let reason = if r.reason.is_empty() {
            "no reason given".to_string()
        } else {
            r.reason
        };
        let by = op.name();
        let (w, re, b) = (what.clone(), reason.clone(), by.clone());
        let new = self.ask(|reply| Command::Revoke(w, re, b, reply)).await?;
        self.shared.security.log.record(
            "revoked",
            json!({ "what": revoked_json(&what), "reason": reason, "by": by, "new": new }),
        );
        Ok(Response::new(wire::RevokeResponse {
            already_revoked: !new,
        }))
    }

    async fn issue_enrolment_token(
        &self,
        req: Request<wire::IssueEnrolmentTokenRequest>,
    ) -> Result<Response<wire::IssueEnrolmentTokenResponse>, Status> {
        let (op, _guard) = self.operator(&req, true, "IssueEnrolmentToken")?;
        if !self.mutual_tls() {
            return Err(Error::Refused(
                "online enrolment needs TLS: this coordinator serves in plaintext, where \
                 sites need no certificate"
                    .into(),
            )
            .into());
        }
        let r = req.into_inner();
        check_operator_reason(&r.reason)?;
        let reason = if r.reason.is_empty() {
            "no reason given".to_string()
        } else {
            r.reason
        };
        let issued = self
            .issue_token(&r.site, r.ttl_seconds, &reason, &op.name())
            .await?;
        Ok(Response::new(wire::IssueEnrolmentTokenResponse {
            token: issued.token,
            expires_unix_ms: issued.expires_at,
            token_id: issued.token_id,
        }))
    }

    async fn list_revocations(
        &self,
        req: Request<wire::ListRevocationsRequest>,
    ) -> Result<Response<wire::ListRevocationsResponse>, Status> {
        let _call = self.operator(&req, false, "ListRevocations")?;
        let list = self.inspect(|e, _| e.store().revocations()).await?;
        let revocations = list
            .into_iter()
            .map(|r| {
                let (kind, role, value) = match r.revoked {
                    Revoked::Identity(role, name) => ("identity", role.as_str(), name),
                    Revoked::Serial(s) => ("serial", "", s),
                };
                wire::Revocation {
                    kind: kind.into(),
                    role: role.into(),
                    value,
                    reason: r.reason,
                    revoked_by: r.revoked_by,
                    revoked_at_ms: r.revoked_at,
                }
            })
            .collect();
        Ok(Response::new(wire::ListRevocationsResponse { revocations }))
    }
}

/// Fewest and most hex digits of a serial: 64 bits (what a CA must at least draw at random)
/// to 20 octets (RFC 5280). fedflow's CA writes 32.
const SERIAL_HEX_DIGITS: std::ops::RangeInclusive<usize> = 16..=40;

/// A certificate serial as fedflow prints it (`pki issue`, `fedflow-ctl revocations`, the
/// audit log): an even number of hex digits without separators, lowercased.
fn check_serial(serial: &str) -> crate::Result<String> {
    let well_formed = SERIAL_HEX_DIGITS.contains(&serial.len())
        && serial.len().is_multiple_of(2)
        && serial.bytes().all(|b| b.is_ascii_hexdigit());
    if !well_formed {
        return Err(Error::BadRequest(format!(
            "serial \"{}\": write the serial as `pki issue` printed it: {} to {} hex digits, \
             without ':' or spaces",
            fedflow_common::text::shorten(serial, 80),
            SERIAL_HEX_DIGITS.start(),
            SERIAL_HEX_DIGITS.end()
        )));
    }
    Ok(serial.to_ascii_lowercase())
}

/// An operator's reason (pause, resume, stop, revoke): short plain text on one line.
pub(super) fn check_operator_reason(reason: &str) -> crate::Result<()> {
    fedflow_common::text::check(
        "reason",
        reason,
        fedflow_common::text::MAX_OPERATOR_REASON_CHARS,
    )
    .map_err(Error::BadRequest)
}

fn revoked_json(r: &Revoked) -> serde_json::Value {
    match r {
        Revoked::Identity(role, name) => json!({ "role": role.as_str(), "name": name }),
        Revoked::Serial(s) => json!({ "serial": s }),
    }
}

impl Coordinator {
    /// Pause, resume or stop, for an admin; recorded in the audit log.
    async fn act(
        &self,
        req: Request<wire::RunActionRequest>,
        action: RunAction,
        method: &'static str,
    ) -> Result<Response<wire::RunActionResponse>, Status> {
        let (op, _guard) = self.operator(&req, true, method)?;
        let reason = req.into_inner().reason;
        check_operator_reason(&reason)?;
        let by = op.name();
        let full = if reason.is_empty() {
            format!("{method} by {by}")
        } else {
            format!("{method} by {by}: {reason}")
        };
        let r = full.clone();
        let result = self.ask(|reply| Command::Act(action, r, reply)).await;
        self.shared.security.log.record(
            "admin_action",
            json!({
                "action": method,
                "by": by,
                "reason": reason,
                "result": match &result { Ok(p) => format!("{p:?}"), Err(e) => e.to_string() },
            }),
        );
        let p = result?;
        let status = self
            .inspect(|e, _| {
                e.store()
                    .run(e.run_id())
                    .map(|r| r.map(|r| r.status.as_str().to_string()).unwrap_or_default())
            })
            .await?;
        Ok(Response::new(wire::RunActionResponse {
            phase: phase(p) as i32,
            status,
        }))
    }
}
