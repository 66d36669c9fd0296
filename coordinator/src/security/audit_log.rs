//! An append-only, hash-chained audit log of security-relevant events, as JSON lines.
//!
//! Each line is one JSON object `{"detail":{..},"event":"..","prev":"..","seq":N,
//! "time_ms":T,"hash":".."}`: `seq` counts from 1, `prev` is the previous line's `hash` (64
//! zeros for the first line), and `hash` is the SHA-256 (hex) of the line's *body*, the
//! exact bytes of the line with its `,"hash":".."` member removed. Editing, inserting,
//! deleting or reordering any line therefore breaks the chain at that line, and
//! [`verify`] names the first line that does not check out. The chain has no key: whoever
//! can write the file can also recompute every hash after an edit, and truncating the end
//! leaves a valid chain. Both are caught by comparing with a copy of the last hash kept
//! elsewhere (the coordinator logs it at start; `audit-log verify` prints it).
//!
//! Every append is written with one `write` and made durable (`fsync`) before it returns.
//! A crash can leave a torn last line, without its newline; [`AuditLog::open`] cuts such a
//! tail off (logging that it did) and refuses a log that fails verification anywhere else.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use fedflow_common::hash::sha256_hex;
use serde_json::json;

use crate::{Error, Result};

/// The `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// Where verification of a log failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// 1-based line number of the first line that does not verify.
    pub line: usize,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// A log that verified: how many lines and the hash of the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Number of lines (events).
    pub lines: u64,
    /// The last line's hash ([`GENESIS`] for an empty log).
    pub head: String,
}

/// Checks one line against the expected sequence number and previous hash; returns its hash.
fn check_line(line: &str, seq: u64, prev: &str) -> std::result::Result<String, String> {
    if line.len() < HASH_SUFFIX_LEN + 2 || !line.is_char_boundary(line.len() - HASH_SUFFIX_LEN) {
        return Err("not an audit record (too short)".into());
    }
    let (head, suffix) = line.split_at(line.len() - HASH_SUFFIX_LEN);
    let hash = suffix
        .strip_prefix(",\"hash\":\"")
        .and_then(|s| s.strip_suffix("\"}"))
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or("the record does not end with its hash")?;
    let body = format!("{head}}}");
    let value: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("the record is not valid JSON: {e}"))?;
    if value.get("seq").and_then(|v| v.as_u64()) != Some(seq) {
        return Err(format!(
            "sequence number is not {seq} (a line was removed or inserted)"
        ));
    }
    if value.get("prev").and_then(|v| v.as_str()) != Some(prev) {
        return Err("prev does not match the previous line's hash".into());
    }
    let actual = sha256_hex(body.as_bytes());
    if actual != hash {
        return Err("the record's content does not match its hash (it was edited)".into());
    }
    Ok(actual)
}

/// Verifies the chain of the log at `path`. `Ok(Err(..))` names the first bad line.
pub fn verify(path: &Path) -> Result<std::result::Result<Verified, ChainBreak>> {
    let text = std::fs::read(path)
        .map_err(|e| Error::Security(format!("cannot read audit log {}: {e}", path.display())))?;
    Ok(verify_bytes(&text))
}

/// Verifies a log's bytes (see [`verify`]).
pub fn verify_bytes(bytes: &[u8]) -> std::result::Result<Verified, ChainBreak> {
    let mut head = GENESIS.to_string();
    let mut lines = 0u64;
    for (i, raw) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let bad = |reason: String| ChainBreak {
            line: line_no,
            reason,
        };
        let Some(raw) = raw.strip_suffix(b"\n") else {
            return Err(bad("the last line is incomplete (no newline)".into()));
        };
        let line = std::str::from_utf8(raw).map_err(|_| bad("not UTF-8".into()))?;
        head = check_line(line, lines + 1, &head).map_err(bad)?;
        lines += 1;
    }
    Ok(Verified { lines, head })
}

/// An open audit log, appending.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    seq: u64,
    head: String,
}

impl AuditLog {
    /// Opens (or creates) the log at `path`, verifying what is there. A torn last line left
    /// by a crash is cut off; any other break refuses to open, naming the line.
    pub fn open(path: &Path) -> Result<AuditLog> {
        let err = |e: std::io::Error| {
            Error::Security(format!("cannot open audit log {}: {e}", path.display()))
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(err(e)),
        };
        let mut keep = bytes.len();
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            tracing::warn!(
                log = %path.display(),
                "the audit log ends with an incomplete line (a crash while appending); cutting it off"
            );
        }
        let verified = verify_bytes(&bytes[..keep]).map_err(|b| {
            Error::Security(format!(
                "audit log {} fails verification at {b}; it was not appended to. Keep it as \
                 evidence and move it aside to start a new log",
                path.display()
            ))
        })?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        if keep < bytes.len() {
            file.set_len(keep as u64).map_err(err)?;
        }
        Ok(AuditLog {
            path: path.to_path_buf(),
            file,
            seq: verified.lines,
            head: verified.head,
        })
    }

    /// Appends one event with its details and makes it durable.
    pub fn append(&mut self, event: &str, detail: serde_json::Value) -> Result<()> {
        let seq = self.seq + 1;
        let body = json!({
            "seq": seq,
            "time_ms": fedflow_common::clock::now_ms(),
            "event": event,
            "detail": detail,
            "prev": self.head,
        })
        .to_string();
        let hash = sha256_hex(body.as_bytes());
        let before = self.file.metadata().map(|m| m.len());
        let mut line = String::with_capacity(body.len() + HASH_SUFFIX_LEN + 1);
        line.push_str(&body[..body.len() - 1]);
        line.push_str(",\"hash\":\"");
        line.push_str(&hash);
        line.push_str("\"}\n");
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| {
                // Take a partial line back off, so the chain stays intact for the next append.
                if let Ok(len) = before {
                    let _ = self.file.set_len(len);
                }
                Error::Security(format!(
                    "cannot append to audit log {}: {e}",
                    self.path.display()
                ))
            })?;
        self.seq = seq;
        self.head = hash;
        Ok(())
    }

    /// The number of events in the log.
    pub fn len(&self) -> u64 {
        self.seq
    }

    /// Whether the log has no events.
    pub fn is_empty(&self) -> bool {
        self.seq == 0
    }

    /// The last event's hash.
    pub fn head(&self) -> &str {
        &self.head
    }
}
