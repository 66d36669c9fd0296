//! Security over real mutual TLS on loopback: who may connect, who may call what, and that
//! refused callers and bad updates leave no trace — the committed model is bit for bit the
//! one a run without them commits. The security audit log records it all and verifies; an
//! edited line breaks verification at that line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use fedflow_common::hash::sha256_hex;
use fedflow_common::model::AttentionFlowModel;
use fedflow_common::params::ParamSet;
use fedflow_coordinator::config::RunConfig;
use fedflow_coordinator::round::RoundEngine;
use fedflow_coordinator::security::audit_log;
use fedflow_coordinator::security::pki::{Ca, Validity};
use fedflow_coordinator::security::{Role, SECURITY_LOG, Transport};
use fedflow_coordinator::service::{Coordinator, serve};
use fedflow_coordinator::store::Store;
use fedflow_proto::transfer::{MAX_MESSAGE_BYTES, update_chunks};
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_proto::v1::{
    DownloadModelRequest, EnrolRequest, GetStatusRequest, ListRoundsRequest, ListSitesRequest,
    Metrics, NextTaskRequest, RevokeRequest, RunActionRequest, Task, UpdateHeader,
    next_task_response,
};
use prost::bytes::Bytes;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A PKI with everything the tests need.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(&dir.path().join("ca"), Validity::days(30)).unwrap();
        ca.issue_server(
            &["127.0.0.1".into()],
            Validity::days(30),
            &dir.path().join("coordinator"),
        )
        .unwrap();
        for (role, name) in [
            (Role::Site, "site-a"),
            (Role::Site, "site-b"),
            (Role::Site, "site-c"),
            (Role::Viewer, "val"),
            (Role::Admin, "ada"),
        ] {
            ca.issue(role, name, Validity::days(30), &dir.path().join(name))
                .unwrap();
        }
        let now = time::OffsetDateTime::now_utc();
        let expired = Validity {
            not_before: now - time::Duration::days(10),
            not_after: now - time::Duration::days(1),
        };
        ca.issue(Role::Site, "site-a", expired, &dir.path().join("expired"))
            .unwrap();
        let other = Ca::init(&dir.path().join("other-ca"), Validity::days(30)).unwrap();
        other
            .issue(
                Role::Site,
                "site-a",
                Validity::days(30),
                &dir.path().join("stranger"),
            )
            .unwrap();
        other
            .issue_server(
                &["127.0.0.1".into()],
                Validity::days(30),
                &dir.path().join("impostor"),
            )
            .unwrap();
        Pki { dir }
    }

    fn bundle(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, bundle: &str, file: &str) -> Vec<u8> {
        std::fs::read(self.bundle(bundle).join(file)).unwrap()
    }

    /// A channel presenting `identity`'s certificate (none for `None`), trusting `ca_of`'s CA.
    async fn channel(
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

    async fn site(&self, addr: SocketAddr, name: &str) -> FederationClient<Channel> {
        FederationClient::new(self.channel(addr, Some(name), name).await.unwrap())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn admin(&self, addr: SocketAddr, name: &str) -> AdminClient<Channel> {
        AdminClient::new(self.channel(addr, Some(name), name).await.unwrap())
    }
}

struct Running {
    addr: SocketAddr,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

/// Two rounds (the tests look at the first) of central site-level DP with a clip of 1 (so the coordinator checks a norm bound) and seeded
/// coordinator randomness (so two runs given the same updates commit the same model).
const RUN: &str = "[run]\nname = \"sec\"\nseed = 5\nrounds = 2\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
    [sampling]\nmin_selected = 2\nmin_available = 2\n\
    [rounds]\ndeadline_secs = 300\nheartbeat_timeout_secs = 120\n\
    [site_dp]\nmode = \"central\"\nclip_norm = 1.0\nnoise_multiplier = 0.5\nexpected_sites = 2\n\
    target_epsilon = 50.0\ntarget_delta = 1e-3\n";

async fn coordinator(transport: Transport) -> Running {
    coordinator_with(transport, "").await
}

/// [`coordinator`] with `extra` appended to its TOML.
async fn coordinator_with(transport: Transport, extra: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let vocab =
        fedflow_common::data::Vocab::from_events(["open", "search", "click", "escalate"]).unwrap();
    vocab.save(dir.path().join("vocab.json")).unwrap();
    let cfg = RunConfig::from_toml_str(&format!("{RUN}{extra}"), dir.path()).unwrap();
    let model = AttentionFlowModel::new(&cfg.model_config().unwrap(), &Device::Cpu, 1).unwrap();
    let initial = ParamSet::from_varmap(model.varmap()).unwrap();
    let data = dir.path().join("coordinator");
    let mut engine = RoundEngine::open(Store::open(&data).unwrap(), cfg.clone(), initial).unwrap();
    engine.seed_site_dp_randomness(11);
    let coordinator = Coordinator::spawn(engine, cfg, &transport).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, coordinator, std::future::pending()));
    Running {
        addr,
        data,
        _dir: dir,
    }
}

async fn task_for(c: &mut FederationClient<Channel>) -> Task {
    c.enrol(EnrolRequest::default()).await.unwrap();
    loop {
        let r = c
            .next_task(NextTaskRequest {
                site_id: String::new(),
                wait_ms: 5_000,
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(next_task_response::Outcome::Task(t)) = r.outcome {
            return t;
        }
    }
}

async fn download(c: &mut FederationClient<Channel>, t: &Task) -> ParamSet {
    let sha = t.model.as_ref().unwrap().sha256.clone();
    let mut stream = c
        .download_model(DownloadModelRequest {
            task_id: t.task_id.clone(),
            run_id: t.run_id.clone(),
            round: t.round,
            sha256: sha.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        bytes.extend_from_slice(&chunk.data);
    }
    assert_eq!(sha256_hex(&bytes), sha);
    ParamSet::from_safetensors_bytes(&bytes).unwrap()
}

fn header(t: &Task, bytes: &Bytes) -> UpdateHeader {
    UpdateHeader {
        task_id: t.task_id.clone(),
        run_id: t.run_id.clone(),
        round: t.round,
        nonce: t.nonce.clone(),
        base_model_sha256: t.model.as_ref().unwrap().sha256.clone(),
        delta_sha256: sha256_hex(bytes),
        total_bytes: bytes.len() as u64,
        weight: 1.0,
        metrics: Some(Metrics {
            train_examples: 10,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn upload_bytes(
    c: &mut FederationClient<Channel>,
    h: UpdateHeader,
    bytes: Bytes,
) -> Result<bool, tonic::Status> {
    c.upload_update(tokio_stream::iter(update_chunks(h, &bytes, 4096)))
        .await
        .map(|r| r.into_inner().duplicate)
}

async fn upload(
    c: &mut FederationClient<Channel>,
    t: &Task,
    delta: &ParamSet,
) -> Result<bool, tonic::Status> {
    let bytes = Bytes::from(delta.to_safetensors_bytes().unwrap());
    upload_bytes(c, header(t, &bytes), bytes).await
}

/// A delta of norm `norm` in the direction of the model itself.
fn delta_of_norm(global: &ParamSet, norm: f64) -> ParamSet {
    global
        .scale((norm / global.l2_norm().unwrap()) as f32)
        .unwrap()
}

/// Waits (polling the admin service, bounded) until round 1 is committed; its model hash.
async fn committed_model(admin: &mut AdminClient<Channel>) -> String {
    for _ in 0..600 {
        let rounds = admin
            .list_rounds(ListRoundsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .rounds;
        if let Some(r) = rounds
            .iter()
            .find(|r| r.round == 1 && r.status == "committed")
        {
            return r.model_sha256.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("round 1 was never committed");
}

/// The audit log's events (verifying the chain on the way).
fn audit_events(data: &Path) -> Vec<serde_json::Value> {
    let path = data.join(SECURITY_LOG);
    audit_log::verify(&path)
        .unwrap()
        .expect("the audit log verifies");
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits (bounded) until the audit log holds an event `event` whose reason contains `text`
/// (handshake refusals are recorded by the accept loop, concurrently with the client's error).
async fn wait_for_audit(data: &Path, event: &str, text: &str) {
    for _ in 0..200 {
        if audit_events(data).iter().any(|e| {
            e["event"] == event
                && e["detail"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(text))
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no {event} event mentioning {text:?} in the audit log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_bad_callers_and_bad_updates_without_a_trace() {
    let pki = Pki::new();
    let c = coordinator(Transport::MutualTls(pki.bundle("coordinator"))).await;

    // Connections the handshake refuses: no certificate, another CA's, an expired one.
    // Each fails for the caller and is recorded with its reason.
    for (who, reason) in [
        (None, "presented no certificate"),
        (Some("stranger"), "not issued by this federation's CA"),
        (Some("expired"), "expired"),
    ] {
        let refused = match pki.channel(c.addr, who, "site-a").await {
            Err(_) => true,
            Ok(ch) => FederationClient::new(ch)
                .enrol(EnrolRequest::default())
                .await
                .is_err(),
        };
        assert!(refused, "{who:?} was let in");
        wait_for_audit(&c.data, "connection_refused", reason).await;
    }
    // The other side: a site refuses a coordinator whose certificate is not from its CA,
    // with an error that says so (and does not retry forever).
    let mut opts =
        fedflow_client::federation::SiteOptions::new(format!("https://{}", c.addr), "site-a");
    opts.tls = Some(fedflow_client::tls::Bundle::load(&pki.bundle("stranger")).unwrap());
    let err = fedflow_client::federation::run_site(
        opts,
        std::sync::Arc::new(fedflow_client::noop::NoopTrainer::new(10)),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    // And a site's own expired certificate is caught before it connects.
    let err = fedflow_client::tls::Bundle::load(&pki.bundle("expired")).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");

    // Site A cannot speak as site B; a site cannot use the admin service; a viewer can
    // look but not pause; revoked identities are refused at their next call.
    let mut a = pki.site(c.addr, "site-a").await;
    let s = a
        .enrol(EnrolRequest {
            site_id: "site-b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("certificate is for site site-a"),
        "{}",
        s.message()
    );
    let s = AdminClient::new(pki.channel(c.addr, Some("site-a"), "site-a").await.unwrap())
        .get_status(GetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let mut viewer = pki.admin(c.addr, "val").await;
    viewer.get_status(GetStatusRequest {}).await.unwrap();
    let s = viewer
        .pause_run(RunActionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("admin role"), "{}", s.message());
    let mut admin = pki.admin(c.addr, "ada").await;
    admin
        .revoke(RevokeRequest {
            role: "site".into(),
            name: "site-c".into(),
            reason: "left the federation".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let s = pki
        .site(c.addr, "site-c")
        .await
        .enrol(EnrolRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("revoked"), "{}", s.message());

    // The round: two sites, both selected.
    let mut b = pki.site(c.addr, "site-b").await;
    let (ta, tb) = tokio::join!(task_for(&mut a), task_for(&mut b));
    let global = download(&mut a, &ta).await;
    let good_a = delta_of_norm(&global, 0.5);
    let good_b = delta_of_norm(&global, -0.25);

    // Bad updates from site A, each refused with its own status.
    let bytes = Bytes::from(good_a.to_safetensors_bytes().unwrap());
    let mut big = bytes.to_vec();
    big.extend_from_slice(&[0u8; 4096]);
    let big = Bytes::from(big);
    let s = upload_bytes(&mut a, header(&ta, &big), big.clone())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "oversized: {s:?}");
    let mut tensors = good_a.clone().into_tensors();
    tensors.insert(
        "head.bias".into(),
        Tensor::new(&[f32::NAN, 0.0, 0.0, 0.0, 0.0], &Device::Cpu).unwrap(),
    );
    let s = upload(&mut a, &ta, &ParamSet::from_tensors(tensors).unwrap())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "NaN: {s:?}");
    let s = upload(&mut a, &ta, &delta_of_norm(&global, 3.0))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "norm: {s:?}");
    assert!(s.message().contains("norm"), "{}", s.message());
    // Site A cannot upload into site B's task, nor claim to be B in the header.
    let s = upload(&mut a, &tb, &good_a).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let mut h = header(&ta, &bytes);
    h.site_id = "site-b".into();
    let s = upload_bytes(&mut a, h, bytes.clone()).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // The good update, replayed: accepted once.
    assert!(!upload(&mut a, &ta, &good_a).await.unwrap());
    assert!(
        upload(&mut a, &ta, &good_a).await.unwrap(),
        "a resend is a duplicate"
    );
    upload(&mut b, &tb, &good_b).await.unwrap();
    let with_attacks = committed_model(&mut admin).await;

    // The same two updates on a coordinator that never saw a bad call commit the same model.
    let clean = coordinator(Transport::MutualTls(pki.bundle("coordinator"))).await;
    let (mut a2, mut b2) = (
        pki.site(clean.addr, "site-a").await,
        pki.site(clean.addr, "site-b").await,
    );
    let (ta2, tb2) = tokio::join!(task_for(&mut a2), task_for(&mut b2));
    upload(&mut a2, &ta2, &good_a).await.unwrap();
    upload(&mut b2, &tb2, &good_b).await.unwrap();
    let mut admin2 = pki.admin(clean.addr, "ada").await;
    assert_eq!(committed_model(&mut admin2).await, with_attacks);
    let rounds = admin
        .list_rounds(ListRoundsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rounds;
    let r1 = rounds.iter().find(|r| r.round == 1).unwrap();
    assert_eq!(r1.uploaded, 2);

    // Everything above is in the audit log, whose chain verifies.
    let events = audit_events(&c.data);
    let count = |name: &str| events.iter().filter(|e| e["event"] == name).count();
    assert!(count("connection_refused") >= 3);
    assert!(count("call_refused") >= 5, "{}", count("call_refused"));
    assert!(
        count("update_rejected") >= 4,
        "{}",
        count("update_rejected")
    );
    assert_eq!(count("revoked"), 1);
    assert_eq!(
        count("admin_action"),
        0,
        "the viewer's pause was refused, not acted on"
    );
    assert!(count("site_enrolled") >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_revocation_in_flight_and_admin_actions() {
    let pki = Pki::new();
    let c = coordinator(Transport::MutualTls(pki.bundle("coordinator"))).await;
    let mut admin = pki.admin(c.addr, "ada").await;

    // Site A rotates: a new certificate for the same identity, then the old one is revoked.
    let ca = Ca::load(&pki.bundle("ca")).unwrap();
    let rotated = ca
        .issue(
            Role::Site,
            "site-a",
            Validity::days(30),
            &pki.bundle("site-a-2"),
        )
        .unwrap();
    let old = pki.site(c.addr, "site-a").await;
    let mut old = old;
    old.enrol(EnrolRequest::default()).await.unwrap();
    let old_serial = {
        let pem = pki.read("site-a", "cert.pem");
        let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        fedflow_common::hash::hex(p.parse_x509().unwrap().raw_serial())
    };
    assert_ne!(old_serial, rotated.serial);
    admin
        .revoke(RevokeRequest {
            serial: old_serial.clone(),
            reason: "rotated".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let s = old.enrol(EnrolRequest::default()).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(
        s.message().contains("certificate has been revoked"),
        "{}",
        s.message()
    );

    // The new certificate is the same site: it trains and its history is one site's.
    let mut a = pki.site(c.addr, "site-a-2").await;
    let mut b = pki.site(c.addr, "site-b").await;
    let (ta, tb) = tokio::join!(task_for(&mut a), task_for(&mut b));
    let global = download(&mut a, &ta).await;
    upload(&mut a, &ta, &delta_of_norm(&global, 0.5))
        .await
        .unwrap();

    // Site B is revoked while its update is arriving: the update is discarded.
    let delta = delta_of_norm(&global, 0.5);
    let bytes = Bytes::from(delta.to_safetensors_bytes().unwrap());
    let mut chunks = update_chunks(header(&tb, &bytes), &bytes, 4096).into_iter();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(chunks.next().unwrap()).await.unwrap();
    let sending = tokio::spawn(async move {
        b.upload_update(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    admin
        .revoke(RevokeRequest {
            role: "site".into(),
            name: "site-b".into(),
            reason: "compromised".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    for chunk in chunks {
        tx.send(chunk).await.unwrap();
    }
    drop(tx);
    let s = sending.await.unwrap().unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("revoked"), "{}", s.message());

    // Pause and resume (admin), then stop: the run ends where it stands (round 1 committed).
    let p = admin
        .pause_run(RunActionRequest {
            reason: "maintenance".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.status, "paused");
    let r = admin
        .resume_run(RunActionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, "running");
    let s = admin
        .stop_run(RunActionRequest {
            reason: "done testing".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.status, "stopped");
    let rounds = admin
        .list_rounds(ListRoundsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rounds;
    // Revoking site B withdrew its task, so round 1 closed with site A's update alone; the
    // next round waits for a second site, and the stop ends the run there.
    let r1 = rounds.iter().find(|r| r.round == 1).unwrap();
    assert_eq!(r1.status, "committed", "{r1:?}");
    assert_eq!(
        (r1.uploaded, r1.dropped),
        (1, 1),
        "site A's update was accepted, site B's discarded and its task withdrawn"
    );
    assert!(
        rounds.iter().all(|r| r.round < 2),
        "no round 2 without a second site"
    );
    let sites = admin
        .list_sites(ListSitesRequest {})
        .await
        .unwrap()
        .into_inner()
        .sites;
    let names: Vec<&str> = sites.iter().map(|s| s.site_id.as_str()).collect();
    assert_eq!(
        names,
        ["site-a", "site-b"],
        "the rotated certificate is the same site"
    );

    // The audit log verifies; editing one line breaks it at that line.
    let events = audit_events(&c.data);
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"] == "admin_action")
            .count(),
        3
    );
    assert_eq!(events.iter().filter(|e| e["event"] == "revoked").count(), 2);
    let text = std::fs::read_to_string(c.data.join(SECURITY_LOG)).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let n = lines.len() / 2;
    lines[n] = lines[n].replacen("\"event\":\"", "\"event\":\"x", 1);
    let tampered = c.data.join("tampered.jsonl");
    std::fs::write(&tampered, lines.join("\n") + "\n").unwrap();
    let broken = audit_log::verify(&tampered).unwrap().unwrap_err();
    assert_eq!(broken.line, n + 1, "{broken}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_limit_is_refused_and_others_are_served() {
    let pki = Pki::new();
    let c = coordinator_with(
        Transport::MutualTls(pki.bundle("coordinator")),
        "[limits]\nrequests_per_second = 0.001\nrequest_burst = 2\n",
    )
    .await;
    let mut viewer = pki.admin(c.addr, "val").await;
    viewer.get_status(GetStatusRequest {}).await.unwrap();
    viewer.get_status(GetStatusRequest {}).await.unwrap();
    let s = viewer.get_status(GetStatusRequest {}).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().contains("requests_per_second"),
        "{}",
        s.message()
    );
    // Another caller has its own allowance.
    let mut admin = pki.admin(c.addr, "ada").await;
    admin.get_status(GetStatusRequest {}).await.unwrap();
    let events = audit_events(&c.data);
    assert!(events.iter().any(|e| e["event"] == "call_refused"
        && e["detail"]["caller"] == "viewer:val"
        && e["detail"]["code"] == "ResourceExhausted"));
}
