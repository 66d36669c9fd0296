//! Who may call what. Under mutual TLS a caller is the identity its verified client
//! certificate carries (never what a request body claims); revoked identities and
//! certificates are refused on every call; sites may only use the `Federation` service as
//! themselves, viewers only read the `Admin` service, admins may also act. Every caller is
//! held to the per-caller limits. Every refusal is logged and recorded in the security
//! audit log.

use std::time::{Duration, Instant};

use serde_json::json;
use tonic::Request;

use super::Coordinator;
use crate::security::limits::CallGuard;
use crate::security::{Identity, Role};
use crate::{Error, Result};

/// How long a site whose previous transfer of the same kind is still open (a connection
/// that died without the coordinator noticing yet) is asked to wait before trying again.
const TRANSFER_PUSHBACK: Duration = Duration::from_secs(1);

/// The caller of an operator call.
#[derive(Debug, Clone)]
pub(super) enum Operator {
    /// A verified viewer or admin.
    Verified(Identity),
    /// Plaintext mode: nobody is authenticated.
    Unauthenticated,
}

impl Operator {
    /// How the caller is named in records.
    pub(super) fn name(&self) -> String {
        match self {
            Operator::Verified(id) => id.uri(),
            Operator::Unauthenticated => "unauthenticated (plaintext) operator".into(),
        }
    }
}

/// A `Federation` call admitted: the calling site, its verified identity under mutual TLS,
/// and its place under the per-caller limits (held until dropped).
#[derive(Debug)]
pub(super) struct SiteCall {
    pub(super) site: String,
    pub(super) identity: Option<Identity>,
    _guard: CallGuard,
}

pub(super) fn peer<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map_or_else(|| "unknown".into(), |a| a.to_string())
}

impl Coordinator {
    /// Whether callers are authenticated by mutual TLS.
    pub(super) fn mutual_tls(&self) -> bool {
        self.shared.security.tls.is_some()
    }

    /// Records a rejected update or report (the engine's or the transfer layer's reason).
    pub(super) fn rejected(&self, method: &str, site: &str, round: u64, error: &Error) {
        let code = super::status::code(error);
        if method == "UploadUpdate" {
            self.shared.telemetry.rejected(code);
        }
        tracing::warn!(method, site, round, "rejected: {error}");
        self.shared.security.log.record(
            "update_rejected",
            json!({
                "method": method,
                "site": site,
                "round": round,
                "code": format!("{code:?}"),
                "reason": error.to_string(),
            }),
        );
    }

    /// Refuses a call: logs it, records it in the audit log, returns `error`.
    pub(super) fn refuse(&self, method: &str, who: &str, peer: &str, error: Error) -> Error {
        let code = super::status::code(&error);
        tracing::warn!(method, caller = who, %peer, "refused: {error}");
        self.shared.telemetry.refused(code);
        self.shared.security.log.record(
            "call_refused",
            json!({
                "method": method,
                "caller": who,
                "peer": peer,
                "code": format!("{code:?}"),
                "reason": error.to_string(),
            }),
        );
        error
    }

    /// The verified identity of the caller (mutual TLS), `None` in plaintext mode; refused
    /// if the certificate carries no usable identity or is revoked.
    fn verified<T>(&self, req: &Request<T>, method: &str) -> Result<Option<Identity>> {
        if self.shared.security.tls.is_none() {
            return Ok(None);
        }
        let peer = peer(req);
        let Some(certs) = req.peer_certs() else {
            return Err(self.refuse(
                method,
                "unknown",
                &peer,
                Error::Unauthenticated("no client certificate: mutual TLS is required".into()),
            ));
        };
        let Some(leaf) = certs.first() else {
            return Err(self.refuse(
                method,
                "unknown",
                &peer,
                Error::Unauthenticated("no client certificate: mutual TLS is required".into()),
            ));
        };
        let id = crate::security::identity::identity_from_der(leaf)
            .map_err(|e| self.refuse(method, "unknown", &peer, Error::Unauthenticated(e)))?;
        // The handshake checked validity when the connection opened; a long-lived
        // connection must not outlive the certificate.
        if fedflow_common::clock::now_ms() / 1000 > id.not_after {
            return Err(self.refuse(
                method,
                &id.uri(),
                &peer,
                Error::Unauthenticated(
                    "the client certificate has expired: ask the federation's operator for a new one"
                        .into(),
                ),
            ));
        }
        if let Some(why) = self.shared.security.revocations.check(&id) {
            return Err(self.refuse(
                method,
                &id.uri(),
                &peer,
                Error::Forbidden(format!(
                    "{why} ({id}); ask the federation's operator for a new certificate"
                )),
            ));
        }
        Ok(Some(id))
    }

    /// One transfer of `kind` (upload or download) per site at a time.
    pub(super) fn transfer_slot(
        &self,
        site: &str,
        kind: &str,
        method: &str,
        peer: &str,
    ) -> Result<CallGuard> {
        self.shared
            .security
            .transfers
            .admit(&format!("{kind}:{site}"), Instant::now())
            .map_err(|_| {
                self.refuse(
                    method,
                    site,
                    peer,
                    Error::SlowDown {
                        reason: format!(
                            "a {kind} from this site is already in progress; one at a time"
                        ),
                        retry_after: TRANSFER_PUSHBACK,
                    },
                )
            })
    }

    /// Admits a call from `key` under the per-caller limits.
    fn admit(&self, key: &str, method: &str, peer: &str) -> Result<CallGuard> {
        self.shared
            .security
            .limiter
            .admit(key, Instant::now())
            .map_err(|e| {
                let slow_down = Error::SlowDown {
                    reason: e.to_string(),
                    retry_after: e.retry_after(),
                };
                self.refuse(method, key, peer, slow_down)
            })
    }

    /// A `Federation` call: the calling site's id and its admission under the limits.
    /// Under mutual TLS the site is the certificate's; `claimed` (the site id in the request
    /// body, which older clients fill in) must be empty or the same. In plaintext mode the
    /// claimed id is taken at its word.
    pub(super) fn site<T>(
        &self,
        req: &Request<T>,
        claimed: &str,
        method: &str,
    ) -> Result<SiteCall> {
        let peer = peer(req);
        let identity = self.verified(req, method)?;
        let site = match identity.clone() {
            Some(id) if id.role != Role::Site => {
                return Err(self.refuse(
                    method,
                    &id.uri(),
                    &peer,
                    Error::Forbidden(format!(
                        "a {} certificate cannot call the Federation service; sites need a site certificate",
                        id.role
                    )),
                ));
            }
            Some(id) => {
                if !claimed.is_empty() && claimed != id.name {
                    // Quoted below and in the audit log: a site id, nothing else.
                    fedflow_common::names::check_name(claimed).map_err(|e| {
                        self.refuse(
                            method,
                            &id.uri(),
                            &peer,
                            Error::BadRequest(format!("site_id: {e}")),
                        )
                    })?;
                    return Err(self.refuse(
                        method,
                        &id.uri(),
                        &peer,
                        Error::Forbidden(format!(
                            "the certificate is for site {}, but the request claims site {claimed}",
                            id.name
                        )),
                    ));
                }
                id.name
            }
            None => {
                fedflow_common::names::check_name(claimed)
                    .map_err(|e| Error::BadRequest(format!("site_id: {e}")))?;
                claimed.to_string()
            }
        };
        let guard = self.admit(&format!("site:{site}"), method, &peer)?;
        if let Some(id) = &identity {
            self.saw_site_certificate(&site, id.not_after);
        }
        Ok(SiteCall {
            site,
            identity,
            _guard: guard,
        })
    }

    /// An `Admin` call: the operator, if its role allows the call (`admin` for actions,
    /// `viewer` or `admin` for views), and its admission under the limits.
    pub(super) fn operator<T>(
        &self,
        req: &Request<T>,
        action: bool,
        method: &str,
    ) -> Result<(Operator, CallGuard)> {
        let peer = peer(req);
        let op = match self.verified(req, method)? {
            None => Operator::Unauthenticated,
            Some(id) => {
                let allowed = if action {
                    id.role == Role::Admin
                } else {
                    id.role.can_view()
                };
                if !allowed {
                    let need = if action { "admin" } else { "viewer or admin" };
                    return Err(self.refuse(
                        method,
                        &id.uri(),
                        &peer,
                        Error::Forbidden(format!(
                            "{method} needs the {need} role; this certificate's role is {}",
                            id.role
                        )),
                    ));
                }
                Operator::Verified(id)
            }
        };
        let key = match &op {
            Operator::Verified(id) => format!("{}:{}", id.role, id.name),
            Operator::Unauthenticated => format!("operator:{peer}"),
        };
        let guard = self.admit(&key, method, &peer)?;
        Ok((op, guard))
    }
}
