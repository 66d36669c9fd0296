//! Record types shared by loaders, the generator and the model.

use serde::{Deserialize, Serialize};

/// Number of satisfaction labels (1..=5), which are the model's classes 0..=4.
pub const NUM_LABELS: usize = 5;

/// One session as it appears in a partner-site data file.
///
/// `session_id` and `user_id` are personal identifiers: they are used only locally (for the
/// split and, later, for grouping by user) and are never sent off the site or logged in clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Site-local session identifier (non-empty).
    pub session_id: String,
    /// Ordered event names, oldest first (non-empty).
    pub events: Vec<String>,
    /// Satisfaction label, 1..=5.
    pub label: u8,
    /// Optional end-user identifier (groups sessions of one user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Optional timestamp, kept verbatim (RFC 3339 recommended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// A session mapped into the model's input space: event ids and a class index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedSession {
    /// Event ids, oldest first; never empty, never containing the padding id.
    pub events: Vec<u32>,
    /// Class index, 0..NUM_LABELS (label - 1).
    pub class: u32,
}
