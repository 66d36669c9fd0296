//! Site keys from the federation's certificates: a site signs its secure-aggregation
//! messages with the private key of its mutual-TLS certificate, and everyone verifies them
//! with the key of a certificate that chains to the federation's CA and names that site
//! (`spiffe://fedflow/site/<id>`, as `fedflow-coordinator pki issue` writes it). A
//! coordinator relaying a roster cannot put a key of its own in a site's name without a
//! certificate the CA signed for that name.
//!
//! Chains are checked by `rustls-webpki` (the verifier rustls uses for TLS), for client
//! authentication, at the time given; the identity is read with `x509-parser`.

use std::collections::HashMap;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Fault;
use super::crypto::{EcdsaSigner, Verifier};

/// The URI prefix of a site's identity in its certificate.
pub const SITE_IDENTITY_PREFIX: &str = "spiffe://fedflow/site/";

impl EcdsaSigner {
    /// The signing key of a certificate bundle's `key.pem` (PKCS#8, ECDSA P-256).
    pub fn from_key_pem(pem: &[u8]) -> Result<EcdsaSigner, String> {
        match PrivateKeyDer::from_pem_slice(pem) {
            Ok(PrivateKeyDer::Pkcs8(der)) => EcdsaSigner::from_pkcs8(der.secret_pkcs8_der()),
            Ok(_) => Err("the key is not in PKCS#8 form (BEGIN PRIVATE KEY)".into()),
            Err(e) => Err(format!("not a PEM private key: {e}")),
        }
    }
}

/// Trusts a site's signatures through its certificate.
#[derive(Debug, Clone)]
pub struct CertVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    certs: HashMap<String, CertificateDer<'static>>,
}

/// The site a certificate names, if exactly one.
fn site_of(der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not a certificate: {e}"))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative names: {e}"))?;
    let mut sites = sans
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => u.strip_prefix(SITE_IDENTITY_PREFIX),
            _ => None,
        });
    match (sites.next(), sites.next()) {
        (Some(site), None) => Ok(site.to_string()),
        (None, _) => Err(format!("names no site ({SITE_IDENTITY_PREFIX}<id>)")),
        (Some(_), Some(_)) => Err("names more than one site".into()),
    }
}

impl CertVerifier {
    /// A verifier trusting the CA certificates in `ca_pem` (a bundle's `ca.pem`).
    pub fn from_ca_pem(ca_pem: &[u8]) -> Result<CertVerifier, Fault> {
        let bad = |why: String| Fault::Params(format!("the CA certificate: {why}"));
        let mut anchors = Vec::new();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|e| bad(e.to_string()))?
                .to_owned();
            anchors.push(anchor);
        }
        if anchors.is_empty() {
            return Err(bad("no certificate in the PEM".into()));
        }
        Ok(CertVerifier {
            anchors,
            certs: HashMap::new(),
        })
    }

    /// Trusts `site`'s signatures through `cert_der`, once the certificate is shown to
    /// chain to the CA, be valid at `now` (Unix seconds) for client authentication, and
    /// name exactly `site`.
    pub fn insert(&mut self, site: &str, cert_der: &[u8], now: u64) -> Result<(), Fault> {
        let refuse = |why: String| Fault::BadKey(format!("{site} (its certificate {why})"));
        let der = CertificateDer::from(cert_der.to_vec());
        let cert = EndEntityCert::try_from(&der).map_err(|e| refuse(e.to_string()))?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            &[],
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
            KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| refuse(format!("does not chain to the federation's CA: {e}")))?;
        let named = site_of(cert_der).map_err(refuse)?;
        if named != site {
            return Err(refuse(format!("names {named}")));
        }
        self.certs.insert(site.to_string(), der);
        Ok(())
    }
}

impl Verifier for CertVerifier {
    fn verify(&self, site: &str, message: &[u8], signature: &[u8]) -> bool {
        let Some(der) = self.certs.get(site) else {
            return false;
        };
        EndEntityCert::try_from(der).is_ok_and(|cert| {
            cert.verify_signature(webpki::ring::ECDSA_P256_SHA256, message, signature)
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };

    use super::super::crypto::Signer;
    use super::*;

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let pem = params.self_signed(&key).unwrap().pem();
        let issuer = Issuer::from_ca_cert_pem(&pem, key).unwrap();
        Ca { pem, issuer }
    }

    /// A site certificate from `ca` naming `uris`, and its key's PEM.
    fn site_cert(ca: &Ca, uris: &[&str]) -> (Vec<u8>, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI(u.to_string().try_into().unwrap()))
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        (cert.der().to_vec(), key.serialize_pem())
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// A site's bundle key signs what its certificate verifies; another site's certificate,
    /// another federation's, one naming someone else or no site are all refused.
    #[test]
    fn signatures_verify_through_certificates_of_the_ca() {
        let ours = ca();
        let (cert, key) = site_cert(&ours, &["spiffe://fedflow/site/site-001"]);
        let mut v = CertVerifier::from_ca_pem(ours.pem.as_bytes()).unwrap();
        v.insert("site-001", &cert, now()).unwrap();
        let signer = EcdsaSigner::from_key_pem(key.as_bytes()).unwrap();
        let sig = signer.sign(b"roster");
        assert!(v.verify("site-001", b"roster", &sig));
        assert!(!v.verify("site-001", b"roster!", &sig));
        assert!(!v.verify("site-002", b"roster", &sig));

        let err = v.insert("site-002", &cert, now()).unwrap_err();
        assert!(err.to_string().contains("names site-001"), "{err}");
        let theirs = ca();
        let (foreign, _) = site_cert(&theirs, &["spiffe://fedflow/site/site-003"]);
        let err = v.insert("site-003", &foreign, now()).unwrap_err();
        assert!(err.to_string().contains("does not chain"), "{err}");
        let (operator, _) = site_cert(&ours, &["spiffe://fedflow/admin/alice"]);
        assert!(v.insert("alice", &operator, now()).is_err());
        let (two, _) = site_cert(
            &ours,
            &[
                "spiffe://fedflow/site/site-004",
                "spiffe://fedflow/site/site-005",
            ],
        );
        assert!(v.insert("site-004", &two, now()).is_err());
        // Outside its validity (rcgen's default starts in 1975) a certificate is refused.
        let (cert6, _) = site_cert(&ours, &["spiffe://fedflow/site/site-006"]);
        let err = v.insert("site-006", &cert6, 0).unwrap_err();
        assert!(err.to_string().contains("does not chain"), "{err}");
        v.insert("site-006", &cert6, now()).unwrap();
        assert!(CertVerifier::from_ca_pem(b"not a pem").is_err());
    }
}
