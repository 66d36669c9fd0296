//! Security over real mutual TLS on loopback: who may connect, who may call what, and that
//! refused callers and bad updates leave no trace — the committed model is bit for bit the
//! one a run without them commits. The security audit log records it all and verifies; an
//! edited line breaks verification at that line.

use std::path::Path;
use std::time::Duration;

use candle_core::{Device, Tensor};
use fedflow_common::params::ParamSet;
use fedflow_coordinator::security::audit_log;
use fedflow_coordinator::security::pki::{Ca, Validity};
use fedflow_coordinator::security::{Role, SECURITY_LOG};
use fedflow_proto::transfer::update_chunks;
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::federation_client::FederationClient;
use fedflow_proto::v1::{
    EnrolRequest, GetStatusRequest, ListRoundsRequest, ListSitesRequest, RevokeRequest,
    RunActionRequest, Task,
};
use fedflow_tests::coordinator::audit_events;
use fedflow_tests::site::{download, header, task_for, upload, upload_bytes};
use fedflow_tests::{Pki, TestCoordinator};
use prost::bytes::Bytes;
use tonic::Code;
use tonic::transport::Channel;

/// Two rounds (the tests look at the first) of central site-level DP with a clip of 1 (so the coordinator checks a norm bound) and seeded
/// coordinator randomness (so two runs given the same updates commit the same model).
const RUN: &str = "[run]\nname = \"sec\"\nseed = 5\nrounds = 2\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
    [sampling]\nmin_selected = 2\nmin_available = 2\n\
    [rounds]\ndeadline_secs = 300\nheartbeat_timeout_secs = 120\n\
    [site_dp]\nmode = \"central\"\nclip_norm = 1.0\nnoise_multiplier = 0.5\nexpected_sites = 2\n\
    target_epsilon = 50.0\ntarget_delta = 1e-3\n";

/// A coordinator for [`RUN`] under mutual TLS with `pki`'s coordinator bundle.
async fn coordinator(pki: &Pki) -> TestCoordinator {
    coordinator_with(pki, "").await
}

/// [`coordinator`] with `extra` appended to its TOML.
async fn coordinator_with(pki: &Pki, extra: &str) -> TestCoordinator {
    TestCoordinator::builder(format!("{RUN}{extra}"))
        .mutual_tls(pki.bundle("coordinator"))
        .site_dp_seed(11)
        .spawn()
        .await
}

/// Uploads `delta` for task `t` (the certificate names the site); whether it was a
/// duplicate.
async fn send(
    c: &mut FederationClient<Channel>,
    t: &Task,
    delta: &ParamSet,
) -> Result<bool, tonic::Status> {
    upload(c, "", t, delta, |_| {}).await.map(|r| r.duplicate)
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

/// Waits (bounded) until the coordinator is receiving an upload: it has admitted the call
/// and spills the update to `<data>/incoming/upload-N.part` as it arrives.
async fn wait_for_upload_in_progress(data: &Path) {
    for _ in 0..400 {
        let spilling = std::fs::read_dir(data.join("incoming"))
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".part"));
        if spilling {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the coordinator never started receiving the upload");
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
    let c = coordinator(&pki).await;

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
    let (ta, tb) = tokio::join!(task_for(&mut a, ""), task_for(&mut b, ""));
    let global = download(&mut a, "", &ta).await;
    let good_a = delta_of_norm(&global, 0.5);
    let good_b = delta_of_norm(&global, -0.25);

    // Bad updates from site A, each refused with its own status.
    let bytes = Bytes::from(good_a.to_safetensors_bytes().unwrap());
    let mut big = bytes.to_vec();
    big.extend_from_slice(&[0u8; 4096]);
    let big = Bytes::from(big);
    let s = upload_bytes(&mut a, header("", &ta, &big), &big)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "oversized: {s:?}");
    let mut tensors = good_a.clone().into_tensors();
    tensors.insert(
        "head.bias".into(),
        Tensor::new(&[f32::NAN, 0.0, 0.0, 0.0, 0.0], &Device::Cpu).unwrap(),
    );
    let s = send(&mut a, &ta, &ParamSet::from_tensors(tensors).unwrap())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "NaN: {s:?}");
    let s = send(&mut a, &ta, &delta_of_norm(&global, 3.0))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "norm: {s:?}");
    assert!(s.message().contains("norm"), "{}", s.message());
    // Site A cannot upload into site B's task, nor claim to be B in the header.
    let s = send(&mut a, &tb, &good_a).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let mut h = header("", &ta, &bytes);
    h.site_id = "site-b".into();
    let s = upload_bytes(&mut a, h, &bytes).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // The good update, replayed: accepted once.
    assert!(!send(&mut a, &ta, &good_a).await.unwrap());
    assert!(
        send(&mut a, &ta, &good_a).await.unwrap(),
        "a resend is a duplicate"
    );
    send(&mut b, &tb, &good_b).await.unwrap();
    let with_attacks = committed_model(&mut admin).await;

    // The same two updates on a coordinator that never saw a bad call commit the same model.
    let clean = coordinator(&pki).await;
    let (mut a2, mut b2) = (
        pki.site(clean.addr, "site-a").await,
        pki.site(clean.addr, "site-b").await,
    );
    let (ta2, tb2) = tokio::join!(task_for(&mut a2, ""), task_for(&mut b2, ""));
    send(&mut a2, &ta2, &good_a).await.unwrap();
    send(&mut b2, &tb2, &good_b).await.unwrap();
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
    let c = coordinator(&pki).await;
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
    old.enrol(EnrolRequest {
        vocab_sha256: c.vocab_sha256.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
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
    let (ta, tb) = tokio::join!(task_for(&mut a, ""), task_for(&mut b, ""));
    let global = download(&mut a, "", &ta).await;
    send(&mut a, &ta, &delta_of_norm(&global, 0.5))
        .await
        .unwrap();

    // Site B is revoked while its update is arriving: the call was admitted, so it is the
    // engine that discards the update. The test feeds the upload stream itself: the header
    // and the first data chunk, then (once the coordinator has admitted the call and is
    // spilling the update to `incoming/`) the revocation, then the rest.
    let delta = delta_of_norm(&global, 0.5);
    let bytes = Bytes::from(delta.to_safetensors_bytes().unwrap());
    let mut chunks = update_chunks(header("", &tb, &bytes), &bytes, bytes.len() / 4).into_iter();
    assert!(chunks.len() > 2, "the update spans several data chunks");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(chunks.next().unwrap()).await.unwrap();
    let sending = tokio::spawn(async move {
        b.upload_update(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // With room for one chunk, this returns once the call has taken the header.
    tx.send(chunks.next().unwrap()).await.unwrap();
    wait_for_upload_in_progress(&c.data).await;
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
    assert!(
        s.message()
            .contains("the site's identity or certificate has been revoked"),
        "discarded by the engine, not refused at the start of the call: {}",
        s.message()
    );
    let events = audit_events(&c.data);
    let upload_events: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| {
            let names_b = |k: &str| {
                e["detail"][k]
                    .as_str()
                    .is_some_and(|v| v.contains("site-b"))
            };
            e["detail"]["method"] == "UploadUpdate" && (names_b("site") || names_b("caller"))
        })
        .collect();
    assert_eq!(upload_events.len(), 1, "{upload_events:?}");
    assert_eq!(upload_events[0]["event"], "update_rejected");
    assert_eq!(upload_events[0]["detail"]["round"], 1);
    assert!(
        upload_events[0]["detail"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("has been revoked")),
        "{}",
        upload_events[0]
    );
    // The revocation withdrew its task (recorded with the reason) before the update came in.
    let b_in_round_1 = c
        .handle
        .inspect(|engine, _| {
            let rows = engine.store().round_sites("sec", 1)?;
            Ok(rows.into_iter().find(|r| r.site_id == "site-b"))
        })
        .await
        .unwrap()
        .expect("site B was selected for round 1");
    assert_eq!(
        (b_in_round_1.state.as_str(), b_in_round_1.reason.as_deref()),
        ("dropped", Some("revoked: compromised")),
        "{b_in_round_1:?}"
    );

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
        &pki,
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
    // The refusal says when the next call would be admitted: one call per 1,000 s, capped
    // at the longest pushback a caller honours.
    assert_eq!(
        fedflow_proto::pushback::pushback(&s),
        Some(fedflow_proto::pushback::MAX_PUSHBACK),
        "{s:?}"
    );
    // Another caller has its own allowance.
    let mut admin = pki.admin(c.addr, "ada").await;
    admin.get_status(GetStatusRequest {}).await.unwrap();
    let events = audit_events(&c.data);
    assert!(events.iter().any(|e| e["event"] == "call_refused"
        && e["detail"]["caller"] == "viewer:val"
        && e["detail"]["code"] == "ResourceExhausted"));
}

/// A model of about 13 MB: more than every flow-control window and buffer between the
/// coordinator and a site that stops reading, so an unread download stays in progress.
const LARGE_RUN: &str = "[run]\nname = \"large\"\nseed = 5\nrounds = 1\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 64\nhidden_size = 512\nnum_layers = 2\n\
    [sampling]\nmin_selected = 2\nmin_available = 2\n\
    [rounds]\ndeadline_secs = 300\nheartbeat_timeout_secs = 120\n";

/// Asks for task `t`'s model; the stream, unread.
async fn open_download(
    c: &mut FederationClient<Channel>,
    t: &Task,
) -> Result<tonic::Streaming<fedflow_proto::v1::ModelChunk>, tonic::Status> {
    c.download_model(fedflow_proto::v1::DownloadModelRequest {
        task_id: t.task_id.clone(),
        run_id: t.run_id.clone(),
        round: t.round,
        sha256: t.model.as_ref().unwrap().sha256.clone(),
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_has_one_download_and_one_upload_in_progress_at_a_time() {
    let pki = Pki::new();
    let c = TestCoordinator::builder(LARGE_RUN)
        .mutual_tls(pki.bundle("coordinator"))
        .spawn()
        .await;
    let mut a = pki.site(c.addr, "site-a").await;
    let mut b = pki.site(c.addr, "site-b").await;
    let (ta, tb) = tokio::join!(task_for(&mut a, ""), task_for(&mut b, ""));
    let busy = |s: tonic::Status, kind: &str| {
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert!(fedflow_proto::pushback::pushback(&s).is_some(), "{s:?}");
        assert!(
            s.message()
                .contains(&format!("a {kind} from this site is already in progress")),
            "{}",
            s.message()
        );
    };

    // Site A's first download is admitted and left unread: a second one is refused, while
    // another site downloads as usual.
    let held = open_download(&mut a, &ta).await.unwrap();
    busy(open_download(&mut a, &ta).await.unwrap_err(), "download");
    let global = download(&mut b, "", &tb).await;
    assert!(
        global.to_safetensors_bytes().unwrap().len() > 12 << 20,
        "the model outgrows the flow-control windows"
    );
    // Once the held stream is dropped the coordinator frees the slot (it notices the
    // cancelled stream on its next send): the site may download again.
    drop(held);
    let mut again = None;
    for _ in 0..200 {
        match open_download(&mut a, &ta).await {
            Ok(stream) => {
                again = Some(stream);
                break;
            }
            Err(s) => busy(s, "download"),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut again = again.expect("the download slot is freed when its stream is dropped");
    let mut bytes = 0;
    while let Some(chunk) = again.message().await.unwrap() {
        bytes += chunk.data.len();
    }
    assert_eq!(bytes, global.to_safetensors_bytes().unwrap().len());

    // Site A's upload, held after its first data chunk once the coordinator is spilling it:
    // a second upload from A is refused before a byte of it is read, a download from A is
    // not (another kind), and B uploads as usual.
    let delta = global.scale(1e-3).unwrap();
    let bytes = Bytes::from(delta.to_safetensors_bytes().unwrap());
    let mut chunks = update_chunks(header("", &ta, &bytes), &bytes, 1 << 20).into_iter();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(chunks.next().unwrap()).await.unwrap();
    let mut sender = a.clone();
    let first = tokio::spawn(async move {
        sender
            .upload_update(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(chunks.next().unwrap()).await.unwrap();
    wait_for_upload_in_progress(&c.data).await;
    busy(send(&mut a, &ta, &delta).await.unwrap_err(), "upload");
    let other = open_download(&mut a, &ta).await.unwrap();
    drop(other);
    assert!(
        !send(&mut b, &tb, &delta).await.unwrap(),
        "B's update is new"
    );
    for chunk in chunks {
        tx.send(chunk).await.unwrap();
    }
    drop(tx);
    let accepted = first.await.unwrap().unwrap().into_inner();
    assert!(!accepted.duplicate, "A's held upload is accepted as new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_enrols_naming_its_vocabulary_in_plain_text() {
    let pki = Pki::new();
    let c = coordinator(&pki).await;
    let mut a = pki.site(c.addr, "site-a").await;
    let enrol = |vocab_sha256: &str, client_version: &str| EnrolRequest {
        vocab_sha256: vocab_sha256.into(),
        client_version: client_version.into(),
        ..Default::default()
    };
    // No hash would skip the vocabulary check: refused, naming the field.
    let s = a.enrol(enrol("", "")).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().starts_with("vocab_sha256: empty"),
        "{}",
        s.message()
    );
    let s = a.enrol(enrol("ABCDEF", "")).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("is not a SHA-256"), "{}", s.message());
    let s = a
        .enrol(enrol(&c.vocab_sha256, "1.0\n\x1b[2Jforged"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().starts_with("client_version: "),
        "{}",
        s.message()
    );
    // Another site's id in the body, with a newline: refused as malformed, not quoted raw.
    let s = a
        .enrol(EnrolRequest {
            site_id: "site-b\nFORGED".into(),
            ..enrol(&c.vocab_sha256, "")
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().starts_with("site_id: "), "{}", s.message());
    assert!(!s.message().contains('\n'), "{}", s.message());
    // The federation's vocabulary: enrolled.
    a.enrol(enrol(&c.vocab_sha256, "fedflow-client 1.0"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_client_of_an_incompatible_version_is_refused_saying_what_to_install() {
    let pki = Pki::new();
    let c = coordinator(&pki).await;
    let mut a = pki.site(c.addr, "site-a").await;
    let ours = env!("CARGO_PKG_VERSION");
    let (major, minor, _) = fedflow_proto::compat::parse(ours).unwrap();
    // The next release that breaks compatibility, and a compatible later patch.
    let (breaking, patch) = if major == 0 {
        (format!("0.{}.0", minor + 1), format!("0.{minor}.99"))
    } else {
        (format!("{}.0.0", major + 1), format!("{major}.99.0"))
    };
    let enrol = |client_version: &str| EnrolRequest {
        vocab_sha256: c.vocab_sha256.clone(),
        client_version: client_version.into(),
        ..Default::default()
    };
    let s = a.enrol(enrol(&breaking)).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message()
            .contains(&format!("fedflow-client {breaking} is newer"))
            && s.message().contains("install fedflow-client"),
        "{}",
        s.message()
    );
    a.enrol(enrol(&patch)).await.unwrap();
    a.enrol(enrol(ours)).await.unwrap();
}

/// `serial` of bundle `name` of `pki`, as fedflow prints serials.
fn serial_of(pki: &Pki, name: &str) -> String {
    let pem = pki.read(name, "cert.pem");
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    fedflow_common::hash::hex(p.parse_x509().unwrap().raw_serial())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_take_serials_as_printed_and_an_admin_locks_itself_out_only_on_purpose() {
    let pki = Pki::new();
    let c = coordinator(&pki).await;
    let mut admin = pki.admin(c.addr, "ada").await;
    let revoke = |serial: &str| RevokeRequest {
        serial: serial.into(),
        reason: "test".into(),
        ..Default::default()
    };
    // Serials as `openssl` prints them, too short to be one, or not hex: refused.
    let val = serial_of(&pki, "val");
    let colons: Vec<String> = val
        .as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8(p.to_vec()).unwrap())
        .collect();
    for bad in [
        colons.join(":"),
        "48:97:45:dd".into(),
        "489745dd".into(),
        format!("{val}zz"),
    ] {
        let s = admin.revoke(revoke(&bad)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{bad}: {s:?}");
        assert!(s.message().starts_with("serial "), "{}", s.message());
    }
    // An operator's reason is short plain text.
    let s = admin
        .revoke(RevokeRequest {
            reason: "rotated\nFORGED".into(),
            ..revoke(&val)
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().starts_with("reason: "), "{}", s.message());
    let s = admin
        .pause_run(RunActionRequest {
            reason: "x".repeat(201),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("at most 200"), "{}", s.message());
    // The viewer's serial, as printed (upper case accepted too): revoked.
    admin
        .revoke(revoke(&val.to_ascii_uppercase()))
        .await
        .unwrap();
    let s = pki
        .admin(c.addr, "val")
        .await
        .get_status(GetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // Ada's own identity or certificate: refused without force.
    let own_identity = RevokeRequest {
        role: "admin".into(),
        name: "ada".into(),
        reason: "leaving".into(),
        ..Default::default()
    };
    for request in [own_identity.clone(), revoke(&serial_of(&pki, "ada"))] {
        let s = admin.revoke(request).await.unwrap_err();
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains("locks you out"), "{}", s.message());
    }
    admin.get_status(GetStatusRequest {}).await.unwrap();
    // With force it is done, and Ada is refused from then on.
    admin
        .revoke(RevokeRequest {
            force: true,
            ..own_identity
        })
        .await
        .unwrap();
    let s = admin.get_status(GetStatusRequest {}).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert_eq!(
        audit_events(&c.data)
            .iter()
            .filter(|e| e["event"] == "revoked")
            .count(),
        2
    );
}

#[test]
fn pki_refuses_a_validity_of_zero_days() {
    let exe = fedflow_tests::bin::cargo_bin("fedflow-coordinator", "fedflow-coordinator");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let run = |args: &[&str]| {
        std::process::Command::new(&exe)
            .arg("pki")
            .args(args)
            .output()
            .unwrap()
    };
    let ca_arg = ca.to_str().unwrap();
    let out = run(&["init", "--dir", ca_arg, "--days", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--days"), "{err}");
    assert!(!ca.join("ca.key").exists(), "no CA was created");
    let out = run(&["init", "--dir", ca_arg, "--days", "30"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = dir.path().join("site-a");
    let bundle_arg = bundle.to_str().unwrap();
    for days in ["0", "36501"] {
        let out = run(&[
            "issue", "--dir", ca_arg, "--role", "site", "--name", "site-a", "--days", days,
            "--out", bundle_arg,
        ]);
        assert!(!out.status.success(), "--days {days}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--days"), "{err}");
        assert!(!bundle.exists(), "no bundle for --days {days}");
    }
    let out = run(&[
        "issue", "--dir", ca_arg, "--role", "site", "--name", "site-a", "--days", "1", "--out",
        bundle_arg,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The certificate written is valid now.
    fedflow_client::tls::Bundle::load(&bundle).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_address_do_not_hold_up_a_handshake() {
    use fedflow_coordinator::security::tls::{
        HANDSHAKE_TIMEOUT, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_ADDRESS, PRE_HANDSHAKE_TIMEOUT,
    };
    let pki = Pki::new();
    let c = coordinator(&pki).await;
    // Raw TCP connections from 127.0.0.1 that never start a TLS handshake, more than every
    // handshake place three times over (and far more than one address may hold), then a
    // real client from the same address, all within a bound timed from before the first
    // idle connection. An accept loop that let each connection hold a handshake place for
    // its full handshake time (64 places, 10 s) accepts connections in order, so it would
    // take this client only once three batches of idle ones had timed out: 30 s after the
    // first. The bound is far above the pre-handshake timeout (even a client made to wait
    // for the idle ones to time out would fit), and below those three batches.
    let idle_count = 3 * MAX_HANDSHAKES + MAX_HANDSHAKES_PER_ADDRESS;
    let bound = Duration::from_secs(20);
    assert!(bound > 4 * PRE_HANDSHAKE_TIMEOUT && bound < 3 * HANDSHAKE_TIMEOUT);
    let (idle, status) = tokio::time::timeout(bound, async {
        let mut idle = Vec::with_capacity(idle_count);
        for _ in 0..idle_count {
            idle.push(tokio::net::TcpStream::connect(c.addr).await.unwrap());
        }
        let status = pki
            .admin(c.addr, "val")
            .await
            .get_status(GetStatusRequest {})
            .await;
        (idle, status)
    })
    .await
    .expect("the handshake was held up by idle connections");
    let status = status.unwrap();
    assert_eq!(status.into_inner().run_id, "sec");
    // The idle ones were closed to make room, recorded for the address (once while it has
    // connections waiting, then counted; a slow machine may see a few such spells), not
    // once each.
    wait_for_audit(
        &c.data,
        "connection_refused",
        "before the TLS handshake started",
    )
    .await;
    let refused = audit_events(&c.data)
        .iter()
        .filter(|e| e["event"] == "connection_refused")
        .count();
    assert!(
        refused < idle_count / 4,
        "{refused} records for {idle_count} idle connections from one address"
    );
    drop(idle);
}
