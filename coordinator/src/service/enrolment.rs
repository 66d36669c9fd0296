//! Online enrolment with one-time tokens: an admin issues a token bound to one site name
//! (`Admin.IssueEnrolmentToken`); the site redeems it once on
//! the enrolment port (`fedflow.v1.Enrolment`, [`EnrolmentService`]) with a certificate
//! request for its own key, and gets its certificate back.
//!
//! The enrolment port is TLS with the server's certificate only (the site has none yet) and
//! serves nothing but `Enrolment.Certify`; the `Federation` and `Admin` services stay behind
//! mutual TLS on the main port. Tokens are 256 random bits; the store keeps their SHA-256
//! only. Checking a token and marking it used happen in one durable transaction on the
//! engine thread, with the signing in between (`Store::redeem_enrolment_token`), so two
//! concurrent redemptions of one token issue one certificate. Every issue, redemption and
//! refusal is in the security audit log, under the token's public id (the first 12 hex
//! digits of its hash), never the token itself.

use std::sync::Arc;

use fedflow_proto::v1 as wire;
use fedflow_proto::v1::enrolment_server::Enrolment;
use serde_json::json;
use tonic::{Request, Response, Status};

use super::{Command, Coordinator, Reply};
use crate::Error;
use crate::security::Role;
use crate::security::pki::{Ca, Certified, Validity};
use crate::store::{NewToken, Redeemed, Store, TokenRefusal};

/// What the enrolment port hands the engine thread.
pub(super) enum EnrolmentJob {
    /// Store a token.
    Issue(NewToken, Reply<()>),
    /// Redeem a token for a certificate.
    Certify(
        Box<Certification>,
        Reply<Result<Redeemed<Certified>, TokenRefusal>>,
    ),
}

/// A certificate request with the token that should pay for it.
pub(super) struct Certification {
    token_sha256: String,
    site: String,
    peer: String,
    request_pem: String,
    ca: Arc<Ca>,
    validity: Validity,
}

/// Runs `job` against the store (on the engine thread).
pub(super) fn run(job: EnrolmentJob, store: &mut Store, now: i64) {
    match job {
        EnrolmentJob::Issue(token, reply) => {
            let _ = reply.send(store.add_enrolment_token(&token, now));
        }
        EnrolmentJob::Certify(c, reply) => {
            let r = store.redeem_enrolment_token(
                &c.token_sha256,
                &c.site,
                now,
                &c.peer,
                |site, token_id| {
                    let cert = c.ca.certify_request(
                        &c.request_pem,
                        Role::Site,
                        site,
                        c.validity,
                        token_id,
                    )?;
                    Ok((cert.serial.clone(), cert))
                },
            );
            let _ = reply.send(r);
        }
    }
}

/// How a token reads: a fixed prefix (so it is recognisable in a paste) and 64 hex digits.
const TOKEN_PREFIX: &str = "fedflow-enrol-";

/// Longest validity of a token.
pub const MAX_TOKEN_TTL_SECS: u64 = 7 * 24 * 3600;

/// Validity of a token when the admin names none.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;

/// The hash under which `token` is stored, and its public id.
fn token_hash(token: &str) -> (String, String) {
    let sha = fedflow_common::hash::sha256_hex(token.as_bytes());
    let id = sha[..12].to_string();
    (sha, id)
}

/// A token just issued.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The token (shown once, stored nowhere).
    pub token: String,
    /// Its public id.
    pub token_id: String,
    /// When it stops being redeemable (Unix ms).
    pub expires_at: i64,
}

impl Coordinator {
    /// Issues a one-time enrolment token for `site`, valid `ttl_secs`, by `by` for `reason`:
    /// stored (its hash) before it is returned, recorded in the audit log.
    pub(super) async fn issue_token(
        &self,
        site: &str,
        ttl_secs: u64,
        reason: &str,
        by: &str,
    ) -> crate::Result<IssuedToken> {
        fedflow_common::names::check_name(site)
            .map_err(|e| Error::BadRequest(format!("site: {e}")))?;
        let ttl = match ttl_secs {
            0 => DEFAULT_TOKEN_TTL_SECS,
            n if n > MAX_TOKEN_TTL_SECS => {
                return Err(Error::BadRequest(format!(
                    "ttl_seconds {n}: at most {MAX_TOKEN_TTL_SECS} (a week); a token is meant \
                     to be redeemed soon after it is issued"
                )));
            }
            n => n,
        };
        let bytes: [u8; 32] = rand::random();
        let token = format!("{TOKEN_PREFIX}{}", fedflow_common::hash::hex(&bytes));
        let (token_sha256, token_id) = token_hash(&token);
        let expires_at = fedflow_common::clock::now_ms() + (ttl * 1000) as i64;
        let stored = NewToken {
            token_sha256,
            token_id: token_id.clone(),
            site: site.to_string(),
            reason: reason.to_string(),
            issued_by: by.to_string(),
            expires_at,
        };
        self.ask(|reply| Command::Enrolment(EnrolmentJob::Issue(stored, reply)))
            .await?;
        self.shared.security.log.record(
            "enrolment_token_issued",
            json!({
                "token": token_id, "site": site, "by": by, "reason": reason,
                "expires_at": expires_at,
            }),
        );
        Ok(IssuedToken {
            token,
            token_id,
            expires_at,
        })
    }
}

/// `fedflow.v1.Enrolment`, served on the enrolment port only: redeems tokens with the CA
/// in `ca`, issuing certificates valid for `days` days.
#[derive(Debug, Clone)]
pub struct EnrolmentService {
    coordinator: Coordinator,
    ca: Arc<Ca>,
    days: u32,
}

impl EnrolmentService {
    /// Redeems tokens the coordinator issued, signing with `ca` for `days` days.
    pub fn new(coordinator: Coordinator, ca: Ca, days: u32) -> EnrolmentService {
        EnrolmentService {
            coordinator,
            ca: Arc::new(ca),
            days,
        }
    }

    fn refused(&self, peer: &str, site: &str, error: Error) -> Status {
        self.coordinator.shared.security.log.record(
            "enrolment_refused",
            json!({ "peer": peer, "site": site, "reason": error.to_string() }),
        );
        tracing::warn!(%peer, site, "enrolment refused: {error}");
        error.into()
    }
}

/// Longest token accepted (a real one is 78 characters).
const MAX_TOKEN_CHARS: usize = 128;

/// Largest certificate request accepted.
const MAX_REQUEST_BYTES: usize = 16 * 1024;

#[tonic::async_trait]
impl Enrolment for EnrolmentService {
    async fn certify(
        &self,
        req: Request<wire::CertifyRequest>,
    ) -> Result<Response<wire::CertifyResponse>, Status> {
        let peer = super::auth::peer(&req);
        let r = req.into_inner();
        if r.token.len() > MAX_TOKEN_CHARS || !r.token.starts_with(TOKEN_PREFIX) {
            return Err(self.refused(
                &peer,
                "",
                Error::Unauthenticated(format!(
                    "token: not an enrolment token (they start {TOKEN_PREFIX:?}, as \
                     `fedflow-ctl enrol-token` prints them)"
                )),
            ));
        }
        if r.request_pem.len() > MAX_REQUEST_BYTES {
            return Err(self.refused(
                &peer,
                "",
                Error::BadRequest(format!(
                    "request_pem: {} bytes, more than a certificate request's {MAX_REQUEST_BYTES}",
                    r.request_pem.len()
                )),
            ));
        }
        let site = crate::security::pki::requested_name(&r.request_pem)
            .map_err(|e| self.refused(&peer, "", Error::BadRequest(e.to_string())))?;
        use fedflow_proto::compat::{ClientVersion, check_client};
        if let ClientVersion::Incompatible(why) =
            check_client(&r.client_version, env!("CARGO_PKG_VERSION"))
        {
            return Err(self.refused(&peer, &site, Error::Refused(format!("site {site}: {why}"))));
        }
        let (token_sha256, _) = token_hash(&r.token);
        let job = Certification {
            token_sha256,
            site: site.clone(),
            peer: peer.clone(),
            request_pem: r.request_pem,
            ca: self.ca.clone(),
            validity: Validity::days(self.days),
        };
        let outcome = self
            .coordinator
            .ask(|reply| Command::Enrolment(EnrolmentJob::Certify(Box::new(job), reply)))
            .await
            .map_err(|e| self.refused(&peer, &site, e))?;
        let redeemed = match outcome {
            Ok(r) => r,
            Err(refusal) => {
                let e = match refusal {
                    TokenRefusal::Unknown => Error::Unauthenticated(refusal.to_string()),
                    _ => Error::Forbidden(refusal.to_string()),
                };
                return Err(self.refused(&peer, &site, e));
            }
        };
        let cert = redeemed.issued;
        self.coordinator.shared.security.log.record(
            "enrolment_token_redeemed",
            json!({
                "token": redeemed.token_id, "site": site, "serial": cert.serial,
                "not_after": cert.not_after, "peer": peer,
            }),
        );
        tracing::info!(%peer, site, serial = %cert.serial, "site enrolled online");
        Ok(Response::new(wire::CertifyResponse {
            cert_pem: cert.cert_pem,
            ca_pem: self.ca.trust_pem()?,
            site,
            serial: cert.serial,
            not_after_unix: cert.not_after,
        }))
    }
}

/// Serves `service` (and nothing else) on `listener` over TLS with the coordinator's server
/// certificate and no client certificate asked for, until `shutdown` resolves. Handshakes
/// are bounded and audited as on the main port. Fails when the coordinator serves in
/// plaintext: a token must never travel unencrypted.
pub async fn serve_enrolment(
    listener: tokio::net::TcpListener,
    service: EnrolmentService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> crate::Result<()> {
    use fedflow_proto::v1::enrolment_server::EnrolmentServer;
    let security = &service.coordinator.shared.security;
    let Some(tls) = security.tls.clone() else {
        return Err(Error::Refused(
            "the enrolment port needs TLS: serve with --tls (mutual TLS), not in plaintext".into(),
        ));
    };
    let log = security.log.clone();
    let server = EnrolmentServer::new(service)
        .max_decoding_message_size(64 * 1024)
        .max_encoding_message_size(64 * 1024);
    tonic::transport::Server::builder()
        .add_service(server)
        .serve_with_incoming_shutdown(
            crate::security::tls::incoming(
                listener,
                tls,
                crate::security::tls::ClientAuth::None,
                log,
            ),
            shutdown,
        )
        .await
        .map_err(|e| Error::Security(format!("the enrolment port stopped: {e}")))
}
