//! One-time enrolment tokens (schema version 6): `enrolment_tokens(token_sha256 PK,
//! token_id, site, reason, issued_by, issued_at, expires_at, redeemed_at, serial,
//! redeemed_by)`. Only the token's SHA-256 is stored, so a copy of the database redeems
//! nothing. A row is never deleted; redeeming fills its `redeemed_*` columns once, in the
//! transaction that decides the certificate may be issued (a trigger refuses any other
//! change), so a token is used at most once even across a crash.

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::Store;
use crate::Result;

pub(super) const SCHEMA_V6: &str = "
CREATE TABLE enrolment_tokens (
    token_sha256 TEXT PRIMARY KEY,
    token_id     TEXT NOT NULL,
    site         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    issued_by    TEXT NOT NULL,
    issued_at    INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    redeemed_at  INTEGER,
    serial       TEXT,
    redeemed_by  TEXT
);
CREATE TRIGGER enrolment_tokens_redeem_once BEFORE UPDATE ON enrolment_tokens
WHEN OLD.redeemed_at IS NOT NULL
  OR NEW.token_sha256 IS NOT OLD.token_sha256 OR NEW.token_id IS NOT OLD.token_id
  OR NEW.site IS NOT OLD.site OR NEW.expires_at IS NOT OLD.expires_at
  OR NEW.issued_at IS NOT OLD.issued_at OR NEW.issued_by IS NOT OLD.issued_by
BEGIN SELECT RAISE(ABORT, 'an enrolment token is redeemed once and otherwise never changes'); END;
CREATE TRIGGER enrolment_tokens_no_delete BEFORE DELETE ON enrolment_tokens
BEGIN SELECT RAISE(ABORT, 'enrolment tokens are kept'); END;
";

/// A token about to be stored (its hash; the token itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    /// SHA-256 (hex) of the token as the site presents it.
    pub token_sha256: String,
    /// Its public short name.
    pub token_id: String,
    /// The site it enrols.
    pub site: String,
    /// Why it was issued.
    pub reason: String,
    /// Who issued it.
    pub issued_by: String,
    /// When it stops being redeemable (Unix ms).
    pub expires_at: i64,
}

/// Why a token was not redeemed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// No token with this hash was issued.
    #[error("this is not an enrolment token this coordinator issued")]
    Unknown,
    /// Redeemed before.
    #[error(
        "enrolment token {token_id} was used already (at {at} ms): ask the operator for a new one"
    )]
    Used {
        /// The token's public name.
        token_id: String,
        /// When it was redeemed (Unix ms).
        at: i64,
    },
    /// Past its expiry.
    #[error("enrolment token {token_id} expired (at {at} ms): ask the operator for a new one")]
    Expired {
        /// The token's public name.
        token_id: String,
        /// When it expired (Unix ms).
        at: i64,
    },
    /// Issued for another site than the request names.
    #[error(
        "enrolment token {token_id} enrols site {site:?}, and the certificate request is for \
         {requested:?}: make the request under the name the token was issued for"
    )]
    OtherSite {
        /// The token's public name.
        token_id: String,
        /// The site it enrols.
        site: String,
        /// The site the request names.
        requested: String,
    },
}

/// What a successful redemption yields: the token's public name, and `issue`'s result.
#[derive(Debug)]
pub struct Redeemed<T> {
    /// The token's public name.
    pub token_id: String,
    /// What the issuing step returned.
    pub issued: T,
}

impl Store {
    /// Stores a new token durably.
    pub fn add_enrolment_token(&mut self, t: &NewToken, now: i64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO enrolment_tokens
                 (token_sha256, token_id, site, reason, issued_by, issued_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                t.token_sha256,
                t.token_id,
                t.site,
                t.reason,
                t.issued_by,
                now,
                t.expires_at
            ],
        )?;
        Ok(())
    }

    /// Redeems the token with hash `token_sha256` for the site `requested` at `now`, by
    /// `who` (the caller's address): when it is known, unused, unexpired and bound to
    /// `requested`, `issue(site, token_id)` runs and, if it succeeds, the token is marked used
    /// with the serial it returns, in the same durable transaction. If `issue` fails the
    /// token stays unused. `Ok(Err(_))` says why the token was refused.
    pub fn redeem_enrolment_token<T>(
        &mut self,
        token_sha256: &str,
        requested: &str,
        now: i64,
        who: &str,
        issue: impl FnOnce(&str, &str) -> Result<(String, T)>,
    ) -> Result<std::result::Result<Redeemed<T>, TokenRefusal>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = tx
            .query_row(
                "SELECT token_id, site, expires_at, redeemed_at FROM enrolment_tokens
                 WHERE token_sha256 = ?1",
                [token_sha256],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                },
            )
            .optional()?;
        let Some((token_id, site, expires_at, redeemed_at)) = row else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        if let Some(at) = redeemed_at {
            return Ok(Err(TokenRefusal::Used { token_id, at }));
        }
        if now >= expires_at {
            return Ok(Err(TokenRefusal::Expired {
                token_id,
                at: expires_at,
            }));
        }
        if site != requested {
            return Ok(Err(TokenRefusal::OtherSite {
                token_id,
                site,
                requested: requested.to_string(),
            }));
        }
        let (serial, issued) = issue(&site, &token_id)?;
        tx.execute(
            "UPDATE enrolment_tokens SET redeemed_at = ?2, serial = ?3, redeemed_by = ?4
             WHERE token_sha256 = ?1",
            params![token_sha256, now, serial, who],
        )?;
        tx.commit()?;
        Ok(Ok(Redeemed { token_id, issued }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(site: &str, expires_at: i64) -> NewToken {
        NewToken {
            token_sha256: format!("hash-{site}"),
            token_id: format!("id-{site}"),
            site: site.into(),
            reason: "test".into(),
            issued_by: "ada".into(),
            expires_at,
        }
    }

    fn redeem(
        store: &mut Store,
        sha: &str,
        site: &str,
        now: i64,
    ) -> std::result::Result<Redeemed<u32>, TokenRefusal> {
        store
            .redeem_enrolment_token(sha, site, now, "peer", |s, _| {
                assert_eq!(s, site);
                Ok(("serial-1".into(), 7))
            })
            .unwrap()
    }

    #[test]
    fn a_token_enrols_its_site_once_before_it_expires_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store
            .add_enrolment_token(&token("site-a", 1_000), 0)
            .unwrap();
        store
            .add_enrolment_token(&token("site-b", 1_000), 0)
            .unwrap();
        assert_eq!(
            redeem(&mut store, "nope", "site-a", 10).unwrap_err(),
            TokenRefusal::Unknown
        );
        assert!(matches!(
            redeem(&mut store, "hash-site-a", "site-b", 10).unwrap_err(),
            TokenRefusal::OtherSite { .. }
        ));
        assert!(matches!(
            redeem(&mut store, "hash-site-b", "site-b", 1_000).unwrap_err(),
            TokenRefusal::Expired { at: 1_000, .. }
        ));
        // A failing issue leaves the token unused.
        let failed = store.redeem_enrolment_token("hash-site-a", "site-a", 10, "peer", |_, _| {
            Err::<(String, ()), _>(crate::Error::Security("the CA failed".into()))
        });
        assert!(failed.is_err());
        let ok = redeem(&mut store, "hash-site-a", "site-a", 20).unwrap();
        assert_eq!((ok.token_id.as_str(), ok.issued), ("id-site-a", 7));
        drop(store);
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(
            redeem(&mut store, "hash-site-a", "site-a", 30).unwrap_err(),
            TokenRefusal::Used {
                token_id: "id-site-a".into(),
                at: 20
            }
        );
        // The row cannot be reset or removed behind the store's back.
        let reset = store.conn.execute(
            "UPDATE enrolment_tokens SET redeemed_at = NULL WHERE token_sha256 = 'hash-site-a'",
            [],
        );
        assert!(reset.is_err());
        assert!(
            store
                .conn
                .execute("DELETE FROM enrolment_tokens", [])
                .is_err()
        );
    }
}
