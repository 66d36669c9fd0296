//! Record types shared by loaders, the generator and the model.

use serde::{Deserialize, Serialize};

/// Number of satisfaction labels (1..=5), which are the model's classes 0..=4.
pub const NUM_LABELS: usize = 5;

/// One session as it appears in a partner-site data file.
///
/// `session_id` and `user_id` are personal identifiers: they are used only locally (for the
/// split and, later, for grouping by user) and are never sent off the site or logged in clear.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Debug output never shows identifiers in clear (a record can end up in a panic message or
/// a log line): ids are replaced by their [`hashed_id`](super::hashed_id).
impl std::fmt::Debug for SessionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRecord")
            .field("session", &super::hashed_id(&self.session_id))
            .field("events", &self.events)
            .field("label", &self.label)
            .field("user", &self.user_id.as_deref().map(super::hashed_id))
            .field("timestamp", &self.timestamp)
            .finish()
    }
}

impl SessionRecord {
    /// A record without the optional fields.
    pub fn new(session_id: impl Into<String>, events: &[&str], label: u8) -> Self {
        SessionRecord {
            session_id: session_id.into(),
            events: events.iter().map(|e| (*e).to_owned()).collect(),
            label,
            user_id: None,
            timestamp: None,
        }
    }
}

/// A session mapped into the model's input space: event ids and a class index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedSession {
    /// Event ids, oldest first; never empty, never containing the padding id.
    pub events: Vec<u32>,
    /// Class index, 0..NUM_LABELS (label - 1).
    pub class: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_identifiers() {
        let mut r = SessionRecord::new("secret-session-42", &["opened_help"], 3);
        r.user_id = Some("alice@example.com".into());
        let shown = format!("{r:?}");
        assert!(!shown.contains("secret-session-42"), "{shown}");
        assert!(!shown.contains("alice"), "{shown}");
        assert!(
            shown.contains(&crate::data::hashed_id("secret-session-42")),
            "{shown}"
        );
    }
}
