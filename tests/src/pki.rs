//! A federation PKI in a temporary directory holding every identity the tests use, and
//! clients that present them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedflow_coordinator::security::Role;
use fedflow_coordinator::security::pki::{Ca, Validity};
use fedflow_proto::transfer::MAX_MESSAGE_BYTES;
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::federation_client::FederationClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A CA (`ca/`), the coordinator's server bundle for 127.0.0.1 (`coordinator/`), and one
/// bundle per identity, each in the directory of its name: sites `site-a`, `site-b`,
/// `site-c`, viewer `val`, admin `ada`; `expired` (site-a's, expired yesterday); and from
/// another CA (`other-ca/`), `stranger` (a site-a certificate) and `impostor` (a server
/// certificate for 127.0.0.1).
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Issues everything listed on [`Pki`].
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let days = Validity::days(30);
        let ca = Ca::init(&dir.path().join("ca"), days).unwrap();
        ca.issue_server(&["127.0.0.1".into()], days, &dir.path().join("coordinator"))
            .unwrap();
        for (role, name) in [
            (Role::Site, "site-a"),
            (Role::Site, "site-b"),
            (Role::Site, "site-c"),
            (Role::Viewer, "val"),
            (Role::Admin, "ada"),
        ] {
            ca.issue(role, name, days, &dir.path().join(name)).unwrap();
        }
        let now = time::OffsetDateTime::now_utc();
        let expired = Validity {
            not_before: now - time::Duration::days(10),
            not_after: now - time::Duration::days(1),
        };
        ca.issue(Role::Site, "site-a", expired, &dir.path().join("expired"))
            .unwrap();
        let other = Ca::init(&dir.path().join("other-ca"), days).unwrap();
        other
            .issue(Role::Site, "site-a", days, &dir.path().join("stranger"))
            .unwrap();
        other
            .issue_server(&["127.0.0.1".into()], days, &dir.path().join("impostor"))
            .unwrap();
        Pki { dir }
    }

    /// The directory holding every bundle (each in `<root>/<name>`).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The bundle directory of `name` (cert.pem, key.pem, ca.pem).
    pub fn bundle(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The bytes of `file` in bundle `bundle`.
    pub fn read(&self, bundle: &str, file: &str) -> Vec<u8> {
        let path = self.bundle(bundle).join(file);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A channel to `addr` presenting `identity`'s certificate (none for `None`) and trusting
    /// the CA of bundle `ca_of`; the error is the connection's, for tests of refusals.
    pub async fn channel(
        &self,
        addr: SocketAddr,
        identity: Option<&str>,
        ca_of: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read(ca_of, "ca.pem")));
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(
                self.read(id, "cert.pem"),
                self.read(id, "key.pem"),
            ));
        }
        Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect()
            .await
    }

    /// A `Federation` client presenting `name`'s certificate, with fedflow's message limits.
    pub async fn site(&self, addr: SocketAddr, name: &str) -> FederationClient<Channel> {
        FederationClient::new(self.channel(addr, Some(name), name).await.unwrap())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// An `Admin` client presenting `name`'s certificate.
    pub async fn admin(&self, addr: SocketAddr, name: &str) -> AdminClient<Channel> {
        AdminClient::new(self.channel(addr, Some(name), name).await.unwrap())
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}
