//! The service layer over a real engine thread: what callers see when the engine fails.

use fedflow_proto::v1::RunActionRequest;
use fedflow_proto::v1::admin_server::Admin;
use tonic::{Code, Request};

use super::Coordinator;
use crate::round::tests::{engine, fixture};
use crate::security::Transport;

fn action(reason: &str) -> Request<RunActionRequest> {
    Request::new(RunActionRequest {
        reason: reason.into(),
    })
}

#[tokio::test]
async fn a_database_failure_during_an_operator_action_is_internal_not_a_refusal() {
    let f = fixture("");
    let c = Coordinator::spawn(engine(&f), f.cfg.clone(), &Transport::InsecurePlaintext).unwrap();
    c.pause_run(action("maintenance")).await.unwrap();

    // The database fails: resuming cannot be stored. That is the coordinator's failure
    // (INTERNAL, fedflow-ctl exit 1), not a refusal of the action as the run stands.
    c.inspect(|e, _| {
        e.store().fail_writes();
        Ok(())
    })
    .await
    .unwrap();
    let failed = c.resume_run(action("done")).await.unwrap_err();
    assert_eq!(failed.code(), Code::Internal, "{failed:?}");
    assert!(
        failed.message().contains("database"),
        "{}",
        failed.message()
    );
}

#[tokio::test]
async fn an_action_refused_as_the_run_stands_is_failed_precondition() {
    let f = fixture("");
    let c = Coordinator::spawn(engine(&f), f.cfg.clone(), &Transport::InsecurePlaintext).unwrap();
    c.stop_run(action("end of pilot")).await.unwrap();
    let refused = c.resume_run(action("again")).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("cannot resume the run"),
        "{}",
        refused.message()
    );
}

#[tokio::test]
async fn every_train_field_a_site_needs_is_in_its_task() {
    use fedflow_proto::v1::federation_server::Federation;
    use fedflow_proto::v1::{EnrolRequest, NextTaskRequest, next_task_response::Outcome};

    let f = fixture(
        "[train]\nepochs = 3\nbatch_size = 16\nlearning_rate = 0.01\noptimizer = \"sgd\"\n\
         momentum = 0.5\nweight_decay = 0.001\npatience = 2\nmin_delta = 0.01\n\
         length_bucketing = false\nfedprox_mu = 0.1\n",
    );
    let c = Coordinator::spawn(engine(&f), f.cfg.clone(), &Transport::InsecurePlaintext).unwrap();
    for site in crate::round::tests::SITES {
        c.enrol(Request::new(EnrolRequest {
            site_id: site.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    let site = crate::round::tests::SITES[0];
    let reply = c
        .next_task(Request::new(NextTaskRequest {
            site_id: site.into(),
            wait_ms: 10_000,
        }))
        .await
        .unwrap()
        .into_inner();
    let Some(Outcome::Task(task)) = reply.outcome else {
        panic!("no task: {reply:?}");
    };
    let t = task.train.expect("training instructions");
    let want = f.cfg.local_train_config(task.round, site);
    assert_eq!(t.local_epochs as usize, want.epochs);
    assert_eq!(t.batch_size as usize, want.batch_size);
    assert_eq!(t.learning_rate, want.learning_rate);
    assert_eq!(t.optimizer, "sgd");
    assert_eq!(t.momentum, want.momentum);
    assert_eq!(t.weight_decay, want.weight_decay);
    assert_eq!(t.patience as usize, want.patience);
    assert_eq!(t.patience, 2);
    assert_eq!(t.min_delta, 0.01);
    assert!(!t.length_bucketing);
    assert_eq!(t.fedprox_mu, want.fedprox_mu);
    assert_eq!(t.seed, want.seed);
}

#[tokio::test]
async fn list_rounds_keeps_failed_attempts_and_counts_refused_updates() {
    use crate::round::tests::{SEC, T0, start, submit, update};
    use fedflow_proto::v1::ListRoundsRequest;

    let f = fixture("");
    let mut e = engine(&f);
    // Attempt 1 of round 1 misses its quorum at the deadline.
    start(&mut e);
    e.tick(T0 + 61 * SEC).unwrap();
    // Attempt 2: site-a sends an update for another site's task (refused), then all three
    // answer and the round commits.
    let now = T0 + 62 * SEC;
    for s in crate::round::tests::SITES {
        e.site_seen(s, now).unwrap();
    }
    let tickets: std::collections::BTreeMap<_, _> = crate::round::tests::SITES
        .iter()
        .map(|s| (*s, e.poll_task(s, now).unwrap().expect("selected")))
        .collect();
    let u = update(&f, 0.1);
    assert!(submit(&mut e, "site-a", &tickets["site-b"], &u, 10, now).is_err());
    for (s, t) in &tickets {
        assert!(submit(&mut e, s, t, &u, 10, now).is_ok());
    }
    assert_eq!(e.committed_round(), 1);

    let c = Coordinator::spawn(e, f.cfg.clone(), &Transport::InsecurePlaintext).unwrap();
    let rounds = c
        .list_rounds(Request::new(ListRoundsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .rounds;
    let r1: Vec<_> = rounds.iter().filter(|r| r.round == 1).collect();
    assert_eq!(r1.len(), 2, "{rounds:?}");
    assert_eq!((r1[0].status.as_str(), r1[0].failed_attempt), ("failed", 1));
    assert!(
        r1[0].failure_reason.contains("updates needed arrived"),
        "{}",
        r1[0].failure_reason
    );
    assert_eq!(
        (r1[1].status.as_str(), r1[1].failed_attempt),
        ("committed", 0)
    );
    assert_eq!(r1[1].rejected, 1, "the refused update is counted");
    assert_eq!(r1[1].uploaded, 3);
}
