//! Transport security, identities and the security audit trail.
//!
//! - [`identity`]: who a caller is, read from its verified client certificate
//!   (`spiffe://fedflow/<role>/<name>`), and the three roles.
//! - [`pki`]: the federation's CA and certificate issuing (`fedflow-coordinator pki`).
//! - [`tls`]: the mutual-TLS server configuration and the audited handshake loop.
//! - [`audit_log`]: the append-only, hash-chained JSON-lines audit log.
//! - [`limits`]: per-caller concurrency and request-rate limits.
//! - [`logs`]: log output that text from callers cannot forge (escaped text log fields,
//!   JSON log lines safe to print).
//! - [`Revocations`]: revoked identities and certificates, persisted by the store and
//!   checked on every call.
//!
//! See `SECURITY.md` for the threat model these serve.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

pub mod audit_log;
pub mod identity;
pub mod limits;
pub mod logs;
pub mod pki;
pub mod tls;

pub use identity::{Identity, Role};

/// The coordinator's security audit log, in its data directory.
pub const SECURITY_LOG: &str = "security-audit.jsonl";

/// How callers reach the coordinator.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Mutual TLS: every caller presents a certificate chained to the federation CA, and
    /// its identity and role come from that certificate. Holds the coordinator's bundle
    /// directory (`cert.pem`, `key.pem`, `ca.pem`).
    MutualTls(PathBuf),
    /// No TLS and no authentication: a site is whoever it says it is and every caller may
    /// use the admin service. Only for the in-process demo, tests and loopback experiments
    /// (`serve --insecure-plaintext`).
    InsecurePlaintext,
}

/// A shared handle on the audit log; cheap to clone. Failing to write the log is logged
/// as an error (the event itself is not undone).
#[derive(Debug, Clone)]
pub struct SecurityLog {
    inner: Arc<Mutex<audit_log::AuditLog>>,
}

impl SecurityLog {
    /// Opens (or creates) the log at `path` (see [`audit_log::AuditLog::open`]).
    pub fn open(path: &Path) -> crate::Result<SecurityLog> {
        Ok(SecurityLog {
            inner: Arc::new(Mutex::new(audit_log::AuditLog::open(path)?)),
        })
    }

    /// Appends an event and makes it durable. Strings longer than 256 characters (which
    /// may come from callers) are cut, so a caller cannot make lines large.
    pub fn record(&self, event: &str, mut detail: serde_json::Value) {
        clamp_strings(&mut detail);
        let mut log = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = log.append(event, detail) {
            tracing::error!("security audit log: {e}");
        }
    }

    /// The number of events and the last event's hash.
    pub fn head(&self) -> (u64, String) {
        let log = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (log.len(), log.head().to_string())
    }

    /// The number of events recorded so far.
    pub fn len(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Longest string kept in an audit record.
const MAX_RECORDED_CHARS: usize = 256;

fn clamp_strings(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.chars().count() > MAX_RECORDED_CHARS => {
            let cut: String = s.chars().take(MAX_RECORDED_CHARS).collect();
            *s = format!("{cut}… (cut)");
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(clamp_strings),
        serde_json::Value::Object(o) => o.values_mut().for_each(clamp_strings),
        _ => {}
    }
}

/// One revocation, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// Every certificate of an identity (a site or an operator).
    Identity(Role, String),
    /// One certificate, by serial (lowercase hex): e.g. the old one after a rotation.
    Serial(String),
}

/// The revocations in force, shared by the gRPC handlers (checked on every call) and the
/// engine thread (which alone adds to it, after storing the revocation).
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    inner: Arc<RwLock<RevocationSet>>,
}

#[derive(Debug, Default)]
struct RevocationSet {
    identities: HashSet<(Role, String)>,
    serials: HashSet<String>,
}

impl Revocations {
    /// A set holding `revoked`.
    pub fn from_list(revoked: impl IntoIterator<Item = Revoked>) -> Revocations {
        let r = Revocations::default();
        for x in revoked {
            r.add(x);
        }
        r
    }

    /// Adds a revocation.
    pub fn add(&self, r: Revoked) {
        let mut set = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match r {
            Revoked::Identity(role, name) => set.identities.insert((role, name)),
            Revoked::Serial(s) => set.serials.insert(s),
        };
    }

    /// Why `id` is refused, if it is revoked.
    pub fn check(&self, id: &Identity) -> Option<&'static str> {
        let set = self.inner.read().unwrap_or_else(|p| p.into_inner());
        if set.identities.contains(&(id.role, id.name.clone())) {
            Some("this identity has been revoked")
        } else if set.serials.contains(&id.serial) {
            Some("this certificate has been revoked")
        } else {
            None
        }
    }

    /// Whether the site `site` (every certificate of it) is revoked.
    pub fn site_revoked(&self, site: &str) -> bool {
        let set = self.inner.read().unwrap_or_else(|p| p.into_inner());
        set.identities.contains(&(Role::Site, site.to_string()))
    }
}

#[cfg(test)]
mod tests;
