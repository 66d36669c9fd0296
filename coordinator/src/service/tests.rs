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
