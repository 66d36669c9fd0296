//! Why the round engine refuses a site's update, evaluation or decline: a leaf type the
//! crate's error enum carries (`Error::Rejected`) and the service maps to a status.

/// Why an update was refused. Each maps to one gRPC status in `service::status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No round is open (between rounds, paused or finished).
    #[error("no round is open")]
    NoOpenRound,
    /// No evaluation is open.
    #[error("no evaluation is open")]
    NoOpenEvaluation,
    /// The update names another round than the open one.
    #[error("update for round {got}, but round {open} is open")]
    WrongRound {
        /// The open round.
        open: u64,
        /// The round the update names.
        got: u64,
    },
    /// The site was not selected for the open round.
    #[error("site was not selected for round {0}")]
    NotSelected(u64),
    /// Task id or nonce do not match the task handed out.
    #[error("task id or nonce does not match the task for this round")]
    WrongTask,
    /// The round's deadline has passed.
    #[error("the deadline of round {0} has passed")]
    Late(u64),
    /// The site already delivered a different update for this task.
    #[error("a different update was already accepted for this task")]
    Conflicting,
    /// The site was marked dropped (silent past the heartbeat timeout) and its task withdrawn.
    #[error("the task was withdrawn: the site was silent past the heartbeat timeout")]
    Withdrawn,
    /// The caller's identity or certificate was revoked (possibly while the update was
    /// arriving): the update is discarded.
    #[error("the site's identity or certificate has been revoked")]
    Revoked,
    /// The site declined this task earlier.
    #[error("the site declined this task")]
    Declined,
    /// The delta was computed against another global model.
    #[error("the update was computed against model {got}, not the round's model {want}")]
    WrongBase {
        /// The round's global model.
        want: String,
        /// What the update names.
        got: String,
    },
    /// The update itself is invalid (names, shapes, values, weight).
    #[error("invalid update: {0}")]
    Invalid(String),
}
