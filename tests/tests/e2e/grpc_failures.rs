//! What goes wrong, over real gRPC on loopback: bad updates are refused with a specific
//! status and change nothing on disk, and a site killed mid-round does not stop the round
//! when the quorum is met; sites refused for calling too fast slow down and finish. Waits are on observable state (admin status), never on sleeps.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use fedflow_client::federation::{SiteOptions, run_site};
use fedflow_client::noop::NoopTrainer;
use fedflow_client::site::SiteTrainer;
use fedflow_common::data::{SiteDataset, Vocab};
use fedflow_common::params::ParamSet;
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::{ListRoundsRequest, RoundSummary};
use fedflow_tests::TestCoordinator;
use fedflow_tests::site::{download, federation_client, heartbeat, task_for, upload};
use prost::bytes::Bytes;
use tonic::Code;

/// A coordinator serving on 127.0.0.1:0 with a tiny model running `rounds` rounds; `extra`
/// is appended to its TOML.
async fn coordinator(vocab: &Vocab, rounds: u64, extra: &str) -> TestCoordinator {
    let toml = format!(
        "[run]\nname = \"t\"\nseed = 3\nrounds = {rounds}\n\
         [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
         [train]\nepochs = 1\nlearning_rate = 0.01\n{extra}"
    );
    TestCoordinator::builder(toml).vocab(vocab).spawn().await
}

async fn round(addr: SocketAddr, n: u64) -> Option<RoundSummary> {
    let mut admin = AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    admin
        .list_rounds(ListRoundsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rounds
        .into_iter()
        .find(|r| r.round == n)
}

/// Polls the admin service until round `n` satisfies `done` (the state under test, not a
/// timer, decides when the test goes on). Panics after a generous limit.
async fn wait_for_round(addr: SocketAddr, n: u64, done: impl Fn(&RoundSummary) -> bool) {
    for _ in 0..600 {
        if round(addr, n).await.is_some_and(|r| done(&r)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("round {n} never reached the expected state");
}

fn checkpoint_files(data: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(data.join("checkpoints/t"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    files
}

fn tiny_vocab() -> Vocab {
    Vocab::from_events(["open", "search", "click", "escalate"]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_are_refused_with_specific_statuses_and_change_nothing() {
    let vocab = tiny_vocab();
    let c = coordinator(
        &vocab,
        1,
        "[sampling]\nmin_selected = 2\nmin_available = 2\n\
         [rounds]\ndeadline_secs = 300\nmin_completed = 2\nheartbeat_timeout_secs = 120\n",
    )
    .await;
    let mut a = federation_client(c.addr).await;
    let mut b = federation_client(c.addr).await;
    let (ta, tb) = tokio::join!(task_for(&mut a, "site-a"), task_for(&mut b, "site-b"));
    let global = download(&mut a, "site-a", &ta).await;
    let good = global.scale(0.01).unwrap();
    let files_before = checkpoint_files(&c.data);

    // Wrong tensor shape.
    let mut tensors = good.clone().into_tensors();
    tensors.insert(
        "head.bias".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let wrong_shape = ParamSet::from_tensors(tensors).unwrap();
    let s = upload(&mut a, "site-a", &ta, &wrong_shape, |_| {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("head.bias"), "{}", s.message());

    // Non-finite values.
    let mut tensors = good.clone().into_tensors();
    tensors.insert(
        "head.bias".into(),
        Tensor::new(&[f32::NAN, 0.0, 0.0, 0.0, 0.0], &Device::Cpu).unwrap(),
    );
    let nan = ParamSet::from_tensors(tensors).unwrap();
    let s = upload(&mut a, "site-a", &ta, &nan, |_| {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // The bytes do not hash to what the header announces.
    let s = upload(&mut a, "site-a", &ta, &good, |h| {
        h.delta_sha256 = "0".repeat(64)
    })
    .await
    .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("hash mismatch"), "{}", s.message());

    // The wrong round, a forged nonce, another site's task.
    let s = upload(&mut a, "site-a", &ta, &good, |h| h.round = 7)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("round 7"), "{}", s.message());
    let s = upload(&mut a, "site-a", &ta, &good, |h| {
        h.nonce = Bytes::from_static(b"forged")
    })
    .await
    .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = upload(&mut a, "site-a", &tb, &good, |_| {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // Nothing changed: no site uploaded, no checkpoint written.
    let r1 = round(c.addr, 1).await.unwrap();
    assert_eq!((r1.status.as_str(), r1.uploaded), ("open", 0));
    assert_eq!(checkpoint_files(&c.data), files_before);

    // The valid updates still go through, once each; a resend is a duplicate, a different
    // update for the same task a conflict.
    upload(&mut a, "site-a", &ta, &good, |_| {}).await.unwrap();
    upload(&mut a, "site-a", &ta, &good, |_| {}).await.unwrap();
    let other = global.scale(0.02).unwrap();
    let s = upload(&mut a, "site-a", &ta, &other, |_| {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
    upload(&mut b, "site-b", &tb, &good, |_| {}).await.unwrap();
    wait_for_round(c.addr, 1, |r| r.status == "committed").await;
    let r1 = round(c.addr, 1).await.unwrap();
    assert_eq!(r1.uploaded, 2);
    assert_eq!(checkpoint_files(&c.data).len(), files_before.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_after_the_deadline_is_refused_as_late() {
    let vocab = tiny_vocab();
    let c = coordinator(
        &vocab,
        1,
        "[sampling]\nmin_selected = 1\nmin_available = 1\n\
         [rounds]\ndeadline_secs = 4\nmin_completed = 1\nheartbeat_timeout_secs = 3\n\
         on_quorum_failure = \"pause\"\n",
    )
    .await;
    let mut a = federation_client(c.addr).await;
    let ta = task_for(&mut a, "site-a").await;
    // The site stays alive (heartbeating) so that only the deadline decides.
    let _alive = heartbeat(&a, "site-a", &ta).await;
    let global = download(&mut a, "site-a", &ta).await;
    wait_for_round(c.addr, 1, |r| r.status == "failed").await;
    let s = upload(&mut a, "site-a", &ta, &global.scale(0.01).unwrap(), |_| {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    assert!(s.message().contains("deadline"), "{}", s.message());
    let r1 = round(c.addr, 1).await.unwrap();
    // It heartbeated, so it was not dropped: it missed the deadline and contributed nothing.
    assert_eq!((r1.uploaded, r1.late, r1.dropped), (0, 1, 0), "{r1:?}");
    assert_eq!(checkpoint_files(&c.data).len(), 1, "only the initial model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_killed_mid_round_does_not_stop_the_round_when_the_quorum_is_met() {
    let fed = generate(&SynthConfig {
        sites: 3,
        total_sessions: 600,
        min_site_sessions: 150,
        seed: 9,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let c = coordinator(
        &vocab,
        1,
        "[sampling]\nmin_selected = 3\nmin_available = 3\n\
         [rounds]\ndeadline_secs = 300\nmin_completed = 2\nheartbeat_timeout_secs = 6\n",
    )
    .await;
    // The survivors heartbeat while they train; six seconds without one (many missed
    // heartbeats, even on a loaded machine) is only ever the killed site's silence.
    let mut handles = Vec::new();
    for (i, s) in fed.sites.iter().enumerate() {
        let ds = SiteDataset::from_records(&s.records, &vocab, 0.2).unwrap();
        let trainer = Arc::new(SiteTrainer::new(ds, &vocab, Device::Cpu));
        let mut o = SiteOptions::new(c.url(), format!("site-{i}"));
        o.poll_wait = Duration::from_secs(1);
        if i == 2 {
            // This site never gets to train: it waits for a permit (heartbeating) until it
            // is killed below, mid-round.
            o.work_permits = Some(Arc::new(tokio::sync::Semaphore::new(0)));
        }
        handles.push(tokio::spawn(run_site(o, trainer)));
    }
    // Once the other two have uploaded, kill site-2 (its task is pending).
    wait_for_round(c.addr, 1, |r| r.uploaded == 2).await;
    let r1 = round(c.addr, 1).await.unwrap();
    assert_eq!(r1.status, "open", "site-2 still holds the round open");
    handles.pop().unwrap().abort();

    // Its heartbeats stop; the coordinator drops it and commits with the quorum of two.
    wait_for_round(c.addr, 1, |r| r.status == "committed").await;
    let r1 = round(c.addr, 1).await.unwrap();
    assert_eq!((r1.selected, r1.uploaded, r1.dropped), (3, 2, 1));
    for h in handles {
        let summary = h.await.unwrap().unwrap();
        assert_eq!(summary.rounds_contributed, [1]);
        assert_eq!(
            summary.rounds_evaluated,
            [1],
            "the two survivors evaluate round 1"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_with_another_vocabulary_is_refused_and_a_declined_task_is_recorded() {
    let vocab = tiny_vocab();
    let c = coordinator(
        &vocab,
        1,
        "[sampling]\nmin_selected = 2\nmin_available = 2\n\
         [rounds]\ndeadline_secs = 300\nmin_completed = 1\nheartbeat_timeout_secs = 120\n",
    )
    .await;
    // A real client whose data uses another vocabulary is refused at enrolment, and says why.
    let other = Vocab::from_events(["open", "search", "chat"]).unwrap();
    let records = [fedflow_common::data::SessionRecord::new(
        "s1",
        &["open", "chat"],
        3,
    )];
    let ds = SiteDataset::from_records(&records, &other, 0.0).unwrap();
    let trainer = Arc::new(SiteTrainer::new(ds, &other, Device::Cpu));
    let err = run_site(SiteOptions::new(c.url(), "site-x"), trainer)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("another vocabulary"), "{err}");

    // A site that cannot do its task declines it; the round goes on without it.
    let mut a = federation_client(c.addr).await;
    let mut b = federation_client(c.addr).await;
    let (ta, tb) = tokio::join!(task_for(&mut a, "site-a"), task_for(&mut b, "site-b"));
    b.decline_task(fedflow_proto::v1::DeclineTaskRequest {
        site_id: "site-b".into(),
        task_id: tb.task_id.clone(),
        run_id: tb.run_id.clone(),
        round: tb.round,
        nonce: tb.nonce.clone(),
        reason: "the model does not fit this site's data".into(),
    })
    .await
    .unwrap();
    let global = download(&mut a, "site-a", &ta).await;
    upload(&mut a, "site-a", &ta, &global.scale(0.01).unwrap(), |_| {})
        .await
        .unwrap();
    wait_for_round(c.addr, 1, |r| r.status == "committed").await;
    let r1 = round(c.addr, 1).await.unwrap();
    assert_eq!((r1.uploaded, r1.declined), (1, 1));
    // Its update for the declined task is refused.
    let s = upload(&mut b, "site-b", &tb, &global.scale(0.01).unwrap(), |_| {})
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::DeadlineExceeded,
        "the round has closed: {s:?}"
    );
}

/// Real sites under a limit tighter than their own pace of calls (four calls a second, no
/// burst) are refused with a pushback, wait it out and finish the run: a limit slows a site
/// down, it never makes it give up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_refused_for_calling_too_fast_wait_and_finish_the_run() {
    let c = coordinator(
        &fedflow_tests::coordinator::default_vocab(),
        2,
        "[sampling]\nmin_selected = 2\nmin_available = 2\n\
         [rounds]\ndeadline_secs = 300\nheartbeat_timeout_secs = 120\n\
         [limits]\nrequests_per_second = 4.0\nrequest_burst = 1\n",
    )
    .await;
    let sites = ["site-a", "site-b"].map(|name| {
        let mut o = SiteOptions::new(c.url(), name);
        o.poll_wait = Duration::from_secs(1);
        tokio::spawn(run_site(o, Arc::new(NoopTrainer::new(10))))
    });
    for site in sites {
        let summary = site.await.unwrap().expect("the site finishes the run");
        assert_eq!(summary.rounds_contributed, [1, 2], "{summary:?}");
        assert!(summary.rejected.is_empty(), "{summary:?}");
    }
    // The limit did bite: the sites were refused along the way.
    let refusals = c
        .audit_events()
        .into_iter()
        .filter(|e| {
            e["event"] == "call_refused"
                && e["detail"]["code"] == "ResourceExhausted"
                && e["detail"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("requests_per_second"))
        })
        .count();
    assert!(refusals > 0, "no call was refused: the test proves nothing");
}
