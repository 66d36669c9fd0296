//! Online enrolment with one-time tokens, with the real `fedflow-ctl` and `fedflow-client`
//! against a coordinator serving its enrolment port: an admin issues a token for one site;
//! the site redeems it once with a request for its own key and gets a bundle the main port
//! accepts. A token for site A does not enrol site B (and stays usable for A), a used or
//! expired token is refused, a viewer cannot issue one, the enrolment port serves nothing
//! else, the site's key exists nowhere on the coordinator's side, and the audit log tells
//! the whole story without ever holding a token.

use std::path::Path;
use std::process::Command;

use fedflow_coordinator::security::pki::Ca;
use fedflow_coordinator::service::enrolment::{EnrolmentService, serve_enrolment};
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_tests::bin::{cargo_bin, output};
use fedflow_tests::site::enrol;
use fedflow_tests::{Pki, TestCoordinator};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const RUN: &str = "[run]\nname = \"online\"\nseed = 5\nrounds = 1\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\n\
    [sampling]\nmin_selected = 2\nmin_available = 2\n";

/// `fedflow-ctl enrol-token` as `who`: the token on success, else the output.
fn issue(
    pki: &Pki,
    c: &TestCoordinator,
    who: &str,
    site: &str,
    ttl: u64,
) -> Result<String, String> {
    let out = Command::new(cargo_bin("fedflow-coordinator", "fedflow-ctl"))
        .arg("--coordinator")
        .arg(format!("https://{}", c.addr))
        .arg("--identity")
        .arg(pki.bundle(who))
        .args(["enrol-token", "--site", site, "--reason", "onboarding"])
        .arg("--ttl-secs")
        .arg(ttl.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_enrols_online_once_with_a_token_bound_to_its_name() {
    let pki = Pki::new();
    let c = TestCoordinator::builder(RUN)
        .mutual_tls(pki.bundle("coordinator"))
        .spawn()
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap();
    let ca = Ca::load(&pki.root().join("ca")).unwrap();
    let service = EnrolmentService::new(c.handle.clone(), ca, 30);
    tokio::spawn(serve_enrolment(listener, service, std::future::pending()));

    // Only admins issue tokens.
    let err = issue(&pki, &c, "val", "site-n", 600).unwrap_err();
    assert!(err.contains("admin role"), "{err}");
    let token = issue(&pki, &c, "ada", "site-n", 600).unwrap();
    assert!(
        token.starts_with("fedflow-enrol-") && token.len() == 78,
        "{token}"
    );

    let site = tempfile::tempdir().unwrap();
    let token_file = site.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let client = cargo_bin("fedflow-client", "fedflow-client");
    let redeem = |name: &str, token_file: &Path, dir: &Path| {
        output(
            Command::new(&client)
                .arg("enrol")
                .arg("--coordinator")
                .arg(format!("https://{port}"))
                .arg("--ca")
                .arg(pki.bundle("ca").join("ca.pem"))
                .args(["--name", name])
                .arg("--token-file")
                .arg(token_file)
                .arg("--dir")
                .arg(dir),
        )
    };

    // A token for site-n does not enrol site-m, and is still good for site-n after.
    let m = site.path().join("site-m");
    let (ok, out) = redeem("site-m", &token_file, &m);
    assert!(
        !ok && out.contains("enrols site \"site-n\"") && out.contains("\"site-m\""),
        "{out}"
    );
    assert!(!m.join("cert.pem").exists());

    // A server the hand-over CA did not sign is not trusted with the token.
    let n = site.path().join("site-n");
    let (ok, out) = output(
        Command::new(&client)
            .arg("enrol")
            .arg("--coordinator")
            .arg(format!("https://{port}"))
            .arg("--ca")
            .arg(pki.bundle("other-ca").join("ca.pem"))
            .args(["--name", "site-n"])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--dir")
            .arg(&n),
    );
    assert!(
        !ok && out.contains("cannot reach the enrolment port"),
        "{out}"
    );

    // site-n redeems it (reusing the key and request the failed attempt made).
    let key = std::fs::read(n.join("key.pem")).unwrap();
    let (ok, out) = redeem("site-n", &token_file, &n);
    assert!(ok && out.contains("enrolled site-n"), "{out}");
    assert_eq!(std::fs::read(n.join("key.pem")).unwrap(), key);

    // Once only: the same token again (for a fresh directory) is refused.
    let again = site.path().join("again");
    let (ok, out) = redeem("site-n", &token_file, &again);
    assert!(!ok && out.contains("used already"), "{out}");

    // An expired token is refused: wait out its one second on the clock it is checked by.
    let short = issue(&pki, &c, "ada", "site-x", 1).unwrap();
    let short_file = site.path().join("short");
    std::fs::write(&short_file, &short).unwrap();
    let issued_at = fedflow_common::clock::now_ms();
    while fedflow_common::clock::now_ms() < issued_at + 1_100 {
        std::thread::yield_now();
    }
    let (ok, out) = redeem("site-x", &short_file, &site.path().join("site-x"));
    assert!(!ok && out.contains("expired"), "{out}");
    // A made-up token is not one.
    std::fs::write(&short_file, format!("fedflow-enrol-{}", "0".repeat(64))).unwrap();
    let (ok, out) = redeem("site-x", &short_file, &site.path().join("site-x"));
    assert!(
        !ok && out.contains("not an enrolment token this coordinator issued"),
        "{out}"
    );

    // The bundle made online is accepted on the main port, as site-n.
    let read = |f: &str| std::fs::read(n.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(read("cert.pem"), read("key.pem")));
    let channel = Endpoint::from_shared(format!("https://{}", c.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    enrol(&mut FederationClient::new(channel), "site-n").await;

    // The enrolment port serves nothing but enrolment, even to a certified site.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(read("cert.pem"), read("key.pem")));
    let channel = Endpoint::from_shared(format!("https://{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = FederationClient::new(channel)
        .enrol(fedflow_proto::v1::EnrolRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");

    // The site's key is in no file on the coordinator's side.
    fedflow_tests::files::assert_nowhere(&[pki.root(), c.dir()], &key, "the site's key");
    // The audit log records issue, redemption and refusals, and never a token.
    let log = std::fs::read_to_string(c.data.join("security-audit.jsonl")).unwrap();
    let events = |name: &str| log.matches(&format!("\"event\":\"{name}\"")).count();
    assert_eq!(events("enrolment_token_issued"), 2, "{log}");
    assert_eq!(events("enrolment_token_redeemed"), 1, "{log}");
    assert_eq!(events("enrolment_refused"), 4, "{log}");
    assert!(
        !log.contains(&token) && !log.contains(&short),
        "a token in the log"
    );
    // The CA's own log says the certificate was issued online, for site-n's key.
    let issued = std::fs::read_to_string(pki.root().join("ca").join("issued.jsonl")).unwrap();
    assert!(issued.contains("online enrolment"), "{issued}");
}
