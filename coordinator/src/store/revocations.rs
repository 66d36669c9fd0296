//! Revoked identities and certificates (schema version 3): `revocations(id, kind, role,
//! value, reason, revoked_by, revoked_at)`, append-only (triggers refuse UPDATE and
//! DELETE), one row per identity or serial (a repeated revocation changes nothing).

use rusqlite::{OptionalExtension, params};

use fedflow_common::clock::now_ms;

use super::Store;
use crate::Result;
use crate::security::{Revoked, Role};

pub(super) const SCHEMA_V3: &str = "
CREATE TABLE revocations (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('identity', 'serial')),
    role TEXT NOT NULL,
    value TEXT NOT NULL,
    reason TEXT NOT NULL,
    revoked_by TEXT NOT NULL,
    revoked_at INTEGER NOT NULL,
    UNIQUE (kind, role, value)
);
CREATE TRIGGER revocations_no_update BEFORE UPDATE ON revocations
BEGIN SELECT RAISE(ABORT, 'revocations are append-only'); END;
CREATE TRIGGER revocations_no_delete BEFORE DELETE ON revocations
BEGIN SELECT RAISE(ABORT, 'revocations are append-only'); END;
";

/// A stored revocation.
#[derive(Debug, Clone, PartialEq)]
pub struct RevocationRecord {
    /// What is revoked.
    pub revoked: Revoked,
    /// Why.
    pub reason: String,
    /// Who revoked it.
    pub revoked_by: String,
    /// When (Unix ms).
    pub revoked_at: i64,
}

fn columns(r: &Revoked) -> (&'static str, &'static str, &str) {
    match r {
        Revoked::Identity(role, name) => ("identity", role.as_str(), name.as_str()),
        Revoked::Serial(s) => ("serial", "", s.as_str()),
    }
}

impl Store {
    /// Records a revocation durably; `false` if it was already recorded.
    pub fn revoke(&mut self, revoked: &Revoked, reason: &str, by: &str) -> Result<bool> {
        let (kind, role, value) = columns(revoked);
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO revocations (kind, role, value, reason, revoked_by, revoked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![kind, role, value, reason, by, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// Every revocation, oldest first.
    pub fn revocations(&self) -> Result<Vec<RevocationRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT kind, role, value, reason, revoked_by, revoked_at FROM revocations ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, role, value, reason, revoked_by, revoked_at) = row?;
            let revoked = match (kind.as_str(), Role::parse(&role)) {
                ("identity", Some(role)) => Revoked::Identity(role, value),
                ("serial", _) => Revoked::Serial(value),
                _ => {
                    return Err(crate::Error::Store(format!(
                        "revocations: unreadable row ({kind}, {role}, {value})"
                    )));
                }
            };
            out.push(RevocationRecord {
                revoked,
                reason,
                revoked_by,
                revoked_at,
            });
        }
        Ok(out)
    }

    /// Whether `revoked` is recorded.
    pub fn is_revoked(&self, revoked: &Revoked) -> Result<bool> {
        let (kind, role, value) = columns(revoked);
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM revocations WHERE kind = ?1 AND role = ?2 AND value = ?3",
                params![kind, role, value],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }
}
