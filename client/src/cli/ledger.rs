//! `fedflow-client ledger`: keep the site's privacy ledger safe (journal, backup, restore).

use std::path::PathBuf;

use clap::Subcommand;
use fedflow_client::ledger::Ledger;
use fedflow_client::ledger::backup::{self, Completeness};

/// A `ledger` command.
#[derive(Debug, Subcommand)]
pub(crate) enum LedgerCommand {
    /// Append every ledger entry, before its update leaves the site, to a journal file on
    /// other storage (another disk, a network mount): with it, a restored ledger holds every
    /// release. While the journal cannot be written, the site releases nothing.
    Journal {
        /// The ledger folder (the privacy directory).
        #[arg(long)]
        ledger: PathBuf,
        /// The journal file (created; outside the ledger folder).
        #[arg(long)]
        to: PathBuf,
    },
    /// Back the ledger up into a new directory, while the site runs: a consistent snapshot
    /// and the updates not yet acknowledged.
    Backup {
        /// The ledger folder.
        #[arg(long)]
        ledger: PathBuf,
        /// The new backup directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a ledger into an empty folder from a backup and/or a journal. Without a
    /// journal (given, or named by the backed-up ledger), refused unless you state that the
    /// site released nothing after the backup.
    Restore {
        /// A backup directory (from `ledger backup`).
        #[arg(long)]
        from: Option<PathBuf>,
        /// The ledger's journal (default: the one the backed-up ledger named).
        #[arg(long)]
        journal: Option<PathBuf>,
        /// State that the site released nothing after the backup (it was stopped when the
        /// backup was taken and has not run since); recorded in the ledger and its report.
        #[arg(long, conflicts_with = "journal")]
        no_releases_since_backup: bool,
        /// The ledger folder to restore into (must hold no ledger).
        #[arg(long)]
        ledger: PathBuf,
    },
}

/// Runs a `ledger` command.
pub(crate) fn run(cmd: LedgerCommand) -> anyhow::Result<()> {
    match cmd {
        LedgerCommand::Journal { ledger, to } => {
            let mut l = Ledger::open(&ledger)?;
            l.set_journal(&to)?;
            println!(
                "{} now journals every entry to {} ({} so far) before its update leaves",
                ledger.display(),
                l.journal().expect("just set").display(),
                l.entries()?.len()
            );
        }
        LedgerCommand::Backup { ledger, out } => {
            let b = backup::backup(&ledger, &out)?;
            println!(
                "backed up {} entries and {} unacknowledged update(s) into {}",
                b.entries,
                b.pending,
                out.display()
            );
        }
        LedgerCommand::Restore {
            from,
            journal,
            no_releases_since_backup,
            ledger,
        } => {
            let completeness = if no_releases_since_backup {
                Completeness::NoReleasesSinceBackup
            } else {
                Completeness::Journal
            };
            let r = backup::restore(from.as_deref(), journal.as_deref(), completeness, &ledger)?;
            println!(
                "restored {} entries from the backup and {} from the journal into {} ({})",
                r.record.from_backup,
                r.record.from_journal,
                ledger.display(),
                r.record.basis
            );
        }
    }
    Ok(())
}
