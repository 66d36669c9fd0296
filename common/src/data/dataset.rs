//! A partner site's sessions encoded with the shared vocabulary and split for training.

use std::path::Path;

use serde::Serialize;

use crate::data::format::{LoadOptions, read_sessions};
use crate::data::split::{Split, split_of};
use crate::data::vocab::{UNK_ID, Vocab};
use crate::data::{EncodedSession, NUM_LABELS, SessionRecord};
use crate::error::{Error, Result};

/// Summary of a site's dataset; contains only counts, so it may be logged or reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DatasetStats {
    /// Sessions kept (`train + validation`).
    pub sessions: usize,
    /// Sessions in the training split.
    pub train: usize,
    /// Sessions in the validation split.
    pub validation: usize,
    /// Events over all sessions.
    pub events_total: usize,
    /// Events not in the vocabulary (encoded as [`UNK_ID`], or into a hashed bucket when
    /// the vocabulary has them).
    pub unknown_events: usize,
    /// Of those, events that fell in the vocabulary's out-of-vocabulary buckets.
    pub oov_bucket_events: usize,
    /// Distinct event names not in the vocabulary (a count: the names are site data and
    /// are never logged or sent; for pooled datasets the sum over sites, an upper bound).
    pub distinct_unknown_names: usize,
    /// Sessions per class (`class_counts[label - 1]`), over both splits.
    pub class_counts: [usize; NUM_LABELS],
    /// Invalid rows skipped while loading (see [`LoadOptions::skip_invalid`]).
    pub skipped_rows: usize,
    /// Mean number of events per session (0 when there are no sessions).
    pub mean_len: f64,
    /// Most events in one session.
    pub max_len: usize,
}

impl DatasetStats {
    /// Adds one encoded session (before `mean_len` is finalised).
    fn add(&mut self, session: &EncodedSession, split: Split, vocab: &Vocab) {
        self.sessions += 1;
        match split {
            Split::Train => self.train += 1,
            Split::Validation => self.validation += 1,
        }
        self.events_total += session.events.len();
        let buckets = session
            .events
            .iter()
            .filter(|&&id| vocab.is_oov_bucket(id))
            .count();
        self.oov_bucket_events += buckets;
        self.unknown_events += buckets + session.events.iter().filter(|&&id| id == UNK_ID).count();
        self.class_counts[session.class as usize] += 1;
        self.max_len = self.max_len.max(session.events.len());
    }

    fn finalise_mean(&mut self) {
        self.mean_len = if self.sessions == 0 {
            0.0
        } else {
            self.events_total as f64 / self.sessions as f64
        };
    }
}

/// One site's sessions, encoded and split deterministically by session id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SiteDataset {
    /// Training sessions, in file order.
    pub train: Vec<EncodedSession>,
    /// Validation sessions, in file order.
    pub validation: Vec<EncodedSession>,
    /// The end user of each training session (`train_users[i]` for `train[i]`), as a dense
    /// local number: sessions with the same `user_id` share it, a session without one gets a
    /// number of its own. Record-level DP at user level groups sessions by it; it never
    /// leaves the site.
    pub train_users: Vec<u32>,
    /// Counts describing both splits.
    pub stats: DatasetStats,
}

/// Maps one session into the model's input space: event names to ids (unknown names to
/// [`UNK_ID`]) and label `1..=5` to class `0..=4`.
///
/// Fails with [`Error::DataFile`] (path `<memory>`) when the label is out of range or there
/// are no events, since such a session cannot be encoded.
pub fn encode_session(record: &SessionRecord, vocab: &Vocab) -> Result<EncodedSession> {
    let invalid = |reason: &str| Error::DataFile {
        path: "<memory>".into(),
        reason: reason.to_owned(),
    };
    if record.events.is_empty() {
        return Err(invalid("session has no events"));
    }
    if !(1..=NUM_LABELS as u8).contains(&record.label) {
        return Err(invalid(&format!(
            "session label {} is outside 1..={NUM_LABELS}",
            record.label
        )));
    }
    Ok(EncodedSession {
        events: record.events.iter().map(|e| vocab.encode(e)).collect(),
        class: u32::from(record.label - 1),
    })
}

impl SiteDataset {
    /// Encodes and splits sessions: a session goes to validation when
    /// [`split_of`]`(session_id, val_fraction)` says so.
    ///
    /// `val_fraction` must lie in `[0, 1]` ([`Error::Config`] otherwise). Records that cannot
    /// be encoded (no events, label outside 1..=5) fail with [`Error::DataFile`] naming the
    /// 1-based record number.
    pub fn from_records(
        records: &[SessionRecord],
        vocab: &Vocab,
        val_fraction: f64,
    ) -> Result<Self> {
        if !(0.0..=1.0).contains(&val_fraction) {
            return Err(Error::Config(format!(
                "validation fraction must be between 0 and 1, found {val_fraction}"
            )));
        }
        let mut dataset = SiteDataset::default();
        let mut users: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
        let mut next_user = 0u32;
        let mut unknown_names: std::collections::HashSet<&str> = Default::default();
        for (i, record) in records.iter().enumerate() {
            let encoded = encode_session(record, vocab).map_err(|e| match e {
                Error::DataFile { path, reason } => Error::DataFile {
                    path,
                    reason: format!("record {}: {reason}", i + 1),
                },
                other => other,
            })?;
            let split = split_of(&record.session_id, val_fraction);
            dataset.stats.add(&encoded, split, vocab);
            for e in &record.events {
                if vocab.id(e).is_none() {
                    unknown_names.insert(e.as_str());
                }
            }
            match split {
                Split::Train => {
                    let user = match record.user_id.as_deref() {
                        Some(id) => *users.entry(id).or_insert_with(|| {
                            next_user += 1;
                            next_user - 1
                        }),
                        None => {
                            next_user += 1;
                            next_user - 1
                        }
                    };
                    dataset.train_users.push(user);
                    dataset.train.push(encoded);
                }
                Split::Validation => dataset.validation.push(encoded),
            }
        }
        dataset.stats.distinct_unknown_names = unknown_names.len();
        dataset.stats.finalise_mean();
        Ok(dataset)
    }

    /// Reads a session file (see [`read_sessions`]) and builds its dataset; rows skipped under
    /// [`LoadOptions::skip_invalid`] are counted in [`DatasetStats::skipped_rows`].
    pub fn load(
        path: impl AsRef<Path>,
        vocab: &Vocab,
        options: &LoadOptions,
        val_fraction: f64,
    ) -> Result<Self> {
        let loaded = read_sessions(path, options)?;
        let mut dataset = Self::from_records(&loaded.records, vocab, val_fraction)?;
        dataset.stats.skipped_rows = loaded.skipped.len();
        Ok(dataset)
    }

    /// Concatenates several sites' datasets, in the order given (for centralised baselines).
    ///
    /// Splits are kept: each site's training sessions go to the pooled training set and its
    /// validation sessions to the pooled validation set. Stats are combined exactly.
    pub fn pool<'a>(datasets: impl IntoIterator<Item = &'a SiteDataset>) -> SiteDataset {
        let mut pooled = SiteDataset::default();
        for d in datasets {
            // Users of different sites are different people: renumber past the ones so far.
            let base = pooled.train_users.iter().max().map_or(0, |m| m + 1);
            pooled
                .train_users
                .extend(d.train_users.iter().map(|u| base + u));
            pooled.train.extend_from_slice(&d.train);
            pooled.validation.extend_from_slice(&d.validation);
            let (p, s) = (&mut pooled.stats, &d.stats);
            p.sessions += s.sessions;
            p.train += s.train;
            p.validation += s.validation;
            p.events_total += s.events_total;
            p.unknown_events += s.unknown_events;
            p.oov_bucket_events += s.oov_bucket_events;
            // Names two sites share are counted twice: in a pool this is an upper bound.
            p.distinct_unknown_names += s.distinct_unknown_names;
            for (pc, sc) in p.class_counts.iter_mut().zip(s.class_counts) {
                *pc += sc;
            }
            p.skipped_rows += s.skipped_rows;
            p.max_len = p.max_len.max(s.max_len);
        }
        pooled.stats.finalise_mean();
        pooled
    }

    /// Number of sessions in both splits.
    pub fn len(&self) -> usize {
        self.train.len() + self.validation.len()
    }

    /// Whether the dataset holds no sessions at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Free-function form of [`SiteDataset::pool`].
pub fn pool<'a>(datasets: impl IntoIterator<Item = &'a SiteDataset>) -> SiteDataset {
    SiteDataset::pool(datasets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, events: &[&str], label: u8) -> SessionRecord {
        SessionRecord::new(id, events, label)
    }

    fn vocab() -> Vocab {
        Vocab::from_events(["a", "b", "c"]).unwrap()
    }

    #[test]
    fn encodes_with_unknowns_and_classes() {
        let records = [
            record("s1", &["a", "zzz", "c"], 1),
            record("s2", &["b"], 5),
            record("s3", &["a", "b", "c", "yyy"], 3),
        ];
        let d = SiteDataset::from_records(&records, &vocab(), 0.0).unwrap();
        assert!(d.validation.is_empty());
        assert_eq!(
            d.train,
            vec![
                EncodedSession {
                    events: vec![2, UNK_ID, 4],
                    class: 0
                },
                EncodedSession {
                    events: vec![3],
                    class: 4
                },
                EncodedSession {
                    events: vec![2, 3, 4, UNK_ID],
                    class: 2
                },
            ]
        );
        let s = &d.stats;
        assert_eq!((s.sessions, s.train, s.validation), (3, 3, 0));
        assert_eq!((s.events_total, s.unknown_events), (8, 2));
        assert_eq!(s.class_counts, [1, 0, 1, 0, 1]);
        assert_eq!(s.max_len, 4);
        assert!((s.mean_len - 8.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.skipped_rows, 0);
    }

    #[test]
    fn unknown_events_fall_in_buckets_counted_apart_and_a_model_embeds_them() {
        let v = vocab().with_oov_buckets(4).unwrap();
        let records = [
            record("s1", &["a", "zzz", "c", "zzz"], 1),
            record("s2", &["yyy", "b"], 5),
        ];
        let d = SiteDataset::from_records(&records, &v, 0.0).unwrap();
        let s = &d.stats;
        assert_eq!(
            (s.events_total, s.unknown_events, s.oov_bucket_events),
            (6, 3, 3)
        );
        assert_eq!(s.distinct_unknown_names, 2);
        // The same name always lands in the same bucket, never on UNK.
        let e = &d.train[0].events;
        assert_eq!(e[1], e[3]);
        assert!(v.is_oov_bucket(e[1]) && v.is_oov_bucket(d.train[1].events[0]));
        // Without buckets the same sessions count unknowns but no bucket events.
        let plain = SiteDataset::from_records(&records, &vocab(), 0.0).unwrap();
        assert_eq!(
            (plain.stats.unknown_events, plain.stats.oov_bucket_events),
            (3, 0)
        );
        // A model sized by the vocabulary has a row for every bucket and runs on them.
        let cfg = crate::model::ModelConfig {
            vocab_size: v.len(),
            embed_dim: 8,
            hidden_size: 8,
            num_layers: 1,
            ..crate::model::ModelConfig::default()
        };
        let model =
            crate::model::AttentionFlowModel::new(&cfg, &candle_core::Device::Cpu, 1).unwrap();
        let params = crate::params::ParamSet::from_varmap(model.varmap()).unwrap();
        let rows = params
            .iter()
            .find(|(n, _)| n.contains("embed"))
            .map(|(_, t)| t.dims()[0])
            .unwrap();
        assert_eq!(rows, 3 + crate::data::FIRST_EVENT_ID as usize + 4);
        let predicted = crate::train::predict(&model, &d.train, 8).unwrap();
        assert_eq!(predicted.len(), 2);
    }

    #[test]
    fn training_sessions_are_grouped_by_user() {
        let mut records: Vec<SessionRecord> = (0..6)
            .map(|i| record(&format!("s{i}"), &["a"], 1))
            .collect();
        for (r, user) in records.iter_mut().zip(["u1", "u2", "u1", "", "u2", ""]) {
            r.user_id = (!user.is_empty()).then(|| user.to_owned());
        }
        let d = SiteDataset::from_records(&records, &vocab(), 0.0).unwrap();
        // u1 -> 0, u2 -> 1, then each anonymous session a number of its own.
        assert_eq!(d.train_users, [0, 1, 0, 2, 1, 3]);
        let pooled = SiteDataset::pool([&d, &d]);
        assert_eq!(pooled.train_users, [0, 1, 0, 2, 1, 3, 4, 5, 4, 6, 5, 7]);
    }

    #[test]
    fn split_follows_split_of() {
        let records: Vec<SessionRecord> = (0..500)
            .map(|i| record(&format!("s{i}"), &["a"], (i % 5 + 1) as u8))
            .collect();
        let d = SiteDataset::from_records(&records, &vocab(), 0.3).unwrap();
        let expected_val = records
            .iter()
            .filter(|r| split_of(&r.session_id, 0.3) == Split::Validation)
            .count();
        assert_eq!(d.validation.len(), expected_val);
        assert_eq!(d.stats.validation, expected_val);
        assert_eq!(d.train.len() + d.validation.len(), 500);
        assert_eq!(d.len(), 500);
        let all = SiteDataset::from_records(&records, &vocab(), 1.0).unwrap();
        assert_eq!(all.validation.len(), 500);
    }

    #[test]
    fn rejects_bad_fraction_and_bad_records() {
        let records = [record("s1", &["a"], 1)];
        for bad in [-0.1, 1.5, f64::NAN] {
            let err = SiteDataset::from_records(&records, &vocab(), bad).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err:?}");
        }
        let bad = [record("s1", &["a"], 1), record("s2", &["a"], 0)];
        let err = SiteDataset::from_records(&bad, &vocab(), 0.2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "<memory>: record 2: session label 0 is outside 1..=5"
        );
        let empty = [record("s1", &[], 2)];
        let err = SiteDataset::from_records(&empty, &vocab(), 0.2).unwrap_err();
        assert_eq!(err.to_string(), "<memory>: record 1: session has no events");
    }

    #[test]
    fn load_counts_skipped_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.csv");
        std::fs::write(
            &path,
            "session_id,events,label\ns1,a b,1\ns2,a,9\ns3,c zzz,2\n",
        )
        .unwrap();
        let options = LoadOptions { skip_invalid: true };
        let d = SiteDataset::load(&path, &vocab(), &options, 0.0).unwrap();
        assert_eq!(d.stats.sessions, 2);
        assert_eq!(d.stats.skipped_rows, 1);
        assert_eq!(d.stats.unknown_events, 1);
        let strict = SiteDataset::load(&path, &vocab(), &LoadOptions::default(), 0.0);
        assert!(matches!(strict, Err(Error::Data { line: 3, .. })));
    }

    #[test]
    fn pool_concatenates_and_combines_stats() {
        let v = vocab();
        let a = SiteDataset::from_records(
            &[record("a1", &["a"], 1), record("a2", &["a", "b", "x"], 2)],
            &v,
            0.5,
        )
        .unwrap();
        let mut b = SiteDataset::from_records(&[record("b1", &["c"; 6], 5)], &v, 0.5).unwrap();
        b.stats.skipped_rows = 2;
        let pooled = pool([&a, &b]);
        let train: Vec<_> = a.train.iter().chain(&b.train).cloned().collect();
        let validation: Vec<_> = a.validation.iter().chain(&b.validation).cloned().collect();
        assert_eq!(pooled.train, train);
        assert_eq!(pooled.validation, validation);
        let s = &pooled.stats;
        assert_eq!(s.sessions, 3);
        assert_eq!(s.train + s.validation, 3);
        assert_eq!(s.events_total, 10);
        assert_eq!(s.unknown_events, 1);
        assert_eq!(s.class_counts, [1, 1, 0, 0, 1]);
        assert_eq!(s.skipped_rows, 2);
        assert_eq!(s.max_len, 6);
        assert!((s.mean_len - 10.0 / 3.0).abs() < 1e-12);
        assert_eq!(pool([]), SiteDataset::default());
    }

    #[test]
    fn stats_serialise() {
        let d = SiteDataset::from_records(&[record("s", &["a"], 2)], &vocab(), 0.0).unwrap();
        let json = serde_json::to_value(&d.stats).unwrap();
        assert_eq!(json["class_counts"], serde_json::json!([0, 1, 0, 0, 0]));
        assert_eq!(json["sessions"], 1);
    }
}
