//! A continuous run over real gRPC whose sites' data files grow between rounds: each site
//! reads its file again before a task when it changed, so the rounds after new feedback
//! arrived train on more sessions. The test holds the run between rounds with the admin
//! service's pause (the open round completes, none starts), appends, and resumes.

use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use fedflow_client::federation::{SiteOptions, run_site};
use fedflow_client::site::SiteTrainer;
use fedflow_client::site::source::DataSource;
use fedflow_common::data::{LoadOptions, Vocab, write_sessions};
use fedflow_common::synth::{SynthConfig, generate};
use fedflow_proto::v1::admin_client::AdminClient;
use fedflow_proto::v1::{GetStatusRequest, RunActionRequest, RunPhase};
use fedflow_tests::TestCoordinator;
use tonic::transport::Channel;

const RUN: &str = "[run]\nname = \"grow\"\nseed = 3\n\
    [model]\nvocab = \"vocab.json\"\nembed_dim = 8\nhidden_size = 8\nnum_layers = 1\ndropout = 0.0\n\
    [train]\nepochs = 1\n\
    [sampling]\nmin_selected = 2\nmin_available = 2\n\
    [rounds]\ndeadline_secs = 300\nmin_completed = 2\nheartbeat_timeout_secs = 120\n\
    [evaluation]\nevery = 0\n\
    [schedule]\nmode = \"continuous\"\n\
    [publish]\nrule = \"every\"\n";

/// Polls the status (bounded) until `done`.
async fn wait(
    admin: &mut AdminClient<Channel>,
    what: &str,
    done: impl Fn(&fedflow_proto::v1::RunStatus) -> bool,
) -> fedflow_proto::v1::RunStatus {
    for _ in 0..3000 {
        let s = admin
            .get_status(GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if done(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never reached: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_train_each_round_on_the_data_they_hold_when_it_starts() {
    let fed = generate(&SynthConfig {
        sites: 2,
        total_sessions: 1_200,
        min_site_sessions: 500,
        seed: 4,
        ..SynthConfig::default()
    })
    .unwrap();
    let vocab = Vocab::from_events(fed.event_names.iter().cloned()).unwrap();
    let c = TestCoordinator::builder(RUN).vocab(&vocab).spawn().await;
    let mut admin = AdminClient::connect(c.url()).await.unwrap();
    // Held before any site arrives: no round starts until the test says so.
    admin.pause_run(RunActionRequest::default()).await.unwrap();
    let files: Vec<_> = fed
        .sites
        .iter()
        .map(|s| c.dir().join(format!("{}.csv", s.name)))
        .collect();
    let sizes = [150, 300, 450];
    for (s, f) in fed.sites.iter().zip(&files) {
        write_sessions(f, &s.records[..sizes[0]]).unwrap();
    }
    let sites: Vec<_> = fed
        .sites
        .iter()
        .zip(&files)
        .map(|(s, f)| {
            let (ds, source) = DataSource::open(f, &vocab, LoadOptions::default(), 0.2).unwrap();
            let trainer = Arc::new(SiteTrainer::new(ds, &vocab, Device::Cpu).with_source(source));
            let mut o = SiteOptions::new(c.url(), s.name.clone());
            o.poll_wait = Duration::from_millis(500);
            tokio::spawn(run_site(o, trainer))
        })
        .collect();
    let mut committed = 0;
    for (i, &size) in sizes.iter().enumerate() {
        if i > 0 {
            for (s, f) in fed.sites.iter().zip(&files) {
                write_sessions(f, &s.records[..size]).unwrap();
            }
        }
        admin.resume_run(RunActionRequest::default()).await.unwrap();
        wait(&mut admin, "a round committed", |s| {
            s.committed_round > committed
        })
        .await;
        admin.pause_run(RunActionRequest::default()).await.unwrap();
        let s = wait(&mut admin, "paused", |s| s.phase == RunPhase::Paused as i32).await;
        committed = s.committed_round;
    }
    admin.stop_run(RunActionRequest::default()).await.unwrap();
    for s in sites {
        s.await.unwrap().unwrap();
    }
    // Every site's training count per round, from the coordinator's records.
    let per_round = c
        .handle
        .inspect(move |e, _| {
            (1..=committed)
                .map(|r| {
                    let mut n: Vec<u64> = e
                        .store()
                        .round_sites("grow", r)?
                        .iter()
                        .map(|s| s.train_examples.unwrap_or(0))
                        .collect();
                    n.sort();
                    Ok(n)
                })
                .collect::<fedflow_coordinator::Result<Vec<_>>>()
        })
        .await
        .unwrap();
    let totals: Vec<u64> = per_round.iter().map(|n| n.iter().sum()).collect();
    assert!(totals.windows(2).all(|w| w[0] <= w[1]), "{per_round:?}");
    let mut distinct = totals.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "one count per data size: {per_round:?}");
    // The last rounds trained on the whole files (80% of them in the training split).
    let last = *totals.last().unwrap() as f64;
    assert!((last - 2.0 * 450.0 * 0.8).abs() < 60.0, "{per_round:?}");
}
