//! The event vocabulary: event names to model input ids, and its JSON file format.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::fsio::write_atomic;

/// Id of the padding token; never produced by [`Vocab::encode`].
pub const PAD_ID: u32 = 0;
/// Id every event name missing from the vocabulary is mapped to.
pub const UNK_ID: u32 = 1;
/// First id given to a real event.
pub const FIRST_EVENT_ID: u32 = 2;
/// The `format` tag of the vocabulary's JSON file.
pub const VOCAB_FORMAT: &str = "fedflow-vocab/1";

/// Most hashed out-of-vocabulary buckets a vocabulary may declare.
pub const MAX_OOV_BUCKETS: u32 = 65_536;

/// Path used in errors about vocabularies that did not come from a file.
const MEMORY: &str = "<memory>";

/// Checks one event name: non-empty and free of whitespace.
///
/// Returns the reason the name is invalid; the caller adds where it was found.
pub(crate) fn check_event_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        Err("event name is empty".to_owned())
    } else if name.chars().any(char::is_whitespace) {
        Err(format!("event name {name:?} contains whitespace"))
    } else {
        Ok(())
    }
}

/// Maps event names to the ids the model consumes.
///
/// Id [`PAD_ID`] (0) is padding, [`UNK_ID`] (1) stands for any event not in the vocabulary,
/// and the vocabulary's events have ids 2, 3, ... in order. All partner sites and the
/// coordinator must use the same vocabulary, since ids index the model's embedding table.
///
/// A vocabulary may declare K *hashed out-of-vocabulary buckets* (`oov_buckets`, chosen
/// when the run is created): K more ids after the events, and an unknown event name goes to
/// bucket `u64::from_be_bytes(SHA-256(name)[..8]) mod K` instead of [`UNK_ID`], so new events
/// stay distinguishable (up to collisions) without changing the model's shape. With buckets
/// nothing is encoded as [`UNK_ID`]; the id stays reserved. K = 0 (the default) is the
/// vocabulary without buckets, whose file and hash are unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocab {
    /// Event names; `names[i]` has id `i + FIRST_EVENT_ID`.
    names: Vec<String>,
    /// The inverse of `names`.
    ids: HashMap<String, u32>,
    /// Hashed out-of-vocabulary buckets after the events (0: none).
    oov_buckets: u32,
}

impl Vocab {
    /// Builds a vocabulary whose events get ids 2, 3, ... in the order given.
    ///
    /// Fails on an empty list, an empty name, a name holding whitespace, or a name given twice.
    pub fn from_events<I, S>(events: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::build(events.into_iter().map(Into::into), Path::new(MEMORY))
    }

    fn build(events: impl Iterator<Item = String>, path: &Path) -> Result<Self> {
        let err = |reason: String| Error::Vocab {
            path: path.to_path_buf(),
            reason,
        };
        let mut names = Vec::new();
        let mut ids = HashMap::new();
        for name in events {
            let id = id_for_index(names.len()).ok_or_else(|| err("too many events".to_owned()))?;
            check_event_name(&name).map_err(|reason| err(format!("id {id}: {reason}")))?;
            if let Some(first) = ids.insert(name.clone(), id) {
                return Err(err(format!(
                    "event {name:?} is listed twice (ids {first} and {id})"
                )));
            }
            names.push(name);
        }
        if names.is_empty() {
            return Err(err("vocabulary has no events".to_owned()));
        }
        Ok(Vocab {
            names,
            ids,
            oov_buckets: 0,
        })
    }

    /// The same vocabulary with `k` hashed out-of-vocabulary buckets (at most
    /// [`MAX_OOV_BUCKETS`]).
    pub fn with_oov_buckets(mut self, k: u32) -> Result<Self> {
        if k > MAX_OOV_BUCKETS {
            return Err(Error::Vocab {
                path: MEMORY.into(),
                reason: format!("oov_buckets: {k} is more than {MAX_OOV_BUCKETS}"),
            });
        }
        id_for_index(self.names.len() + k as usize).ok_or_else(|| Error::Vocab {
            path: MEMORY.into(),
            reason: "too many ids".into(),
        })?;
        self.oov_buckets = k;
        Ok(self)
    }

    /// Number of hashed out-of-vocabulary buckets.
    pub fn oov_buckets(&self) -> u32 {
        self.oov_buckets
    }

    /// The first bucket's id (one past the last event's).
    pub fn first_oov_id(&self) -> u32 {
        FIRST_EVENT_ID + self.names.len() as u32
    }

    /// Whether `id` is one of the out-of-vocabulary buckets.
    pub fn is_oov_bucket(&self, id: u32) -> bool {
        id >= self.first_oov_id() && id < self.first_oov_id() + self.oov_buckets
    }

    /// Reads and validates a vocabulary file (see the [module docs](crate::data) for the format).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Writes the vocabulary file, replacing any existing file atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut text = self.to_json_string();
        text.push('\n');
        write_atomic(path.as_ref(), text.as_bytes())
    }

    /// The vocabulary in its file format (pretty-printed JSON, events in id order).
    pub fn to_json_string(&self) -> String {
        let file = VocabFileOut {
            format: VOCAB_FORMAT,
            pad_id: PAD_ID,
            unk_id: UNK_ID,
            oov_buckets: self.oov_buckets,
            events: EventsOut(&self.names),
        };
        serde_json::to_string_pretty(&file).expect("a vocabulary always serialises")
    }

    /// Parses and validates a vocabulary in its file format.
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::parse(text, Path::new(MEMORY))
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        let err = |reason: String| Error::Vocab {
            path: path.to_path_buf(),
            reason,
        };
        let file: VocabFileIn = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        if file.format != VOCAB_FORMAT {
            return Err(err(format!(
                "unsupported format {:?} (expected {VOCAB_FORMAT:?})",
                file.format
            )));
        }
        if file.pad_id != u64::from(PAD_ID) {
            return Err(err(format!(
                "pad_id must be {PAD_ID}, found {}",
                file.pad_id
            )));
        }
        if file.unk_id != u64::from(UNK_ID) {
            return Err(err(format!(
                "unk_id must be {UNK_ID}, found {}",
                file.unk_id
            )));
        }
        let n = file.events.0.len();
        if n == 0 {
            return Err(err("vocabulary has no events".to_owned()));
        }
        let last = u64::from(FIRST_EVENT_ID) + n as u64 - 1;
        let mut slots: Vec<Option<String>> = vec![None; n];
        let mut seen: HashSet<&str> = HashSet::with_capacity(n);
        for (name, id) in &file.events.0 {
            check_event_name(name).map_err(|reason| err(format!("id {id}: {reason}")))?;
            if !seen.insert(name) {
                return Err(err(format!("event {name:?} is listed twice")));
            }
            if *id < u64::from(FIRST_EVENT_ID) {
                return Err(err(format!(
                    "event {name:?} has reserved id {id} (0 is padding, 1 is unknown; \
                     events start at {FIRST_EVENT_ID})"
                )));
            }
            if *id > last {
                return Err(err(format!(
                    "event {name:?} has id {id}, but {n} event(s) must have exactly the ids \
                     {FIRST_EVENT_ID}..={last}"
                )));
            }
            let slot = &mut slots[(*id - u64::from(FIRST_EVENT_ID)) as usize];
            if let Some(other) = slot {
                return Err(err(format!("events {other:?} and {name:?} share id {id}")));
            }
            *slot = Some(name.clone());
        }
        // n names, n distinct ids, all within a range of n: every slot is filled.
        let names = slots.into_iter().map(|s| s.expect("ids cover the range"));
        let vocab = Self::build(names, path)?;
        let k = u32::try_from(file.oov_buckets)
            .ok()
            .filter(|&k| k <= MAX_OOV_BUCKETS)
            .ok_or_else(|| {
                err(format!(
                    "oov_buckets: {} is more than {MAX_OOV_BUCKETS}",
                    file.oov_buckets
                ))
            })?;
        vocab.with_oov_buckets(k).map_err(|e| match e {
            Error::Vocab { reason, .. } => err(reason),
            other => other,
        })
    }

    /// The id of a known event.
    pub fn id(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// The id of an event: its own, else its out-of-vocabulary bucket, else [`UNK_ID`].
    pub fn encode(&self, name: &str) -> u32 {
        self.id(name).unwrap_or_else(|| self.oov_id(name))
    }

    /// The id an event missing from the vocabulary is encoded as.
    fn oov_id(&self, name: &str) -> u32 {
        if self.oov_buckets == 0 {
            return UNK_ID;
        }
        let digest = crate::hash::sha256(name.as_bytes());
        let h = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        self.first_oov_id() + (h % u64::from(self.oov_buckets)) as u32
    }

    /// The name of a real event's id; `None` for [`PAD_ID`], [`UNK_ID`] and ids out of range.
    pub fn name(&self, id: u32) -> Option<&str> {
        let index = id.checked_sub(FIRST_EVENT_ID)?;
        self.names.get(index as usize).map(String::as_str)
    }

    /// Total number of ids including padding and unknown: the model's vocabulary size.
    #[allow(clippy::len_without_is_empty)] // never empty: padding and unknown always exist
    pub fn len(&self) -> usize {
        self.names.len() + FIRST_EVENT_ID as usize + self.oov_buckets as usize
    }

    /// Number of real events (excluding padding and unknown).
    pub fn num_events(&self) -> usize {
        self.names.len()
    }

    /// The real events' names in id order (the first has id [`FIRST_EVENT_ID`]).
    pub fn event_names(&self) -> &[String] {
        &self.names
    }
}

fn id_for_index(index: usize) -> Option<u32> {
    u32::try_from(index).ok()?.checked_add(FIRST_EVENT_ID)
}

/// The file as written: `events` in id order.
#[derive(Serialize)]
struct VocabFileOut<'a> {
    format: &'static str,
    pad_id: u32,
    unk_id: u32,
    #[serde(skip_serializing_if = "is_zero")]
    oov_buckets: u32,
    events: EventsOut<'a>,
}

fn is_zero(k: &u32) -> bool {
    *k == 0
}

struct EventsOut<'a>(&'a [String]);

impl Serialize for EventsOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (i, name) in self.0.iter().enumerate() {
            let id = id_for_index(i).expect("vocabulary size fits in u32");
            map.serialize_entry(name, &id)?;
        }
        map.end()
    }
}

/// The file as read; duplicate event names survive deserialisation so they can be reported.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VocabFileIn {
    format: String,
    pad_id: u64,
    unk_id: u64,
    #[serde(default)]
    oov_buckets: u64,
    events: EventsIn,
}

struct EventsIn(Vec<(String, u64)>);

impl<'de> Deserialize<'de> for EventsIn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct EventsVisitor;
        impl<'de> Visitor<'de> for EventsVisitor {
            type Value = EventsIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object mapping event names to integer ids")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<EventsIn, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((name, id)) = map.next_entry::<String, u64>()? {
                    entries.push((name, id));
                }
                Ok(EventsIn(entries))
            }
        }
        deserializer.deserialize_map(EventsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab_err(text: &str) -> String {
        match Vocab::from_json_str(text) {
            Err(Error::Vocab { path, reason }) => {
                assert_eq!(path, Path::new(MEMORY));
                reason
            }
            other => panic!("expected a vocabulary error, got {other:?}"),
        }
    }

    fn events_json(events: &str) -> String {
        format!(r#"{{"format": "fedflow-vocab/1", "pad_id": 0, "unk_id": 1, "events": {events}}}"#)
    }

    #[test]
    fn ids_names_and_size() {
        let v = Vocab::from_events(["opened_help", "searched", "clicked_answer"]).unwrap();
        assert_eq!(v.len(), 5);
        assert_eq!(v.num_events(), 3);
        assert_eq!(v.id("opened_help"), Some(2));
        assert_eq!(v.id("clicked_answer"), Some(4));
        assert_eq!(v.id("nope"), None);
        assert_eq!(v.encode("searched"), 3);
        assert_eq!(v.encode("nope"), UNK_ID);
        assert_eq!(v.name(PAD_ID), None);
        assert_eq!(v.name(UNK_ID), None);
        assert_eq!(v.name(3), Some("searched"));
        assert_eq!(v.name(5), None);
        assert_eq!(
            v.event_names(),
            ["opened_help", "searched", "clicked_answer"]
        );
    }

    #[test]
    fn from_events_rejects_bad_names() {
        let reason = |events: &[&str]| match Vocab::from_events(events.iter().copied()) {
            Err(Error::Vocab { reason, .. }) => reason,
            other => panic!("expected a vocabulary error, got {other:?}"),
        };
        assert_eq!(
            reason(&["a", "b", "a"]),
            r#"event "a" is listed twice (ids 2 and 4)"#
        );
        assert_eq!(reason(&["a", ""]), "id 3: event name is empty");
        assert_eq!(
            reason(&["a b"]),
            r#"id 2: event name "a b" contains whitespace"#
        );
        assert_eq!(
            reason(&["tab\there"]),
            r#"id 2: event name "tab\there" contains whitespace"#
        );
        assert_eq!(reason(&[]), "vocabulary has no events");
    }

    #[test]
    fn json_round_trip_keeps_id_order() {
        // Names deliberately not in alphabetical order.
        let v = Vocab::from_events(["zeta", "alpha", "mu"]).unwrap();
        let text = v.to_json_string();
        assert_eq!(
            text,
            "{\n  \"format\": \"fedflow-vocab/1\",\n  \"pad_id\": 0,\n  \"unk_id\": 1,\n  \
             \"events\": {\n    \"zeta\": 2,\n    \"alpha\": 3,\n    \"mu\": 4\n  }\n}"
        );
        assert_eq!(Vocab::from_json_str(&text).unwrap(), v);
    }

    #[test]
    fn ids_may_be_listed_in_any_order() {
        let v = Vocab::from_json_str(&events_json(r#"{"b": 3, "a": 2}"#)).unwrap();
        assert_eq!(v.event_names(), ["a", "b"]);
    }

    #[test]
    fn save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.json");
        let v = Vocab::from_events(["x", "y"]).unwrap();
        v.save(&path).unwrap();
        assert_eq!(Vocab::load(&path).unwrap(), v);
    }

    #[test]
    fn load_reports_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.json");
        std::fs::write(&path, events_json(r#"{"a": 5}"#)).unwrap();
        match Vocab::load(&path) {
            Err(e @ Error::Vocab { .. }) => {
                let Error::Vocab { path: p, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(p, &path);
                assert!(e.to_string().starts_with("vocabulary "), "{e}");
            }
            other => panic!("expected a vocabulary error, got {other:?}"),
        }
        let missing = dir.path().join("missing.json");
        assert!(matches!(Vocab::load(&missing), Err(Error::Io { .. })));
    }

    #[test]
    fn validation_errors() {
        let cases: &[(String, &str)] = &[
            (
                r#"{"format": "fedflow-vocab/2", "pad_id": 0, "unk_id": 1, "events": {"a": 2}}"#
                    .to_owned(),
                r#"unsupported format "fedflow-vocab/2" (expected "fedflow-vocab/1")"#,
            ),
            (
                r#"{"format": "fedflow-vocab/1", "pad_id": 1, "unk_id": 1, "events": {"a": 2}}"#
                    .to_owned(),
                "pad_id must be 0, found 1",
            ),
            (
                r#"{"format": "fedflow-vocab/1", "pad_id": 0, "unk_id": 2, "events": {"a": 2}}"#
                    .to_owned(),
                "unk_id must be 1, found 2",
            ),
            (events_json("{}"), "vocabulary has no events"),
            (
                events_json(r#"{"a": 2, "b": 2}"#),
                r#"events "a" and "b" share id 2"#,
            ),
            (
                events_json(r#"{"a": 2, "a": 3}"#),
                r#"event "a" is listed twice"#,
            ),
            (
                events_json(r#"{"a": 1}"#),
                r#"event "a" has reserved id 1 (0 is padding, 1 is unknown; events start at 2)"#,
            ),
            (
                events_json(r#"{"a": 2, "b": 4}"#),
                r#"event "b" has id 4, but 2 event(s) must have exactly the ids 2..=3"#,
            ),
            (events_json(r#"{"": 2}"#), "id 2: event name is empty"),
            (
                events_json(r#"{"a b": 2}"#),
                r#"id 2: event name "a b" contains whitespace"#,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(vocab_err(text), *expected, "for {text}");
        }
    }

    #[test]
    fn malformed_json_is_reported() {
        assert!(vocab_err("{").contains("EOF"));
        assert!(vocab_err(&events_json(r#"{"a": -1}"#)).contains("invalid value"));
        assert!(vocab_err(&events_json(r#"{"a": "2"}"#)).contains("invalid type"));
        assert!(vocab_err(r#"{"format": "fedflow-vocab/1"}"#).contains("missing field"));
        let extra = r#"{"format": "fedflow-vocab/1", "pad_id": 0, "unk_id": 1, "events": {"a": 2}, "x": 1}"#;
        assert!(vocab_err(extra).contains("unknown field `x`"));
    }

    #[test]
    fn hashed_buckets_keep_unknown_events_apart_without_changing_known_ids() {
        let plain = Vocab::from_events(["open", "search"]).unwrap();
        let v = plain.clone().with_oov_buckets(8).unwrap();
        assert_eq!((v.len(), v.first_oov_id(), v.oov_buckets()), (12, 4, 8));
        assert_eq!((v.encode("open"), v.encode("search")), (2, 3));
        // The bucket is SHA-256's first 8 bytes, big-endian, mod K: computed here apart.
        use sha2::{Digest, Sha256};
        for name in ["new_feature", "chat_opened", "x"] {
            let d = Sha256::digest(name.as_bytes());
            let h = u64::from_be_bytes(d[..8].try_into().unwrap());
            assert_eq!(v.encode(name), 4 + (h % 8) as u32, "{name}");
            assert!(v.is_oov_bucket(v.encode(name)));
            assert_eq!(plain.encode(name), UNK_ID);
        }
        // Many new names spread over the buckets.
        let used: HashSet<u32> = (0..200).map(|i| v.encode(&format!("ev{i}"))).collect();
        assert_eq!(used.len(), 8);
        assert!(!used.contains(&UNK_ID));
        // The file: K = 0 is written exactly as before; K > 0 round-trips and changes the hash.
        assert_eq!(
            plain.to_json_string(),
            "{\n  \"format\": \"fedflow-vocab/1\",\n  \"pad_id\": 0,\n  \"unk_id\": 1,\n  \"events\": {\n    \"open\": 2,\n    \"search\": 3\n  }\n}"
        );
        let back = Vocab::from_json_str(&v.to_json_string()).unwrap();
        assert_eq!(back, v);
        assert_ne!(v.to_json_string(), plain.to_json_string());
        let err = vocab_err(
            r#"{"format": "fedflow-vocab/1", "pad_id": 0, "unk_id": 1, "oov_buckets": 70000, "events": {"a": 2}}"#,
        );
        assert!(err.contains("oov_buckets"), "{err}");
        assert!(plain.with_oov_buckets(MAX_OOV_BUCKETS + 1).is_err());
    }
}
