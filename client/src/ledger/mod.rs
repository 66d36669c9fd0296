//! The site's privacy ledger: every release of a DP-SGD update, with the parameters that
//! determine its privacy cost, recorded durably *before* the update leaves the site.
//!
//! Storage: SQLite (`<dir>/ledger.sqlite`, WAL, `synchronous = FULL`) for the entries and
//! `<dir>/pending/` for the exact update bytes of each entry until the coordinator has
//! accepted them. The order of writes makes every crash safe:
//!
//! 1. the update is trained (nothing recorded yet: a crash here released nothing);
//! 2. its bytes are written to `pending/` and fsync'd;
//! 3. the entry is inserted in one durable transaction: from here on the spend counts;
//!    with a journal on other storage ([`backup`]), it is also appended there and fsync'd
//!    (if that fails, nothing is released);
//! 4. the bytes are uploaded; on acceptance the entry is marked released and the pending file
//!    removed.
//!
//! A task seen again after a crash between 3 and 4 (or after a network error) is answered
//! with the *recorded* bytes, never retrained: sending the same noisy update twice reveals
//! nothing new, so nothing is double-counted, and no fresh noise is ever drawn for a task
//! that already has an entry, so no retry is free. Entries are never deleted or changed
//! except for the `released` mark.
//!
//! # One privacy unit per ledger, and what a ledger bounds for each unit
//!
//! A ledger records releases of one privacy unit: [`Ledger::record`] refuses an entry whose
//! unit differs from the entries already there (the site declines such tasks before
//! training). Ledgers written before that rule may mix units; for every ledger,
//! [`bound`] states what its releases bound for each unit and each neighbouring
//! relation, charging every entry by this rule (RDP curves per step, composed by adding them):
//!
//! | bound about \ entry of | the same unit | session bound, user entry | user bound, session entry |
//! |---|---|---|---|
//! | add/remove one unit | add/remove curve | replace-one curve | no bound |
//! | replace one unit | replace-one curve | replace-one of the replace-one curve | no bound |
//!
//! Removing one session of a user from a user-level release changes that user's unit (the
//! step's sum moves by up to 2C: a substitution of the unit, or its removal if it was the
//! user's only used session), hence the replace-one curve; replacing a session by another can
//! change two users' units, hence the two-step bound applied twice. A session-level release
//! gives no user-level bound at all (a user may have any number of sessions). The
//! replace-one curve is [`fedflow_common::privacy::neighbours`]' weak-triangle bound (Mironov
//! 2017, Prop. 11).

use std::path::{Path, PathBuf};

use fedflow_common::clock::now_ms;
use fedflow_common::fsio::write_atomic;
use fedflow_common::hash::sha256_hex;
use fedflow_common::privacy::neighbours::two_step_rdp;
use fedflow_common::privacy::pld::PldAccountant;
use fedflow_common::privacy::rdp::{default_orders, rdp_poisson_subsampled_gaussian};
use fedflow_common::privacy::{RdpAccountant, SampledGaussian};
use fedflow_common::train::PrivacyUnit;
use rusqlite::{Connection, params};
use serde::Serialize;

use crate::{Error, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_unix_ms    INTEGER NOT NULL,
    run_id              TEXT NOT NULL,
    round               INTEGER NOT NULL,
    task_id             TEXT NOT NULL,
    unit                TEXT NOT NULL,
    units               INTEGER NOT NULL,
    clip_norm           REAL NOT NULL,
    noise_multiplier    REAL NOT NULL,
    expected_batch_size INTEGER NOT NULL,
    epochs              INTEGER NOT NULL,
    q                   REAL NOT NULL,
    steps               INTEGER NOT NULL,
    update_sha256       TEXT NOT NULL,
    metrics_released    INTEGER NOT NULL,
    released            INTEGER NOT NULL DEFAULT 0,
    count_noise_multiplier REAL,
    released_count      INTEGER,
    UNIQUE (run_id, round, task_id)
);
CREATE TABLE IF NOT EXISTS restores (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    restored_unix_ms     INTEGER NOT NULL,
    backup_taken_unix_ms INTEGER,
    from_backup          INTEGER NOT NULL,
    from_journal         INTEGER NOT NULL,
    basis                TEXT NOT NULL
);
";

/// Adds the noisy-count columns to a ledger created before they existed (both NULL: the
/// count went out in the clear).
fn add_count_columns(conn: &Connection) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('entries')")?;
    let columns: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for (name, ty) in [
        ("count_noise_multiplier", "REAL"),
        ("released_count", "INTEGER"),
    ] {
        if !columns.iter().any(|c| c == name) {
            conn.execute_batch(&format!("ALTER TABLE entries ADD COLUMN {name} {ty}"))?;
        }
    }
    Ok(())
}

/// The ledger's database file in its folder.
pub const DB_FILE: &str = "ledger.sqlite";
/// The folder (inside the ledger's) of update bytes awaiting acknowledgement.
pub const PENDING_DIR: &str = "pending";

pub mod backup;

/// One recorded release.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct LedgerEntry {
    /// Position in the ledger (1-based, increasing).
    pub id: i64,
    /// When it was recorded (Unix milliseconds).
    pub recorded_unix_ms: i64,
    /// The federated run.
    pub run_id: String,
    /// The round within the run.
    pub round: u64,
    /// The coordinator's task id.
    pub task_id: String,
    /// The privacy unit of this release.
    pub unit: PrivacyUnit,
    /// Number of privacy units n the sampling rate was computed over.
    pub units: u64,
    /// Clipping bound C.
    pub clip_norm: f64,
    /// Noise multiplier z.
    pub noise_multiplier: f64,
    /// Expected batch size B.
    pub expected_batch_size: u64,
    /// Local epochs.
    pub epochs: u64,
    /// Poisson sampling rate q = B / n.
    pub q: f64,
    /// DP-SGD steps.
    pub steps: u64,
    /// SHA-256 of the released update bytes.
    pub update_sha256: String,
    /// Whether metrics computed on the site's data went out with the update (outside the
    /// guarantee).
    pub metrics_released: bool,
    /// Whether the coordinator has acknowledged the update (it counts either way).
    pub released: bool,
    /// The noisy count of privacy units sent with the update (its FedAvg weight), when the
    /// run asked for one; `None`: the count went out in the clear, outside the guarantee.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<CountRelease>,
}

/// A count of privacy units released through the Gaussian mechanism: `round(n + N(0, z²))`,
/// at least 1 (rounding and the floor are post-processing). Adding or removing one unit
/// changes n by 1, so the release is the Gaussian mechanism with sensitivity 1 and noise
/// multiplier z (Dwork and Roth 2014, Appendix A; as an RDP/PLD event: q = 1, one step),
/// charged to the ledger with the update it goes with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct CountRelease {
    /// Noise multiplier z (the noise std, the sensitivity being 1).
    pub noise_multiplier: f64,
    /// The count sent.
    pub released: u64,
}

impl CountRelease {
    /// The privacy event of the release.
    pub fn event(&self) -> SampledGaussian {
        SampledGaussian {
            q: 1.0,
            z: self.noise_multiplier,
            steps: 1,
        }
    }

    /// Draws the noisy count of `units` with multiplier `z` (> 0) from `rng` (the site's
    /// CSPRNG), with the noise source of DP-SGD ([`fedflow_common::privacy::add_gaussian`]).
    pub fn draw<R: rand::Rng + rand::CryptoRng>(units: u64, z: f64, rng: &mut R) -> Self {
        let mut n = [units as f64];
        fedflow_common::privacy::add_gaussian(&mut n, z, rng);
        CountRelease {
            noise_multiplier: z,
            released: n[0].round().max(1.0) as u64,
        }
    }
}

impl LedgerEntry {
    /// The privacy event of the update's DP-SGD.
    pub fn event(&self) -> SampledGaussian {
        SampledGaussian {
            q: self.q,
            z: self.noise_multiplier,
            steps: self.steps,
        }
    }

    /// Every privacy event this entry accounts for: the update's DP-SGD and, when a noisy
    /// count went with it, the count's Gaussian mechanism.
    pub fn events(&self) -> impl Iterator<Item = SampledGaussian> + '_ {
        std::iter::once(self.event()).chain(self.count.map(|c| c.event()))
    }
}

/// The neighbouring relation a bound is stated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// Datasets differ by one unit more or fewer (the relation DP-SGD is accounted under).
    AddRemove,
    /// Datasets of the same size differ in one unit (substitution).
    ReplaceOne,
}

impl std::fmt::Display for Relation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Relation::AddRemove => "add/remove one",
            Relation::ReplaceOne => "replace one",
        })
    }
}

/// What a per-step curve depends on: the bound's unit and relation, the entry's unit, and
/// the bits of its q and z.
type ChargeKey = (PrivacyUnit, Relation, PrivacyUnit, u64, u64);

/// The per-step RDP curves of ledger entries, computed once per distinct setting (see the
/// module docs for the rule by which an entry is charged).
#[derive(Debug)]
pub struct Charges {
    orders: Vec<f64>,
    cache: std::collections::HashMap<ChargeKey, Option<Vec<f64>>>,
}

impl Default for Charges {
    fn default() -> Self {
        Charges {
            orders: default_orders(),
            cache: Default::default(),
        }
    }
}

impl Charges {
    /// The RDP orders of every curve (`dp_accounting`'s default orders).
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The per-step RDP curve an entry of `entry_unit` with sampling rate `q` and noise
    /// multiplier `z` costs a bound about `unit` under `relation`; `None` when such an entry
    /// leaves that unit without a bound.
    pub fn per_step(
        &mut self,
        unit: PrivacyUnit,
        relation: Relation,
        entry_unit: PrivacyUnit,
        q: f64,
        z: f64,
    ) -> Result<Option<&[f64]>> {
        let key = (unit, relation, entry_unit, q.to_bits(), z.to_bits());
        if !self.cache.contains_key(&key) {
            let add = |o: &[f64]| rdp_poisson_subsampled_gaussian(q, z, o);
            let two = |o: &[f64]| two_step_rdp(o, add);
            // How many add/remove changes of an entry's own unit one change of `unit` is.
            let changes = match (unit, entry_unit, relation) {
                (u, e, Relation::AddRemove) if u == e => Some(1),
                (u, e, Relation::ReplaceOne) if u == e => Some(2),
                (PrivacyUnit::Session, PrivacyUnit::User, Relation::AddRemove) => Some(2),
                (PrivacyUnit::Session, PrivacyUnit::User, Relation::ReplaceOne) => Some(4),
                _ => None,
            };
            let curve = match changes {
                None => None,
                Some(1) => Some(add(&self.orders)?),
                Some(2) => Some(two(&self.orders)?),
                Some(_) => Some(two_step_rdp(&self.orders, two)?),
            };
            self.cache.insert(key, curve);
        }
        Ok(self.cache[&key].as_deref())
    }
}

/// The unit a ledger's guarantee is stated for: the user when every entry is user-level
/// (and there is at least one), else the session (the only unit a mixed ledger bounds).
pub fn stated_unit(entries: &[LedgerEntry]) -> PrivacyUnit {
    if !entries.is_empty() && entries.iter().all(|e| e.unit == PrivacyUnit::User) {
        PrivacyUnit::User
    } else {
        PrivacyUnit::Session
    }
}

/// What `entries` bound for `unit` under `relation` (the rule of the module docs), as an
/// accountant over `dp_accounting`'s default orders; `None` when they bound nothing.
pub fn bound(
    entries: &[LedgerEntry],
    unit: PrivacyUnit,
    relation: Relation,
    charges: &mut Charges,
) -> Result<Option<RdpAccountant>> {
    let mut total = vec![0.0; charges.orders().len()];
    for e in entries {
        for event in e.events() {
            let Some(curve) = charges.per_step(unit, relation, e.unit, event.q, event.z)? else {
                return Ok(None);
            };
            add_steps(&mut total, curve, event.steps);
        }
    }
    Ok(Some(RdpAccountant::with_rdp(
        charges.orders().to_vec(),
        total,
    )?))
}

/// What a ledger's releases spend for its stated unit under add/remove, by two accountants:
/// RDP (every ledger) and PLD (`fedflow_common::privacy::pld`, a port of `dp_accounting`'s
/// PLD accountant), which is tighter for the same releases but applies only when every
/// entry is of the stated unit (a mixed ledger's cross-unit charges are RDP curves). Both are
/// valid upper bounds, so the smaller is: [`Spend::epsilon`] is what the limit is checked
/// against and what the reports state first.
#[derive(Debug, Clone)]
pub struct Spend {
    /// The RDP accountant (as [`Ledger::accountant`]).
    pub rdp: RdpAccountant,
    /// The PLD accountant, when it applies.
    pub pld: Option<PldAccountant>,
}

impl Spend {
    /// Both accountants over `entries`; releases with the same q and z are composed as one
    /// self-composition of their summed steps (composition commutes).
    pub fn of(entries: &[LedgerEntry]) -> Result<Spend> {
        let unit = stated_unit(entries);
        let rdp = bound(entries, unit, Relation::AddRemove, &mut Charges::default())?
            .expect("a ledger always bounds its stated unit");
        let pld = if entries.iter().all(|e| e.unit == unit) {
            Some(PldAccountant::of(
                entries.iter().flat_map(LedgerEntry::events),
            )?)
        } else {
            None
        };
        Ok(Spend { rdp, pld })
    }

    /// Adds a release of the stated unit.
    pub fn compose(&mut self, event: &SampledGaussian) -> Result<()> {
        self.rdp.compose(event)?;
        if let Some(p) = &mut self.pld {
            p.compose(event)?;
        }
        Ok(())
    }

    /// ε at `delta`: the smaller of the two bounds.
    pub fn epsilon(&self, delta: f64) -> Result<f64> {
        let (rdp, _) = self.rdp.epsilon(delta)?;
        Ok(self.pld.as_ref().map_or(rdp, |p| p.epsilon(delta).min(rdp)))
    }

    /// ε at `delta` by PLD, when it applies.
    pub fn pld_epsilon(&self, delta: f64) -> Option<f64> {
        self.pld.as_ref().map(|p| p.epsilon(delta))
    }
}

/// `total += steps · curve`, with no steps spending nothing (0 · ∞ would be NaN).
pub(crate) fn add_steps(total: &mut [f64], curve: &[f64], steps: u64) {
    if steps == 0 {
        return;
    }
    for (t, r) in total.iter_mut().zip(curve) {
        *t += steps as f64 * r;
    }
}

/// What is recorded for a new release (the ledger assigns id and time).
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// The federated run.
    pub run_id: String,
    /// The round within the run.
    pub round: u64,
    /// The coordinator's task id.
    pub task_id: String,
    /// The privacy unit.
    pub unit: PrivacyUnit,
    /// Number of privacy units.
    pub units: u64,
    /// Clipping bound C.
    pub clip_norm: f64,
    /// Expected batch size B.
    pub expected_batch_size: u64,
    /// Local epochs.
    pub epochs: u64,
    /// The privacy event actually run.
    pub event: SampledGaussian,
    /// Whether metrics on the site's data go out with the update.
    pub metrics_released: bool,
    /// The noisy count that goes with it, if the run asked for one.
    pub count: Option<CountRelease>,
}

/// The ledger of one site (see the module docs for the crash-safety protocol).
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
    db_path: PathBuf,
    dir: PathBuf,
    journal: Option<backup::Journal>,
}

impl Ledger {
    /// Opens (creating if needed) the ledger in `dir`, with the journal it names, if any
    /// (see [`backup`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut ledger = Self::open_file(&dir.join(DB_FILE))?;
        ledger.journal = backup::Journal::configured(dir)?;
        Ok(ledger)
    }

    /// Opens (creating if needed) the ledger database `db_path`, whose folder holds its
    /// pending updates; no journal.
    fn open_file(db_path: &Path) -> Result<Self> {
        let dir = db_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let pending = dir.join(PENDING_DIR);
        let err = |reason: String| Error::Ledger {
            path: db_path.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(&pending)
            .map_err(|e| err(format!("cannot create {}: {e}", pending.display())))?;
        let conn = Connection::open(db_path).map_err(|e| err(e.to_string()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .and_then(|()| conn.execute_batch(SCHEMA))
        .and_then(|()| add_count_columns(&conn))
        .map_err(|e| err(e.to_string()))?;
        Ok(Ledger {
            conn,
            db_path: db_path.to_path_buf(),
            dir,
            journal: None,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.db_path
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Ledger {
            path: self.db_path.clone(),
            reason: e.to_string(),
        }
    }

    /// Where the bytes of a task's update wait for acknowledgement (named by a hash, since
    /// run and task ids come from the coordinator).
    fn pending_path(&self, run_id: &str, round: u64, task_id: &str) -> PathBuf {
        self.pending_path_in(&self.dir, run_id, round, task_id)
    }

    /// Where the ledger folder `dir` keeps a task's pending update.
    fn pending_path_in(&self, dir: &Path, run_id: &str, round: u64, task_id: &str) -> PathBuf {
        let key = sha256_hex(format!("{run_id}\0{round}\0{task_id}").as_bytes());
        dir.join(PENDING_DIR)
            .join(format!("{}.safetensors", &key[..32]))
    }

    /// Entries matching `filter` (an SQL condition over the columns, with `args`), oldest
    /// first.
    fn select(&self, filter: &str, args: impl rusqlite::Params) -> Result<Vec<LedgerEntry>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT id, recorded_unix_ms, run_id, round, task_id, unit, units, clip_norm,
                        noise_multiplier, expected_batch_size, epochs, q, steps, update_sha256,
                        released, metrics_released, count_noise_multiplier, released_count
                 FROM entries WHERE {filter} ORDER BY id"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(args, |r| {
                let unit: String = r.get(5)?;
                Ok(LedgerEntry {
                    id: r.get(0)?,
                    recorded_unix_ms: r.get(1)?,
                    run_id: r.get(2)?,
                    round: r.get::<_, i64>(3)? as u64,
                    task_id: r.get(4)?,
                    unit: unit.parse().unwrap_or(PrivacyUnit::Session),
                    units: r.get::<_, i64>(6)? as u64,
                    clip_norm: r.get(7)?,
                    noise_multiplier: r.get(8)?,
                    expected_batch_size: r.get::<_, i64>(9)? as u64,
                    epochs: r.get::<_, i64>(10)? as u64,
                    q: r.get(11)?,
                    steps: r.get::<_, i64>(12)? as u64,
                    update_sha256: r.get(13)?,
                    released: r.get::<_, i64>(14)? != 0,
                    metrics_released: r.get::<_, i64>(15)? != 0,
                    count: match (r.get::<_, Option<f64>>(16)?, r.get::<_, Option<i64>>(17)?) {
                        (Some(z), Some(n)) => Some(CountRelease {
                            noise_multiplier: z,
                            released: n as u64,
                        }),
                        _ => None,
                    },
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Result<Vec<LedgerEntry>> {
        self.select("1", [])
    }

    /// The entry of a task, if recorded (the key is unique).
    fn entry(&self, run_id: &str, round: u64, task_id: &str) -> Result<Option<LedgerEntry>> {
        Ok(self
            .select(
                "run_id = ?1 AND round = ?2 AND task_id = ?3",
                params![run_id, round as i64, task_id],
            )?
            .pop())
    }

    /// An accountant holding every recorded release, for the ledger's stated unit
    /// ([`stated_unit`]) under add/remove: the figure the site's limit is checked against.
    pub fn accountant(&self) -> Result<RdpAccountant> {
        let entries = self.entries()?;
        let unit = stated_unit(&entries);
        Ok(
            bound(&entries, unit, Relation::AddRemove, &mut Charges::default())?
                .expect("a ledger always bounds its stated unit"),
        )
    }

    /// Both accountants over every recorded release, for the ledger's stated unit under
    /// add/remove ([`Spend`]): what the site's limit is checked against.
    pub fn spend(&self) -> Result<Spend> {
        Spend::of(&self.entries()?)
    }

    /// The privacy unit of the ledger's entries; `None` while it is empty. A ledger written
    /// before units were kept apart may mix them: then the session (see [`stated_unit`]).
    pub fn unit(&self) -> Result<Option<PrivacyUnit>> {
        let entries = self.entries()?;
        Ok((!entries.is_empty()).then(|| stated_unit(&entries)))
    }

    /// The recorded entry of a task and, while it is not yet acknowledged, its update bytes
    /// (returned only once the journal, if any, holds the entry: they may be sent again).
    pub fn find(
        &mut self,
        run_id: &str,
        round: u64,
        task_id: &str,
    ) -> Result<Option<(LedgerEntry, Option<Vec<u8>>)>> {
        let Some(entry) = self.entry(run_id, round, task_id)? else {
            return Ok(None);
        };
        let path = self.pending_path(run_id, round, task_id);
        let bytes = match std::fs::read(&path) {
            Ok(b) if sha256_hex(&b) == entry.update_sha256 => Some(b),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.err(format!("{}: {e}", path.display()))),
        };
        if bytes.is_some() {
            self.sync_journal()?;
        }
        Ok(Some((entry, bytes)))
    }

    /// Records a release: first the update bytes (fsync'd), then the entry (one durable
    /// transaction). Fails if the task already has an entry, or if the ledger holds entries
    /// of another privacy unit (one ledger accounts for one unit, see the module docs).
    pub fn record(&mut self, entry: &NewEntry, update: &[u8]) -> Result<LedgerEntry> {
        if let Some(other) = self
            .entries()?
            .iter()
            .map(|e| e.unit)
            .find(|&u| u != entry.unit)
        {
            return Err(self.err(format!(
                "run {} round {}: this ledger holds {other}-level releases and the new one is \
                 {}-level; one ledger accounts for one privacy unit, so the release is refused",
                entry.run_id, entry.round, entry.unit
            )));
        }
        self.insert(entry, update)
    }

    /// [`Ledger::record`] without the one-unit rule, as ledgers written before it could hold
    /// entries (tests of how such ledgers are charged).
    #[cfg(test)]
    pub(crate) fn record_legacy(&mut self, entry: &NewEntry, update: &[u8]) -> Result<LedgerEntry> {
        self.insert(entry, update)
    }

    /// Writes the update bytes (fsync'd), then the entry (one durable transaction), then the
    /// entry to the journal, if any.
    fn insert(&mut self, entry: &NewEntry, update: &[u8]) -> Result<LedgerEntry> {
        if self
            .entry(&entry.run_id, entry.round, &entry.task_id)?
            .is_some()
        {
            return Err(self.err(format!(
                "run {} round {} task {} is already recorded: its recorded update must be \
                 sent again, never a new one",
                entry.run_id, entry.round, entry.task_id
            )));
        }
        let path = self.pending_path(&entry.run_id, entry.round, &entry.task_id);
        write_atomic(&path, update)?;
        let sha = sha256_hex(update);
        self.conn
            .execute(
                "INSERT INTO entries (recorded_unix_ms, run_id, round, task_id, unit, units,
                    clip_norm, noise_multiplier, expected_batch_size, epochs, q, steps,
                    update_sha256, metrics_released, count_noise_multiplier, released_count)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    now_ms(),
                    entry.run_id,
                    entry.round as i64,
                    entry.task_id,
                    entry.unit.to_string(),
                    entry.units as i64,
                    entry.clip_norm,
                    entry.event.z,
                    entry.expected_batch_size as i64,
                    entry.epochs as i64,
                    entry.event.q,
                    entry.event.steps as i64,
                    sha,
                    entry.metrics_released,
                    entry.count.map(|c| c.noise_multiplier),
                    entry.count.map(|c| c.released as i64),
                ],
            )
            .map_err(|e| self.err(e))?;
        // In the journal before the update can leave: if it cannot be written, the entry
        // counts (it is in the database) and nothing is released.
        self.sync_journal()?;
        Ok(self
            .entry(&entry.run_id, entry.round, &entry.task_id)?
            .expect("just inserted"))
    }

    /// Marks a task's update acknowledged and drops its pending bytes.
    pub fn mark_released(&mut self, run_id: &str, round: u64, task_id: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE entries SET released = 1 WHERE run_id = ?1 AND round = ?2 AND task_id = ?3",
                params![run_id, round as i64, task_id],
            )
            .map_err(|e| self.err(e))?;
        match std::fs::remove_file(self.pending_path(run_id, round, task_id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[cfg(test)]
mod backup_tests;
#[cfg(test)]
mod tests;
