//! The federation's certificate authority: create it, issue the coordinator's server
//! certificate and a certificate bundle for each site and operator (rcgen, ECDSA P-256).
//!
//! A PKI directory holds `ca.pem` and `ca.key` (the CA's key, mode 0600) and `issued.jsonl`,
//! a hash-chained log of every certificate issued (see [`super::audit_log`]). Each issued
//! certificate goes to a *bundle* directory (mode 0700) with `cert.pem`, `key.pem` (0600)
//! and `ca.pem`: what the site's client (`fedflow-client join --identity DIR`), an operator's
//! tools, or the coordinator (`fedflow-coordinator serve --tls DIR`) load. Keep `ca.key`
//! offline: whoever holds it can mint identities.
//!
//! A site can keep its private key from ever leaving it: it makes its key and a certificate
//! request itself (`fedflow-client enrol-request`), and the CA signs the request
//! ([`Ca::sign_request`], `pki sign`) into a bundle holding only `cert.pem` and `ca.pem`,
//! which the site puts beside its key. The request proves possession of the key (its
//! signature is verified); everything else in the certificate — the role, the name, the
//! validity, the usages — is the CA's decision, not the request's.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde_json::json;
use time::{Duration, OffsetDateTime};

use super::audit_log::AuditLog;
use super::identity::{Role, coordinator_uri, identity_uri, valid_name};
use crate::{Error, Result};

/// The CA certificate's file name (in the PKI directory and in every bundle).
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name in the PKI directory.
pub const CA_KEY: &str = "ca.key";
/// A bundle's certificate.
pub const BUNDLE_CERT: &str = "cert.pem";
/// A bundle's private key.
pub const BUNDLE_KEY: &str = "key.pem";
/// The log of issued certificates in the PKI directory.
pub const ISSUED_LOG: &str = "issued.jsonl";
/// Other CAs' certificates that bundles issued here also trust, in the PKI directory.
pub const TRUSTED_CERTS: &str = "trusted.pem";

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Not valid before.
    pub not_before: OffsetDateTime,
    /// Not valid after.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From five minutes ago (for clock skew between machines) for `days` days.
    pub fn days(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

/// What was issued, and where its bundle is.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Serial number, lowercase hex (as [`super::Identity::serial`]).
    pub serial: String,
    /// The identity URI (or the coordinator's).
    pub uri: String,
    /// The bundle directory.
    pub dir: PathBuf,
    /// Expiry, Unix seconds.
    pub not_after: i64,
}

fn pki_err(what: impl std::fmt::Display) -> Error {
    Error::Security(what.to_string())
}

/// Writes `bytes` to `path` atomically with mode `mode` (on Unix).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    fedflow_common::fsio::write_atomic_with(path, |file| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| fedflow_common::Error::io(path, e))?;
        }
        #[cfg(not(unix))]
        let _ = mode;
        std::io::Write::write_all(file, bytes).map_err(|e| fedflow_common::Error::io(path, e))
    })?;
    Ok(())
}

/// Creates `dir` (and parents) with mode 0700 on Unix.
fn private_dir(dir: &Path) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
        .map_err(|e| pki_err(format!("cannot create {}: {e}", dir.display())))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and 16 bytes long (RFC 5280 4.1.2.2: at most 20 octets, positive).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// The federation's CA, loaded from a PKI directory.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Creates a new CA in `dir` (`ca.pem`, `ca.key`, `issued.jsonl`). Refuses to overwrite
    /// an existing CA.
    pub fn init(dir: &Path, validity: Validity) -> Result<Ca> {
        private_dir(dir)?;
        if dir.join(CA_KEY).exists() || dir.join(CA_CERT).exists() {
            return Err(pki_err(format!(
                "{} already holds a CA: every certificate it issued would stop working if it \
                 were replaced; use another directory",
                dir.display()
            )));
        }
        let key = KeyPair::generate().map_err(pki_err)?;
        let mut params = CertificateParams::default();
        // A random tag tells federations' CAs apart by name, so a certificate from another
        // federation is refused as "unknown issuer" rather than as a bad signature.
        let tag: [u8; 4] = rand::random();
        params.distinguished_name = name(&format!(
            "fedflow federation CA {}",
            fedflow_common::hash::hex(&tag)
        ));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(pki_err)?;
        write_file(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
        let mut log = AuditLog::open(&dir.join(ISSUED_LOG))?;
        log.append(
            "ca_created",
            json!({ "not_after": validity.not_after.unix_timestamp() }),
        )?;
        Ca::load(dir)
    }

    /// Loads the CA from `dir`.
    pub fn load(dir: &Path) -> Result<Ca> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f)).map_err(|e| {
                pki_err(format!(
                    "cannot read {}: {e} (create a CA with `fedflow-coordinator pki init`)",
                    dir.join(f).display()
                ))
            })
        };
        let cert_pem = read(CA_CERT)?;
        let key = KeyPair::from_pem(&read(CA_KEY)?)
            .map_err(|e| pki_err(format!("{}: {e}", dir.join(CA_KEY).display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| pki_err(format!("{}: {e}", dir.join(CA_CERT).display())))?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            cert_pem,
            issuer,
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues the coordinator's server certificate for `names` (DNS names or IP addresses
    /// the sites will connect to) into the bundle `out`.
    pub fn issue_server(&self, names: &[String], validity: Validity, out: &Path) -> Result<Issued> {
        if names.is_empty() {
            return Err(pki_err(
                "a server certificate needs at least one DNS name or IP address (--name)",
            ));
        }
        let mut sans = Vec::with_capacity(names.len() + 1);
        for n in names {
            sans.push(match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.clone()
                        .try_into()
                        .map_err(|e| pki_err(format!("server name {n:?}: {e}")))?,
                ),
            });
        }
        let uri = coordinator_uri();
        sans.push(SanType::URI(uri.clone().try_into().map_err(pki_err)?));
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&names[0]);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_with(
            params,
            validity,
            out,
            uri,
            "server",
            json!({ "names": names }),
            SubjectKey::Generate,
        )
    }

    /// Issues a certificate for `name` in `role` (a site id or an operator name) into the
    /// bundle `out`. Issuing again for the same name is how a certificate is rotated: the
    /// new one carries the same identity (and so the same history) and a new serial; revoke
    /// the old serial once the site has switched.
    pub fn issue(&self, role: Role, name_: &str, validity: Validity, out: &Path) -> Result<Issued> {
        self.issue_identity(role, name_, validity, out, SubjectKey::Generate)
    }

    /// Signs the certificate request `request_pem` (PEM, from `fedflow-client
    /// enrol-request`) for `name_` in `role` into the bundle `out`, which gets `cert.pem`
    /// and `ca.pem` and no key: the key stays where the request was made. The request's
    /// signature must verify (it proves the requester holds the key) and its common name
    /// must be `name_`; nothing else of it is used.
    pub fn sign_request(
        &self,
        request_pem: &str,
        role: Role,
        name_: &str,
        validity: Validity,
        out: &Path,
    ) -> Result<Issued> {
        let public = verified_request(request_pem, name_)?;
        self.issue_identity(role, name_, validity, out, SubjectKey::Requested(public))
    }

    fn issue_identity(
        &self,
        role: Role,
        name_: &str,
        validity: Validity,
        out: &Path,
        key: SubjectKey,
    ) -> Result<Issued> {
        let params = identity_params(role, name_)?;
        let uri = identity_uri(role, name_);
        self.issue_with(
            params,
            validity,
            out,
            uri,
            role.as_str(),
            json!({ "name": name_ }),
            key,
        )
    }

    /// Signs the certificate request `request_pem` for `name_` in `role` online (the
    /// coordinator's enrolment port), as [`Ca::sign_request`] does, and returns the
    /// certificate instead of writing a bundle; recorded in the CA's log as issued by online
    /// enrolment with `token_id`.
    pub fn certify_request(
        &self,
        request_pem: &str,
        role: Role,
        name_: &str,
        validity: Validity,
        token_id: &str,
    ) -> Result<Certified> {
        let public = verified_request(request_pem, name_)?;
        let params = identity_params(role, name_)?;
        let uri = identity_uri(role, name_);
        let (signed, _) = self.sign(params, validity, SubjectKey::Requested(public))?;
        self.log_issued(
            &signed,
            &uri,
            validity,
            json!({
                "name": name_,
                "kind": role.as_str(),
                "bundle": "online enrolment",
                "token": token_id,
                "key": "the requester's own (signed request)",
            }),
        )?;
        Ok(Certified {
            serial: signed.serial,
            uri,
            not_after: validity.not_after.unix_timestamp(),
            cert_pem: signed.cert_pem,
        })
    }

    /// What bundles get as `ca.pem`: this CA's certificate, then every certificate in the
    /// PKI directory's `trusted.pem` (other CAs trusted during a CA rollover; see
    /// [`Ca::trust`]).
    pub fn trust_pem(&self) -> Result<String> {
        let extra = self.dir.join(TRUSTED_CERTS);
        let mut out = self.cert_pem.clone();
        match std::fs::read_to_string(&extra) {
            Ok(more) => {
                if !out.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(&more);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(pki_err(format!("cannot read {}: {e}", extra.display()))),
        }
        Ok(out)
    }

    /// Adds the CA certificates in `pem` (another federation CA's `ca.pem`) to the ones
    /// bundles issued from now on trust (`trusted.pem` in the PKI directory), for a CA
    /// rollover: the old CA trusts the new one and the new one the old until every
    /// participant holds a certificate from the new CA. Refuses anything that is not a CA
    /// certificate; adding one already trusted changes nothing. Returns how many were added.
    pub fn trust(&self, pem: &str, source: &Path) -> Result<usize> {
        let bad = |why: String| pki_err(format!("{}: {why}", source.display()));
        let mut blocks = Vec::new();
        for block in pem_blocks(pem) {
            let (_, parsed) = x509_parser::pem::parse_x509_pem(block.as_bytes())
                .map_err(|e| bad(format!("not PEM: {e}")))?;
            let cert = parsed
                .parse_x509()
                .map_err(|e| bad(format!("not a certificate: {e}")))?;
            if !cert.is_ca() {
                return Err(bad(format!(
                    "{} is not a CA certificate (trust another federation CA's ca.pem)",
                    cert.subject()
                )));
            }
            blocks.push((parsed.contents.clone(), block));
        }
        if blocks.is_empty() {
            return Err(bad("holds no PEM certificate".into()));
        }
        let known: Vec<Vec<u8>> = pem_blocks(&self.trust_pem()?)
            .filter_map(|b| {
                x509_parser::pem::parse_x509_pem(b.as_bytes())
                    .ok()
                    .map(|(_, p)| p.contents)
            })
            .collect();
        let path = self.dir.join(TRUSTED_CERTS);
        let mut text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(pki_err(format!("cannot read {}: {e}", path.display()))),
        };
        let mut added = 0;
        for (der, block) in blocks {
            if known.contains(&der) {
                continue;
            }
            text.push_str(block);
            text.push('\n');
            added += 1;
        }
        if added > 0 {
            write_file(&path, text.as_bytes(), 0o644)?;
            AuditLog::open(&self.dir.join(ISSUED_LOG))?.append(
                "ca_trusted",
                json!({ "source": source.display().to_string(), "added": added }),
            )?;
        }
        Ok(added)
    }

    #[allow(clippy::too_many_arguments)]
    fn issue_with(
        &self,
        params: CertificateParams,
        validity: Validity,
        out: &Path,
        uri: String,
        kind: &str,
        detail: serde_json::Value,
        key: SubjectKey,
    ) -> Result<Issued> {
        if out.join(BUNDLE_KEY).exists() || out.join(BUNDLE_CERT).exists() {
            return Err(pki_err(format!(
                "{} already holds a certificate bundle: choose another --out (e.g. for a \
                 rotated certificate) or remove it first",
                out.display()
            )));
        }
        let trust = self.trust_pem()?;
        let (signed, generated) = self.sign(params, validity, key)?;
        private_dir(out)?;
        let key_source = match &generated {
            Some(key) => {
                write_file(&out.join(BUNDLE_KEY), key.serialize_pem().as_bytes(), 0o600)?;
                "generated by the CA"
            }
            None => "the requester's own (signed request)",
        };
        write_file(&out.join(BUNDLE_CERT), signed.cert_pem.as_bytes(), 0o644)?;
        write_file(&out.join(CA_CERT), trust.as_bytes(), 0o644)?;
        let mut detail = detail;
        detail["kind"] = json!(kind);
        detail["bundle"] = json!(out.display().to_string());
        detail["key"] = json!(key_source);
        self.log_issued(&signed, &uri, validity, detail)?;
        Ok(Issued {
            serial: signed.serial,
            uri,
            dir: out.to_path_buf(),
            not_after: validity.not_after.unix_timestamp(),
        })
    }

    /// Signs `params` for `validity` with a fresh serial; returns the certificate and the
    /// key made for it (for [`SubjectKey::Generate`]).
    fn sign(
        &self,
        mut params: CertificateParams,
        validity: Validity,
        key: SubjectKey,
    ) -> Result<(Signed, Option<KeyPair>)> {
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let (cert, generated) = match key {
            SubjectKey::Generate => {
                let key = KeyPair::generate().map_err(pki_err)?;
                (
                    params.signed_by(&key, &self.issuer).map_err(pki_err)?,
                    Some(key),
                )
            }
            SubjectKey::Requested(public) => (
                params.signed_by(&public, &self.issuer).map_err(pki_err)?,
                None,
            ),
        };
        let signed = Signed {
            serial: fedflow_common::hash::hex(&serial.to_bytes()),
            cert_pem: cert.pem(),
        };
        Ok((signed, generated))
    }

    /// Appends `certificate_issued` to the CA's log.
    fn log_issued(
        &self,
        signed: &Signed,
        uri: &str,
        validity: Validity,
        mut detail: serde_json::Value,
    ) -> Result<()> {
        detail["serial"] = json!(signed.serial);
        detail["uri"] = json!(uri);
        detail["not_before"] = json!(validity.not_before.unix_timestamp());
        detail["not_after"] = json!(validity.not_after.unix_timestamp());
        AuditLog::open(&self.dir.join(ISSUED_LOG))?.append("certificate_issued", detail)?;
        Ok(())
    }
}

/// A certificate just signed.
struct Signed {
    serial: String,
    cert_pem: String,
}

/// A certificate signed online ([`Ca::certify_request`]).
#[derive(Debug, Clone)]
pub struct Certified {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The identity URI.
    pub uri: String,
    /// Expiry, Unix seconds.
    pub not_after: i64,
    /// The certificate (PEM).
    pub cert_pem: String,
}

/// The PEM certificate blocks in `text`, each from its `BEGIN` line to its `END` line.
fn pem_blocks(text: &str) -> impl Iterator<Item = &str> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    text.split_inclusive(END).filter_map(|chunk| {
        let at = chunk.find(BEGIN)?;
        chunk.ends_with(END).then(|| &chunk[at..])
    })
}

/// The common name the certificate request `request_pem` asks for, once its signature
/// verifies (the requester holds the key).
pub fn requested_name(request_pem: &str) -> Result<String> {
    let request = rcgen::CertificateSigningRequestParams::from_pem(request_pem)
        .map_err(|e| pki_err(format!("not a valid certificate request: {e}")))?;
    common_name(&request)
        .ok_or_else(|| pki_err("the certificate request names no one (no common name)"))
}

fn common_name(request: &rcgen::CertificateSigningRequestParams) -> Option<String> {
    request
        .params
        .distinguished_name
        .get(&DnType::CommonName)
        .map(|v| match v {
            rcgen::DnValue::PrintableString(s) => s.to_string(),
            rcgen::DnValue::Utf8String(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

/// The public key of the certificate request `request_pem`, whose signature verifies (the
/// requester holds the key) and whose common name is `name_`.
fn verified_request(request_pem: &str, name_: &str) -> Result<rcgen::PublicKey> {
    let request = rcgen::CertificateSigningRequestParams::from_pem(request_pem)
        .map_err(|e| pki_err(format!("not a valid certificate request: {e}")))?;
    let requested = common_name(&request);
    if requested.as_deref() != Some(name_) {
        return Err(pki_err(format!(
            "the request is for {}, not {name_:?}: sign it under the name it asks for, \
             or ask the site for a request for {name_:?}",
            requested.map_or("no name".to_string(), |n| format!("{n:?}"))
        )));
    }
    Ok(request.public_key)
}

/// What a site's or operator's certificate says: its name, its identity URI, client use.
fn identity_params(role: Role, name_: &str) -> Result<CertificateParams> {
    if !valid_name(name_) {
        return Err(pki_err(format!(
            "{role} name {name_:?} is invalid: use 1-128 characters of [A-Za-z0-9._-]"
        )));
    }
    let uri = identity_uri(role, name_);
    let mut params = CertificateParams::default();
    params.distinguished_name = name(name_);
    params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(pki_err)?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// Where an issued certificate's key comes from.
enum SubjectKey {
    /// A new key made by the CA and written to the bundle.
    Generate,
    /// The public key of a verified certificate request; the private key stays with the
    /// requester.
    Requested(rcgen::PublicKey),
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fedflow");
    dn.push(DnType::CommonName, common_name);
    dn
}
