//! Partner-site feedback data: the record types, the event vocabulary, file formats
//! (CSV and JSON Lines), validation, and the deterministic train/validation split.
//!
//! # Session files
//!
//! A partner site keeps its feedback data in one file, one session per row. The format is
//! chosen by the file's extension (case-insensitive): `.csv` for CSV, `.jsonl` or `.ndjson`
//! for JSON Lines; any other extension is an error. Files are UTF-8.
//!
//! Every session has these fields:
//!
//! | field        | required | meaning                                                         |
//! |--------------|----------|-----------------------------------------------------------------|
//! | `session_id` | yes      | site-local session identifier: non-empty, unique within the file |
//! | `events`     | yes      | the session's event names, oldest first; at least one            |
//! | `label`      | yes      | satisfaction label, an integer from 1 to 5                       |
//! | `user_id`    | no       | end-user identifier, grouping sessions of one user               |
//! | `timestamp`  | no       | when the session happened, kept verbatim (RFC 3339 recommended)  |
//!
//! Event names are non-empty and contain no whitespace. No other fields are allowed.
//! `session_id` and `user_id` are personal data: they never leave the site, and error
//! messages refer to rows by line number, never by id.
//!
//! ## CSV
//!
//! RFC 4180 CSV with a header line naming the columns, in any order. `session_id`, `events`
//! and `label` are required; `user_id` and `timestamp` may be present; any other column is
//! rejected. Every row has as many fields as the header. `events` is one field holding the
//! event names separated by single spaces, with no leading or trailing space. An empty
//! `user_id` or `timestamp` field means absent. Fields containing commas, quotes or line
//! breaks are quoted with `"`, with `""` for a quote inside.
//!
//! ```text
//! session_id,events,label,user_id,timestamp
//! s-0001,opened_help searched clicked_answer,4,u-17,2026-01-01T00:00:00Z
//! "s-0002, retry",opened_help searched searched,2,,
//! ```
//!
//! ## JSON Lines
//!
//! One JSON object per line; blank lines are skipped. `events` is an array of strings, `label`
//! a JSON integer (not a string, not `4.0`); `user_id` and `timestamp` are strings, and may be
//! `null` or left out (an empty string also reads as absent).
//!
//! ```text
//! {"session_id": "s-0001", "events": ["opened_help", "searched", "clicked_answer"], "label": 4, "user_id": "u-17", "timestamp": "2026-01-01T00:00:00Z"}
//! {"session_id": "s-0002", "events": ["opened_help"], "label": 2}
//! ```
//!
//! ## Validation
//!
//! [`read_sessions`] checks every row. An invalid row (wrong field count or malformed JSON,
//! missing or empty `session_id`, no events, an empty or whitespace-holding event name, a label
//! that is not an integer in 1..=5, an unknown JSON field, a `session_id` already used on an
//! earlier line) fails the load with [`Error::Data`](crate::Error::Data), which names the file,
//! the 1-based line where the row starts, and the reason; nothing is returned. With
//! [`LoadOptions::skip_invalid`] such rows are left out instead and listed in
//! [`Loaded::skipped`]. Either way a file with no valid session, an unknown extension, or a CSV
//! header with unknown, duplicate or missing columns is an error.
//!
//! [`write_sessions`] writes the canonical form of either format (CSV: columns in the order of
//! the table above, optional ones only when some session has them) to a temporary file which
//! is synced and renamed over the target, so a crash never leaves a partial file. Reading a
//! written file gives back exactly the records written.
//!
//! # Vocabulary file
//!
//! The event vocabulary ([`Vocab`]) is shared by all sites and the coordinator, since its ids
//! index the model's embedding table. It is a JSON object:
//!
//! ```text
//! {
//!   "format": "fedflow-vocab/1",
//!   "pad_id": 0,
//!   "unk_id": 1,
//!   "events": {
//!     "opened_help": 2,
//!     "searched": 3,
//!     "clicked_answer": 4
//!   }
//! }
//! ```
//!
//! `format` must be exactly `"fedflow-vocab/1"`, `pad_id` must be 0 and `unk_id` 1 (padding
//! and unknown events). `events` maps each event name (non-empty, no whitespace, each listed
//! once) to its id; with `n` events the ids are exactly 2, 3, ..., `n + 1`, each used once, in
//! any order in the file. The optional key `oov_buckets` (an integer K, 0 to
//! [`MAX_OOV_BUCKETS`], default 0 and then not written) declares K hashed out-of-vocabulary
//! buckets with ids `n + 2` .. `n + K + 1`. No other keys are allowed. Event names in session
//! files that are not in the vocabulary are encoded as the unknown id, or with buckets as
//! bucket `first 8 bytes of SHA-256(name), big-endian, mod K`. The model's vocabulary size is
//! [`Vocab::len`], that is `n + 2 + K`.
//!
//! # Split
//!
//! [`split_of`] puts a session in validation when the first 8 bytes of
//! `SHA-256(b"fedflow-split/1\0" || session_id)`, read as a big-endian integer and divided by
//! 2^64, are below the validation fraction; otherwise in training. The split depends only on
//! the session id, so it is stable across runs, platforms and file order.

mod dataset;
mod format;
mod records;
mod split;
mod vocab;

pub use dataset::{DatasetStats, SiteDataset, encode_session, pool};
pub use format::{
    ALLOWED_COLUMNS, FileFormat, LoadOptions, Loaded, REQUIRED_COLUMNS, SkippedRow,
    encode_sessions, read_sessions, read_sessions_from, validate_record, write_sessions,
};
pub use records::{EncodedSession, NUM_LABELS, SessionRecord};
pub use split::{Split, hashed_id, split_of, split_unit};
pub use vocab::{FIRST_EVENT_ID, MAX_OOV_BUCKETS, PAD_ID, UNK_ID, VOCAB_FORMAT, Vocab};
