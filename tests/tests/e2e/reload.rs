//! SIGHUP to the real `fedflow-coordinator serve`: a new server certificate put into its
//! bundle serves the next connections, while a connection made before and the run go on;
//! an unusable bundle is refused, the previous certificate still serves, and both outcomes
//! are in the security audit log; the certificate's expiry is a metric, and so is the
//! soonest expiry of the sites' certificates, each of which the site list shows.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use fedflow_coordinator::security::pki::{Ca, Validity};
use fedflow_proto::v1::GetStatusRequest;
use fedflow_tests::Pki;
use fedflow_tests::bin::cargo_bin;
use fedflow_tests::http::{request, tls_client};

/// The serial of the certificate the server at `addr` presents, as fedflow prints serials.
async fn served_serial(pki: &Pki, addr: SocketAddr) -> String {
    let site = pki.bundle("site-a");
    let client = tls_client(
        &site.join("ca.pem"),
        Some((&site.join("cert.pem"), &site.join("key.pem"))),
    );
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = client
        .connect(
            rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&cert).unwrap();
    fedflow_common::hash::hex(parsed.raw_serial())
}

fn copy_bundle(from: &Path, to: &Path) {
    for f in ["cert.pem", "key.pem", "ca.pem"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Waits (bounded) until the server presents `serial`.
async fn until_serving(pki: &Pki, addr: SocketAddr, serial: &str) -> bool {
    for _ in 0..100 {
        if served_serial(pki, addr).await == serial {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_new_certificate_without_dropping_the_run_and_refuses_a_bad_one() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("tls");
    std::fs::create_dir(&live).unwrap();
    copy_bundle(&pki.bundle("coordinator"), &live);
    fedflow_common::data::Vocab::from_events(["open", "search"])
        .unwrap()
        .save(dir.path().join("vocab.json"))
        .unwrap();
    std::fs::write(
        dir.path().join("run.toml"),
        "[run]\nname = \"reload\"\nrounds = 1\n[model]\nvocab = \"vocab.json\"\nembed_dim = 8\n\
         hidden_size = 8\nnum_layers = 1\n[sampling]\nmin_selected = 2\nmin_available = 2\n",
    )
    .unwrap();
    let mut child = Command::new(cargo_bin("fedflow-coordinator", "fedflow-coordinator"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(dir.path().join("run.toml"))
        .arg("--data")
        .arg(dir.path().join("data"))
        .arg("--tls")
        .arg(&live)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr: SocketAddr = first
        .split("serving on ")
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let metrics_line = lines.next().unwrap().unwrap();
    let metrics: SocketAddr = metrics_line
        .split("http://")
        .nth(1)
        .unwrap()
        .trim_end_matches("/metrics")
        .parse()
        .unwrap();
    std::thread::spawn(move || for _ in lines {});
    let hup = |pid: u32| {
        let ok = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };

    let old = served_serial(&pki, addr).await;
    // A connection made before the reload, used after it.
    let mut admin = pki.admin(addr, "ada").await;
    let before = admin
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();

    // A new certificate for the same names, copied into the bundle; SIGHUP.
    let ca = Ca::load(&pki.root().join("ca")).unwrap();
    let fresh = dir.path().join("fresh");
    let issued = ca
        .issue_server(&["127.0.0.1".into()], Validity::days(10), &fresh)
        .unwrap();
    assert_ne!(issued.serial, old);
    copy_bundle(&fresh, &live);
    hup(child.id());
    assert!(
        until_serving(&pki, addr, &issued.serial).await,
        "the new certificate never served"
    );
    let after = admin
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.run_id, before.run_id, "the same run goes on");
    // Its expiry: 10 days, within the warning period.
    let m = request(metrics, "GET", "/metrics", &[], b"").await.body;
    let line = m
        .lines()
        .find(|l| l.starts_with("fedflow_certificate_expiry_seconds"))
        .unwrap_or_else(|| panic!("{m}"));
    let secs: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((9.0 * 86_400.0..=10.0 * 86_400.0).contains(&secs), "{line}");

    // A half-written bundle is refused: the certificate in force stays.
    std::fs::write(
        live.join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nnot one\n",
    )
    .unwrap();
    hup(child.id());
    let log = dir.path().join("data/security-audit.jsonl");
    let mut refused = false;
    for _ in 0..100 {
        if std::fs::read_to_string(&log)
            .unwrap()
            .contains("configuration_reload_failed")
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the failed reload is not in the audit log");
    assert_eq!(served_serial(&pki, addr).await, issued.serial);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("configuration_reloaded") && text.contains(&issued.serial));
    assert!(admin.get_status(GetStatusRequest {}).await.is_ok());
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sites_certificate_expiry_is_in_the_site_list_and_the_soonest_in_the_metrics() {
    use fedflow_coordinator::security::Role;
    use fedflow_proto::v1::ListSitesRequest;
    let pki = Pki::new();
    let c = fedflow_tests::TestCoordinator::builder(
        "[run]\nname = \"certs\"\nrounds = 1\n[model]\nvocab = \"vocab.json\"\nembed_dim = 8\n\
         hidden_size = 8\nnum_layers = 1\n[sampling]\nmin_selected = 3\nmin_available = 3\n",
    )
    .mutual_tls(pki.bundle("coordinator"))
    .metrics()
    .spawn()
    .await;
    // site-a's certificate is valid for 30 days (the Pki's); site-s gets one for 5.
    let ca = Ca::load(&pki.root().join("ca")).unwrap();
    let short = pki.root().join("site-s");
    ca.issue(Role::Site, "site-s", Validity::days(5), &short)
        .unwrap();
    let read = |f: &str| std::fs::read(short.join(f)).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", c.addr))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
                .identity(tonic::transport::Identity::from_pem(
                    read("cert.pem"),
                    read("key.pem"),
                )),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut s = fedflow_proto::v1::federation_client::FederationClient::new(channel);
    fedflow_tests::site::enrol(&mut s, "").await;
    let mut a = pki.site(c.addr, "site-a").await;
    fedflow_tests::site::enrol(&mut a, "").await;
    let sites = pki
        .admin(c.addr, "ada")
        .await
        .list_sites(ListSitesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sites;
    let now = fedflow_common::clock::now_ms();
    let days_left = |site: &str| {
        let t = sites
            .iter()
            .find(|x| x.site_id == site)
            .unwrap_or_else(|| panic!("{site} not listed: {sites:?}"))
            .certificate_not_after_unix_ms;
        (t - now) as f64 / 86_400_000.0
    };
    assert!((4.9..=5.0).contains(&days_left("site-s")), "{sites:?}");
    assert!((29.9..=30.0).contains(&days_left("site-a")), "{sites:?}");
    let m = request(c.metrics_addr.unwrap(), "GET", "/metrics", &[], b"")
        .await
        .body;
    let line = m
        .lines()
        .find(|l| l.starts_with("fedflow_site_certificate_expiry_seconds_min"))
        .unwrap_or_else(|| panic!("{m}"));
    let secs: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((4.9 * 86_400.0..=5.0 * 86_400.0).contains(&secs), "{line}");
}
