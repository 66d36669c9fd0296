//! Reading and writing partner-site session files (CSV and JSON Lines), with row validation.
//!
//! The formats are specified in the [module docs](crate::data).
//!
//! Kept as one file (about 650 lines): the CSV and JSON Lines readers share the row sink,
//! the row validation and the error wording, and are meant to be read side by side.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::{Map, Value};

use crate::data::NUM_LABELS;
use crate::data::SessionRecord;
use crate::data::vocab::check_event_name;
use crate::error::{Error, Result};
use crate::fsio::write_atomic;

/// Every column (CSV) or field (JSON Lines) a session file may have, in canonical order.
pub const ALLOWED_COLUMNS: [&str; 5] = ["session_id", "events", "label", "user_id", "timestamp"];
/// The columns (fields) every session file must have.
pub const REQUIRED_COLUMNS: [&str; 3] = ["session_id", "events", "label"];

/// The format of a session file, chosen by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// Comma-separated values with a header line (`.csv`).
    Csv,
    /// One JSON object per line (`.jsonl` or `.ndjson`).
    JsonLines,
}

impl FileFormat {
    /// The format for a path's extension (case-insensitive): `.csv`, `.jsonl` or `.ndjson`.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("csv") => Ok(FileFormat::Csv),
            Some("jsonl" | "ndjson") => Ok(FileFormat::JsonLines),
            _ => Err(Error::DataFile {
                path: path.to_path_buf(),
                reason: "unknown session file format: the name must end in .csv, .jsonl or \
                         .ndjson"
                    .to_owned(),
            }),
        }
    }
}

/// How to treat invalid rows when reading a session file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Skip invalid rows (listing them in [`Loaded::skipped`]) instead of failing on the first.
    ///
    /// Problems with the file as a whole (unreadable, bad CSV header, no valid rows) fail the
    /// load either way.
    pub skip_invalid: bool,
}

/// A row left out of a load because it was invalid.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SkippedRow {
    /// 1-based line number where the row starts.
    pub line: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// The result of reading a session file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// Valid sessions, in file order.
    pub records: Vec<SessionRecord>,
    /// Invalid rows that were skipped (always empty unless [`LoadOptions::skip_invalid`]).
    pub skipped: Vec<SkippedRow>,
}

/// Reads a session file, choosing the format by extension (see [`FileFormat::from_path`]).
///
/// Without [`LoadOptions::skip_invalid`] the first invalid row fails the whole load with
/// [`Error::Data`] naming the file, the 1-based line and the reason. A file without any (valid)
/// session is an [`Error::DataFile`].
pub fn read_sessions(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Loaded> {
    let path = path.as_ref();
    let format = FileFormat::from_path(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    read_sessions_from(file, format, path, options)
}

/// Reads sessions in `format` from any reader; `path` is only used in errors.
pub fn read_sessions_from(
    reader: impl Read,
    format: FileFormat,
    path: impl AsRef<Path>,
    options: &LoadOptions,
) -> Result<Loaded> {
    let path = path.as_ref();
    let mut sink = RowSink::new(path, options);
    match format {
        FileFormat::Csv => read_csv(reader, path, &mut sink)?,
        FileFormat::JsonLines => read_jsonl(reader, path, &mut sink)?,
    }
    sink.finish()
}

/// Writes sessions to a file in the format its extension names, replacing any existing file
/// atomically (temporary file, fsync, rename), so a crash never leaves a partial file.
///
/// The records are validated first with the same rules as reading (so whatever is written can
/// be read back to equal records): at least one record, non-empty unique session ids, events
/// non-empty and free of whitespace, labels 1..=5. Empty optional fields (`Some("")`) are
/// rejected too, since both formats read an empty value as absent.
pub fn write_sessions(path: impl AsRef<Path>, records: &[SessionRecord]) -> Result<()> {
    let path = path.as_ref();
    let format = FileFormat::from_path(path)?;
    let bytes = encode_sessions(records, format, path)?;
    write_atomic(path, &bytes)
}

/// Serialises sessions into the bytes of a file in `format`; `path` is only used in errors.
pub fn encode_sessions(
    records: &[SessionRecord],
    format: FileFormat,
    path: impl AsRef<Path>,
) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let file_err = |reason: String| Error::DataFile {
        path: path.to_path_buf(),
        reason,
    };
    if records.is_empty() {
        return Err(file_err("no sessions to write".to_owned()));
    }
    let mut first_index: HashMap<&str, usize> = HashMap::with_capacity(records.len());
    for (i, record) in records.iter().enumerate() {
        let n = i + 1;
        validate_record(record).map_err(|reason| file_err(format!("record {n}: {reason}")))?;
        for (field, value) in [
            ("user_id", &record.user_id),
            ("timestamp", &record.timestamp),
        ] {
            if value.as_deref() == Some("") {
                return Err(file_err(format!(
                    "record {n}: {field} is an empty string (use none instead)"
                )));
            }
        }
        if let Some(first) = first_index.insert(&record.session_id, n) {
            return Err(file_err(format!(
                "record {n}: duplicate session_id (same as record {first})"
            )));
        }
    }
    match format {
        FileFormat::Csv => encode_csv(records, path),
        FileFormat::JsonLines => {
            let mut out = Vec::new();
            for record in records {
                serde_json::to_writer(&mut out, record)?;
                out.push(b'\n');
            }
            Ok(out)
        }
    }
}

/// Checks the rules every session obeys, whatever its source (a file, an API); returns the
/// reason it fails.
pub fn validate_record(record: &SessionRecord) -> std::result::Result<(), String> {
    if record.session_id.trim().is_empty() {
        return Err("session_id is empty".to_owned());
    }
    if record.events.is_empty() {
        return Err("events is empty".to_owned());
    }
    for (i, name) in record.events.iter().enumerate() {
        check_event_name(name).map_err(|reason| format!("event {}: {reason}", i + 1))?;
    }
    check_label(i64::from(record.label))?;
    Ok(())
}

fn check_label(label: i64) -> std::result::Result<u8, String> {
    match u8::try_from(label) {
        Ok(l) if (1..=NUM_LABELS as u8).contains(&l) => Ok(l),
        _ => Err(format!("label {label} is outside 1..={NUM_LABELS}")),
    }
}

/// Collects rows: validates them, detects duplicate ids, and skips or fails on bad ones.
struct RowSink<'a> {
    path: &'a Path,
    skip_invalid: bool,
    records: Vec<SessionRecord>,
    skipped: Vec<SkippedRow>,
    /// First line of every session id accepted so far.
    seen: HashMap<String, u64>,
}

impl<'a> RowSink<'a> {
    fn new(path: &'a Path, options: &LoadOptions) -> Self {
        RowSink {
            path,
            skip_invalid: options.skip_invalid,
            records: Vec::new(),
            skipped: Vec::new(),
            seen: HashMap::new(),
        }
    }

    /// Takes one parsed row (or the reason it could not be parsed) starting at `line`.
    fn push(&mut self, line: u64, row: std::result::Result<SessionRecord, String>) -> Result<()> {
        let checked = row.and_then(|record| {
            validate_record(&record)?;
            if let Some(first) = self.seen.get(&record.session_id) {
                // The id itself is personal data: name the line, not the id.
                return Err(format!("duplicate session_id (first seen on line {first})"));
            }
            Ok(record)
        });
        match checked {
            Ok(record) => {
                self.seen.insert(record.session_id.clone(), line);
                self.records.push(record);
                Ok(())
            }
            Err(reason) if self.skip_invalid => {
                self.skipped.push(SkippedRow { line, reason });
                Ok(())
            }
            Err(reason) => Err(Error::Data {
                path: self.path.to_path_buf(),
                line,
                reason,
            }),
        }
    }

    fn finish(self) -> Result<Loaded> {
        if self.records.is_empty() {
            let reason = if self.skipped.is_empty() {
                "file holds no sessions".to_owned()
            } else {
                format!(
                    "file holds no valid sessions ({} invalid row(s) skipped, the first on \
                     line {}: {})",
                    self.skipped.len(),
                    self.skipped[0].line,
                    self.skipped[0].reason
                )
            };
            return Err(Error::DataFile {
                path: self.path.to_path_buf(),
                reason,
            });
        }
        Ok(Loaded {
            records: self.records,
            skipped: self.skipped,
        })
    }
}

// --- CSV ---

/// Column positions of a CSV file, from its header.
struct CsvColumns {
    session_id: usize,
    events: usize,
    label: usize,
    user_id: Option<usize>,
    timestamp: Option<usize>,
    count: usize,
}

/// Maps a csv reader error; with flexible field counts and byte records reading from memory,
/// only malformed input that the reader itself refuses ends up here.
fn csv_error(err: csv::Error, path: &Path) -> Error {
    Error::DataFile {
        path: path.to_path_buf(),
        reason: format!("malformed csv: {err}"),
    }
}

fn parse_csv_header(header: &csv::ByteRecord, line: u64, path: &Path) -> Result<CsvColumns> {
    let err = |reason: String| Error::Data {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut positions: HashMap<&str, usize> = HashMap::new();
    for (i, raw) in header.iter().enumerate() {
        let name = std::str::from_utf8(raw)
            .map_err(|_| err(format!("header column {} is not valid utf-8", i + 1)))?;
        let Some(&known) = ALLOWED_COLUMNS.iter().find(|c| **c == name) else {
            return Err(err(format!(
                "unknown column {name:?} (allowed: {})",
                ALLOWED_COLUMNS.join(", ")
            )));
        };
        if positions.insert(known, i).is_some() {
            return Err(err(format!("column {name:?} appears twice")));
        }
    }
    let missing: Vec<&str> = REQUIRED_COLUMNS
        .iter()
        .copied()
        .filter(|c| !positions.contains_key(c))
        .collect();
    if !missing.is_empty() {
        return Err(err(format!(
            "missing required column(s): {} (required: {})",
            missing.join(", "),
            REQUIRED_COLUMNS.join(", ")
        )));
    }
    Ok(CsvColumns {
        session_id: positions["session_id"],
        events: positions["events"],
        label: positions["label"],
        user_id: positions.get("user_id").copied(),
        timestamp: positions.get("timestamp").copied(),
        count: header.len(),
    })
}

fn read_csv(mut reader: impl Read, path: &Path, sink: &mut RowSink<'_>) -> Result<()> {
    // The whole file is read first so that line numbers can be computed from byte offsets:
    // the csv crate's own line numbers are wrong after CRLF line endings and blank lines
    // (BurntSushi/rust-csv#395). The records end up in memory anyway.
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let mut lines = LineCounter::new(&bytes);
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        // Field counts are checked here, so the error can say what was expected.
        .flexible(true)
        .from_reader(bytes.as_slice());
    let header = csv.byte_headers().map_err(|e| csv_error(e, path))?.clone();
    if header.is_empty() || (header.len() == 1 && header[0].is_empty()) {
        return Err(Error::DataFile {
            path: path.to_path_buf(),
            reason: format!(
                "file is empty (expected a header line naming the columns, e.g. {})",
                ALLOWED_COLUMNS.join(",")
            ),
        });
    }
    let header_line = lines.line_at(header.position().map_or(0, |p| p.byte()));
    let columns = parse_csv_header(&header, header_line, path)?;
    let mut row = csv::ByteRecord::new();
    while csv
        .read_byte_record(&mut row)
        .map_err(|e| csv_error(e, path))?
    {
        let line = lines.line_at(row.position().map_or(0, |p| p.byte()));
        sink.push(line, parse_csv_row(&row, &columns))?;
    }
    Ok(())
}

/// Turns the byte offsets the csv reader reports into 1-based line numbers.
///
/// A line break is `\n`, `\r\n` or a lone `\r`, as the csv reader understands them. Offsets must
/// be asked for in increasing order; the counter only moves forward.
struct LineCounter<'a> {
    bytes: &'a [u8],
    /// Bytes before `pos` have been counted.
    pos: usize,
    /// The line `pos` is on.
    line: u64,
}

impl<'a> LineCounter<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        // A byte order mark is skipped by the csv reader and is not a line of its own.
        let pos = if bytes.starts_with(b"\xef\xbb\xbf") {
            3
        } else {
            0
        };
        LineCounter {
            bytes,
            pos,
            line: 1,
        }
    }

    /// The line of the record the csv reader started parsing at byte `offset`.
    ///
    /// The reader reports where it started, which is before any empty lines it skipped (and,
    /// with CRLF endings, before the `\n` ending the previous record); the record itself
    /// begins at the first byte after those.
    fn line_at(&mut self, offset: u64) -> u64 {
        let mut start = usize::try_from(offset).map_or(self.bytes.len(), |o| o.max(self.pos));
        while matches!(self.bytes.get(start), Some(b'\r' | b'\n')) {
            start += 1;
        }
        let start = start.min(self.bytes.len());
        for i in self.pos..start {
            let is_break = match self.bytes[i] {
                b'\n' => true,
                // The `\n` of a CRLF pair does the counting.
                b'\r' => self.bytes.get(i + 1) != Some(&b'\n'),
                _ => false,
            };
            if is_break {
                self.line += 1;
            }
        }
        self.pos = start;
        self.line
    }
}

fn parse_csv_row(
    row: &csv::ByteRecord,
    columns: &CsvColumns,
) -> std::result::Result<SessionRecord, String> {
    if row.len() != columns.count {
        return Err(format!(
            "malformed row: expected {} field(s) as in the header, found {}",
            columns.count,
            row.len()
        ));
    }
    let field = |index: usize, name: &str| {
        std::str::from_utf8(&row[index]).map_err(|_| format!("{name} is not valid utf-8"))
    };
    let optional = |index: Option<usize>, name: &str| match index {
        None => Ok(None),
        Some(i) => field(i, name).map(|v| (!v.is_empty()).then(|| v.to_owned())),
    };
    let session_id = field(columns.session_id, "session_id")?;
    if session_id.trim().is_empty() {
        return Err("session_id is empty".to_owned());
    }
    let events = field(columns.events, "events")?;
    if events.is_empty() {
        return Err("events is empty".to_owned());
    }
    let events: Vec<String> = events.split(' ').map(str::to_owned).collect();
    if events.iter().any(String::is_empty) {
        return Err(
            "events holds an empty event name (events are separated by single spaces, with \
             none at the start or end)"
                .to_owned(),
        );
    }
    let label_text = field(columns.label, "label")?;
    let label = label_text
        .parse::<i64>()
        .map_err(|_| format!("label {} is not an integer", describe_cell(label_text)))?;
    let label = check_label(label)?;
    Ok(SessionRecord {
        session_id: session_id.to_owned(),
        events,
        label,
        user_id: optional(columns.user_id, "user_id")?,
        timestamp: optional(columns.timestamp, "timestamp")?,
    })
}

fn encode_csv(records: &[SessionRecord], path: &Path) -> Result<Vec<u8>> {
    let with_user = records.iter().any(|r| r.user_id.is_some());
    let with_time = records.iter().any(|r| r.timestamp.is_some());
    let mut header = vec!["session_id", "events", "label"];
    if with_user {
        header.push("user_id");
    }
    if with_time {
        header.push("timestamp");
    }
    let to_err = |e: csv::Error| Error::DataFile {
        path: path.to_path_buf(),
        reason: format!("writing csv: {e}"),
    };
    let mut csv = csv::Writer::from_writer(Vec::new());
    csv.write_record(&header).map_err(to_err)?;
    for record in records {
        let label = record.label.to_string();
        let events = record.events.join(" ");
        let mut fields = vec![record.session_id.as_str(), events.as_str(), label.as_str()];
        if with_user {
            fields.push(record.user_id.as_deref().unwrap_or(""));
        }
        if with_time {
            fields.push(record.timestamp.as_deref().unwrap_or(""));
        }
        csv.write_record(&fields).map_err(to_err)?;
    }
    csv.into_inner().map_err(|e| Error::DataFile {
        path: path.to_path_buf(),
        reason: format!("writing csv: {}", e.error()),
    })
}

// --- JSON Lines ---

fn read_jsonl(reader: impl Read, path: &Path, sink: &mut RowSink<'_>) -> Result<()> {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    let mut line: u64 = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        let mut bytes = buf.as_slice();
        if line == 1 {
            bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
        }
        let row = match std::str::from_utf8(bytes) {
            Err(_) => Err("line is not valid utf-8".to_owned()),
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => parse_json_row(text),
        };
        sink.push(line, row)?;
    }
}

fn parse_json_row(text: &str) -> std::result::Result<SessionRecord, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("malformed row: invalid json: {e}"))?;
    let Value::Object(object) = value else {
        return Err(format!(
            "malformed row: expected a json object, found {}",
            json_kind(&value)
        ));
    };
    if let Some(unknown) = object
        .keys()
        .find(|k| !ALLOWED_COLUMNS.contains(&k.as_str()))
    {
        return Err(format!(
            "unknown field {unknown:?} (allowed: {})",
            ALLOWED_COLUMNS.join(", ")
        ));
    }
    let session_id = match object.get("session_id") {
        None | Some(Value::Null) => return Err("missing session_id".to_owned()),
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err("session_id is empty".to_owned());
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(format!(
                "session_id must be a string, found {}",
                json_kind(other)
            ));
        }
    };
    let events = match object.get("events") {
        None | Some(Value::Null) => return Err("missing events".to_owned()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "event {} must be a string, found {}",
                    i + 1,
                    json_kind(other)
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(format!(
                "events must be an array of strings, found {}",
                json_kind(other)
            ));
        }
    };
    let label = match object.get("label") {
        None | Some(Value::Null) => return Err("missing label".to_owned()),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(l) => check_label(l)?,
            None if n.is_u64() => return Err(format!("label {n} is outside 1..={NUM_LABELS}")),
            None => return Err(format!("label {n} is not an integer")),
        },
        Some(other) => {
            return Err(format!(
                "label must be an integer, found {}",
                json_kind(other)
            ));
        }
    };
    Ok(SessionRecord {
        session_id,
        events,
        label,
        user_id: optional_string(&object, "user_id")?,
        timestamp: optional_string(&object, "timestamp")?,
    })
}

fn optional_string(
    object: &Map<String, Value>,
    field: &str,
) -> std::result::Result<Option<String>, String> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!(
            "{field} must be a string or null, found {}",
            json_kind(other)
        )),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Shows a short cell verbatim (`"3.0"`) but only the length of a longer one: a misaligned
/// row can put an identifier in the label column, and identifiers must not reach error
/// messages.
fn describe_cell(text: &str) -> String {
    if text.chars().count() <= 6 {
        format!("{text:?}")
    } else {
        format!("(a {}-character text)", text.chars().count())
    }
}

#[cfg(test)]
mod tests;
