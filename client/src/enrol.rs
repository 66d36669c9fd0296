//! Enrolment that keeps the site's private key at the site: the site makes its own key
//! (ECDSA P-256) and a certificate request naming it; the federation's CA signs the request
//! (`fedflow-coordinator pki sign`) and sends back `cert.pem` and `ca.pem`, which go beside
//! the key and make the directory a certificate bundle (`join --identity DIR`,
//! `coordinator.identity` of `site.toml`). The key is written once, mode 0600 in a 0700
//! directory, and never read again by this module except to check that a certificate
//! received for it is for this key.
//!
//! Online, with a one-time token an admin issued ([`redeem`], `fedflow-client enrol`): the
//! site makes its key and request the same way and sends the request with the token to the
//! coordinator's enrolment port, over TLS checked against the federation CA from the site's
//! hand-over package; the certificate and the federation's trust bundle come back and are
//! written beside the key.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::{Error, Result};

/// The request's file name in the bundle directory.
pub const REQUEST_FILE: &str = "request.pem";
/// The private key's file name (the bundle's `key.pem`).
pub const KEY_FILE: &str = "key.pem";

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Usage(format!("{}: {e}", path.display()))
}

/// Writes `bytes` to the new file `path` with `mode`, synced; refuses an existing file.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

/// Makes `name`'s key and certificate request in `dir` (created, mode 0700): `key.pem` and
/// `request.pem`. Refuses a directory that holds a key already (a second key would orphan
/// the first one's certificate). Returns the request's path.
pub fn make_request(name: &str, dir: &Path) -> Result<PathBuf> {
    fedflow_common::names::check_name(name).map_err(|e| Error::Usage(format!("--name: {e}")))?;
    if dir.join(KEY_FILE).exists() {
        return Err(Error::Usage(format!(
            "{} holds a key already: use another directory (or the request made with it, {})",
            dir.display(),
            dir.join(REQUEST_FILE).display()
        )));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))?;
    let key = KeyPair::generate().map_err(|e| Error::Usage(format!("cannot make a key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fedflow");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let request = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| Error::Usage(format!("cannot make the certificate request: {e}")))?;
    write_new(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    let path = dir.join(REQUEST_FILE);
    write_new(&path, request.as_bytes(), 0o644)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))?;
    Ok(path)
}

/// The certificate's file name in the bundle directory.
pub const CERT_FILE: &str = "cert.pem";
/// The trusted CAs' file name in the bundle directory.
pub const CA_FILE: &str = "ca.pem";

/// A site enrolled online.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The site the certificate names.
    pub site: String,
    /// Its serial (hex).
    pub serial: String,
    /// When it expires (Unix seconds).
    pub not_after: i64,
}

/// Redeems `token` at the enrolment port `endpoint` (`https://HOST:PORT`), trusting the CAs
/// in `ca_pem` (the hand-over package's `ca.pem`) for the server: makes `name`'s key and
/// request in `dir` (or reuses the ones an earlier, failed attempt made there), sends the
/// request, and writes the certificate and the trust bundle it gets back, which makes `dir`
/// a certificate bundle. Refuses a directory that holds a certificate already, and a
/// certificate that is not for the key in `dir`.
pub async fn redeem(
    endpoint: &str,
    ca_pem: &[u8],
    name: &str,
    token: &str,
    dir: &Path,
) -> Result<Enrolled> {
    if !endpoint.starts_with("https://") {
        return Err(Error::Usage(format!(
            "{endpoint}: the enrolment port is TLS only; use https://HOST:PORT (a token never \
             travels in plaintext)"
        )));
    }
    if dir.join(CERT_FILE).exists() {
        return Err(Error::Usage(format!(
            "{} holds a certificate already: this site is enrolled (use another directory \
             to enrol again)",
            dir.display()
        )));
    }
    let request_path = dir.join(REQUEST_FILE);
    if !dir.join(KEY_FILE).exists() {
        make_request(name, dir)?;
    }
    let request_pem = std::fs::read_to_string(&request_path).map_err(|e| io(&request_path, e))?;
    let key_path = dir.join(KEY_FILE);
    let key_pem = std::fs::read_to_string(&key_path).map_err(|e| io(&key_path, e))?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| Error::Usage(format!("{}: {e}", key_path.display())))?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| Error::Usage(format!("{endpoint}: {e}")))?
        .connect()
        .await
        .map_err(|e| {
            Error::Usage(format!(
                "cannot reach the enrolment port {endpoint}: {}",
                fedflow_proto::tls::error_chain(&e)
            ))
        })?;
    let mut client = fedflow_proto::v1::enrolment_client::EnrolmentClient::new(channel);
    let reply = client
        .certify(fedflow_proto::v1::CertifyRequest {
            token: token.trim().to_string(),
            request_pem,
            client_version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .await
        .map_err(|s| {
            Error::Usage(format!(
                "the coordinator refused the enrolment ({:?}): {}",
                s.code(),
                s.message()
            ))
        })?
        .into_inner();
    check_certificate(&reply.cert_pem, &key, name)?;
    write_new(&dir.join(CA_FILE), reply.ca_pem.as_bytes(), 0o644)?;
    write_new(&dir.join(CERT_FILE), reply.cert_pem.as_bytes(), 0o644)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))?;
    Ok(Enrolled {
        site: reply.site,
        serial: reply.serial,
        not_after: reply.not_after_unix,
    })
}

/// Refuses a certificate that does not carry `key`'s public key or does not name `name`.
fn check_certificate(cert_pem: &str, key: &KeyPair, name: &str) -> Result<()> {
    let bad = |why: String| Error::Usage(format!("the certificate the coordinator sent: {why}"));
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| bad(format!("not a certificate: {e}")))?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
        return Err(bad("it is not for this site's key".into()));
    }
    let named = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    if named != Some(name) {
        return Err(bad(format!("it names {named:?}, not {name:?}")));
    }
    Ok(())
}
