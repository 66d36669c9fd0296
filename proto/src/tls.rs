//! Connecting to the coordinator (sites and operators alike): over mutual TLS with the site's (or operator's)
//! certificate bundle, or in plaintext where the coordinator was started insecure.
//!
//! A bundle is a directory written by `fedflow-coordinator pki issue`: `cert.pem` (this
//! participant's certificate, whose identity the coordinator trusts instead of anything a
//! request says), `key.pem` (its private key) and `ca.pem` (the federation CA, the only
//! authority the coordinator's certificate is accepted from).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// What went wrong with a certificate bundle or an address; the message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

type Result<T> = std::result::Result<T, TlsError>;

/// A loaded certificate bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl Bundle {
    /// Reads the bundle in `dir` and checks that its certificate is within its validity
    /// period (an expired certificate would only fail later, at the coordinator, with a
    /// less helpful message).
    pub fn load(dir: &Path) -> Result<Bundle> {
        let read = |f: &str| {
            std::fs::read(dir.join(f)).map_err(|e| {
                TlsError(format!(
                    "cannot read {}: {e} (a certificate bundle holds cert.pem, key.pem and ca.pem, \
                     as written by `fedflow-coordinator pki issue`)",
                    dir.join(f).display()
                ))
            })
        };
        let bundle = Bundle {
            dir: dir.to_path_buf(),
            ca_pem: read("ca.pem")?,
            cert_pem: read("cert.pem")?,
            key_pem: read("key.pem")?,
        };
        bundle.check_validity(now_secs())?;
        Ok(bundle)
    }

    /// Refuses a certificate that is expired or not yet valid at `now` (Unix seconds).
    pub fn check_validity(&self, now: i64) -> Result<()> {
        use x509_parser::pem::parse_x509_pem;
        let path = self.dir.join("cert.pem");
        let bad = |why: String| TlsError(format!("{}: {why}", path.display()));
        let (_, pem) = parse_x509_pem(&self.cert_pem)
            .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| bad(format!("not a certificate: {e}")))?;
        let v = cert.validity();
        if now < v.not_before.timestamp() {
            return Err(bad(format!(
                "the certificate is not valid before {} (check this machine's clock)",
                v.not_before
            )));
        }
        if now > v.not_after.timestamp() {
            return Err(bad(format!(
                "the certificate expired on {}: ask the federation's operator for a new one",
                v.not_after
            )));
        }
        Ok(())
    }

    /// The site id the certificate carries (`spiffe://fedflow/site/<id>`); fails for an
    /// operator's certificate.
    pub fn site_name(&self) -> Result<String> {
        let path = self.dir.join("cert.pem");
        let bad = |why: String| TlsError(format!("{}: {why}", path.display()));
        let (_, pem) = x509_parser::pem::parse_x509_pem(&self.cert_pem)
            .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| bad(format!("not a certificate: {e}")))?;
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| bad(e.to_string()))?;
        sans.iter()
            .flat_map(|s| s.value.general_names.iter())
            .find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => {
                    u.strip_prefix("spiffe://fedflow/site/").map(str::to_string)
                }
                _ => None,
            })
            .ok_or_else(|| {
                bad("not a site certificate (no spiffe://fedflow/site/<id> name)".into())
            })
    }

    /// The bundle's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn tls_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The error and all its causes, joined (tonic's transport errors say little on their own).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Whether a connection error is about certificates (retrying will not help).
pub fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        // `io::Error::source` skips the error it wraps, so look inside it too.
        let wrapped = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if let Some(tls) = c.downcast_ref::<rustls::Error>().or(wrapped) {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::AlertReceived(_)
            );
        }
        cur = c.source();
    }
    false
}

/// Connects to `endpoint` (`https://...` with a bundle, `http://...` without one). Fails
/// with a message saying what to check; [`is_certificate_error`] tells whether the failure
/// is about certificates (permanent) or reachability (worth retrying).
pub async fn connect(
    endpoint: &str,
    bundle: Option<&Bundle>,
) -> std::result::Result<Channel, tonic::transport::Error> {
    let mut ep = Endpoint::from_shared(endpoint.to_string())?;
    if let Some(b) = bundle {
        ep = ep.tls_config(b.tls_config())?;
    }
    ep.connect().await
}

/// Checks that a bundle goes with an endpoint: `https://` needs one, `http://` must be
/// asked for explicitly (`insecure`).
pub fn check_endpoint(endpoint: &str, bundle: Option<&Bundle>, insecure: bool) -> Result<()> {
    match (endpoint.starts_with("https://"), bundle, insecure) {
        (true, Some(_), _) => Ok(()),
        (true, None, _) => Err(TlsError(format!(
            "{endpoint} is a TLS address: pass --identity DIR (the certificate bundle from \
             `fedflow-coordinator pki issue`)"
        ))),
        (false, _, true) if endpoint.starts_with("http://") => Ok(()),
        (false, _, _) => Err(TlsError(format!(
            "{endpoint}: use https://HOST:PORT with --identity DIR (mutual TLS), or \
             http://HOST:PORT with --insecure-plaintext for a coordinator started without TLS"
        ))),
    }
}
