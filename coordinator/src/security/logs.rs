//! Log output that text from callers cannot forge.
//!
//! Log messages and fields carry text that sites and operators chose (decline reasons, site
//! ids in refused requests, tensor names in a refused update). In the text log, a newline
//! in such a value would start a line that looks like the coordinator's own, and a control
//! sequence would act on the terminal showing the log. [`text_fields`] formats every
//! message and field value with `fedflow_common::text::escape`, so an event is always one
//! line of plain text. The JSON log escapes control characters by construction
//! (`serde_json`); [`SafeJson`] also escapes the ones `serde_json` writes as they are (DEL,
//! the C1 controls, bidirectional overrides), without changing the values.

use std::fmt;
use std::io;

use tracing::field::Field;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{FormatFields, Writer, debug_fn};

/// The field formatter of the text log: `key=value` pairs and the message, space
/// separated like tracing's default, with every unsafe character escaped (a `\n` in a value
/// is written `\n`, an escape character `\u{1b}`).
pub fn text_fields() -> impl for<'w> FormatFields<'w> + Send + Sync + 'static {
    debug_fn(write_field as fn(&mut Writer<'_>, &Field, &dyn fmt::Debug) -> fmt::Result)
        .delimited(" ")
}

fn write_field(w: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug) -> fmt::Result {
    // The message arrives as `format_args!` (its Debug is its Display); string fields arrive
    // quoted and escaped by their Debug; `%` fields as their Display. Escaping the result
    // catches whatever the value's own formatting let through.
    let shown = format!("{value:?}");
    let safe = fedflow_common::text::escape(&shown);
    match field.name() {
        "message" => w.write_str(&safe),
        name => write!(w, "{name}={safe}"),
    }
}

/// A [`MakeWriter`] for the JSON log: what `M`'s writers would write, with
/// `fedflow_common::text::json_safe` applied to each event (tracing writes an event, one
/// JSON object and its newline, with one `write_all`).
#[derive(Debug, Clone, Copy)]
pub struct SafeJson<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for SafeJson<M> {
    type Writer = SafeJsonWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        SafeJsonWriter(self.0.make_writer())
    }
}

/// The writer of [`SafeJson`].
#[derive(Debug)]
pub struct SafeJsonWriter<W>(W);

impl<W: io::Write> io::Write for SafeJsonWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => self
                .0
                .write_all(fedflow_common::text::json_safe(text).as_bytes())?,
            // Not from tracing's JSON formatter (which writes whole UTF-8 events).
            Err(_) => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A decline reason that cleared an operator's screen and forged a log line.
    const ATTACK: &str = "\x1b[2J\x1b[Hfine\nFORGED 2026-01-01T00:00:00Z  INFO round 9 committed";

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn log_attack() {
        let site = "site-a\nFORGED field";
        let reason = ATTACK;
        tracing::warn!(%site, round = 1, reason, "the site declined its task: {reason}");
    }

    #[test]
    fn a_text_log_event_stays_one_plain_line_whatever_its_values_hold() {
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .fmt_fields(text_fields())
            .finish();
        tracing::subscriber::with_default(subscriber, log_attack);
        let text = out.text();
        assert_eq!(
            text.matches('\n').count(),
            1,
            "one event, one line: {text:?}"
        );
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(
            !text.lines().any(|l| l.starts_with("FORGED")),
            "no line starts with the forged text: {text:?}"
        );
        // What the site sent is still there, escaped, with the usual key=value fields.
        assert!(
            text.contains(
                "the site declined its task: \\u{1b}[2J\\u{1b}[Hfine\\nFORGED 2026-01-01"
            ),
            "{text:?}"
        );
        assert!(text.contains("site=site-a\\nFORGED field"), "{text:?}");
        assert!(text.contains(" round=1 "), "{text:?}");
    }

    #[test]
    fn a_json_log_event_holds_the_same_values_and_prints_safely() {
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(SafeJson(move || sink.clone()))
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .finish();
        let reason = format!("{ATTACK} \u{9b}2J \u{202e}desrever");
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(reason = %reason, "declined: {reason}");
        });
        let text = out.text();
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(
            !text
                .trim_end_matches('\n')
                .chars()
                .any(fedflow_common::text::is_unsafe),
            "{text:?}"
        );
        let event: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(event["reason"], reason.as_str());
        assert_eq!(event["message"], format!("declined: {reason}").as_str());
    }
}
