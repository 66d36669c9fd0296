//! The one place a coordinator error becomes a gRPC status: every handler returns
//! [`crate::Error`] (through `?`) and this module decides the code the caller sees.
//!
//! The rule: what the caller did wrong or may not do gets a code that says so
//! (`INVALID_ARGUMENT`, `PERMISSION_DENIED`, `RESOURCE_EXHAUSTED`, ...); what went wrong on
//! the coordinator's side (its database, its disk, its own files) is `INTERNAL`, whatever
//! request happened to meet it.

use fedflow_proto::transfer::{Fault, ReceiveError};
use tonic::{Code, Status};

use crate::Error;
use crate::round::Rejection;

/// The gRPC code `e` travels as.
pub fn code(e: &Error) -> Code {
    match e {
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::Forbidden(_) => Code::PermissionDenied,
        Error::Limited(_) => Code::ResourceExhausted,
        Error::BadRequest(_) => Code::InvalidArgument,
        Error::OutOfRange(_) => Code::OutOfRange,
        Error::NotFound(_) => Code::NotFound,
        Error::Refused(_) => Code::FailedPrecondition,
        Error::TimedOut(_) => Code::DeadlineExceeded,
        Error::ShuttingDown => Code::Unavailable,
        Error::Rejected(r) => rejection_code(r),
        Error::Receive(ReceiveError::Stream(s)) => s.code(),
        Error::Receive(ReceiveError::Refused(t)) => match t.fault() {
            Fault::Limit => Code::ResourceExhausted,
            Fault::Sender => Code::InvalidArgument,
            Fault::Receiver => Code::Internal,
        },
        Error::Common(_)
        | Error::Config { .. }
        | Error::ConfigMismatch(_)
        | Error::Strategy(_)
        | Error::Store(_)
        | Error::Database(_)
        | Error::Io { .. }
        | Error::Json(_)
        | Error::Security(_) => Code::Internal,
    }
}

/// The gRPC code a site's refused update travels as.
fn rejection_code(r: &Rejection) -> Code {
    match r {
        Rejection::Late(_) => Code::DeadlineExceeded,
        Rejection::NotSelected(_) | Rejection::WrongTask | Rejection::Revoked => {
            Code::PermissionDenied
        }
        Rejection::Conflicting => Code::AlreadyExists,
        Rejection::Invalid(_) => Code::InvalidArgument,
        Rejection::NoOpenRound
        | Rejection::NoOpenEvaluation
        | Rejection::WrongRound { .. }
        | Rejection::Withdrawn
        | Rejection::Declined
        | Rejection::WrongBase { .. } => Code::FailedPrecondition,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = code(&e);
        let message = match code {
            // The caller cannot act on the coordinator's own failure beyond retrying later;
            // the message still says what failed, for the operator reading the site's log.
            Code::Internal => format!("coordinator error: {e}"),
            _ => e.to_string(),
        };
        Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use fedflow_proto::transfer::TransferError;

    use super::*;

    #[test]
    fn the_coordinators_own_failures_are_internal_and_the_callers_are_not() {
        let sink = Error::Receive(ReceiveError::Refused(TransferError::Sink(
            "No space left on device".into(),
        )));
        assert_eq!(Status::from(sink).code(), Code::Internal);
        let db = Error::Database(rusqlite::Error::InvalidQuery);
        assert_eq!(Status::from(db).code(), Code::Internal);
        let refused = Error::Refused("cannot resume the run: it is stopped".into());
        let s = Status::from(refused);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(s.message(), "cannot resume the run: it is stopped");
        let too_big = Error::Receive(ReceiveError::Refused(TransferError::TooLarge {
            total: 10,
            limit: 5,
        }));
        assert_eq!(Status::from(too_big).code(), Code::ResourceExhausted);
        let hash = Error::Receive(ReceiveError::Refused(TransferError::HashMismatch {
            expected: "a".into(),
            got: "b".into(),
        }));
        assert_eq!(Status::from(hash).code(), Code::InvalidArgument);
        assert_eq!(
            Status::from(Error::Rejected(Rejection::Conflicting)).code(),
            Code::AlreadyExists
        );
        assert_eq!(Status::from(Error::ShuttingDown).code(), Code::Unavailable);
    }
}
