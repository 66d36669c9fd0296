//! Text that comes from sites and operators: checked where it enters, escaped where it is
//! shown.
//!
//! A decline reason, a pause reason or a site id typed into a request ends up in terminal
//! output (`fedflow-ctl`), log lines and reports. A control character in it could clear an
//! operator's screen or paint fake text (`ESC [2J`), a newline could start a forged log line,
//! and a bidirectional override could show text in another order than it is stored. So:
//!
//! - at the edge, [`check`] refuses a field that is too long or holds an unsafe character
//!   (the caller answers `INVALID_ARGUMENT` with the message, which names the field), and
//!   [`sanitize`] cleans a field that must not be refused (a site's reason for declining a
//!   task is still a decline);
//! - where text is shown, [`escape`] writes every unsafe character as a visible escape
//!   (`\n`, `\u{1b}`), [`shorten`] cuts long text for a table cell, and [`json_safe`] makes a
//!   JSON document safe to print without changing the value it encodes.
//!
//! *Unsafe* ([`is_unsafe`]): the C0 and C1 control characters and DEL (everything
//! `char::is_control` says), and the invisible Unicode format characters that reorder or
//! hide text: bidirectional marks, embeddings, overrides and isolates, zero-width
//! characters, the byte-order mark, and the line and paragraph separators.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Longest reason a site may give (declining a task), in characters.
pub const MAX_REASON_CHARS: usize = 1000;

/// Longest reason an operator may give (pause, resume, stop, revoke), in characters.
pub const MAX_OPERATOR_REASON_CHARS: usize = 200;

/// Longest identifier-like field (task ids, versions, hashes), in characters.
pub const MAX_ID_CHARS: usize = 128;

/// What [`shorten`] and [`sanitize`] put where they cut text.
pub const ELLIPSIS: char = '…';

/// Whether `c` must never reach a terminal, a log line or a report as it is (see the
/// module documentation).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'              // Arabic letter mark
                | '\u{180e}'        // Mongolian vowel separator
                | '\u{200b}'..='\u{200f}' // zero-width space/joiners, LRM, RLM
                | '\u{2028}'..='\u{202e}' // line/paragraph separators, embeddings, overrides
                | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
                | '\u{2066}'..='\u{2069}' // isolates
                | '\u{feff}'        // byte-order mark, zero-width no-break space
        )
}

/// Writes `c` as a visible escape: `\n`, `\r`, `\t`, or `\u{XXXX}`.
fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c => {
            let _ = write!(out, "{}", c.escape_unicode());
        }
    }
}

/// `text` with every unsafe character written as a visible escape (`\n`, `\r`, `\t`,
/// `\u{1b}`): one line, nothing a terminal acts on. Borrows when there is nothing to escape.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`escape`]d `text`, cut to at most `max` characters (the last one an [`ELLIPSIS`] when
/// it was cut): for a table cell or a one-line summary.
pub fn shorten(text: &str, max: usize) -> String {
    let escaped = escape(text);
    if escaped.chars().count() <= max {
        return escaped.into_owned();
    }
    let mut out: String = escaped.chars().take(max.saturating_sub(1)).collect();
    out.push(ELLIPSIS);
    out
}

/// Checks a text field from a caller: at most `max` characters and no unsafe character.
/// The error names `field` and says what to do, quoting no more than the start of the
/// value (escaped), so it is safe to send back and to log.
pub fn check(field: &str, text: &str, max: usize) -> Result<(), String> {
    let chars = text.chars().count();
    if chars > max {
        return Err(format!(
            "{field}: {chars} characters is too long; at most {max} are allowed"
        ));
    }
    if let Some((at, c)) = text.chars().enumerate().find(|&(_, c)| is_unsafe(c)) {
        return Err(format!(
            "{field}: character {} is {} (a control or invisible formatting character), in \
             \"{}\"; use plain text on one line",
            at + 1,
            c.escape_unicode(),
            shorten(text, 60)
        ));
    }
    Ok(())
}

/// A text field that must be accepted whatever it holds, made safe: unsafe characters
/// escaped (see [`escape`]) and the result cut to `max` characters (see [`shorten`]).
pub fn sanitize(text: &str, max: usize) -> String {
    shorten(text, max)
}

/// Whether `text` is a SHA-256 as fedflow writes it: 64 lowercase hex digits.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A JSON document (as `serde_json` writes it) with every unsafe character inside its
/// strings written as a `\uXXXX` escape. It encodes the same value, but prints safely on a
/// terminal: `serde_json` already escapes the C0 control characters, not DEL, the C1
/// controls or the Unicode formatting characters. Borrows when there is nothing to escape.
pub fn json_safe(json: &str) -> Cow<'_, str> {
    // Outside strings, JSON holds only ASCII punctuation, digits, letters and whitespace, so
    // every character escaped here is inside a string, where `\uXXXX` means the same.
    let unsafe_here = |c: char| c > '\u{1f}' && is_unsafe(c);
    if !json.chars().any(unsafe_here) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 12);
    for c in json.chars() {
        if unsafe_here(c) {
            // Every unsafe character above U+001F lies in the Basic Multilingual Plane.
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence that cleared an operator's screen and forged a log line.
    const ATTACK: &str =
        "\x1b[2J\x1b[Hall fine\nFORGED 2026-01-01T00:00:00Z INFO round 9 committed";

    #[test]
    fn escaping_leaves_one_line_with_nothing_a_terminal_acts_on() {
        let e = escape(ATTACK);
        assert!(!e.chars().any(is_unsafe), "{e}");
        assert!(!e.contains('\n') && !e.contains('\x1b'), "{e}");
        assert_eq!(
            e,
            "\\u{1b}[2J\\u{1b}[Hall fine\\nFORGED 2026-01-01T00:00:00Z INFO round 9 committed"
        );
        for (c, shown) in [
            ('\r', "\\r"),
            ('\t', "\\t"),
            ('\u{7f}', "\\u{7f}"),
            ('\u{9b}', "\\u{9b}"),
            ('\u{202e}', "\\u{202e}"),
            ('\u{2066}', "\\u{2066}"),
            ('\u{200b}', "\\u{200b}"),
            ('\u{2028}', "\\u{2028}"),
            ('\u{feff}', "\\u{feff}"),
        ] {
            assert_eq!(escape(&format!("a{c}b")), format!("a{shown}b"), "{c:?}");
        }
        // Ordinary text, accents and other scripts are untouched (and not copied).
        for fine in ["loss became NaN", "épuisé: ε > 3", "数据不足", "path C:\\x"] {
            assert!(
                matches!(escape(fine), Cow::Borrowed(s) if s == fine),
                "{fine}"
            );
        }
    }

    #[test]
    fn shortening_cuts_with_an_ellipsis_only_when_needed() {
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcd", 3), "ab…");
        assert_eq!(shorten(&"é".repeat(10), 4), "ééé…");
        // Escapes count as what is shown.
        assert_eq!(shorten("a\nb", 10), "a\\nb");
        assert_eq!(shorten("a\nbcdef", 4), "a\\n…");
        assert_eq!(sanitize(ATTACK, MAX_REASON_CHARS), escape(ATTACK));
        assert_eq!(
            sanitize(&"x".repeat(5000), MAX_REASON_CHARS)
                .chars()
                .count(),
            MAX_REASON_CHARS
        );
    }

    #[test]
    fn checking_names_the_field_and_what_is_wrong() {
        assert_eq!(check("reason", "maintenance window", 200), Ok(()));
        assert_eq!(check("reason", "", 200), Ok(()));
        assert_eq!(check("reason", &"é".repeat(200), 200), Ok(()));
        let long = check("reason", &"x".repeat(201), 200).unwrap_err();
        assert!(long.starts_with("reason: 201 characters"), "{long}");
        assert!(long.contains("at most 200"), "{long}");
        let control = check("reason", ATTACK, 200).unwrap_err();
        assert!(
            control.starts_with("reason: character 1 is \\u{1b}"),
            "{control}"
        );
        // The message itself is safe to log and print.
        assert!(!control.chars().any(is_unsafe), "{control}");
        let newline = check("client_version", "1.0\nFORGED", 128).unwrap_err();
        assert!(newline.contains("character 4 is \\u{a}"), "{newline}");
        let bidi = check("reason", "abc\u{202e}fed", 200).unwrap_err();
        assert!(bidi.contains("\\u{202e}"), "{bidi}");
    }

    #[test]
    fn sha256_hex_is_64_lowercase_hex_digits() {
        assert!(is_sha256_hex(&"0a".repeat(32)));
        assert!(!is_sha256_hex(&"0A".repeat(32)));
        assert!(!is_sha256_hex(&"0a".repeat(31)));
        assert!(!is_sha256_hex(""));
        assert!(!is_sha256_hex(&format!("{}\n", "0a".repeat(32))));
    }

    #[test]
    fn json_stays_the_same_value_and_prints_safely() {
        let value =
            serde_json::json!({ "reason": format!("{ATTACK} \u{9b}31m \u{202e}abc \u{7f}") });
        let text = serde_json::to_string(&value).unwrap();
        // serde_json escapes the C0 controls but writes the others as they are.
        assert!(!text.contains('\x1b') && text.contains('\u{9b}'), "{text}");
        let safe = json_safe(&text);
        assert!(!safe.chars().any(is_unsafe), "{safe}");
        assert!(
            safe.contains("\\u009b") && safe.contains("\\u202e"),
            "{safe}"
        );
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, value);
        // Nothing to escape: the same text, not a copy.
        let plain = r#"{"a":"b\n","c":[1,2]}"#;
        assert!(matches!(json_safe(plain), Cow::Borrowed(s) if s == plain));
    }
}
