//! The coordinator's TLS: a rustls server configuration that requires a client certificate
//! chained to the federation's CA (mutual TLS), and the stream of accepted connections the
//! gRPC server runs on, which does the handshakes itself so that every refused connection
//! is logged and recorded in the audit log with its reason.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::SecurityLog;
use super::pki::{BUNDLE_CERT, BUNDLE_KEY, CA_CERT};
use crate::{Error, Result};

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; further connections wait to be accepted.
const MAX_HANDSHAKES: usize = 64;

/// The crypto provider fedflow uses everywhere (ring: no C build of aws-lc).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: impl std::fmt::Display) -> Error {
    Error::Security(what.to_string())
}

/// Reads every certificate in the PEM file `path`.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| {
            tls_err(format!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(tls_err(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// Builds the server configuration from the coordinator's bundle directory (`cert.pem`,
/// `key.pem`, and `ca.pem`, the federation CA that client certificates must chain to).
/// Refuses an expired or not-yet-valid server certificate with a message saying so.
pub fn server_config(bundle: &Path) -> Result<Arc<ServerConfig>> {
    let certs = read_certs(&bundle.join(BUNDLE_CERT))?;
    check_validity(&certs[0], &bundle.join(BUNDLE_CERT))?;
    let key = PrivateKeyDer::from_pem_file(bundle.join(BUNDLE_KEY)).map_err(|e| {
        tls_err(format!(
            "cannot read the private key {}: {e}",
            bundle.join(BUNDLE_KEY).display()
        ))
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(&bundle.join(CA_CERT))? {
        roots
            .add(ca)
            .map_err(|e| tls_err(format!("{}: {e}", bundle.join(CA_CERT).display())))?;
    }
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(tls_err)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| {
            tls_err(format!(
                "the certificate and key in {} do not form a usable identity: {e}",
                bundle.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Refuses a certificate outside its validity period, naming the file and the dates.
pub fn check_validity(cert: &CertificateDer<'_>, path: &Path) -> Result<()> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert)
        .map_err(|e| tls_err(format!("{}: not a certificate: {e}", path.display())))?;
    let v = parsed.validity();
    let now = fedflow_common::clock::now_ms() / 1000;
    if now < v.not_before.timestamp() {
        return Err(tls_err(format!(
            "the certificate {} is not valid before {} (check this machine's clock)",
            path.display(),
            v.not_before
        )));
    }
    if now > v.not_after.timestamp() {
        return Err(tls_err(format!(
            "the certificate {} expired on {}: issue a new one with `fedflow-coordinator pki`",
            path.display(),
            v.not_after
        )));
    }
    Ok(())
}

/// Says in words why a handshake failed.
pub fn describe_handshake_error(e: &io::Error) -> String {
    use rustls::{CertificateError, Error as TlsError};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) else {
        return match e.kind() {
            io::ErrorKind::TimedOut => "the handshake did not complete in time".into(),
            io::ErrorKind::UnexpectedEof => {
                "the client closed the connection during the handshake (it may not trust the \
                 coordinator's certificate)"
                    .into()
            }
            _ => format!("handshake failed: {e}"),
        };
    };
    match tls {
        TlsError::NoCertificatesPresented => {
            "the client presented no certificate (mutual TLS is required)".into()
        }
        TlsError::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the client certificate has expired ({c})")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("the client certificate is not valid yet ({c})")
            }
            // A CA with the same name but another key fails on the signature.
            CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::UnsupportedSignatureAlgorithmContext { .. } => {
                format!("the client certificate is not issued by this federation's CA ({c})")
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                format!("the client certificate is not for client authentication ({c})")
            }
            other => format!("the client certificate is invalid: {other}"),
        },
        TlsError::AlertReceived(alert) => {
            format!(
                "the client aborted the handshake ({alert:?}): it does not trust the coordinator's certificate"
            )
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// Accepts TCP connections on `listener` and completes TLS handshakes concurrently (each
/// limited to [`HANDSHAKE_TIMEOUT`], at most 64 at once); yields the established streams.
/// A failed handshake is logged and recorded in `log` as `connection_refused` with the
/// peer's address and the reason, and the server goes on serving everyone else. Stops when
/// the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    log: SecurityLog,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => refused(&log, peer, &describe_handshake_error(&e)),
                    Err(_) => refused(&log, peer, "the handshake did not complete in time"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn refused(log: &SecurityLog, peer: SocketAddr, reason: &str) {
    tracing::warn!(%peer, "refused a connection: {reason}");
    log.record(
        "connection_refused",
        json!({ "peer": peer.to_string(), "reason": reason }),
    );
}
