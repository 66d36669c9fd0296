//! Property tests of every decoder and validator in `fedflow-common`, on arbitrary bytes and
//! values: session files (CSV, JSON Lines), the vocabulary, safetensors parameter sets and
//! layouts, the FedAvg accumulator's inputs, saved models, and the configuration validators.
//!
//! Each must never panic, must refuse bad input with a non-empty message naming what the API
//! promises (the line, field or tensor), and must not change any state when it refuses.
//! Case counts are kept moderate so the whole file runs in seconds.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use fedflow_common::Error;
use fedflow_common::baseline::BaselineConfig;
use fedflow_common::data::{
    EncodedSession, FileFormat, LoadOptions, Loaded, PAD_ID, SessionRecord, SiteDataset,
    SkippedRow, Vocab, encode_sessions, read_sessions, read_sessions_from,
};
use fedflow_common::device::DeviceChoice;
use fedflow_common::fedavg::{Added, FedAvgAccumulator, MAX_WEIGHT, NormBound};
use fedflow_common::model::{
    AttentionFlowModel, Batch, CARD_FILE, EncoderKind, Mode, ModelConfig, PARAMS_FILE, VOCAB_FILE,
    load_model, save_model,
};
use fedflow_common::params::{ParamSet, ParamSpec, SafetensorsLayout, TensorSpec};
use fedflow_common::privacy::dpfedavg::{AdaptiveClipping, SiteDp, TrustMode};
use fedflow_common::robust::{RobustAccumulator, RobustRule};
use fedflow_common::synth::SynthConfig;
use fedflow_common::train::{DpSgdConfig, OptimizerKind, PrivacyUnit, TrainConfig};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::Index;

// ================================================================================================
// Session files
// ================================================================================================

const CSV_PATH: &str = "site.csv";
const JSONL_PATH: &str = "site.jsonl";
/// Every generated session id starts with this, so an error message can be searched for ids.
const ID_PREFIX: &str = "sid-";

fn path_of(format: FileFormat) -> &'static str {
    match format {
        FileFormat::Csv => CSV_PATH,
        FileFormat::JsonLines => JSONL_PATH,
    }
}

fn read(bytes: &[u8], format: FileFormat, skip_invalid: bool) -> Result<Loaded, Error> {
    read_sessions_from(
        bytes,
        format,
        path_of(format),
        &LoadOptions { skip_invalid },
    )
}

/// Valid records with unique, distinctive ids (which may hold commas, quotes, spaces and
/// line breaks, all of which CSV must quote).
fn records() -> impl Strategy<Value = Vec<SessionRecord>> {
    let suffix = prop_oneof![
        6 => "[a-z0-9 ,\"]{1,6}",
        1 => "[a-z]{1,3}\n[a-z]{1,3}",
    ];
    let row = (
        suffix,
        vec("[a-z_.:é-]{1,8}", 1..5),
        1u8..=5,
        option::of("u-[a-z0-9,]{1,5}"),
        option::of("2026-0[1-9]-1[0-9]T00:00:00Z"),
    );
    vec(row, 1..10).prop_map(|rows| {
        rows.into_iter()
            .enumerate()
            .map(
                |(i, (suffix, events, label, user_id, timestamp))| SessionRecord {
                    session_id: format!("{ID_PREFIX}{i}-{suffix}"),
                    events,
                    label,
                    user_id,
                    timestamp,
                },
            )
            .collect()
    })
}

/// A CSV row of raw fields, quoted as needed, ending in `\n` or `\r\n`.
fn csv_row(fields: &[Vec<u8>], crlf: bool) -> Vec<u8> {
    let terminator = if crlf {
        csv::Terminator::CRLF
    } else {
        csv::Terminator::Any(b'\n')
    };
    let mut w = csv::WriterBuilder::new()
        .terminator(terminator)
        .from_writer(Vec::new());
    w.write_record(fields).expect("writing to memory");
    w.into_inner().expect("writing to memory")
}

/// The five CSV fields of a record (absent optional fields are empty).
fn csv_fields(r: &SessionRecord) -> Vec<Vec<u8>> {
    vec![
        r.session_id.clone().into_bytes(),
        r.events.join(" ").into_bytes(),
        r.label.to_string().into_bytes(),
        r.user_id.clone().unwrap_or_default().into_bytes(),
        r.timestamp.clone().unwrap_or_default().into_bytes(),
    ]
}

/// Number of line breaks in `bytes`, counting `\n`, `\r\n` and a lone `\r` once each.
fn line_breaks(bytes: &[u8]) -> u64 {
    let mut n = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')) {
            n += 1;
        }
    }
    n
}

/// How a test file is laid out around its rows.
#[derive(Clone, Debug)]
struct Layout {
    crlf: bool,
    bom: bool,
    /// Whether a blank line precedes row `i` (cycled).
    blanks: Vec<bool>,
}

fn layout() -> impl Strategy<Value = Layout> {
    (
        any::<bool>(),
        any::<bool>(),
        vec(prop::bool::weighted(0.2), 1..8),
    )
        .prop_map(|(crlf, bom, blanks)| Layout { crlf, bom, blanks })
}

/// Joins a header (if any) and rows into a file; returns its bytes and the 1-based line
/// each row starts on.
fn assemble(header: Option<Vec<u8>>, rows: &[Vec<u8>], layout: &Layout) -> (Vec<u8>, Vec<u64>) {
    let eol: &[u8] = if layout.crlf { b"\r\n" } else { b"\n" };
    let mut bytes = Vec::new();
    if layout.bom {
        bytes.extend_from_slice(b"\xef\xbb\xbf");
    }
    if let Some(h) = header {
        bytes.extend_from_slice(&h);
    }
    let mut lines = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if layout.blanks[i % layout.blanks.len()] {
            bytes.extend_from_slice(eol);
        }
        lines.push(1 + line_breaks(&bytes));
        bytes.extend_from_slice(row);
    }
    (bytes, lines)
}

fn csv_header(crlf: bool) -> Vec<u8> {
    let names = ["session_id", "events", "label", "user_id", "timestamp"];
    csv_row(&names.map(|n| n.as_bytes().to_vec()), crlf)
}

/// One way to make a CSV row invalid.
#[derive(Clone, Debug)]
enum CsvFault {
    Label(&'static str),
    EmptyId(&'static str),
    MissingField,
    ExtraField,
    NoEvents,
    Events(&'static str),
    /// The same session id as an earlier row (the first row gets a bad label instead).
    Duplicate(Index),
    /// Invalid UTF-8 in field `i`.
    NotUtf8(usize),
}

fn csv_fault() -> impl Strategy<Value = CsvFault> {
    prop_oneof![
        prop::sample::select(vec![
            "0",
            "6",
            "-1",
            "x",
            "",
            "4.0",
            " 4",
            "99999999999999999999"
        ])
        .prop_map(CsvFault::Label),
        prop::sample::select(vec!["", "   "]).prop_map(CsvFault::EmptyId),
        Just(CsvFault::MissingField),
        Just(CsvFault::ExtraField),
        Just(CsvFault::NoEvents),
        prop::sample::select(vec!["a  b", " a", "a ", "a\tb"]).prop_map(CsvFault::Events),
        any::<Index>().prop_map(CsvFault::Duplicate),
        (0usize..5).prop_map(CsvFault::NotUtf8),
    ]
}

/// The fields of row `k` of `records` after `fault`.
fn corrupt_csv(records: &[SessionRecord], k: usize, fault: &CsvFault) -> Vec<Vec<u8>> {
    let mut f = csv_fields(&records[k]);
    match fault {
        CsvFault::Label(l) => f[2] = l.as_bytes().to_vec(),
        CsvFault::EmptyId(s) => f[0] = s.as_bytes().to_vec(),
        CsvFault::MissingField => {
            f.pop();
        }
        CsvFault::ExtraField => f.push(b"x".to_vec()),
        CsvFault::NoEvents => f[1].clear(),
        CsvFault::Events(e) => f[1] = e.as_bytes().to_vec(),
        CsvFault::Duplicate(j) if k > 0 => f = csv_fields(&records[j.index(k)]),
        CsvFault::Duplicate(_) => f[2] = b"0".to_vec(),
        CsvFault::NotUtf8(i) => f[*i] = b"ok\xff\xfe".to_vec(),
    }
    f
}

/// One way to make a JSON Lines row invalid.
#[derive(Clone, Debug)]
enum JsonFault {
    /// Replace the whole line with this text.
    Line(&'static str),
    /// Set a field to this JSON (`None`: remove it).
    Field(&'static str, Option<&'static str>),
    Duplicate(Index),
    /// Invalid UTF-8 inside the line.
    NotUtf8(Index),
}

fn json_fault() -> impl Strategy<Value = JsonFault> {
    let line = prop::sample::select(vec![
        "{",
        "{\"session_id\": ",
        "nul",
        "[]",
        "3",
        "\"x\"",
        "null",
        "{} {}",
    ]);
    let field = prop::sample::select(vec![
        ("label", Some("0")),
        ("label", Some("6")),
        ("label", Some("-1")),
        ("label", Some("\"4\"")),
        ("label", Some("4.0")),
        ("label", Some("1e3")),
        ("label", Some("18446744073709551615")),
        ("label", Some("18446744073709551616")),
        ("label", Some("true")),
        ("label", Some("null")),
        ("label", None),
        ("session_id", Some("\"\"")),
        ("session_id", Some("\"  \"")),
        ("session_id", Some("5")),
        ("session_id", Some("[]")),
        ("session_id", None),
        ("events", Some("[]")),
        ("events", Some("\"a b\"")),
        ("events", Some("[1]")),
        ("events", Some("[\"a b\"]")),
        ("events", Some("[\"\"]")),
        ("events", Some("[\"ok\", {}]")),
        ("events", Some("null")),
        ("events", None),
        ("user_id", Some("5")),
        ("user_id", Some("[]")),
        ("timestamp", Some("{}")),
        ("timestamp", Some("false")),
        ("extra", Some("1")),
        ("Label", Some("3")),
    ]);
    prop_oneof![
        1 => line.prop_map(JsonFault::Line),
        3 => field.prop_map(|(k, v)| JsonFault::Field(k, v)),
        1 => any::<Index>().prop_map(JsonFault::Duplicate),
        1 => any::<Index>().prop_map(JsonFault::NotUtf8),
    ]
}

fn json_line(record: &SessionRecord, crlf: bool) -> Vec<u8> {
    let mut line = serde_json::to_vec(record).expect("a record serialises");
    line.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
    line
}

/// Line `k` of a JSON Lines file of `records` after `fault`.
fn corrupt_json(records: &[SessionRecord], k: usize, fault: &JsonFault, crlf: bool) -> Vec<u8> {
    let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
    let mut value = serde_json::to_value(&records[k]).expect("a record serialises");
    let mut line = match fault {
        JsonFault::Line(text) => text.as_bytes().to_vec(),
        JsonFault::Field(key, new) => {
            let object = value.as_object_mut().expect("a record is an object");
            match new {
                Some(v) => {
                    object.insert((*key).into(), serde_json::from_str(v).expect("valid json"));
                }
                None => {
                    object.remove(*key);
                }
            }
            serde_json::to_vec(&value).expect("serialises")
        }
        JsonFault::Duplicate(j) if k > 0 => {
            let mut r = records[k].clone();
            r.session_id = records[j.index(k)].session_id.clone();
            serde_json::to_vec(&r).expect("serialises")
        }
        JsonFault::Duplicate(_) => b"{".to_vec(),
        JsonFault::NotUtf8(at) => {
            let mut line = serde_json::to_vec(&records[k]).expect("serialises");
            let i = at.index(line.len());
            line[i] = 0xff;
            line
        }
    };
    line.extend_from_slice(eol);
    line
}

/// Checks a load of a file whose row `k` (on line `line`) is the only invalid one.
fn check_one_bad_row(
    bytes: &[u8],
    format: FileFormat,
    records: &[SessionRecord],
    k: usize,
    line: u64,
) -> Result<(), TestCaseError> {
    let path = path_of(format);
    let reason = match read(bytes, format, false) {
        Err(Error::Data {
            path: p,
            line: l,
            reason,
        }) => {
            prop_assert_eq!(p, Path::new(path));
            prop_assert_eq!(l, line, "reason: {}", reason);
            prop_assert!(!reason.is_empty());
            reason
        }
        other => {
            return Err(TestCaseError::fail(format!(
                "expected an error on line {line}, got {other:?}"
            )));
        }
    };
    let message = Error::Data {
        path: path.into(),
        line,
        reason: reason.clone(),
    }
    .to_string();
    prop_assert!(
        message.starts_with(&format!("{path}:{line}: ")),
        "{}",
        message
    );
    // Architecture invariant: ids never appear in errors.
    prop_assert!(!message.contains(ID_PREFIX), "{}", message);

    let mut rest = records.to_vec();
    rest.remove(k);
    match read(bytes, format, true) {
        Ok(loaded) => {
            prop_assert_eq!(loaded.skipped, vec![SkippedRow { line, reason }]);
            prop_assert_eq!(loaded.records, rest);
        }
        Err(Error::DataFile { reason: why, .. }) if rest.is_empty() => {
            prop_assert!(
                why.contains(&format!("the first on line {line}: {reason}")),
                "{}",
                why
            );
        }
        Err(e) => return Err(TestCaseError::fail(format!("skipping failed: {e}"))),
    }
    Ok(())
}

/// One edit of a file's bytes.
#[derive(Clone, Debug)]
enum Edit {
    Set(Index, u8),
    Insert(Index, u8),
    Delete(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(b",\"\n\r {}[]:\\0-9".to_vec()),
    ];
    prop_oneof![
        (any::<Index>(), byte.clone()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<Index>(), byte).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<Index>().prop_map(Edit::Delete),
    ]
}

fn apply_edits(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for e in edits {
        match *e {
            Edit::Set(i, b) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            Edit::Insert(i, b) => {
                let i = i.index(bytes.len() + 1);
                bytes.insert(i, b);
            }
            Edit::Delete(i) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes.remove(i);
            }
            _ => {}
        }
    }
}

/// A valid file of `records` in `format`, laid out per `layout`.
fn valid_file(records: &[SessionRecord], format: FileFormat, layout: &Layout) -> Vec<u8> {
    match format {
        FileFormat::Csv => {
            let rows: Vec<Vec<u8>> = records
                .iter()
                .map(|r| csv_row(&csv_fields(r), layout.crlf))
                .collect();
            assemble(Some(csv_header(layout.crlf)), &rows, layout).0
        }
        FileFormat::JsonLines => {
            let rows: Vec<Vec<u8>> = records.iter().map(|r| json_line(r, layout.crlf)).collect();
            assemble(None, &rows, layout).0
        }
    }
}

/// Arbitrary bytes, or a valid file with a few random edits.
fn session_file_bytes(format: FileFormat) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..400),
        (records(), layout(), vec(edit(), 1..5)).prop_map(move |(records, layout, edits)| {
            let mut bytes = valid_file(&records, format, &layout);
            apply_edits(&mut bytes, &edits);
            bytes
        }),
    ]
}

/// What any load of any bytes must satisfy: no panic; strict and lenient loads agree (the
/// strict load's row error is the lenient load's first skipped row, anything else fails both
/// alike); errors name the file and a line within it; what loads is valid (it can be written
/// and read back unchanged); skipped rows are listed in increasing line order.
fn check_any_load(bytes: &[u8], format: FileFormat) -> Result<(), TestCaseError> {
    let path = path_of(format);
    let max_line = 1 + line_breaks(bytes);
    let strict = read(bytes, format, false);
    let lenient = read(bytes, format, true);
    if let Err(e) = &strict {
        let message = e.to_string();
        prop_assert!(message.starts_with(&format!("{path}:")), "{}", message);
        prop_assert!(message.len() > path.len() + 2, "{}", message);
    }
    match (&strict, &lenient) {
        (Ok(s), Ok(l)) => {
            prop_assert!(l.skipped.is_empty());
            prop_assert_eq!(&s.records, &l.records);
        }
        (Err(Error::Data { line, reason, .. }), Ok(l)) => {
            prop_assert!(
                (1..=max_line).contains(line),
                "line {} of {}",
                line,
                max_line
            );
            prop_assert_eq!(
                l.skipped.first(),
                Some(&SkippedRow {
                    line: *line,
                    reason: reason.clone()
                })
            );
        }
        (Err(Error::Data { line, reason, .. }), Err(Error::DataFile { reason: why, .. }))
            if why.starts_with("file holds no valid sessions") =>
        {
            prop_assert!(
                why.contains(&format!("the first on line {line}: {reason}")),
                "{}",
                why
            );
        }
        (Err(s), Err(l)) => prop_assert_eq!(s.to_string(), l.to_string()),
        (s, l) => {
            return Err(TestCaseError::fail(format!(
                "strict load gave {s:?} but lenient gave {l:?}"
            )));
        }
    }
    if let Ok(l) = &lenient {
        prop_assert!(!l.records.is_empty());
        prop_assert!(l.skipped.windows(2).all(|w| w[0].line < w[1].line));
        for s in &l.skipped {
            prop_assert!((1..=max_line).contains(&s.line));
            prop_assert!(!s.reason.is_empty());
        }
        for f in [FileFormat::Csv, FileFormat::JsonLines] {
            let written = encode_sessions(&l.records, f, path_of(f))
                .map_err(|e| TestCaseError::fail(format!("loaded records are invalid: {e}")))?;
            let back = read(&written, f, false)
                .map_err(|e| TestCaseError::fail(format!("rewritten file fails: {e}")))?;
            prop_assert_eq!(&back.records, &l.records);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A valid CSV file (any layout: CRLF or LF, BOM, blank lines, quoted fields with commas,
    /// quotes and line breaks) with one row made invalid in any of the documented ways: the
    /// strict load fails naming exactly that row's first line and never an id; the lenient
    /// load skips exactly that row with the same reason and keeps every other record.
    #[test]
    fn csv_error_names_the_line_of_the_corrupted_row(
        records in records(),
        layout in layout(),
        which in any::<Index>(),
        fault in csv_fault(),
    ) {
        let k = which.index(records.len());
        let mut rows: Vec<Vec<u8>> =
            records.iter().map(|r| csv_row(&csv_fields(r), layout.crlf)).collect();
        rows[k] = csv_row(&corrupt_csv(&records, k, &fault), layout.crlf);
        let (bytes, lines) = assemble(Some(csv_header(layout.crlf)), &rows, &layout);
        check_one_bad_row(&bytes, FileFormat::Csv, &records, k, lines[k])?;
    }

    /// The same for JSON Lines: one line made invalid (malformed JSON, not an object, a bad
    /// or missing field, an unknown field, a duplicate id, invalid UTF-8) among valid ones,
    /// with CRLF or LF endings, a BOM and blank lines: the error names that line.
    #[test]
    fn jsonl_error_names_the_corrupted_line(
        records in records(),
        layout in layout(),
        which in any::<Index>(),
        fault in json_fault(),
    ) {
        let k = which.index(records.len());
        let mut rows: Vec<Vec<u8>> = records.iter().map(|r| json_line(r, layout.crlf)).collect();
        rows[k] = corrupt_json(&records, k, &fault, layout.crlf);
        let (bytes, lines) = assemble(None, &rows, &layout);
        check_one_bad_row(&bytes, FileFormat::JsonLines, &records, k, lines[k])?;
    }

    /// Valid files of any layout load back exactly the records they hold.
    #[test]
    fn valid_session_files_load_exactly(records in records(), layout in layout()) {
        for format in [FileFormat::Csv, FileFormat::JsonLines] {
            let bytes = valid_file(&records, format, &layout);
            let loaded = read(&bytes, format, false)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(loaded.records, records.clone());
        }
    }

    /// Arbitrary bytes and randomly edited valid files, read as CSV: see [`check_any_load`].
    #[test]
    fn csv_reader_survives_arbitrary_bytes(bytes in session_file_bytes(FileFormat::Csv)) {
        check_any_load(&bytes, FileFormat::Csv)?;
    }

    /// Arbitrary bytes and randomly edited valid files, read as JSON Lines: see
    /// [`check_any_load`].
    #[test]
    fn jsonl_reader_survives_arbitrary_bytes(bytes in session_file_bytes(FileFormat::JsonLines)) {
        check_any_load(&bytes, FileFormat::JsonLines)?;
    }

    /// The format is chosen by extension alone, case-insensitively; any other name is refused
    /// with an error naming it, and `read_sessions` refuses such a name before opening it.
    #[test]
    fn format_is_chosen_by_extension(name in "[a-zA-Z0-9 ._/-]{0,12}(\\.(csv|CSV|jsonl|NDJson|json|txt))?") {
        let ext = Path::new(&name)
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match (FileFormat::from_path(&name), ext.as_deref()) {
            (Ok(FileFormat::Csv), Some("csv")) => {}
            (Ok(FileFormat::JsonLines), Some("jsonl" | "ndjson")) => {}
            (Err(e), Some(other)) if !["csv", "jsonl", "ndjson"].contains(&other) => {
                prop_assert!(e.to_string().starts_with(&format!("{name}: ")), "{}", e);
            }
            (Err(e), None) => prop_assert!(e.to_string().starts_with(&format!("{name}: ")), "{}", e),
            (got, ext) => {
                return Err(TestCaseError::fail(format!("{name:?} ({ext:?}) gave {got:?}")));
            }
        }
        if FileFormat::from_path(&name).is_err() {
            let err = read_sessions(&name, &LoadOptions::default()).unwrap_err();
            prop_assert!(matches!(err, Error::DataFile { .. }), "{:?}", err);
        }
    }
}

/// Records as a caller may build them, unchecked: events possibly empty, any label byte.
fn raw_records() -> impl Strategy<Value = Vec<SessionRecord>> {
    let row = (
        "[a-z0-9]{0,4}",
        vec(
            prop_oneof!["[a-d]{1,2}", Just(String::new()), Just("a b".to_owned())],
            0..5,
        ),
        prop_oneof![4 => 1u8..=5, 1 => any::<u8>()],
        option::of("[a-c]"),
    );
    vec(row, 0..12).prop_map(|rows| {
        rows.into_iter()
            .map(|(session_id, events, label, user_id)| SessionRecord {
                session_id,
                events,
                label,
                user_id,
                timestamp: None,
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `SiteDataset::from_records` (the encoder between session files and the model) on
    /// unchecked records and any validation fraction (NaN, negative, above 1): refuses a bad
    /// fraction (`invalid config`) or the first record without events or with a label outside
    /// 1..=5, naming its 1-based record number; otherwise every record lands in exactly one
    /// split, encoded to ids inside the vocabulary (never padding) and a class below 5, with
    /// one user number per training session.
    #[test]
    fn dataset_encoding_refuses_exactly_the_unencodable(
        records in raw_records(),
        val_fraction in prop_oneof![4 => 0.0f64..=1.0, 1 => real()],
    ) {
        let vocab = Vocab::from_events(["a", "b", "c"]).unwrap();
        let first_bad = records
            .iter()
            .position(|r| r.events.is_empty() || !(1..=5).contains(&r.label));
        match SiteDataset::from_records(&records, &vocab, val_fraction) {
            Ok(d) => {
                prop_assert!((0.0..=1.0).contains(&val_fraction) && first_bad.is_none());
                prop_assert_eq!(d.train.len() + d.validation.len(), records.len());
                prop_assert_eq!(d.train_users.len(), d.train.len());
                prop_assert_eq!(d.stats.sessions, records.len());
                for s in d.train.iter().chain(&d.validation) {
                    prop_assert!(s.class < 5);
                    prop_assert!(!s.events.is_empty());
                    prop_assert!(s.events.iter().all(|&id| id != PAD_ID && (id as usize) < vocab.len()));
                }
            }
            Err(e) => {
                let message = e.to_string();
                if !(0.0..=1.0).contains(&val_fraction) {
                    prop_assert!(message.starts_with("invalid config: "), "{}", message);
                } else {
                    let n = first_bad.map(|i| i + 1);
                    prop_assert!(n.is_some(), "refused good records: {}", message);
                    let want = format!("record {}: ", n.unwrap());
                    prop_assert!(message.contains(&want), "{} should name {}", message, want);
                }
            }
        }
    }
}

// ================================================================================================
// Vocabulary
// ================================================================================================

/// JSON text for a number-ish field: mostly the right value, sometimes anything.
fn id_text(right: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just(right.to_owned()),
        1 => prop::sample::select(vec!["0", "1", "2", "-1", "0.0", "\"0\"", "null", "18446744073709551616"])
            .prop_map(str::to_owned),
        1 => any::<u64>().prop_map(|n| n.to_string()),
    ]
}

/// A vocabulary file made of parts that are each usually right.
#[derive(Clone, Debug)]
struct VocabText {
    format: String,
    pad: String,
    unk: String,
    /// Event names and ids as JSON texts, in file order (names may repeat).
    events: Vec<(String, String)>,
    extra_key: bool,
    missing: Option<usize>,
}

impl VocabText {
    fn render(&self) -> String {
        let mut parts = vec![
            format!(
                "\"format\": {}",
                serde_json::to_string(&self.format).unwrap()
            ),
            format!("\"pad_id\": {}", self.pad),
            format!("\"unk_id\": {}", self.unk),
        ];
        let events: Vec<String> = self
            .events
            .iter()
            .map(|(n, id)| format!("{}: {id}", serde_json::to_string(n).unwrap()))
            .collect();
        parts.push(format!("\"events\": {{{}}}", events.join(", ")));
        if let Some(i) = self.missing {
            parts.remove(i % parts.len());
        }
        if self.extra_key {
            parts.push("\"extra\": 1".into());
        }
        format!("{{{}}}", parts.join(",\n"))
    }

    /// Whether the file follows every documented rule, decided independently of the parser.
    fn is_valid(&self) -> bool {
        let n = self.events.len();
        let mut names = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        self.format == "fedflow-vocab/1"
            && self.pad == "0"
            && self.unk == "1"
            && !self.extra_key
            && self.missing.is_none()
            && n > 0
            && self.events.iter().all(|(name, id)| {
                !name.is_empty()
                    && !name.chars().any(char::is_whitespace)
                    && names.insert(name.clone())
                    && id
                        .parse::<u64>()
                        .is_ok_and(|id| (2..=n as u64 + 1).contains(&id) && ids.insert(id))
            })
    }
}

fn vocab_text() -> impl Strategy<Value = VocabText> {
    let name = prop_oneof![
        8 => "[a-z_é]{1,4}",
        1 => prop::sample::select(vec!["", "a b", "\t", "x\n", "a\u{a0}b"]).prop_map(str::to_owned),
    ];
    (1usize..7).prop_flat_map(move |n| {
        (
            prop_oneof![
                8 => Just("fedflow-vocab/1".to_owned()),
                1 => "[a-z/0-9-]{0,16}",
            ],
            id_text("0"),
            id_text("1"),
            vec(
                (
                    name.clone(),
                    prop_oneof![
                        6 => (2u64..n as u64 + 2).prop_map(|i| i.to_string()),
                        1 => id_text("2"),
                    ],
                ),
                0..n + 1,
            ),
            prop::bool::weighted(0.05),
            option::weighted(0.05, 0usize..4),
        )
            .prop_map(|(format, pad, unk, events, extra_key, missing)| VocabText {
                format,
                pad,
                unk,
                events,
                extra_key,
                missing,
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Vocabulary files assembled from mostly-right parts (format tag, pad/unk ids, event
    /// names with whitespace, empty or repeated, ids reserved, repeated, out of range or not
    /// integers, missing and unknown keys): the loader accepts exactly the files that follow
    /// the documented rules; an accepted vocabulary has each name at its file id and survives
    /// a save/load round trip; a refusal is a non-empty `vocabulary <memory>: ...` message.
    #[test]
    fn vocab_accepts_exactly_the_valid_files(v in vocab_text()) {
        let text = v.render();
        match Vocab::from_json_str(&text) {
            Ok(vocab) => {
                prop_assert!(v.is_valid(), "accepted an invalid file:\n{}", text);
                prop_assert_eq!(vocab.num_events(), v.events.len());
                for (name, id) in &v.events {
                    prop_assert_eq!(vocab.id(name).map(u64::from), id.parse::<u64>().ok());
                }
                prop_assert_eq!(Vocab::from_json_str(&vocab.to_json_string()).unwrap(), vocab);
            }
            Err(e) => {
                prop_assert!(!v.is_valid(), "refused a valid file ({}):\n{}", e, text);
                prop_assert!(matches!(e, Error::Vocab { .. }), "{:?}", e);
                let message = e.to_string();
                prop_assert!(message.starts_with("vocabulary <memory>: "), "{}", message);
                prop_assert!(message.len() > "vocabulary <memory>: ".len());
            }
        }
    }

    /// Arbitrary bytes as a vocabulary, from memory and from a file: never a panic; the file
    /// loader's errors name the file (invalid UTF-8 included).
    #[test]
    fn vocab_survives_arbitrary_bytes(bytes in prop_oneof![
        vec(any::<u8>(), 0..200),
        vocab_text().prop_map(|v| v.render().into_bytes()),
    ], edits in vec(edit(), 0..3)) {
        let mut bytes = bytes;
        apply_edits(&mut bytes, &edits);
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(v) = Vocab::from_json_str(&text) {
            prop_assert_eq!(Vocab::from_json_str(&v.to_json_string()).unwrap(), v);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.json");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = Vocab::load(&path) {
            let message = e.to_string();
            prop_assert!(message.contains(&path.display().to_string()), "{}", message);
        }
    }
}

// ================================================================================================
// Parameter sets and safetensors layouts
// ================================================================================================

fn raw_tensor(dtypes: Vec<DType>, max_dim: usize) -> impl Strategy<Value = Tensor> {
    (prop::sample::select(dtypes), vec(0usize..max_dim, 0..3)).prop_flat_map(|(dtype, shape)| {
        let n = shape.iter().product::<usize>() * dtype.size_in_bytes();
        vec(any::<u8>(), n).prop_map(move |bytes| {
            Tensor::from_raw_buffer(&bytes, dtype, &shape, &Device::Cpu).expect("sizes agree")
        })
    })
}

/// Parameter sets of every supported dtype, with arbitrary bit patterns (NaN included) and
/// shapes including scalars and empty tensors.
fn param_set() -> impl Strategy<Value = ParamSet> {
    let dtypes = vec![
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::U8,
        DType::U32,
        DType::I64,
    ];
    btree_map(
        "[a-z]{1,3}(\\.[a-z0-9_]{1,4})?",
        raw_tensor(dtypes, 4),
        0..4,
    )
    .prop_map(|m| ParamSet::from_tensors(m).expect("valid names and dtypes"))
}

fn st_bytes(p: &ParamSet) -> Vec<u8> {
    p.to_safetensors_bytes().expect("serialises")
}

/// One change to a file's bytes.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    /// Flip a bit in the last quarter of the bytes (tensor data, in a safetensors file).
    FlipTail(Index, u8),
    Set(Index, u8),
    Truncate(Index),
    Append(Vec<u8>),
    /// Replace the 8-byte header length with this value.
    Prefix(u64),
    /// Add this to the 8-byte header length.
    PrefixDelta(i8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipTail(i, b)),
        2 => (any::<Index>(), prop_oneof![any::<u8>(), prop::sample::select(b"0123456789 ,:{}[]\"".to_vec())])
            .prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        1 => any::<u64>().prop_map(Mutation::Prefix),
        1 => any::<i8>().prop_map(Mutation::PrefixDelta),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        match m {
            Mutation::Flip(i, bit) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes[i] ^= 1 << bit;
            }
            Mutation::FlipTail(i, bit) if !bytes.is_empty() => {
                let quarter = bytes.len().div_ceil(4);
                let i = bytes.len() - quarter + i.index(quarter);
                bytes[i] ^= 1 << bit;
            }
            Mutation::Set(i, b) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes[i] = *b;
            }
            Mutation::Truncate(i) => {
                let keep = i.index(bytes.len() + 1);
                bytes.truncate(keep);
            }
            Mutation::Append(tail) => bytes.extend_from_slice(tail),
            Mutation::Prefix(n) if bytes.len() >= 8 => bytes[..8].copy_from_slice(&n.to_le_bytes()),
            Mutation::PrefixDelta(d) if bytes.len() >= 8 => {
                let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                bytes[..8].copy_from_slice(&n.wrapping_add_signed(i64::from(*d)).to_le_bytes());
            }
            _ => {}
        }
    }
}

/// Errors of the safetensors decoders are one of the two documented kinds, with a message.
fn check_params_error(e: &Error) -> Result<(), TestCaseError> {
    let message = e.to_string();
    prop_assert!(
        matches!(
            e,
            Error::Safetensors(_) | Error::ParamMismatch(_) | Error::Io { .. }
        ),
        "{:?}",
        e
    );
    prop_assert!(message.len() > "safetensors: ".len(), "{}", message);
    Ok(())
}

/// The checks every decoder of the same bytes must agree on: `from_safetensors_bytes`,
/// `SafetensorsLayout::read` and `ParamSet::load_hashed` never panic, fail with the
/// documented error kinds, and when the strict in-memory parser accepts the bytes, the layout
/// describes exactly the parsed tensors and the whole file, and the streaming loader returns
/// the same values with the file's size and hash.
fn check_decoders_agree(bytes: &[u8]) -> Result<(), TestCaseError> {
    let parsed = ParamSet::from_safetensors_bytes(bytes);
    let mut cursor = Cursor::new(bytes);
    let layout = SafetensorsLayout::read(&mut cursor);
    if let Err(e) = &parsed {
        check_params_error(e)?;
    }
    if let Err(e) = &layout {
        check_params_error(e)?;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let hashed = ParamSet::load_hashed(&path);
    if let Err(e) = &hashed {
        check_params_error(e)?;
    }
    if let Ok(p) = &parsed {
        let layout = layout.map_err(|e| TestCaseError::fail(format!("layout refused: {e}")))?;
        prop_assert_eq!(&layout.spec, &p.spec());
        prop_assert_eq!(layout.file_len, bytes.len() as u64);
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
        prop_assert_eq!(cursor.position(), header_end);
        for (name, range) in &layout.ranges {
            let spec = layout.spec.get(name).unwrap();
            prop_assert_eq!(
                range.end - range.start,
                (spec.elem_count() * spec.dtype.size_in_bytes()) as u64
            );
            prop_assert!(range.start >= header_end && range.end <= layout.file_len);
        }
        let (h, size, sha) =
            hashed.map_err(|e| TestCaseError::fail(format!("load_hashed refused: {e}")))?;
        prop_assert_eq!(size, bytes.len() as u64);
        prop_assert_eq!(sha, fedflow_common::hash::sha256_hex(bytes));
        prop_assert_eq!(st_bytes(&h), st_bytes(p));
    }
    Ok(())
}

/// A safetensors header entry: name, dtype text, shape, and offsets (consistent or not).
fn header_entry() -> impl Strategy<Value = (String, String, Vec<u64>, Option<(u64, u64)>)> {
    (
        prop_oneof![4 => "[a-z]{1,3}", 1 => Just("__metadata__".to_owned()), 1 => Just(String::new())],
        prop::sample::select(vec![
            "F32", "F64", "F16", "BF16", "U8", "I8", "U16", "I16", "U32", "I32", "I64", "U64",
            "BOOL", "F8_E4M3", "F8_E5M2", "F4", "f32", "XYZ",
        ])
        .prop_map(str::to_owned),
        vec(
            prop_oneof![8 => 0u64..4, 1 => Just(u64::MAX), 1 => Just(1 << 31)],
            0..3,
        ),
        option::weighted(0.2, (0u64..64, 0u64..64)),
    )
}

/// Bytes with a well-formed length prefix and a JSON header of arbitrary entries (any dtype
/// name, shapes that overflow, offsets that overlap, leave gaps or disagree with the shape),
/// followed by a data section that is what the header asks for (when small) or arbitrary.
fn crafted_safetensors() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(header_entry(), 0..4),
        any::<bool>(),
        vec(any::<u8>(), 0..32),
        0usize..8,
    )
        .prop_map(|(entries, with_metadata, tail, pad)| {
            let mut header = serde_json::Map::new();
            let mut at = 0u64;
            for (name, dtype, shape, offsets) in entries {
                let size: u64 = match dtype.as_str() {
                    "F64" | "I64" | "U64" => 8,
                    "F32" | "I32" | "U32" => 4,
                    "F16" | "BF16" | "I16" | "U16" => 2,
                    _ => 1,
                };
                let len = shape
                    .iter()
                    .try_fold(size, |acc, &d| acc.checked_mul(d))
                    .unwrap_or(u64::MAX);
                let (start, end) = offsets.unwrap_or((at, at.saturating_add(len)));
                at = end;
                header.insert(
                    name,
                    serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, end]}),
                );
            }
            if with_metadata {
                header.insert("__metadata__".into(), serde_json::json!({"k": "v"}));
            }
            let mut json = serde_json::to_vec(&header).unwrap();
            json.extend(std::iter::repeat_n(b' ', pad));
            let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(&json);
            if at <= 4096 {
                bytes.resize(bytes.len() + at as usize, 0);
            } else {
                bytes.extend_from_slice(&tail);
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any parameter set (every supported dtype, arbitrary bit patterns including NaN, empty
    /// and scalar tensors) round-trips through safetensors bytes bit for bit, and the layout
    /// read from the header alone describes every tensor's exact byte range.
    #[test]
    fn safetensors_round_trip_is_exact(p in param_set()) {
        let bytes = st_bytes(&p);
        let back = ParamSet::from_safetensors_bytes(&bytes)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(st_bytes(&back), bytes.clone());
        prop_assert_eq!(back.spec(), p.spec());
        prop_assert_eq!(p.sha256_hex().unwrap(), fedflow_common::hash::sha256_hex(&bytes));
        check_decoders_agree(&bytes)?;
    }

    /// Valid safetensors bytes with random bit flips, byte changes, truncations, appended
    /// bytes and rewritten length prefixes: no decoder panics, errors are of the documented
    /// kinds, and whatever the strict parser accepts, the layout and streaming loader agree
    /// with (see [`check_decoders_agree`]).
    #[test]
    fn corrupted_safetensors_never_panic(p in param_set(), mutations in vec(mutation(), 1..5)) {
        let mut bytes = st_bytes(&p);
        mutate(&mut bytes, &mutations);
        check_decoders_agree(&bytes)?;
    }

    /// Arbitrary bytes, and well-framed headers of arbitrary entries, through the in-memory
    /// parser and the layout reader: never a panic, only documented errors; an unsupported
    /// dtype in a layout is refused naming its tensor.
    #[test]
    fn arbitrary_safetensors_headers_never_panic(bytes in prop_oneof![
        vec(any::<u8>(), 0..64),
        crafted_safetensors(),
    ]) {
        if let Err(e) = ParamSet::from_safetensors_bytes(&bytes) {
            check_params_error(&e)?;
        }
        match SafetensorsLayout::read(&mut Cursor::new(&bytes)) {
            Err(Error::ParamMismatch(m)) => {
                prop_assert!(m.starts_with("tensor `") && m.contains("unsupported dtype"), "{}", m);
            }
            Err(e) => check_params_error(&e)?,
            Ok(layout) => {
                for (name, range) in &layout.ranges {
                    prop_assert!(range.start <= range.end && range.end <= layout.file_len, "{}", name);
                }
            }
        }
        // The streaming loader reads what the header describes; only headers whose data
        // section is present are given to it (see `load_hashed_allocates_what_a_header_claims`).
        if let Ok(layout) = SafetensorsLayout::read(&mut Cursor::new(&bytes))
            && layout.file_len <= bytes.len() as u64
        {
            check_decoders_agree(&bytes)?;
        }
    }
}

/// Regression test: `ParamSet::load_hashed` used to trust the header's sizes and allocate
/// them before reading, so a 100-byte file whose header claims a 4 TB tensor aborted the
/// process (allocation failure). It now compares the header's `file_len` with the file's real
/// size first (as `FedAvgAccumulator::add_safetensors_file` does) and refuses the file with
/// `Error::Safetensors` naming it.
#[test]
fn load_hashed_allocates_what_a_header_claims() {
    let header =
        br#"{"w":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4000000000000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 16]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let err = ParamSet::load_hashed(&path).unwrap_err();
    assert!(
        matches!(err, Error::Safetensors(_) | Error::Io { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "the error should name the file: {message}"
    );
}

// ================================================================================================
// FedAvg accumulator
// ================================================================================================

fn spec() -> impl Strategy<Value = ParamSpec> {
    let dtype = prop_oneof![6 => Just(DType::F32), 2 => Just(DType::F64), 1 => Just(DType::F16)];
    btree_map("[a-e]{1,2}", (dtype, vec(0usize..4, 0..3)), 1..4).prop_map(|m| {
        ParamSpec::new(
            m.into_iter()
                .map(|(name, (dtype, shape))| (name, TensorSpec { shape, dtype }))
                .collect(),
        )
    })
}

/// Values of a good update: ordinary, huge (f32::MAX), tiny (subnormal) and signed zeros.
fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => -1e3f64..1e3,
        1 => prop::sample::select(vec![
            f64::from(f32::MAX),
            -f64::from(f32::MAX),
            1e-45,
            0.0,
            -0.0,
            65504.0,
            70000.0,
        ]),
    ]
}

/// What is wrong with an update (or nothing).
#[derive(Clone, Debug)]
enum Fault {
    None,
    /// One value of one tensor replaced by NaN or an infinity.
    NonFinite(Index, Index, f64),
    /// One tensor gets an extra dimension of size 1.
    Shape(Index),
    /// One tensor changes between f32 and f64.
    Dtype(Index),
    Missing(Index),
    Extra,
    Weight(f64),
    /// Arbitrary bytes as the file (file updates only).
    Garbage(Vec<u8>),
    /// The valid file changed at random (file updates only).
    Mutated(Vec<Mutation>),
    /// The file does not exist (file updates only).
    NoFile,
}

#[derive(Clone, Debug)]
struct Update {
    values: Vec<f64>,
    weight: f64,
    via_file: bool,
    fault: Fault,
}

fn update() -> impl Strategy<Value = Update> {
    let fault = prop_oneof![
        10 => Just(Fault::None),
        2 => (any::<Index>(), any::<Index>(), prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY]))
            .prop_map(|(t, i, v)| Fault::NonFinite(t, i, v)),
        1 => any::<Index>().prop_map(Fault::Shape),
        1 => any::<Index>().prop_map(Fault::Dtype),
        1 => any::<Index>().prop_map(Fault::Missing),
        1 => Just(Fault::Extra),
        2 => prop::sample::select(vec![0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, MAX_WEIGHT * 1.000_001, 1e300])
            .prop_map(Fault::Weight),
        1 => vec(any::<u8>(), 0..64).prop_map(Fault::Garbage),
        2 => vec(mutation(), 1..3).prop_map(Fault::Mutated),
        1 => Just(Fault::NoFile),
    ];
    (
        vec(value(), 1..16),
        prop_oneof![4 => 1e-3f64..1e4, 1 => Just(MAX_WEIGHT), 1 => Just(5e-324)],
        any::<bool>(),
        fault,
    )
        .prop_map(|(values, weight, via_file, fault)| {
            // Faults only a file can have make the update a file update.
            let via_file =
                via_file || matches!(fault, Fault::Garbage(_) | Fault::Mutated(_) | Fault::NoFile);
            Update {
                values,
                weight,
                via_file,
                fault,
            }
        })
}

/// The update's parameter set: the spec's tensors filled cyclically with `values`, then the
/// structural fault applied.
fn build(spec: &ParamSpec, u: &Update) -> (ParamSet, Option<String>) {
    let mut tensors = BTreeMap::new();
    let mut next = u.values.iter().cycle();
    for (name, t) in spec.iter() {
        let data: Vec<f64> = (0..t.elem_count()).map(|_| *next.next().unwrap()).collect();
        let tensor = Tensor::from_vec(data, t.shape.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(t.dtype)
            .unwrap();
        tensors.insert(name.to_owned(), tensor);
    }
    let names: Vec<String> = spec.names().map(str::to_owned).collect();
    let pick = |i: &Index| names[i.index(names.len())].clone();
    let mut culprit = None;
    match &u.fault {
        Fault::NonFinite(t, i, v) => {
            let name = pick(t);
            let old = &tensors[&name];
            let n = old.elem_count();
            if n > 0 {
                let mut flat = old
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                flat[i.index(n)] = *v;
                let new = Tensor::from_vec(flat, old.dims(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(old.dtype())
                    .unwrap();
                tensors.insert(name.clone(), new);
                culprit = Some(name);
            }
        }
        Fault::Shape(t) => {
            let name = pick(t);
            let old = &tensors[&name];
            let mut dims = old.dims().to_vec();
            dims.push(1);
            tensors.insert(name.clone(), old.reshape(dims).unwrap());
            culprit = Some(name);
        }
        Fault::Dtype(t) => {
            let name = pick(t);
            let old = &tensors[&name];
            let to = if old.dtype() == DType::F64 {
                DType::F32
            } else {
                DType::F64
            };
            tensors.insert(name.clone(), old.to_dtype(to).unwrap());
            culprit = Some(name);
        }
        Fault::Missing(t) => {
            let name = pick(t);
            tensors.remove(&name);
            culprit = Some(name);
        }
        Fault::Extra => {
            tensors.insert(
                "zz.extra".into(),
                Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
            );
            culprit = Some("zz.extra".into());
        }
        _ => {}
    }
    (ParamSet::from_tensors(tensors).unwrap(), culprit)
}

/// The documented checks of `FedAvgAccumulator::add`, in order, decided independently:
/// `Ok(())` if the update must be accepted, else the expected error's kind and, where the
/// API names one, the tensor it must name.
fn expected_verdict(
    spec: &ParamSpec,
    delta: &ParamSet,
    weight: f64,
    bound: Option<f64>,
) -> Result<(), (&'static str, Option<String>)> {
    if !(weight.is_finite() && weight > 0.0 && weight <= MAX_WEIGHT) {
        return Err(("weight", None));
    }
    if delta.spec() != *spec {
        return Err(("structure", None));
    }
    let mut squares = 0.0f64;
    for (name, t) in delta.iter() {
        let flat = t
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        if flat.iter().any(|x| !x.is_finite()) {
            return Err(("non-finite", Some(name.to_owned())));
        }
        for x in flat {
            squares += x * x;
        }
    }
    match bound {
        Some(b) if squares.sqrt() > b => Err(("norm", None)),
        _ => Ok(()),
    }
}

/// Runs one test case of the accumulator property.
fn run_fedavg_case(
    spec: &ParamSpec,
    bound: Option<f64>,
    rule: RobustRule,
    updates: &[Update],
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let new = || {
        let acc = FedAvgAccumulator::new(spec).unwrap();
        match bound {
            Some(b) => acc.with_norm_bound(NormBound::Refuse(b)),
            None => acc,
        }
    };
    // `all` sees every update; `good` only those `all` must accept, always in memory.
    let (mut all, mut good) = (new(), new());
    // The same for the robust rules, which promise the same checks and all-or-nothing.
    let (spill_all, spill_good) = (dir.path().join("spill-all"), dir.path().join("spill-good"));
    let new_robust = |spill: &Path| {
        let acc = RobustAccumulator::new(spec, rule, spill).unwrap();
        match bound {
            Some(b) => acc.with_norm_bound(NormBound::Refuse(b)),
            None => acc,
        }
    };
    let (mut r_all, mut r_good) = (new_robust(&spill_all), new_robust(&spill_good));
    for (i, u) in updates.iter().enumerate() {
        let (delta, culprit) = build(spec, u);
        let weight = match u.fault {
            Fault::Weight(w) => w,
            _ => u.weight,
        };
        let path = dir.path().join(format!("u{i}.safetensors"));
        let mut expected = expected_verdict(spec, &delta, weight, bound);
        let got = if u.via_file {
            match &u.fault {
                Fault::Garbage(bytes) => std::fs::write(&path, bytes).unwrap(),
                Fault::Mutated(mutations) => {
                    let mut bytes = st_bytes(&delta);
                    mutate(&mut bytes, mutations);
                    std::fs::write(&path, bytes).unwrap();
                }
                Fault::NoFile => {}
                _ => {
                    delta.save(&path).unwrap();
                }
            }
            let got = all.add_safetensors_file(&path, weight);
            let r_got = r_all.add_safetensors_file(&path, weight);
            check_same_verdict(&got, &r_got)?;
            if r_got.is_ok() {
                r_good.add(&ParamSet::load(&path).unwrap(), weight).unwrap();
            }
            if matches!(u.fault, Fault::Garbage(_) | Fault::Mutated(_)) {
                // Unknown content: whatever the streaming path accepts must be what the
                // in-memory path accepts for the parsed file.
                expected = match (&expected, ParamSet::load(&path)) {
                    (Err(("weight", _)), _) => Err(("weight", None)),
                    (_, Ok(parsed)) => expected_verdict(spec, &parsed, weight, bound),
                    (_, Err(_)) => Err(("file", None)),
                };
                if got.is_ok() {
                    good.add(&ParamSet::load(&path).unwrap(), weight)
                        .map_err(|e| {
                            TestCaseError::fail(format!(
                                "streamed file accepted, parsed refused: {e}"
                            ))
                        })?;
                }
            } else if matches!(u.fault, Fault::NoFile) {
                expected = match expected {
                    Err(("weight", _)) => Err(("weight", None)),
                    _ => Err(("io", None)),
                };
            }
            got
        } else {
            let got = all.add(&delta, weight);
            let r_got = r_all.add(&delta, weight);
            check_same_verdict(&got, &r_got)?;
            if r_got.is_ok() {
                r_good.add(&delta, weight).unwrap();
            }
            got
        };
        match (&got, &expected) {
            (Ok(_), Ok(())) => {
                if !matches!(u.fault, Fault::Garbage(_) | Fault::Mutated(_)) {
                    good.add(&delta, weight).unwrap();
                }
            }
            (Err(e), Err((kind, name))) => {
                let message = e.to_string();
                prop_assert!(!message.is_empty());
                match *kind {
                    "weight" => prop_assert!(
                        matches!(e, Error::Aggregation(_)) && message.contains("weight"),
                        "{}",
                        message
                    ),
                    "structure" => {
                        prop_assert!(matches!(e, Error::ParamMismatch(_)), "{:?}", e);
                        // A corrupted file may have renamed or reshaped anything: then
                        // some tensor is named, in backticks.
                        let culprit = culprit.clone().unwrap_or_default();
                        prop_assert!(
                            message.contains(&format!("`{culprit}")),
                            "{} should name {}",
                            message,
                            culprit
                        );
                    }
                    "non-finite" => match e {
                        Error::NonFinite { name: got, count } => {
                            prop_assert_eq!(Some(got), name.as_ref());
                            prop_assert!(*count > 0);
                        }
                        other => {
                            return Err(TestCaseError::fail(format!(
                                "expected NonFinite, got {other:?}"
                            )));
                        }
                    },
                    "norm" => prop_assert!(
                        matches!(e, Error::Aggregation(_)) && message.contains("norm"),
                        "{}",
                        message
                    ),
                    "io" => {
                        prop_assert!(message.contains(&path.display().to_string()), "{}", message)
                    }
                    _ => check_params_error(e)?,
                }
            }
            (got, expected) => {
                return Err(TestCaseError::fail(format!(
                    "update {i} ({:?}, via file: {}): got {got:?}, expected {expected:?}",
                    u.fault, u.via_file
                )));
            }
        }
        // Refused or not, `all` is exactly where `good` is.
        prop_assert_eq!(all.count(), good.count());
        prop_assert_eq!(all.total_weight().to_bits(), good.total_weight().to_bits());
        prop_assert_eq!(r_all.count(), all.count());
        prop_assert_eq!(r_good.count(), all.count());
        // A refused update leaves no spill file behind.
        let spilled = std::fs::read_dir(&spill_all).unwrap().count();
        prop_assert_eq!(spilled, r_all.count());
    }
    for (a, g) in [
        (all.finish(), good.finish()),
        (r_all.finish(), r_good.finish()),
    ] {
        match (a, g) {
            (Ok(a), Ok(g)) => prop_assert_eq!(st_bytes(&a), st_bytes(&g)),
            (Err(a), Err(g)) => prop_assert_eq!(a.to_string(), g.to_string()),
            (a, g) => {
                return Err(TestCaseError::fail(format!(
                    "finish differs: {a:?} vs {g:?}"
                )));
            }
        }
    }
    Ok(())
}

/// The robust accumulator accepts and refuses exactly what FedAvg's does, with the same
/// message.
fn check_same_verdict(
    fedavg: &fedflow_common::Result<Added>,
    robust: &fedflow_common::Result<Added>,
) -> Result<(), TestCaseError> {
    match (fedavg, robust) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Err(f), Err(r)) => {
            prop_assert_eq!(f.to_string(), r.to_string());
            Ok(())
        }
        (f, r) => Err(TestCaseError::fail(format!(
            "fedavg gave {f:?} but the robust accumulator {r:?}"
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Updates with arbitrary values (huge, tiny, NaN, ±Inf), weights (0, negative, NaN, Inf,
    /// over the cap), wrong shapes, dtypes, missing or extra tensors, over the norm bound,
    /// as parameter sets or as files (also garbage, corrupted or missing files), interleaved
    /// with good ones: each update is accepted exactly when the documented checks pass; a
    /// refusal names the weight, the tensor or the norm as documented and leaves the
    /// accumulator unchanged (same count and total weight after every step), so finishing
    /// gives bit for bit what an accumulator that only ever saw the accepted updates gives;
    /// streaming a file adds exactly what adding the parsed file would. The robust
    /// accumulator (median or trimmed mean) gives the same verdicts and messages, keeps a
    /// spill file for accepted updates only, and likewise finishes bit for bit as one that
    /// only saw the accepted updates.
    #[test]
    fn fedavg_rejections_leave_the_accumulator_unchanged(
        spec in spec(),
        bound in option::weighted(0.3, prop_oneof![0.0f64..3e3, Just(f64::INFINITY)]),
        rule in prop_oneof![
            Just(RobustRule::Median),
            (0.0f64..0.5).prop_map(|trim_fraction| RobustRule::TrimmedMean { trim_fraction }),
        ],
        updates in vec(update(), 1..7),
    ) {
        run_fedavg_case(&spec, bound, rule, &updates)?;
    }

    /// `RobustRule::check` accepts a trim fraction exactly when it is in `[0, 0.5)` (so NaN,
    /// negatives, 0.5 and infinities are refused with a message), and an accepted rule always
    /// leaves a value per coordinate: `2 · trimmed_per_side(n) < n`.
    #[test]
    fn robust_rule_validation(trim_fraction in real(), n in 1usize..1000) {
        let rule = RobustRule::TrimmedMean { trim_fraction };
        match rule.check() {
            Ok(()) => {
                prop_assert!((0.0..0.5).contains(&trim_fraction));
                prop_assert!(2 * rule.trimmed_per_side(n) < n);
            }
            Err(e) => {
                prop_assert!(!(0.0..0.5).contains(&trim_fraction));
                prop_assert!(e.to_string().contains("trim fraction"), "{}", e);
            }
        }
        prop_assert!(2 * RobustRule::Median.trimmed_per_side(n) < n);
    }
}

// ================================================================================================
// Saved models (model card, vocabulary, parameters)
// ================================================================================================

/// The files of one small saved model, made once.
struct SavedModel {
    vocab: Vocab,
    params: Vec<u8>,
    files: BTreeMap<&'static str, Vec<u8>>,
}

fn saved_model() -> &'static SavedModel {
    static MODEL: OnceLock<SavedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let vocab = Vocab::from_events(["a", "b", "c"]).unwrap();
        let cfg = ModelConfig {
            vocab_size: vocab.len(),
            embed_dim: 4,
            hidden_size: 4,
            num_layers: 1,
            ..ModelConfig::default()
        };
        let model = AttentionFlowModel::new(&cfg, &Device::Cpu, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_model(dir.path(), &model, &vocab).unwrap();
        let files = [CARD_FILE, VOCAB_FILE, PARAMS_FILE]
            .into_iter()
            .map(|f| (f, std::fs::read(dir.path().join(f)).unwrap()))
            .collect();
        let params = st_bytes(&ParamSet::from_varmap(model.varmap()).unwrap());
        SavedModel {
            vocab,
            params,
            files,
        }
    })
}

/// How one file of a saved model is tampered with.
#[derive(Clone, Debug)]
enum Tamper {
    Mutate(Vec<Mutation>),
    Replace(Vec<u8>),
    Remove,
    /// Rewrite the file in another valid form that means the same (compact JSON for the card
    /// and vocabulary, the same bytes for the parameters).
    Reformat,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A saved model with one of its three files (card, vocabulary, parameters) corrupted at
    /// random, replaced by arbitrary bytes or removed: loading never panics; a missing or
    /// unreadable file is named in the error; and a load that succeeds gives exactly the
    /// saved vocabulary and parameters (the hashes catch every change that matters).
    #[test]
    fn tampered_model_directories_are_refused_or_identical(
        file in prop::sample::select(vec![CARD_FILE, VOCAB_FILE, PARAMS_FILE]),
        tamper in prop_oneof![
            4 => vec(mutation(), 1..4).prop_map(Tamper::Mutate),
            1 => vec(any::<u8>(), 0..64).prop_map(Tamper::Replace),
            1 => Just(Tamper::Remove),
            1 => Just(Tamper::Reformat),
        ],
    ) {
        let saved = saved_model();
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in &saved.files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let target = dir.path().join(file);
        match &tamper {
            Tamper::Mutate(m) => {
                let mut bytes = saved.files[file].clone();
                mutate(&mut bytes, m);
                std::fs::write(&target, bytes).unwrap();
            }
            Tamper::Replace(bytes) => std::fs::write(&target, bytes).unwrap(),
            Tamper::Remove => std::fs::remove_file(&target).unwrap(),
            Tamper::Reformat if file == PARAMS_FILE => {}
            Tamper::Reformat => {
                let value: serde_json::Value = serde_json::from_slice(&saved.files[file]).unwrap();
                std::fs::write(&target, serde_json::to_vec(&value).unwrap()).unwrap();
            }
        }
        match load_model(dir.path(), &Device::Cpu) {
            Ok((model, vocab, card)) => {
                prop_assert!(!matches!(tamper, Tamper::Remove));
                prop_assert_eq!(vocab, saved.vocab.clone());
                prop_assert_eq!(st_bytes(&ParamSet::from_varmap(model.varmap()).unwrap()), saved.params.clone());
                prop_assert!(card.model.validate().is_ok());
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(!message.is_empty());
                prop_assert!(!matches!(tamper, Tamper::Reformat), "{}", message);
                if matches!(tamper, Tamper::Remove) {
                    prop_assert!(matches!(e, Error::Io { .. }), "{:?}", e);
                    prop_assert!(message.contains(&target.display().to_string()), "{}", message);
                }
            }
        }
    }
}

/// Regression test: `load_model` used to build the model the card describes before checking
/// that the parameters fit it (the card's own hash covers neither its config nor its
/// `parameters` count), so a card edited to say `vocab_size: 10^12` (hashes untouched) made
/// loading allocate 32 TB and abort. It now compares the parameter count the config implies
/// (and the card's `parameters`) with the parameter file before constructing anything, and
/// refuses the card with `Error::ParamMismatch`.
#[test]
fn load_model_builds_whatever_the_card_claims() {
    let saved = saved_model();
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in &saved.files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let mut card: serde_json::Value = serde_json::from_slice(&saved.files[CARD_FILE]).unwrap();
    card["model"]["vocab_size"] = serde_json::json!(1_000_000_000_000u64);
    std::fs::write(
        dir.path().join(CARD_FILE),
        serde_json::to_vec(&card).unwrap(),
    )
    .unwrap();
    let err = load_model(dir.path(), &Device::Cpu)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, Error::ParamMismatch(_)), "{err:?}");
}

// ================================================================================================
// Configuration validators and names
// ================================================================================================

/// Sizes: mostly small, sometimes zero or huge.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![6 => 0usize..10, 1 => Just(usize::MAX), 1 => any::<usize>()]
}

/// Floats: ordinary, boundary and non-finite values.
fn real() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -2.0f64..2.0,
        2 => prop::sample::select(vec![0.0, -0.0, 1.0, 0.5, 1e-300, 1e300, f64::MIN_POSITIVE, 1.0 - f64::EPSILON / 2.0]),
        1 => prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY]),
        1 => any::<f64>(),
    ]
}

fn encoder() -> impl Strategy<Value = EncoderKind> {
    prop::sample::select(vec![
        EncoderKind::Lstm,
        EncoderKind::Gru,
        EncoderKind::Transformer,
    ])
}

/// Checks that a validator's error starts with `prefix` and names the field an independent
/// reading of the rules expects (`None`: the config must be accepted).
fn check_verdict(
    got: fedflow_common::Result<()>,
    expected: Option<&str>,
    prefix: &str,
) -> Result<(), TestCaseError> {
    match (got, expected) {
        (Ok(()), None) => Ok(()),
        (Err(e), Some(field)) => {
            let message = e.to_string();
            prop_assert!(
                message.starts_with(prefix),
                "{} should start with {}",
                message,
                prefix
            );
            let rest = &message[prefix.len()..];
            // `model.<field>: ...`-style messages lead with the field; others mention it.
            let named = if prefix.ends_with('.') {
                rest.starts_with(&format!("{field}: "))
            } else {
                rest.contains(field)
            };
            prop_assert!(named, "{} should name {}", message, field);
            prop_assert!(
                message.len() > prefix.len() + field.len() + 2,
                "{}",
                message
            );
            Ok(())
        }
        (got, expected) => Err(TestCaseError::fail(format!(
            "got {got:?}, expected an error on {expected:?}"
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `ModelConfig::validate` on arbitrary sizes and floats (NaN, ±Inf, 0, huge) refuses
    /// exactly the documented cases, naming the first offending field as `model.<field>`.
    #[test]
    fn model_config_validation_names_the_field(
        vocab_size in size(), embed_dim in size(), encoder in encoder(), hidden_size in size(),
        num_layers in size(), dropout in real(), num_classes in size(), max_seq_len in size(),
        num_heads in size(), ffn_dim in size(),
    ) {
        let c = ModelConfig {
            vocab_size, embed_dim, encoder, hidden_size, num_layers, dropout, num_classes,
            max_seq_len, num_heads, ffn_dim,
        };
        let transformer = encoder == EncoderKind::Transformer;
        let expected = if vocab_size < 3 { Some("vocab_size") }
            else if embed_dim == 0 { Some("embed_dim") }
            else if hidden_size == 0 { Some("hidden_size") }
            else if num_layers == 0 { Some("num_layers") }
            else if max_seq_len == 0 { Some("max_seq_len") }
            else if num_classes < 2 { Some("num_classes") }
            else if !(0.0..1.0).contains(&dropout) { Some("dropout") }
            else if transformer && (num_heads == 0 || !embed_dim.is_multiple_of(num_heads)) { Some("num_heads") }
            else if transformer && ffn_dim == 0 { Some("ffn_dim") }
            else { None };
        check_verdict(c.validate(), expected, "invalid config: model.")?;
    }

    /// Every small config `ModelConfig::validate` accepts builds a model that runs: the
    /// validator is the only gate before construction, so it must not let through a config
    /// that panics or fails later.
    #[test]
    fn accepted_model_configs_build_and_run(
        vocab_size in 3usize..9, embed_dim in 1usize..9, encoder in encoder(),
        hidden_size in 1usize..6, num_layers in 1usize..3, dropout in 0.0f64..1.0,
        num_classes in 2usize..6, max_seq_len in 1usize..5, num_heads in 1usize..9,
        ffn_dim in 1usize..6, events in vec(1u32..9, 1..7), class in 0u32..6,
    ) {
        // Mostly a divisor of embed_dim, so that few Transformer configs are refused.
        let divisors: Vec<usize> = (1..=embed_dim).filter(|d| embed_dim.is_multiple_of(*d)).collect();
        let num_heads = if num_heads % 4 == 0 { num_heads } else { divisors[num_heads % divisors.len()] };
        let c = ModelConfig {
            vocab_size, embed_dim, encoder, hidden_size, num_layers, dropout, num_classes,
            max_seq_len, num_heads, ffn_dim,
        };
        prop_assume!(c.validate().is_ok());
        let model = AttentionFlowModel::new(&c, &Device::Cpu, 1)
            .map_err(|e| TestCaseError::fail(format!("valid config failed to build: {e}")))?;
        let session = EncodedSession {
            events: events.into_iter().map(|e| e % vocab_size as u32).map(|e| e.max(1)).collect(),
            class: class % num_classes as u32,
        };
        let batch = Batch::new(&[&session], &c, &Device::Cpu)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let logits = model.forward(&batch, &mut Mode::Eval)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(logits.dims(), &[1, num_classes]);
        prop_assert!(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
    }

    /// `TrainConfig::validate`: refuses exactly the documented cases, naming `train.<field>`.
    #[test]
    fn train_config_validation_names_the_field(
        epochs in size(), batch_size in size(), learning_rate in real(), momentum in real(),
        weight_decay in real(), patience in size(), min_delta in real(), fedprox_mu in real(),
        optimizer in prop::sample::select(vec![OptimizerKind::Adamw, OptimizerKind::Sgd]),
    ) {
        let c = TrainConfig {
            epochs, batch_size, learning_rate, momentum, weight_decay, patience, min_delta,
            fedprox_mu, optimizer, ..TrainConfig::default()
        };
        let nonneg = |x: f64| x.is_finite() && x >= 0.0;
        let expected = if epochs == 0 { Some("epochs") }
            else if batch_size == 0 { Some("batch_size") }
            else if !(learning_rate.is_finite() && learning_rate > 0.0) { Some("learning_rate") }
            else if !(0.0..1.0).contains(&momentum) { Some("momentum") }
            else if !nonneg(weight_decay) { Some("weight_decay") }
            else if !nonneg(fedprox_mu) { Some("fedprox_mu") }
            else if !nonneg(min_delta) { Some("min_delta") }
            else { None };
        check_verdict(c.validate(), expected, "invalid config: train.")?;
    }

    /// `DpSgdConfig::validate`: refuses exactly the documented cases, naming `dp_sgd.<field>`.
    #[test]
    fn dpsgd_config_validation_names_the_field(
        clip_norm in real(), noise_multiplier in real(), expected_batch_size in size(),
        sampling_rate in option::of(real()), max_sessions_per_user in size(),
        unit in prop::sample::select(vec![PrivacyUnit::Session, PrivacyUnit::User]),
    ) {
        let c = DpSgdConfig { clip_norm, noise_multiplier, expected_batch_size, sampling_rate, unit, max_sessions_per_user };
        let expected = if !(clip_norm.is_finite() && clip_norm > 0.0) { Some("clip_norm") }
            else if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) { Some("noise_multiplier") }
            else if sampling_rate.is_some_and(|q| !(q > 0.0 && q <= 1.0)) { Some("sampling_rate") }
            else if sampling_rate.is_some() == (expected_batch_size != 0) { Some("expected_batch_size") }
            else if max_sessions_per_user == 0 { Some("max_sessions_per_user") }
            else { None };
        check_verdict(c.validate(), expected, "invalid config: dp_sgd.")?;
    }

    /// `SynthConfig::validate` and `BaselineConfig::validate`: refuse exactly the documented
    /// cases (including `sites × min_site_sessions` overflowing), naming the field.
    #[test]
    fn synth_and_baseline_validation_name_the_field(
        sites in size(), total_sessions in size(), size_skew in real(), min_site_sessions in size(),
        label_alpha in real(), label_noise in real(), min_len in size(), max_len in size(),
        iterations in size(), learning_rate in real(), l2 in real(),
    ) {
        let c = SynthConfig {
            sites, total_sessions, size_skew, min_site_sessions, label_alpha, label_noise,
            min_len, max_len, ..SynthConfig::default()
        };
        let expected = if sites == 0 { Some("sites") }
            else if min_site_sessions == 0 { Some("min_site_sessions") }
            // (A product that overflows saturates: only usize::MAX sessions pass it.)
            else if total_sessions < sites.saturating_mul(min_site_sessions) { Some("total_sessions") }
            else if !(size_skew.is_finite() && size_skew >= 0.0) { Some("size_skew") }
            else if !(label_alpha.is_finite() && label_alpha > 0.0) { Some("label_alpha") }
            else if !(0.0..=1.0).contains(&label_noise) { Some("label_noise") }
            else if min_len == 0 || min_len > max_len { Some("min_len") }
            else { None };
        check_verdict(c.validate(), expected, "invalid config: synth: ")?;

        let b = BaselineConfig { iterations, learning_rate, l2 };
        let expected = if iterations == 0 { Some("iterations") }
            else if !(learning_rate.is_finite() && learning_rate > 0.0) { Some("learning_rate") }
            else if !(l2.is_finite() && l2 >= 0.0) { Some("l2") }
            else { None };
        check_verdict(b.validate(), expected, "invalid config: baseline: ")?;
    }

    /// `SiteDp::validate`: refuses exactly the documented cases with a `privacy: ` message
    /// naming the parameter, and whatever it accepts has a usable update
    /// multiplier and non-negative noise for any positive clip.
    #[test]
    fn site_dp_validation_names_the_parameter(
        mode in prop::sample::select(vec![TrustMode::Central, TrustMode::Distributed, TrustMode::Local]),
        clip_norm in real(), noise_multiplier in real(), expected_sites in prop_oneof![real(), 1.0f64..100.0],
        adaptive in option::of((real(), real(), prop_oneof![real(), 0.0f64..100.0])),
    ) {
        let adaptive = adaptive.map(|(target_quantile, learning_rate, bit_noise_std)| AdaptiveClipping {
            target_quantile, learning_rate, bit_noise_std,
        });
        let c = SiteDp { mode, clip_norm, noise_multiplier, expected_sites, adaptive: adaptive.clone() };
        let expected = if !(clip_norm.is_finite() && clip_norm > 0.0) { Some("clip_norm") }
            else if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) { Some("noise_multiplier") }
            else if !(expected_sites.is_finite() && expected_sites >= 1.0) { Some("expected_sites") }
            else if let Some(a) = &adaptive {
                if mode != TrustMode::Central { Some("adaptive clipping") }
                else if !(a.target_quantile > 0.0 && a.target_quantile < 1.0) { Some("target_quantile") }
                else if !(a.learning_rate.is_finite() && a.learning_rate > 0.0) { Some("clip learning rate") }
                else if noise_multiplier > 0.0 {
                    let rest = noise_multiplier.powi(-2) - (2.0 * a.bit_noise_std).powi(-2);
                    if rest.is_nan() || rest <= 0.0 { Some("bit noise std") } else { None }
                } else { None }
            } else { None };
        check_verdict(c.validate(), expected, "privacy: ")?;
        if c.validate().is_ok() {
            let z = c.update_multiplier().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(z >= 0.0, "{}", z);
            for clip in [1e-3, 1.0, 1e3] {
                let site = c.site_noise_std(clip).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let server = c.server_noise_std(clip, 3).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(site >= 0.0 && server >= 0.0, "{} {}", site, server);
            }
        }
    }

    /// Names parsed from configs and command lines (encoder, optimizer, privacy unit, device):
    /// any string is accepted exactly when it is one of the documented names, and a refusal
    /// repeats what was given; accepted devices print back to the same choice.
    #[test]
    fn names_parse_exactly_the_documented_values(s in prop_oneof![
        "[a-z:0-9+ -]{0,10}",
        prop::sample::select(vec!["lstm", "gru", "transformer", "adamw", "sgd", "session", "user",
            "auto", "cpu", "cuda", "metal", "cuda:0", "cuda:17", "cuda:", "cuda:-1", "LSTM", " cpu"])
            .prop_map(str::to_owned),
    ]) {
        fn check<T: std::str::FromStr<Err = Error> + std::fmt::Debug>(s: &str, ok: bool) -> Result<(), TestCaseError> {
            match s.parse::<T>() {
                Ok(v) => prop_assert!(ok, "{:?} parsed as {:?}", s, v),
                Err(e) => {
                    prop_assert!(!ok, "{:?} refused: {}", s, e);
                    prop_assert!(e.to_string().contains(s), "{}", e);
                }
            }
            Ok(())
        }
        check::<EncoderKind>(&s, ["lstm", "gru", "transformer"].contains(&s.as_str()))?;
        check::<OptimizerKind>(&s, ["adamw", "sgd"].contains(&s.as_str()))?;
        check::<PrivacyUnit>(&s, ["session", "user"].contains(&s.as_str()))?;
        let cuda_n = s.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok());
        check::<DeviceChoice>(&s, ["auto", "cpu", "cuda", "metal"].contains(&s.as_str()) || cuda_n)?;
        if let Ok(d) = s.parse::<DeviceChoice>() {
            prop_assert_eq!(d.to_string().parse::<DeviceChoice>().unwrap(), d);
        }
    }

    /// Every config type decoded from arbitrary JSON objects (known and unknown keys, values
    /// of every JSON kind): decoding and validating never panic; decoding errors have a
    /// message; and a config that decodes and validates survives a JSON round trip.
    #[test]
    fn configs_decode_arbitrary_json(object in btree_map(
        prop::sample::select(vec![
            "vocab_size", "embed_dim", "encoder", "hidden_size", "dropout", "num_heads",
            "epochs", "learning_rate", "momentum", "optimizer", "clip_norm", "noise_multiplier",
            "sampling_rate", "unit", "sites", "label_noise", "iterations", "l2", "mode",
            "expected_sites", "adaptive", "unknown",
        ]),
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            (0u64..10).prop_map(serde_json::Value::from),
            (-2.0f64..2.0).prop_map(serde_json::Value::from),
            prop::sample::select(vec!["lstm", "transformer", "sgd", "user", "central", "x"])
                .prop_map(serde_json::Value::from),
            Just(serde_json::json!([])),
            Just(serde_json::json!({"target_quantile": 0.5, "learning_rate": 0.2, "bit_noise_std": 5.0})),
        ],
        0..5,
    )) {
        let value = serde_json::Value::Object(object.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
        fn check<T>(value: &serde_json::Value, validate: fn(&T) -> fedflow_common::Result<()>) -> Result<(), TestCaseError>
        where
            T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
        {
            match serde_json::from_value::<T>(value.clone()) {
                Err(e) => prop_assert!(!e.to_string().is_empty()),
                Ok(c) => {
                    if validate(&c).is_ok() {
                        let back: T = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
                        prop_assert_eq!(back, c);
                    }
                }
            }
            Ok(())
        }
        check::<ModelConfig>(&value, ModelConfig::validate)?;
        check::<TrainConfig>(&value, TrainConfig::validate)?;
        check::<DpSgdConfig>(&value, DpSgdConfig::validate)?;
        check::<SynthConfig>(&value, SynthConfig::validate)?;
        check::<BaselineConfig>(&value, BaselineConfig::validate)?;
        check::<SiteDp>(&value, SiteDp::validate)?;
    }
}
