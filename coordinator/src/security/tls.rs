//! The coordinator's TLS: a rustls server configuration that requires a client certificate
//! chained to the federation's CA (mutual TLS), and the stream of accepted connections the
//! gRPC server runs on, which does the handshakes itself so that every refused connection
//! is logged and recorded in the audit log with its reason, and so that idle connections
//! cannot hold the handshake places (a short pre-handshake timeout, a limit per address).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use super::SecurityLog;
use super::pki::{BUNDLE_CERT, BUNDLE_KEY, CA_CERT};
use crate::{Error, Result};

/// How long a client may take to complete the TLS handshake, from its connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new connection may take to start its TLS handshake (its ClientHello
/// arrives): a client sends it at once, so a connection that does not is idle.
pub const PRE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Handshakes in progress at once; further connections wait to be accepted.
pub const MAX_HANDSHAKES: usize = 64;

/// Handshakes in progress at once from one address (see [`address_key`]).
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 16;

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
    Ok(server_configs(bundle)?.0)
}

/// The mutual-TLS configuration ([`server_config`]) and, with the same certificate, one that
/// asks for no client certificate (the enrolment port, whose callers have none yet).
fn server_configs(bundle: &Path) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>)> {
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
    let unusable = |e: rustls::Error| {
        tls_err(format!(
            "the certificate and key in {} do not form a usable identity: {e}",
            bundle.display()
        ))
    };
    let mut mutual = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(unusable)?;
    mutual.alpn_protocols = vec![b"h2".to_vec()];
    let mut server_only = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(unusable)?;
    server_only.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(mutual), Arc::new(server_only)))
}

/// Which callers a listener's handshakes admit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Only callers presenting a certificate chained to the federation CA (the main port).
    Required,
    /// Anyone (the enrolment port, which serves nothing but token redemption).
    None,
}

/// The server configuration in force, replaceable while the coordinator serves: each new
/// connection's handshake takes the configuration current at that moment; connections
/// already established keep theirs.
#[derive(Debug)]
pub struct ServerTls {
    bundle: PathBuf,
    current: std::sync::RwLock<(Arc<ServerConfig>, Arc<ServerConfig>)>,
    not_after: std::sync::atomic::AtomicI64,
}

/// What a reload installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The server certificate's serial, as fedflow prints serials.
    pub serial: String,
    /// When it expires (Unix seconds).
    pub not_after: i64,
}

impl ServerTls {
    /// Loads the bundle directory `bundle` ([`server_config`]).
    pub fn load(bundle: &Path) -> Result<ServerTls> {
        let configs = server_configs(bundle)?;
        let (_, not_after) = certificate_facts(&bundle.join(BUNDLE_CERT))?;
        Ok(ServerTls {
            bundle: bundle.to_path_buf(),
            current: std::sync::RwLock::new(configs),
            not_after: std::sync::atomic::AtomicI64::new(not_after),
        })
    }

    /// The configuration new handshakes use under `auth`.
    pub fn current(&self, auth: ClientAuth) -> Arc<ServerConfig> {
        let configs = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match auth {
            ClientAuth::Required => configs.0.clone(),
            ClientAuth::None => configs.1.clone(),
        }
    }

    /// When the server certificate in force expires (Unix seconds).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the bundle again and, when it is a usable identity, serves new connections with
    /// it; an unusable bundle (a half-copied file, an expired certificate) changes nothing
    /// and says why.
    pub fn reload(&self) -> Result<Reloaded> {
        let configs = server_configs(&self.bundle)?;
        let (serial, not_after) = certificate_facts(&self.bundle.join(BUNDLE_CERT))?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = configs;
        self.not_after
            .store(not_after, std::sync::atomic::Ordering::Relaxed);
        Ok(Reloaded { serial, not_after })
    }
}

/// The serial (hex) and expiry (Unix seconds) of the first certificate in `path`.
fn certificate_facts(path: &Path) -> Result<(String, i64)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let certs = read_certs(path)?;
    let (_, parsed) = X509Certificate::from_der(&certs[0])
        .map_err(|e| tls_err(format!("{}: not a certificate: {e}", path.display())))?;
    Ok((
        fedflow_common::hash::hex(parsed.raw_serial()),
        parsed.validity().not_after.timestamp(),
    ))
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

/// Accepts TCP connections on `listener` and completes TLS handshakes concurrently; yields
/// the established streams. A connection must start its handshake (send its ClientHello)
/// within [`PRE_HANDSHAKE_TIMEOUT`] and complete it within [`HANDSHAKE_TIMEOUT`]; at most
/// [`MAX_HANDSHAKES`] handshakes are in progress at once, and at most
/// [`MAX_HANDSHAKES_PER_ADDRESS`] from one address (see [`address_key`]): a new connection
/// from an address at its limit closes that address's oldest connection that has not
/// started its handshake yet, or is itself closed when all of them have. So idle
/// connections from one address can neither hold the handshake places nor keep a
/// legitimate client from the same address (behind the same NAT) waiting.
///
/// A failed handshake is logged and recorded in `log` as `connection_refused` with the
/// peer's address and the reason, and the server goes on serving everyone else. Connections
/// closed before their handshake started (idle past the pre-handshake timeout, over the
/// address's limit, or closed by the client without a word) are recorded once per address
/// while it has connections waiting, then
/// counted: the count is recorded when the address has none left, so a flood of them does
/// not become a flood of audit records. Stops when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerTls>,
    auth: ClientAuth,
    log: SecurityLog,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(16);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let pending = Pending::new(log.clone());
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
            let config = config.clone();
            let tx = tx.clone();
            let log = log.clone();
            let pending = pending.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let Some((mut slot, evicted)) = pending.admit(peer) else {
                    pending.closed_early(
                        peer,
                        &format!(
                            "{MAX_HANDSHAKES_PER_ADDRESS} handshakes from this address were \
                             already in progress (the limit per address)"
                        ),
                    );
                    return;
                };
                let began = tokio::time::Instant::now();
                let hello = tokio::select! {
                    _ = evicted => {
                        pending.closed_early(
                            peer,
                            &format!(
                                "it had not started its TLS handshake when more than \
                                 {MAX_HANDSHAKES_PER_ADDRESS} connections from this address \
                                 were waiting (the oldest idle one is closed for each new one)"
                            ),
                        );
                        drop(slot);
                        return;
                    }
                    r = tokio::time::timeout(
                        PRE_HANDSHAKE_TIMEOUT,
                        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp),
                    ) => r,
                };
                let start = match hello {
                    Ok(Ok(start)) => start,
                    // Closed without a word: a port scan or a load balancer's health check.
                    Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        pending.closed_early(
                            peer,
                            "the client closed the connection without starting a TLS handshake",
                        );
                        drop(slot);
                        return;
                    }
                    Ok(Err(e)) => return refused(&log, peer, &describe_handshake_error(&e)),
                    Err(_) => {
                        // Recorded (or counted) while the slot still holds the address.
                        pending.closed_early(
                            peer,
                            &format!(
                                "it did not start its TLS handshake within {}s",
                                PRE_HANDSHAKE_TIMEOUT.as_secs()
                            ),
                        );
                        drop(slot);
                        return;
                    }
                };
                // Closed for a newer connection just as its ClientHello arrived: its place
                // is gone.
                if !slot.start() {
                    return;
                }
                let left = HANDSHAKE_TIMEOUT.saturating_sub(began.elapsed());
                match tokio::time::timeout(left, start.into_stream(config.current(auth))).await {
                    Ok(Ok(stream)) => {
                        drop(slot);
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

/// What the per-address limit counts as one address: an IPv4 address (also when it arrives
/// IPv4-mapped), or the /64 prefix of an IPv6 address (what one subscriber is usually
/// given, so an attacker cannot pick a fresh address per connection).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// Handshakes in progress per address, and which of them have not started (those can be
/// closed to make room); cheap to clone.
#[derive(Debug, Clone)]
struct Pending {
    table: Arc<Mutex<PendingTable>>,
    log: SecurityLog,
}

#[derive(Debug, Default)]
struct PendingTable {
    next_id: u64,
    addresses: HashMap<IpAddr, AddressPending>,
}

/// One address's handshakes in progress.
#[derive(Debug, Default)]
struct AddressPending {
    /// Connections admitted and not yet finished or closed to make room.
    admitted: usize,
    /// Those that have not started their handshake, oldest first, each with the sender that
    /// closes it.
    idle: VecDeque<(u64, oneshot::Sender<()>)>,
    /// Whether a connection closed early has been recorded since the address had none
    /// waiting, and how many have been closed since without a record.
    reported: bool,
    unreported: u64,
}

impl Pending {
    fn new(log: SecurityLog) -> Pending {
        Pending {
            table: Arc::default(),
            log,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `peer`, closing the address's oldest idle one if it is at
    /// its limit; `None` if it is at its limit with none idle. The receiver resolves when
    /// the connection is closed to make room for a newer one.
    fn admit(&self, peer: SocketAddr) -> Option<(Slot, oneshot::Receiver<()>)> {
        let key = address_key(peer.ip());
        let mut table = self.lock();
        let id = table.next_id;
        table.next_id += 1;
        let entry = table.addresses.entry(key).or_default();
        if entry.admitted >= MAX_HANDSHAKES_PER_ADDRESS {
            let (_, close) = entry.idle.pop_front()?;
            // The closed connection no longer counts (its slot knows: it is not idle and
            // has not started).
            entry.admitted -= 1;
            let _ = close.send(());
        }
        let (close, closed) = oneshot::channel();
        entry.admitted += 1;
        entry.idle.push_back((id, close));
        Some((
            Slot {
                pending: self.clone(),
                key,
                id,
                started: false,
            },
            closed,
        ))
    }

    /// Logs and records (the first per address while it has connections waiting; the rest
    /// are counted) a connection from `peer` closed before its handshake started.
    fn closed_early(&self, peer: SocketAddr, reason: &str) {
        let key = address_key(peer.ip());
        let first = {
            let mut table = self.lock();
            match table.addresses.get_mut(&key) {
                Some(entry) if entry.reported => {
                    entry.unreported += 1;
                    false
                }
                Some(entry) => {
                    entry.reported = true;
                    true
                }
                // Nothing waiting from this address any more: nothing to count it with.
                None => true,
            }
        };
        if first {
            let reason = format!(
                "closed before the TLS handshake started: {reason}; further such connections \
                 from this address are counted, not recorded one by one"
            );
            refused(&self.log, peer, &reason);
        }
    }

    /// Forgets slot `id` of `key`: `started` says whether it had left the idle list itself.
    fn release(&self, key: IpAddr, id: u64, started: bool) {
        let unreported = {
            let mut table = self.lock();
            let Some(entry) = table.addresses.get_mut(&key) else {
                return;
            };
            if started {
                entry.admitted -= 1;
            } else if let Some(at) = entry.idle.iter().position(|(i, _)| *i == id) {
                entry.idle.remove(at);
                entry.admitted -= 1;
            }
            // Otherwise it was closed to make room, and no longer counted.
            if entry.admitted > 0 {
                return;
            }
            let unreported = entry.unreported;
            table.addresses.remove(&key);
            unreported
        };
        if unreported > 0 {
            let reason = format!(
                "{unreported} more connection(s) from this address were closed before their \
                 TLS handshake started"
            );
            tracing::warn!(address = %key, "{reason}");
            self.log.record(
                "connection_refused",
                json!({ "peer": key.to_string(), "reason": reason }),
            );
        }
    }
}

/// A connection's place among its address's handshakes in progress; freed when dropped.
#[derive(Debug)]
struct Slot {
    pending: Pending,
    key: IpAddr,
    id: u64,
    started: bool,
}

impl Slot {
    /// The connection's ClientHello has arrived: it can no longer be closed to make room.
    /// False if it was closed to make room just before.
    fn start(&mut self) -> bool {
        let mut table = self.pending.lock();
        let Some(entry) = table.addresses.get_mut(&self.key) else {
            return false;
        };
        match entry.idle.iter().position(|(i, _)| *i == self.id) {
            Some(at) => {
                entry.idle.remove(at);
                self.started = true;
                true
            }
            None => false,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pending.release(self.key, self.id, self.started);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    fn pending() -> (Pending, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let log = SecurityLog::open(&dir.path().join("audit.jsonl")).unwrap();
        (Pending::new(log), dir)
    }

    #[test]
    fn an_address_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let key = |s: &str| address_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    /// An address at its limit makes room by closing its oldest connection that has not
    /// started its handshake; when all of them have started, the new one is refused. Other
    /// addresses are not affected, and places are freed when connections finish.
    #[test]
    fn idle_connections_make_room_for_new_ones_from_their_address() {
        let (p, _dir) = pending();
        let mut held: Vec<(Slot, oneshot::Receiver<()>)> = (0..MAX_HANDSHAKES_PER_ADDRESS)
            .map(|i| p.admit(peer("10.0.0.1", 1000 + i as u16)).unwrap())
            .collect();
        // One more: the oldest idle one (the first) is told to close.
        let (newest, newest_closed) = p.admit(peer("10.0.0.1", 2000)).unwrap();
        let (mut first, mut first_closed) = held.remove(0);
        assert_eq!(first_closed.try_recv(), Ok(()));
        assert!(!first.start(), "a closed connection cannot start");
        drop(first);
        for (_, closed) in &mut held {
            assert!(closed.try_recv().is_err(), "only the oldest is closed");
        }
        // Another address has its own places.
        let other = p.admit(peer("10.0.0.2", 1000));
        assert!(other.is_some());
        // All of 10.0.0.1's connections start their handshakes: none can be closed, so a
        // new one is refused until one finishes.
        for (slot, _) in &mut held {
            assert!(slot.start());
        }
        let mut newest = newest;
        assert!(newest.start());
        assert!(p.admit(peer("10.0.0.1", 3000)).is_none());
        drop(held.pop());
        let (_again, mut again_closed) = p.admit(peer("10.0.0.1", 3001)).unwrap();
        assert!(again_closed.try_recv().is_err());
        drop(newest_closed);
        drop(newest);
        drop(held);
        drop(_again);
        drop(other);
        assert!(
            p.lock().addresses.is_empty(),
            "nothing is kept for addresses with no connection"
        );
    }
}
