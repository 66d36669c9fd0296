//! Enrolment that keeps a site's private key at the site, with the real binaries: the site
//! makes its key and request (`fedflow-client enrol-request`), the operator signs the request
//! (`fedflow-coordinator pki sign`); the signed certificate beside the site's own key is a
//! bundle the coordinator accepts under mutual TLS, and the key exists nowhere on the
//! operator's side. A request signed under another name, or altered, is refused. The
//! hand-over package a new site receives holds what it needs and the run's terms.

use std::path::Path;
use std::process::Command;

use fedflow_proto::v1::ListSitesRequest;
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_tests::bin::{cargo_bin, output};
use fedflow_tests::site::enrol;
use fedflow_tests::{Pki, TestCoordinator};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const RUN: &str = "[run]\nname = \"enrol\"\nseed = 5\nrounds = 1\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\n\
    [sampling]\nmin_selected = 2\nmin_available = 2\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_enrols_with_a_certificate_signed_for_its_own_key() {
    let pki = Pki::new();
    let c = TestCoordinator::builder(RUN)
        .mutual_tls(pki.bundle("coordinator"))
        .spawn()
        .await;
    let client = cargo_bin("fedflow-client", "fedflow-client");
    let coordinator = cargo_bin("fedflow-coordinator", "fedflow-coordinator");
    let site_dir = tempfile::tempdir().unwrap();
    let bundle = site_dir.path().join("site-n");

    // At the site: the key and the request.
    let (ok, out) = output(
        Command::new(&client)
            .args(["enrol-request", "--name", "site-n", "--out"])
            .arg(&bundle),
    );
    assert!(ok, "{out}");
    let key = std::fs::read(bundle.join("key.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(bundle.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A second request in the same place would orphan the first key: refused.
    let (ok, out) = output(
        Command::new(&client)
            .args(["enrol-request", "--name", "site-n", "--out"])
            .arg(&bundle),
    );
    assert!(!ok && out.contains("holds a key already"), "{out}");

    // At the operator: only the request travels. Under another name, or altered, it is
    // refused, and nothing is written.
    let request = std::fs::read_to_string(bundle.join("request.pem")).unwrap();
    let operator = tempfile::tempdir().unwrap();
    let incoming = operator.path().join("request.pem");
    std::fs::write(&incoming, &request).unwrap();
    let sign = |name: &str, request: &Path, out: &Path| {
        output(
            Command::new(&coordinator)
                .args(["pki", "sign", "--role", "site", "--name", name, "--dir"])
                .arg(pki.root().join("ca"))
                .arg("--request")
                .arg(request)
                .arg("--out")
                .arg(out),
        )
    };
    let signed = operator.path().join("signed");
    let (ok, out) = sign("site-m", &incoming, &signed);
    assert!(
        !ok && out.contains("the request is for \"site-n\""),
        "{out}"
    );
    assert!(!signed.exists());
    let mut body: Vec<char> = request.chars().collect();
    let at = request.find("-----END").unwrap() - 10;
    body[at] = if body[at] == 'A' { 'B' } else { 'A' };
    let altered = operator.path().join("altered.pem");
    std::fs::write(&altered, body.iter().collect::<String>()).unwrap();
    let (ok, out) = sign("site-n", &altered, &signed);
    assert!(
        !ok && out.contains("not a valid certificate request"),
        "{out}"
    );
    let (ok, out) = sign("site-n", &incoming, &signed);
    assert!(ok, "{out}");
    let mut written: Vec<String> = fedflow_tests::files::all(&signed)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        ["ca.pem", "cert.pem"],
        "no key on the operator's side"
    );
    // Back at the site: cert.pem and ca.pem beside the key make the bundle.
    for f in ["cert.pem", "ca.pem"] {
        std::fs::copy(signed.join(f), bundle.join(f)).unwrap();
    }
    let read = |f: &str| std::fs::read(bundle.join(f)).unwrap();
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
    let mut site = FederationClient::new(channel);
    // (A refusal panics, naming the status.)
    enrol(&mut site, "").await;
    let mut admin = AdminClient::new(pki.channel(c.addr, Some("ada"), "ada").await.unwrap());
    let sites = admin
        .list_sites(ListSitesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sites;
    assert!(
        sites.iter().any(|s| s.site_id == "site-n"),
        "the coordinator knows the site by its signed certificate: {sites:?}"
    );
    // After all that, the site's key is in no file the operator has (the CA directory, its
    // log, the signed bundle, the request), nor in the coordinator's data directory.
    fedflow_tests::files::assert_nowhere(
        &[pki.root(), operator.path(), c.data.as_path()],
        &key,
        "the site's key",
    );
}

#[test]
fn the_hand_over_package_holds_what_a_site_needs_and_the_terms_in_figures_the_ledger_uses() {
    use fedflow_client::agent::config::AgentConfig;
    use fedflow_coordinator::config::RunConfig;
    let dir = tempfile::tempdir().unwrap();
    fedflow_common::data::Vocab::from_events(["open", "search"])
        .unwrap()
        .save(dir.path().join("vocab.json"))
        .unwrap();
    let run = dir.path().join("run.toml");
    std::fs::write(
        &run,
        "[run]\nname = \"terms\"\nrounds = 10\n[model]\nvocab = \"vocab.json\"\n\
         [record_dp]\nclip_norm = 1.0\nnoise_multiplier = 1.1\nexpected_batch_size = 32\n\
         target_epsilon = 8.0\ntarget_delta = 1e-5\n",
    )
    .unwrap();
    let pki = Pki::new();
    let out = dir.path().join("package");
    let (ok, text) = output(
        Command::new(cargo_bin("fedflow-coordinator", "fedflow-coordinator"))
            .args(["handover", "--address", "https://coordinator.example:50051"])
            .arg("--config")
            .arg(&run)
            .arg("--ca")
            .arg(pki.bundle("ca").join("ca.pem"))
            .arg("--out")
            .arg(&out),
    );
    assert!(ok, "{text}");
    assert_eq!(
        std::fs::read(out.join("ca.pem")).unwrap(),
        std::fs::read(pki.bundle("ca").join("ca.pem")).unwrap()
    );
    let cfg = RunConfig::load(&run).unwrap();
    assert_eq!(
        fedflow_common::data::Vocab::load(out.join("vocab.json")).unwrap(),
        fedflow_common::data::Vocab::load(&cfg.model.vocab).unwrap()
    );
    let site = AgentConfig::parse(
        &std::fs::read_to_string(out.join("site.toml")).unwrap(),
        &out,
    )
    .unwrap();
    assert_eq!(site.coordinator.url, "https://coordinator.example:50051");
    assert_eq!(site.privacy.unwrap().max_epsilon, 8.0);
    // The terms state the mechanism and what it costs, in the ledger's own figures.
    let terms = std::fs::read_to_string(out.join("TERMS.md")).unwrap();
    let dp = cfg.record_dp.as_ref().unwrap();
    for n in [500usize, 2_000, 10_000] {
        let eps = dp.site_epsilon(n, cfg.train.epochs, 10).unwrap();
        assert!(
            terms.contains(&format!("| {n} | {eps:.3} |")),
            "{n}: {terms}"
        );
    }
    assert!(terms.contains("clipped to L2 norm 1") && terms.contains("epsilon 8 at delta 1e-5"));
    assert!(terms.contains("**Site level: none.**"), "{terms}");
    // Only https addresses: sites join over mutual TLS.
    let (ok, text) = output(
        Command::new(cargo_bin("fedflow-coordinator", "fedflow-coordinator"))
            .args(["handover", "--address", "http://coordinator.example:50051"])
            .arg("--config")
            .arg(&run)
            .arg("--ca")
            .arg(pki.bundle("ca").join("ca.pem"))
            .arg("--out")
            .arg(dir.path().join("other")),
    );
    assert!(!ok && text.contains("https://"), "{text}");
}
