//! Who is calling: the identity a federation certificate carries.
//!
//! Every certificate the federation's CA issues to a participant names it with one URI
//! subject alternative name in the SPIFFE style, `spiffe://fedflow/<role>/<name>`
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>): `site/<site id>`
//! for a partner site, `viewer/<name>` and `admin/<name>` for operators, and
//! `coordinator` for the coordinator's server certificate. The coordinator reads a caller's
//! identity from the certificate the TLS handshake verified, never from a request body.

use std::fmt;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The trust domain and scheme every fedflow identity URI starts with.
pub const IDENTITY_PREFIX: &str = "spiffe://fedflow/";

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A partner site: fetches its own tasks and submits its own updates.
    Site,
    /// An operator with read-only access: status, runs, rounds, sites, reports.
    Viewer,
    /// An operator who may also pause, resume and stop runs and revoke identities.
    Admin,
}

impl Role {
    /// The role's name in identity URIs, flags and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }

    /// Parses `site`, `viewer` or `admin`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "site" => Some(Role::Site),
            "viewer" => Some(Role::Viewer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Whether the role may read operator views (status, runs, reports).
    pub fn can_view(self) -> bool {
        matches!(self, Role::Viewer | Role::Admin)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verified caller: its role and name from the certificate, and which certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// What the caller may do.
    pub role: Role,
    /// The site id or operator name.
    pub name: String,
    /// The certificate's serial number, lowercase hex without separators.
    pub serial: String,
    /// When the certificate expires (Unix seconds).
    pub not_after: i64,
}

impl Identity {
    /// The identity URI, e.g. `spiffe://fedflow/site/site-a`.
    pub fn uri(&self) -> String {
        identity_uri(self.role, &self.name)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (certificate {})",
            self.role, self.name, self.serial
        )
    }
}

/// The identity URI of `name` in `role`.
pub fn identity_uri(role: Role, name: &str) -> String {
    format!("{IDENTITY_PREFIX}{}/{name}", role.as_str())
}

/// The URI subject alternative name of the coordinator's server certificate.
pub fn coordinator_uri() -> String {
    format!("{IDENTITY_PREFIX}coordinator")
}

/// Whether `name` is a valid site id or operator name: fedflow's one naming rule
/// ([`fedflow_common::names`]), shared with run names.
pub use fedflow_common::names::valid_name;

/// Reads the fedflow identity of a DER certificate (one the TLS layer has already verified
/// against the federation's CA). Fails, saying why, if the bytes are not a certificate or
/// it carries no identity URI, more than one, or one with an unknown role or a bad name.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, String> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the client certificate cannot be parsed: {e}"))?;
    if !rest.is_empty() {
        return Err("the client certificate has trailing bytes".into());
    }
    let sans = cert.subject_alternative_name().map_err(|e| {
        format!("the client certificate's subject alternative names are invalid: {e}")
    })?;
    let mut found = None;
    for name in sans.iter().flat_map(|s| s.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(rest) = uri.strip_prefix(IDENTITY_PREFIX) else {
            continue;
        };
        if found.is_some() {
            return Err("the client certificate carries more than one fedflow identity".into());
        }
        found = Some(rest.to_string());
    }
    let Some(path) = found else {
        return Err(format!(
            "the client certificate carries no fedflow identity (a URI SAN {IDENTITY_PREFIX}<role>/<name>): \
             issue it with `fedflow-coordinator pki issue`"
        ));
    };
    let (role, name) = path
        .split_once('/')
        .ok_or_else(|| format!("the identity {IDENTITY_PREFIX}{path} has no role"))?;
    let role = Role::parse(role).ok_or_else(|| {
        format!("the identity {IDENTITY_PREFIX}{path} has an unknown role {role:?} (site, viewer or admin)")
    })?;
    if !valid_name(name) {
        return Err(format!(
            "the identity {IDENTITY_PREFIX}{path} has an invalid name (1-128 characters of [A-Za-z0-9._-])"
        ));
    }
    Ok(Identity {
        role,
        name: name.to_string(),
        serial: fedflow_common::hash::hex(cert.raw_serial()),
        not_after: cert.validity().not_after.timestamp(),
    })
}
