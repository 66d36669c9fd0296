//! Data-format tests: every row rule, with the file, line and reason of each error.

use super::*;

fn strict() -> LoadOptions {
    LoadOptions::default()
}

fn lenient() -> LoadOptions {
    LoadOptions { skip_invalid: true }
}

fn parse(text: &str, format: FileFormat, options: &LoadOptions) -> Result<Loaded> {
    read_sessions_from(text.as_bytes(), format, "site.data", options)
}

/// Expects a row error and returns its line and reason.
fn row_error(text: &str, format: FileFormat) -> (u64, String) {
    match parse(text, format, &strict()) {
        Err(Error::Data { path, line, reason }) => {
            assert_eq!(path, Path::new("site.data"));
            (line, reason)
        }
        other => panic!("expected a row error for {text:?}, got {other:?}"),
    }
}

/// Expects a whole-file error and returns its reason.
fn file_error(text: &str, format: FileFormat, options: &LoadOptions) -> String {
    match parse(text, format, options) {
        Err(Error::DataFile { reason, .. }) => reason,
        other => panic!("expected a file error for {text:?}, got {other:?}"),
    }
}

fn record(id: &str, events: &[&str], label: u8) -> SessionRecord {
    SessionRecord::new(id, events, label)
}

const CSV_HEADER: &str = "session_id,events,label\n";

#[test]
fn format_from_extension() {
    assert_eq!(FileFormat::from_path("a/b.csv").unwrap(), FileFormat::Csv);
    assert_eq!(FileFormat::from_path("b.CSV").unwrap(), FileFormat::Csv);
    assert_eq!(
        FileFormat::from_path("b.jsonl").unwrap(),
        FileFormat::JsonLines
    );
    assert_eq!(
        FileFormat::from_path("b.ndjson").unwrap(),
        FileFormat::JsonLines
    );
    for bad in ["b.json", "b.txt", "b", "csv"] {
        let err = FileFormat::from_path(bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{bad}: unknown session file format: the name must end in .csv, .jsonl or \
                     .ndjson"
            )
        );
    }
}

#[test]
fn reads_csv_in_any_column_order() {
    let text = "timestamp,label,events,user_id,session_id\n\
                    2026-01-01T00:00:00Z,4,opened_help searched,u1,s1\n\
                    ,2,clicked_answer,,s2\n";
    let loaded = parse(text, FileFormat::Csv, &strict()).unwrap();
    assert!(loaded.skipped.is_empty());
    assert_eq!(
        loaded.records,
        vec![
            SessionRecord {
                session_id: "s1".into(),
                events: vec!["opened_help".into(), "searched".into()],
                label: 4,
                user_id: Some("u1".into()),
                timestamp: Some("2026-01-01T00:00:00Z".into()),
            },
            record("s2", &["clicked_answer"], 2),
        ]
    );
}

#[test]
fn reads_jsonl_with_blank_lines_and_nulls() {
    let text = "\n{\"session_id\": \"s1\", \"events\": [\"a\", \"b\"], \"label\": 3, \
                    \"user_id\": \"u1\", \"timestamp\": \"2026-01-01T00:00:00Z\"}\n\
                    \n   \n{\"session_id\": \"s2\", \"events\": [\"c\"], \"label\": 5, \
                    \"user_id\": null}\r\n";
    let loaded = parse(text, FileFormat::JsonLines, &strict()).unwrap();
    assert_eq!(loaded.records.len(), 2);
    assert_eq!(loaded.records[0].user_id.as_deref(), Some("u1"));
    assert_eq!(loaded.records[1], record("s2", &["c"], 5));
}

#[test]
fn csv_row_errors_name_line_and_reason() {
    let h = CSV_HEADER;
    let cases: &[(String, u64, &str)] = &[
        (
            format!("{h}s1,a,1\ns2,a,1,extra\n"),
            3,
            "malformed row: expected 3 field(s) as in the header, found 4",
        ),
        (
            format!("{h}s1,a\n"),
            2,
            "malformed row: expected 3 field(s) as in the header, found 2",
        ),
        (format!("{h},a,1\n"), 2, "session_id is empty"),
        (format!("{h}\"  \",a,1\n"), 2, "session_id is empty"),
        (format!("{h}s1,,1\n"), 2, "events is empty"),
        (
            format!("{h}s1,a  b,1\n"),
            2,
            "events holds an empty event name (events are separated by single spaces, \
                 with none at the start or end)",
        ),
        (
            format!("{h}s1,a ,1\n"),
            2,
            "events holds an empty event name (events are separated by single spaces, \
                 with none at the start or end)",
        ),
        (
            format!("{h}s1,\"a\tb\",1\n"),
            2,
            "event 1: event name \"a\\tb\" contains whitespace",
        ),
        (format!("{h}s1,a,x\n"), 2, "label \"x\" is not an integer"),
        (
            format!("{h}s1,a,3.0\n"),
            2,
            "label \"3.0\" is not an integer",
        ),
        (format!("{h}s1,a,\n"), 2, "label \"\" is not an integer"),
        (
            format!("{h}s1,a,user-4711\n"),
            2,
            "label (a 9-character text) is not an integer",
        ),
        (format!("{h}s1,a,0\n"), 2, "label 0 is outside 1..=5"),
        (format!("{h}s1,a,6\n"), 2, "label 6 is outside 1..=5"),
        (format!("{h}s1,a,-1\n"), 2, "label -1 is outside 1..=5"),
        (
            format!("{h}s1,a,1\ns2,b,2\ns1,c,3\n"),
            4,
            "duplicate session_id (first seen on line 2)",
        ),
        (
            format!("{h}\"s1\nstill s1\",a,1\ns2,a,9\n"),
            4,
            "label 9 is outside 1..=5",
        ),
    ];
    for (text, line, reason) in cases {
        assert_eq!(
            row_error(text, FileFormat::Csv),
            (*line, (*reason).to_owned()),
            "for {text:?}"
        );
    }
}

#[test]
fn csv_error_display() {
    let err = read_sessions_from(
        "session_id,events,label\ns1,a,7\n".as_bytes(),
        FileFormat::Csv,
        "data/site-a.csv",
        &strict(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "data/site-a.csv:2: label 7 is outside 1..=5"
    );
}

#[test]
fn csv_invalid_utf8_is_a_row_error() {
    let mut bytes = CSV_HEADER.as_bytes().to_vec();
    bytes.extend_from_slice(b"s1,a\xff,1\n");
    let err =
        read_sessions_from(bytes.as_slice(), FileFormat::Csv, "x.csv", &strict()).unwrap_err();
    assert_eq!(err.to_string(), "x.csv:2: events is not valid utf-8");
}

#[test]
fn csv_header_errors() {
    let allowed = "session_id, events, label, user_id, timestamp";
    assert_eq!(
        row_error("session_id,events,label,score\ns1,a,1,2\n", FileFormat::Csv),
        (1, format!("unknown column \"score\" (allowed: {allowed})"))
    );
    assert_eq!(
        row_error("session_id,events\ns1,a\n", FileFormat::Csv),
        (
            1,
            "missing required column(s): label (required: session_id, events, label)".to_owned()
        )
    );
    assert_eq!(
        row_error("session_id,events,label,label\n", FileFormat::Csv),
        (1, "column \"label\" appears twice".to_owned())
    );
    // Header problems are fatal even when skipping rows.
    assert!(matches!(
        parse("session_id,events\ns1,a\n", FileFormat::Csv, &lenient()),
        Err(Error::Data { line: 1, .. })
    ));
}

#[test]
fn csv_line_numbers_count_blank_lines_and_crlf() {
    let text = "session_id,events,label\r\n\r\ns1,a,1\r\n\r\ns2,a,6\r\n";
    assert_eq!(
        row_error(text, FileFormat::Csv),
        (5, "label 6 is outside 1..=5".to_owned())
    );
    for (text, line) in [
        ("session_id,events,label\n\ns1,a,1\n\ns2,a,6\n", 5),
        ("session_id,events,label\r\ns1,a,1\r\ns2,a,6\r\n", 3),
        ("session_id,events,label\r\ns1,a,1\r\ns2,a,6", 3),
        ("\n\nsession_id,events,label\ns1,a,1\ns2,a,6\n", 5),
        ("session_id,events,label\rs1,a,1\rs2,a,6\r", 3),
        ("\u{feff}session_id,events,label\r\ns1,a,1\r\ns2,a,6\r\n", 3),
        (
            "session_id,events,label\r\n\"s\r\n1\",a,1\r\n\r\ns2,a,6\r\n",
            5,
        ),
        ("session_id,events,label\r\n\"s\n\n1\",a,1\ns2,a,6\r\n", 5),
    ] {
        assert_eq!(
            row_error(text, FileFormat::Csv),
            (line, "label 6 is outside 1..=5".to_owned()),
            "for {text:?}"
        );
    }
    assert_eq!(
        row_error("\r\n\nsession_id,events\r\n", FileFormat::Csv).0,
        3,
        "header line"
    );
    let ok = "session_id,events,label\r\ns1,a b,1\r\n";
    let loaded = parse(ok, FileFormat::Csv, &strict()).unwrap();
    assert_eq!(loaded.records, vec![record("s1", &["a", "b"], 1)]);
}

#[test]
fn examples_in_module_docs_parse() {
    let csv = "session_id,events,label,user_id,timestamp\n\
                   s-0001,opened_help searched clicked_answer,4,u-17,2026-01-01T00:00:00Z\n\
                   \"s-0002, retry\",opened_help searched searched,2,,\n";
    let jsonl = "{\"session_id\": \"s-0001\", \"events\": [\"opened_help\", \"searched\", \
                     \"clicked_answer\"], \"label\": 4, \"user_id\": \"u-17\", \
                     \"timestamp\": \"2026-01-01T00:00:00Z\"}\n\
                     {\"session_id\": \"s-0002\", \"events\": [\"opened_help\"], \"label\": 2}\n";
    let from_csv = parse(csv, FileFormat::Csv, &strict()).unwrap().records;
    let from_jsonl = parse(jsonl, FileFormat::JsonLines, &strict())
        .unwrap()
        .records;
    assert_eq!(from_csv[0], from_jsonl[0]);
    assert_eq!(from_csv[1].session_id, "s-0002, retry");
    assert_eq!(from_csv[1].user_id, None);
    assert_eq!(from_jsonl[1], record("s-0002", &["opened_help"], 2));
}

#[test]
fn csv_with_byte_order_mark() {
    let text = "\u{feff}session_id,events,label\ns1,a,1\n";
    let loaded = parse(text, FileFormat::Csv, &strict()).unwrap();
    assert_eq!(loaded.records, vec![record("s1", &["a"], 1)]);
}

#[test]
fn jsonl_row_errors_name_line_and_reason() {
    let ok = r#"{"session_id": "s1", "events": ["a"], "label": 1}"#;
    let cases: &[(&str, &str)] = &[
        (
            r#"{"session_id": "s2", "events": ["a"], "label": 1"#,
            "malformed row: invalid json: ",
        ),
        (
            r#"["s2"]"#,
            "malformed row: expected a json object, found an array",
        ),
        (r#"{"events": ["a"], "label": 1}"#, "missing session_id"),
        (
            r#"{"session_id": "", "events": ["a"], "label": 1}"#,
            "session_id is empty",
        ),
        (
            r#"{"session_id": 7, "events": ["a"], "label": 1}"#,
            "session_id must be a string, found a number",
        ),
        (r#"{"session_id": "s2", "label": 1}"#, "missing events"),
        (
            r#"{"session_id": "s2", "events": [], "label": 1}"#,
            "events is empty",
        ),
        (
            r#"{"session_id": "s2", "events": "a b", "label": 1}"#,
            "events must be an array of strings, found a string",
        ),
        (
            r#"{"session_id": "s2", "events": ["a", 3], "label": 1}"#,
            "event 2 must be a string, found a number",
        ),
        (
            r#"{"session_id": "s2", "events": ["a", ""], "label": 1}"#,
            "event 2: event name is empty",
        ),
        (
            r#"{"session_id": "s2", "events": ["a b"], "label": 1}"#,
            "event 1: event name \"a b\" contains whitespace",
        ),
        (r#"{"session_id": "s2", "events": ["a"]}"#, "missing label"),
        (
            r#"{"session_id": "s2", "events": ["a"], "label": "3"}"#,
            "label must be an integer, found a string",
        ),
        (
            r#"{"session_id": "s2", "events": ["a"], "label": 3.5}"#,
            "label 3.5 is not an integer",
        ),
        (
            r#"{"session_id": "s2", "events": ["a"], "label": 3.0}"#,
            "label 3.0 is not an integer",
        ),
        (
            r#"{"session_id": "s2", "events": ["a"], "label": 6}"#,
            "label 6 is outside 1..=5",
        ),
        (
            r#"{"session_id": "s2", "events": ["a"], "label": -3}"#,
            "label -3 is outside 1..=5",
        ),
        (
            r#"{"session_id": "s2", "events": ["a"], "label": 18446744073709551615}"#,
            "label 18446744073709551615 is outside 1..=5",
        ),
        (
            r#"{"session_id": "s2", "events": ["a"], "label": 1, "user_id": 5}"#,
            "user_id must be a string or null, found a number",
        ),
        (
            r#"{"session_id": "s2", "events": ["a"], "label": 1, "score": 5}"#,
            "unknown field \"score\" (allowed: session_id, events, label, user_id, \
                 timestamp)",
        ),
        (
            r#"{"session_id": "s1", "events": ["a"], "label": 1}"#,
            "duplicate session_id (first seen on line 1)",
        ),
    ];
    for (row, reason) in cases {
        // A blank line in between: line numbers count it.
        let text = format!("{ok}\n\n{row}\n");
        let (line, got) = row_error(&text, FileFormat::JsonLines);
        assert_eq!(line, 3, "for {row}");
        assert!(got.starts_with(reason), "for {row}: {got:?} vs {reason:?}");
        if !reason.ends_with(": ") {
            assert_eq!(got, *reason, "for {row}");
        }
    }
}

#[test]
fn jsonl_invalid_utf8_is_a_row_error() {
    let bytes = b"{\"session_id\": \"s1\", \"events\": [\"a\"], \"label\": 1}\n\xff\n";
    let err =
        read_sessions_from(&bytes[..], FileFormat::JsonLines, "x.jsonl", &strict()).unwrap_err();
    assert_eq!(err.to_string(), "x.jsonl:2: line is not valid utf-8");
}

#[test]
fn empty_files_are_errors() {
    for options in [strict(), lenient()] {
        assert_eq!(
            file_error("", FileFormat::JsonLines, &options),
            "file holds no sessions"
        );
        assert_eq!(
            file_error("\n  \n\n", FileFormat::JsonLines, &options),
            "file holds no sessions"
        );
        assert_eq!(
            file_error(CSV_HEADER, FileFormat::Csv, &options),
            "file holds no sessions"
        );
        assert_eq!(
            file_error("", FileFormat::Csv, &options),
            "file is empty (expected a header line naming the columns, e.g. \
                 session_id,events,label,user_id,timestamp)"
        );
    }
    assert_eq!(
        file_error(
            &format!("{CSV_HEADER}s1,a,0\ns2,a,9\n"),
            FileFormat::Csv,
            &lenient()
        ),
        "file holds no valid sessions (2 invalid row(s) skipped, the first on line 2: \
             label 0 is outside 1..=5)"
    );
}

#[test]
fn skip_invalid_lists_bad_rows() {
    let text = format!("{CSV_HEADER}s1,a,1\ns2,a  b,2\ns3,b,9\ns1,c,3\ns4,c,4\n");
    let loaded = parse(&text, FileFormat::Csv, &lenient()).unwrap();
    assert_eq!(
        loaded.records,
        vec![record("s1", &["a"], 1), record("s4", &["c"], 4)]
    );
    let lines: Vec<u64> = loaded.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, vec![3, 4, 5]);
    assert_eq!(loaded.skipped[1].reason, "label 9 is outside 1..=5");
    assert_eq!(
        loaded.skipped[2].reason,
        "duplicate session_id (first seen on line 2)"
    );
    // Without skipping, the first bad row fails the load.
    assert_eq!(row_error(&text, FileFormat::Csv).0, 3);

    let jsonl = "{\"session_id\": \"a\", \"events\": [\"x\"], \"label\": 2}\nnot json\n";
    let loaded = parse(jsonl, FileFormat::JsonLines, &lenient()).unwrap();
    assert_eq!(loaded.records.len(), 1);
    assert_eq!(loaded.skipped.len(), 1);
    assert_eq!(loaded.skipped[0].line, 2);
}

fn tricky_records() -> Vec<SessionRecord> {
    vec![
        SessionRecord {
            session_id: "s,1 \"quoted\", with comma".into(),
            events: vec!["opened_help".into(), "sear,ched".into(), "\"q\"".into()],
            label: 1,
            user_id: Some("u, \"one\"".into()),
            timestamp: Some("2026-01-01T00:00:00Z".into()),
        },
        SessionRecord {
            session_id: " leading space and\nnewline ".into(),
            events: vec!["é_unicode".into()],
            label: 5,
            user_id: None,
            timestamp: Some("t".into()),
        },
        record("#3", &["a", "a", "a"], 3),
    ]
}

#[test]
fn write_then_read_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["s.csv", "s.jsonl", "s.ndjson"] {
        let path = dir.path().join(name);
        let records = tricky_records();
        write_sessions(&path, &records).unwrap();
        let loaded = read_sessions(&path, &strict()).unwrap();
        assert_eq!(loaded.records, records, "{name}");
        assert!(loaded.skipped.is_empty());
        // Without optional columns too.
        let plain = vec![record("p1", &["a"], 2), record("p2", &["b", "c"], 4)];
        write_sessions(&path, &plain).unwrap();
        assert_eq!(read_sessions(&path, &strict()).unwrap().records, plain);
    }
}

#[test]
fn canonical_output() {
    let records = vec![
        SessionRecord {
            user_id: Some("u1".into()),
            ..record("s,1", &["a", "b"], 2)
        },
        record("s2", &["c"], 5),
    ];
    let csv = encode_sessions(&records, FileFormat::Csv, "x.csv").unwrap();
    assert_eq!(
        String::from_utf8(csv).unwrap(),
        "session_id,events,label,user_id\n\"s,1\",a b,2,u1\ns2,c,5,\n"
    );
    let jsonl = encode_sessions(&records, FileFormat::JsonLines, "x.jsonl").unwrap();
    assert_eq!(
        String::from_utf8(jsonl).unwrap(),
        "{\"session_id\":\"s,1\",\"events\":[\"a\",\"b\"],\"label\":2,\"user_id\":\"u1\"}\n\
             {\"session_id\":\"s2\",\"events\":[\"c\"],\"label\":5}\n"
    );
}

#[test]
fn write_rejects_what_could_not_be_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.csv");
    let reason = |records: &[SessionRecord]| match write_sessions(&path, records) {
        Err(Error::DataFile { reason, .. }) => reason,
        other => panic!("expected a file error, got {other:?}"),
    };
    assert_eq!(reason(&[]), "no sessions to write");
    assert_eq!(
        reason(&[record("a", &["x"], 1), record("a", &["y"], 2)]),
        "record 2: duplicate session_id (same as record 1)"
    );
    assert_eq!(
        reason(&[record("a", &["x y"], 1)]),
        "record 1: event 1: event name \"x y\" contains whitespace"
    );
    assert_eq!(reason(&[record("a", &[], 1)]), "record 1: events is empty");
    assert_eq!(
        reason(&[record("", &["x"], 1)]),
        "record 1: session_id is empty"
    );
    assert_eq!(
        reason(&[record("a", &["x"], 0)]),
        "record 1: label 0 is outside 1..=5"
    );
    let empty_user = SessionRecord {
        user_id: Some(String::new()),
        ..record("a", &["x"], 1)
    };
    assert_eq!(
        reason(&[empty_user]),
        "record 1: user_id is an empty string (use none instead)"
    );
    // Nothing was written by any of the failed attempts.
    assert!(!path.exists());
    assert!(matches!(
        write_sessions(dir.path().join("out.txt"), &[record("a", &["x"], 1)]),
        Err(Error::DataFile { .. })
    ));
}

#[test]
fn read_missing_file_is_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_sessions(dir.path().join("none.csv"), &strict()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
}
