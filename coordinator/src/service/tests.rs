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
