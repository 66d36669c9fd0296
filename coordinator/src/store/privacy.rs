//! The coordinator's site-level privacy ledger: one row per released round with every
//! parameter of its DP-FedAvg mechanism, and one row per update a site sent (what the
//! coordinator saw, for the guarantee against it in the distributed and local modes).
//!
//! Both tables are append-only (triggers refuse `UPDATE` and `DELETE`). A round's row is
//! inserted in the same transaction that marks the round committed ([`Store::commit_round`]),
//! and a model is handed out only after that transaction: so a crash at any moment either
//! leaves the round uncommitted and unreleased (it is re-run) or recorded — a `kill -9`
//! never loses a spend.

use rusqlite::{Transaction, params};
use serde::{Deserialize, Serialize};

use fedflow_common::clock::now_ms;

use super::{Store, to_i64};
use crate::Result;

pub(super) const SCHEMA_V2: &str = "
CREATE TABLE site_dp_rounds (
    run_id                  TEXT NOT NULL REFERENCES runs(run_id),
    round                   INTEGER NOT NULL CHECK (round >= 1),
    mode                    TEXT NOT NULL CHECK (mode IN ('central', 'distributed', 'local')),
    sampling                TEXT NOT NULL CHECK (sampling IN ('poisson', 'all', 'fixed')),
    sampling_rate           REAL NOT NULL,
    noise_multiplier        REAL NOT NULL,
    update_noise_multiplier REAL NOT NULL,
    clip_norm               REAL NOT NULL,
    expected_sites          REAL NOT NULL,
    site_noise_std          REAL NOT NULL,
    server_noise_std        REAL NOT NULL,
    bit_noise_std           REAL,
    selected                INTEGER NOT NULL,
    contributions           INTEGER NOT NULL,
    clipped_fraction        REAL,
    noisy_unclipped_fraction REAL,
    next_clip_norm          REAL NOT NULL,
    epsilon                 REAL NOT NULL,
    target_delta            REAL NOT NULL,
    rdp_json                TEXT NOT NULL,
    recorded_at             INTEGER NOT NULL,
    PRIMARY KEY (run_id, round)
);
CREATE TRIGGER site_dp_rounds_no_update BEFORE UPDATE ON site_dp_rounds
BEGIN SELECT RAISE(ABORT, 'the site-level privacy ledger is append-only'); END;
CREATE TRIGGER site_dp_rounds_no_delete BEFORE DELETE ON site_dp_rounds
BEGIN SELECT RAISE(ABORT, 'the site-level privacy ledger is append-only'); END;
CREATE TABLE site_dp_uploads (
    run_id         TEXT NOT NULL REFERENCES runs(run_id),
    round          INTEGER NOT NULL,
    site_id        TEXT NOT NULL,
    task_id        TEXT NOT NULL,
    delta_sha256   TEXT NOT NULL,
    site_noise_std REAL NOT NULL,
    clip_norm      REAL NOT NULL,
    recorded_at    INTEGER NOT NULL,
    PRIMARY KEY (run_id, task_id, delta_sha256)
);
CREATE TRIGGER site_dp_uploads_no_update BEFORE UPDATE ON site_dp_uploads
BEGIN SELECT RAISE(ABORT, 'the site-level privacy ledger is append-only'); END;
CREATE TRIGGER site_dp_uploads_no_delete BEFORE DELETE ON site_dp_uploads
BEGIN SELECT RAISE(ABORT, 'the site-level privacy ledger is append-only'); END;
";

/// Version 4: whether a round's coordinator-side DP randomness was seeded (rows written
/// before it were all drawn from the operating system: 0).
pub(super) const SCHEMA_V4: &str = "
ALTER TABLE site_dp_rounds ADD COLUMN seeded_randomness INTEGER NOT NULL DEFAULT 0
    CHECK (seeded_randomness IN (0, 1));
";

/// Version 7: each round's cumulative ε by the PLD accountant beside the RDP one (NULL in
/// rows recorded before).
pub(super) const SCHEMA_V7: &str = "
ALTER TABLE site_dp_rounds ADD COLUMN epsilon_pld REAL;
";

/// One released round of site-level DP-FedAvg, as the ledger records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteDpRound {
    /// The round.
    pub round: u64,
    /// `central`, `distributed` or `local`.
    pub mode: String,
    /// `poisson`, `all` (every available site) or `fixed` (a fixed-size sample).
    pub sampling: String,
    /// The sampling rate the accountant used.
    pub sampling_rate: f64,
    /// The noise multiplier charged: noise std over the sensitivity (z, or z/2 for a
    /// fixed-size sample in central mode; adaptive clipping's bit included).
    pub noise_multiplier: f64,
    /// The multiplier the updates' noise was calibrated with (z, or z_Δ with adaptive
    /// clipping).
    pub update_noise_multiplier: f64,
    /// The clip C of the round.
    pub clip_norm: f64,
    /// The fixed denominator.
    pub expected_sites: f64,
    /// Noise std each contributing site added per coordinate.
    pub site_noise_std: f64,
    /// Noise std the coordinator added per coordinate of the sum (its top-up).
    pub server_noise_std: f64,
    /// Noise std on the count of unclipped updates (adaptive clipping), if on.
    pub bit_noise_std: Option<f64>,
    /// Sites selected.
    pub selected: u64,
    /// Updates folded into the sum.
    pub contributions: u64,
    /// Fraction of contributions the sites clipped (central mode, where sites report it to
    /// the trusted coordinator; operator-only, not released), if known.
    pub clipped_fraction: Option<f64>,
    /// The noisy fraction of unclipped updates adaptive clipping used (released), if on.
    pub noisy_unclipped_fraction: Option<f64>,
    /// The clip the next round uses.
    pub next_clip_norm: f64,
    /// Cumulative ε of the run after this round, at `target_delta`, by the RDP accountant.
    pub epsilon: f64,
    /// The same by the PLD accountant (`None` in rows recorded before it was kept). The
    /// run's stated ε is the smaller of the two.
    #[serde(default)]
    pub epsilon_pld: Option<f64>,
    /// The δ of `epsilon`.
    pub target_delta: f64,
    /// This round's RDP increment at the accountant's orders (∞ where unbounded, stored as
    /// JSON null).
    pub rdp: Vec<f64>,
    /// Whether the coordinator's DP randomness of the round (site sampling, its noise) came
    /// from a fixed seed (simulations and statistical tests) instead of the operating
    /// system: such a round protects nobody against whoever knows the seed.
    #[serde(default)]
    pub seeded_randomness: bool,
    /// When it was recorded (Unix ms; 0 before it is).
    pub recorded_at_ms: i64,
}

/// One update a site sent, as the site-level ledger records it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteDpUpload {
    /// The round.
    pub round: u64,
    /// The site.
    pub site_id: String,
    /// Its task.
    pub task_id: String,
    /// SHA-256 of the update.
    pub delta_sha256: String,
    /// Noise std the site was told to add.
    pub site_noise_std: f64,
    /// The clip it was told to apply.
    pub clip_norm: f64,
}

pub(super) fn insert_round(tx: &Transaction<'_>, run_id: &str, r: &SiteDpRound) -> Result<()> {
    let rdp = serde_json::to_string(&r.rdp).map_err(|e| crate::Error::Store(e.to_string()))?;
    tx.execute(
        "INSERT INTO site_dp_rounds (run_id, round, mode, sampling, sampling_rate,
             noise_multiplier, update_noise_multiplier, clip_norm, expected_sites,
             site_noise_std, server_noise_std, bit_noise_std, selected, contributions,
             clipped_fraction, noisy_unclipped_fraction, next_clip_norm, epsilon, target_delta,
             rdp_json, recorded_at, seeded_randomness, epsilon_pld)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                 ?18, ?19, ?20, ?21, ?22, ?23)",
        params![
            run_id,
            to_i64(r.round)?,
            r.mode,
            r.sampling,
            r.sampling_rate,
            r.noise_multiplier,
            r.update_noise_multiplier,
            r.clip_norm,
            r.expected_sites,
            r.site_noise_std,
            r.server_noise_std,
            r.bit_noise_std,
            to_i64(r.selected)?,
            to_i64(r.contributions)?,
            r.clipped_fraction,
            r.noisy_unclipped_fraction,
            r.next_clip_norm,
            r.epsilon,
            r.target_delta,
            rdp,
            now_ms(),
            r.seeded_randomness,
            r.epsilon_pld
        ],
    )?;
    Ok(())
}

impl Store {
    /// The site-level ledger of a run, in round order.
    pub fn site_dp_rounds(&self, run_id: &str) -> Result<Vec<SiteDpRound>> {
        let mut stmt = self.conn.prepare(
            "SELECT round, mode, sampling, sampling_rate, noise_multiplier,
                    update_noise_multiplier, clip_norm, expected_sites, site_noise_std,
                    server_noise_std, bit_noise_std, selected, contributions, clipped_fraction,
                    noisy_unclipped_fraction, next_clip_norm, epsilon, target_delta, rdp_json,
                    recorded_at, seeded_randomness, epsilon_pld
             FROM site_dp_rounds WHERE run_id = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([run_id], |row| {
            let rdp: String = row.get(18)?;
            Ok((
                SiteDpRound {
                    round: row.get::<_, i64>(0)? as u64,
                    mode: row.get(1)?,
                    sampling: row.get(2)?,
                    sampling_rate: row.get(3)?,
                    noise_multiplier: row.get(4)?,
                    update_noise_multiplier: row.get(5)?,
                    clip_norm: row.get(6)?,
                    expected_sites: row.get(7)?,
                    site_noise_std: row.get(8)?,
                    server_noise_std: row.get(9)?,
                    bit_noise_std: row.get(10)?,
                    selected: row.get::<_, i64>(11)? as u64,
                    contributions: row.get::<_, i64>(12)? as u64,
                    clipped_fraction: row.get(13)?,
                    noisy_unclipped_fraction: row.get(14)?,
                    next_clip_norm: row.get(15)?,
                    epsilon: row.get(16)?,
                    epsilon_pld: row.get(21)?,
                    target_delta: row.get(17)?,
                    rdp: Vec::new(),
                    seeded_randomness: row.get(20)?,
                    recorded_at_ms: row.get(19)?,
                },
                rdp,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut r, rdp) = row?;
            // JSON has no infinity: an unbounded order is stored as null.
            let values: Vec<Option<f64>> = serde_json::from_str(&rdp).map_err(|e| {
                crate::Error::Store(format!("site_dp_rounds.rdp_json of round {}: {e}", r.round))
            })?;
            r.rdp = values
                .into_iter()
                .map(|v| v.unwrap_or(f64::INFINITY))
                .collect();
            out.push(r);
        }
        Ok(out)
    }

    /// Records that `upload.site_id` sent an update under site-level DP (once per task and
    /// content; a resend of the same bytes is not a new release).
    pub fn record_site_dp_upload(&mut self, run_id: &str, upload: &SiteDpUpload) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO site_dp_uploads (run_id, round, site_id, task_id,
                 delta_sha256, site_noise_std, clip_norm, recorded_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                run_id,
                to_i64(upload.round)?,
                upload.site_id,
                upload.task_id,
                upload.delta_sha256,
                upload.site_noise_std,
                upload.clip_norm,
                now_ms()
            ],
        )?;
        Ok(())
    }

    /// Every update sent under site-level DP in a run, in the order recorded.
    pub fn site_dp_uploads(&self, run_id: &str) -> Result<Vec<SiteDpUpload>> {
        let mut stmt = self.conn.prepare(
            "SELECT round, site_id, task_id, delta_sha256, site_noise_std, clip_norm
             FROM site_dp_uploads WHERE run_id = ?1 ORDER BY recorded_at, rowid",
        )?;
        let rows = stmt.query_map([run_id], |row| {
            Ok(SiteDpUpload {
                round: row.get::<_, i64>(0)? as u64,
                site_id: row.get(1)?,
                task_id: row.get(2)?,
                delta_sha256: row.get(3)?,
                site_noise_std: row.get(4)?,
                clip_norm: row.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
