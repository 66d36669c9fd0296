//! The one place a coordinator error becomes a gRPC status: every handler returns
//! [`crate::Error`] (through `?`) and this module decides the code the caller sees.
//!
//! The rule: what the caller did wrong or may not do gets a code that says so
//! (`INVALID_ARGUMENT`, `PERMISSION_DENIED`, `RESOURCE_EXHAUSTED`, ...); what went wrong on
//! the coordinator's side (its database, its disk, its own files) is `INTERNAL`, whatever
//! request happened to meet it. A caller is told what is wrong, never where the coordinator
//! keeps its files: an internal error says what failed (the full error goes to the
//! coordinator's log) and every other message has its file paths redacted.

use fedflow_proto::transfer::{Fault, ReceiveError};
use tonic::{Code, Status};

use crate::Error;
use crate::round::Rejection;

/// The gRPC code `e` travels as.
pub fn code(e: &Error) -> Code {
    match e {
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::Forbidden(_) => Code::PermissionDenied,
        Error::Limited(_) | Error::SlowDown { .. } => Code::ResourceExhausted,
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
            // The caller cannot act on the coordinator's own failure beyond retrying later:
            // it learns what failed, not where (the full error, with the coordinator's file
            // names, goes to the coordinator's log).
            Code::Internal => {
                tracing::error!("a call failed on the coordinator's side: {e}");
                format!(
                    "coordinator error: {}; retry later (the coordinator's log has the details)",
                    internal_summary(&e)
                )
            }
            _ => redact_paths(&e.to_string()),
        };
        match e {
            Error::SlowDown { retry_after, .. } => {
                fedflow_proto::pushback::slow_down(message, retry_after)
            }
            _ => Status::new(code, message),
        }
    }
}

/// What failed on the coordinator's side, without its file names.
fn internal_summary(e: &Error) -> String {
    let io = |source: &std::io::Error| {
        format!(
            "reading or writing one of its files failed ({})",
            source.kind()
        )
    };
    match e {
        Error::Io { source, .. } => io(source),
        Error::Common(fedflow_common::Error::Io { source, .. }) => io(source),
        Error::Common(_) => "its model files or arithmetic failed".into(),
        Error::Database(_) => "its database failed".into(),
        Error::Store(_) => "its store failed".into(),
        Error::Config { .. } | Error::ConfigMismatch(_) => {
            "its run configuration is unusable".into()
        }
        Error::Json(_) => "reading or writing its own records failed".into(),
        Error::Security(_) => "its security setup failed".into(),
        Error::Receive(ReceiveError::Refused(_)) => "it could not store the upload".into(),
        other => redact_paths(&other.to_string()),
    }
}

/// Said instead of a file name of the coordinator's in what a caller is told.
const REDACTED_PATH: &str = "(a coordinator file)";

/// `message` with every absolute file path in it (a word starting with `/`, or with a drive
/// letter and `\`) replaced by "(a coordinator file)": callers are told what is wrong, not where
/// the coordinator keeps its files (e.g. the spill file of an upload).
pub fn redact_paths(message: &str) -> String {
    let chars: Vec<char> = message.chars().collect();
    let mut out = String::with_capacity(message.len());
    let mut i = 0;
    while i < chars.len() {
        let at_word_start =
            i == 0 || matches!(chars[i - 1], ' ' | '\t' | '"' | '\'' | '(' | '=' | '`');
        let unix = chars[i] == '/';
        let windows = chars[i].is_ascii_alphabetic()
            && chars.get(i + 1) == Some(&':')
            && chars.get(i + 2) == Some(&'\\');
        if at_word_start && (unix || windows) {
            let mut end = i;
            while end < chars.len()
                && !matches!(
                    chars[end],
                    ' ' | '\t' | '\n' | '"' | '\'' | ')' | ',' | ';' | '`'
                )
            {
                end += 1;
            }
            // "PATH: what happened": the colon is the message's, not the path's.
            while end > i + 1 && matches!(chars[end - 1], ':' | '.') {
                end -= 1;
            }
            out.push_str(REDACTED_PATH);
            i = end;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
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

    /// What a caller is told names no file of the coordinator's; the operator's log has it.
    #[test]
    fn callers_learn_what_failed_not_where() {
        let spill = "/srv/fedflow/data/incoming/upload-7.part";
        let io = Error::io(
            spill,
            std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory"),
        );
        let s = Status::from(io);
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("/srv"), "{}", s.message());
        assert!(
            s.message()
                .contains("reading or writing one of its files failed"),
            "{}",
            s.message()
        );
        assert!(s.message().contains("not found"), "{}", s.message());
        let common = Error::Common(fedflow_common::Error::io(
            "/srv/fedflow/data/checkpoints/r/round-000001.safetensors",
            std::io::Error::other("disk on fire"),
        ));
        assert!(!Status::from(common).message().contains("/srv"));
        // A refusal that happens to quote the spill file keeps its reason, not the path.
        let invalid = Error::Rejected(Rejection::Invalid(format!(
            "{spill} is 10 bytes but its header describes 12 bytes"
        )));
        let s = Status::from(invalid);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "invalid update: (a coordinator file) is 10 bytes but its header describes 12 bytes"
        );
        for (message, shown) in [
            ("open /a/b: denied", "open (a coordinator file): denied"),
            (
                "file=\"/x/y.db\" locked",
                "file=\"(a coordinator file)\" locked",
            ),
            ("C:\\data\\x.part is short", "(a coordinator file) is short"),
            (
                "1/2 sites; limits.max_upload_bytes",
                "1/2 sites; limits.max_upload_bytes",
            ),
            ("see https://example.org/x", "see https://example.org/x"),
        ] {
            assert_eq!(redact_paths(message), shown, "{message}");
        }
    }
}
