//! A CA rollover without stopping the run: each CA is told to trust the other (`pki trust`,
//! the real binary), the coordinator's trust bundle takes both and is reloaded, then its
//! server certificate moves to the new CA, sites move one by one, and at last the old CA is
//! dropped. At every step the sites that followed the procedure are served, and the ones
//! that did not are refused the way the guide says.

use std::path::Path;
use std::process::Command;

use fedflow_coordinator::security::Role;
use fedflow_coordinator::security::pki::{Ca, Validity};
use fedflow_proto::v1::EnrolRequest;
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_tests::bin::{cargo_bin, output};
use fedflow_tests::{Pki, TestCoordinator};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const RUN: &str = "[run]\nname = \"rollover\"\nseed = 5\nrounds = 1\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\n\
    [sampling]\nmin_selected = 2\nmin_available = 2\n";

/// Whether the coordinator at `c` serves a site presenting the certificate in `identity`
/// and trusting the CAs in `trust` (PEM): the handshake and an `Enrol` call both succeed.
async fn served(c: &TestCoordinator, trust: &[u8], identity: &Path) -> bool {
    let read = |f: &str| std::fs::read(identity.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trust))
        .identity(Identity::from_pem(read("cert.pem"), read("key.pem")));
    let Ok(channel) = Endpoint::from_shared(format!("https://{}", c.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    FederationClient::new(channel)
        .enrol(EnrolRequest {
            vocab_sha256: c.vocab_sha256.clone(),
            ..Default::default()
        })
        .await
        .is_ok()
}

fn trust(dir: &Path, add: &Path) {
    let (ok, out) = output(
        Command::new(cargo_bin("fedflow-coordinator", "fedflow-coordinator"))
            .args(["pki", "trust", "--dir"])
            .arg(dir)
            .arg("--add")
            .arg(add),
    );
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_federation_moves_to_a_new_ca_while_the_coordinator_serves() {
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    // The coordinator serves from a bundle directory the operator edits in place.
    let live = work.path().join("tls");
    std::fs::create_dir(&live).unwrap();
    for f in ["cert.pem", "key.pem", "ca.pem"] {
        std::fs::copy(pki.bundle("coordinator").join(f), live.join(f)).unwrap();
    }
    let c = TestCoordinator::builder(RUN)
        .mutual_tls(live.clone())
        .spawn()
        .await;
    let old_dir = pki.root().join("ca");
    let new_dir = work.path().join("new-ca");
    let days = Validity::days(30);
    Ca::init(&new_dir, days).unwrap();
    let old_ca = std::fs::read(old_dir.join("ca.pem")).unwrap();
    let new_ca = std::fs::read(new_dir.join("ca.pem")).unwrap();
    let site_a = pki.bundle("site-a");
    assert!(served(&c, &old_ca, &site_a).await);

    // 1. Each CA trusts the other; a CA certificate only, once.
    trust(&new_dir, &old_dir.join("ca.pem"));
    trust(&old_dir, &new_dir.join("ca.pem"));
    let (ok, out) = output(
        Command::new(cargo_bin("fedflow-coordinator", "fedflow-coordinator"))
            .args(["pki", "trust", "--dir"])
            .arg(&old_dir)
            .arg("--add")
            .arg(site_a.join("cert.pem")),
    );
    assert!(!ok && out.contains("is not a CA certificate"), "{out}");
    trust(&old_dir, &new_dir.join("ca.pem"));
    let both = Ca::load(&old_dir).unwrap().trust_pem().unwrap();
    assert_eq!(both.matches("BEGIN CERTIFICATE").count(), 2, "{both}");

    // A site certified by the new CA is refused while the coordinator trusts the old only.
    let new = Ca::load(&new_dir).unwrap();
    let site_b = work.path().join("site-b");
    new.issue(Role::Site, "site-b", days, &site_b).unwrap();
    let b_trust = std::fs::read(site_b.join("ca.pem")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&b_trust)
            .matches("BEGIN CERTIFICATE")
            .count(),
        2,
        "bundles of the new CA trust both"
    );
    assert!(!served(&c, &b_trust, &site_b).await);

    // 2. The coordinator trusts both (its ca.pem, reloaded): old and new sites are served.
    std::fs::write(live.join("ca.pem"), &both).unwrap();
    c.handle.reload().await.unwrap();
    assert!(served(&c, &old_ca, &site_a).await);
    assert!(served(&c, &b_trust, &site_b).await);

    // 3. Its server certificate moves to the new CA. A site still trusting the old CA alone
    // cannot verify it (which is why sites get the two-CA ca.pem first); with it, it can.
    let server = work.path().join("server");
    new.issue_server(&["127.0.0.1".into()], days, &server)
        .unwrap();
    for f in ["cert.pem", "key.pem", "ca.pem"] {
        std::fs::copy(server.join(f), live.join(f)).unwrap();
    }
    c.handle.reload().await.unwrap();
    assert!(!served(&c, &old_ca, &site_a).await);
    assert!(served(&c, both.as_bytes(), &site_a).await);
    assert!(served(&c, &b_trust, &site_b).await);

    // 4. site-a moves to a certificate from the new CA.
    let site_a2 = work.path().join("site-a");
    new.issue(Role::Site, "site-a", days, &site_a2).unwrap();
    assert!(served(&c, both.as_bytes(), &site_a2).await);

    // 5. The old CA is dropped: its certificates are refused, the new ones served.
    std::fs::write(live.join("ca.pem"), &new_ca).unwrap();
    c.handle.reload().await.unwrap();
    assert!(!served(&c, both.as_bytes(), &site_a).await);
    assert!(served(&c, &new_ca, &site_a2).await);
    assert!(served(&c, &new_ca, &site_b).await);
}
