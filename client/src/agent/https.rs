//! The agent's API over TLS: a rustls server configuration from PEM files (optionally
//! requiring client certificates from a CA: mutual TLS), and the accept loop that serves
//! the router on each established TLS connection with HTTP/1.1. Handshakes run in their own
//! tasks with a deadline, so a slow or idle client holds up nobody else.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::{Error, Result};

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn tls_err(field: &str, path: &Path, what: impl std::fmt::Display) -> Error {
    Error::ConfigFile {
        path: path.to_path_buf(),
        reason: format!("{field}: {what}"),
    }
}

fn read_certs(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| tls_err(field, path, format!("cannot read certificates: {e}")))?;
    if certs.is_empty() {
        return Err(tls_err(field, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The server configuration: the certificate chain `cert` with its key `key`, and when
/// `client_ca` is given, client certificates required and verified against it. Errors name
/// the setting (`http.tls_cert`, `http.tls_key`, `http.tls_client_ca`) and the file.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>> {
    let certs = read_certs("http.tls_cert", cert)?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        tls_err(
            "http.tls_key",
            key,
            format!("cannot read the private key: {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("http.tls_cert", cert, e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs("http.tls_client_ca", ca)? {
                roots
                    .add(c)
                    .map_err(|e| tls_err("http.tls_client_ca", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_err("http.tls_client_ca", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, private).map_err(|e| {
        tls_err(
            "http.tls_key",
            key,
            format!("the certificate and the key do not form a usable identity: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` over TLS on `listener` until `stop` turns true; connections open then finish
/// the request they are answering and close.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    app: Router,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(config);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: the next accept may succeed.
                    tracing::warn!("the API's accept failed: {e}");
                    continue;
                }
            },
        };
        let (acceptor, app, mut stop) = (acceptor.clone(), app.clone(), stop.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, "API TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "API TLS handshake did not complete in time");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            let done = tokio::select! {
                done = conn.as_mut() => Some(done),
                _ = stop.wait_for(|s| *s) => None,
            };
            // (The stop's borrow ends before the connection is awaited again.)
            let done = match done {
                Some(done) => done,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = done {
                tracing::debug!(%peer, "API connection ended: {e}");
            }
        });
    }
}
