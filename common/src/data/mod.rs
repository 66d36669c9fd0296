//! Partner-site feedback data: the record types, the event vocabulary, file formats
//! (CSV and JSON Lines), validation, and the deterministic train/validation split.

mod records;

pub use records::{EncodedSession, NUM_LABELS, SessionRecord};
