//! Journal, backup and restore: a restored ledger holds every release, or the restore is
//! refused; what is restored is what was recorded.

use super::backup::{Completeness, backup, read_journal, restore};
use super::tests::entry;
use super::*;

fn epsilon(l: &Ledger) -> f64 {
    l.accountant().unwrap().epsilon(1e-5).unwrap().0
}

#[test]
fn a_ledger_restored_from_a_backup_and_its_journal_holds_every_release() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("ledger");
    let journal = dir.path().join("elsewhere").join("ledger.jsonl");
    std::fs::create_dir_all(journal.parent().unwrap()).unwrap();
    let mut l = Ledger::open(&live).unwrap();
    l.record(&entry(1, "t1"), b"update one").unwrap();
    l.mark_released("run-1", 1, "t1").unwrap();
    // Journalling starts with the entries recorded so far.
    l.set_journal(&journal).unwrap();
    assert_eq!(read_journal(&journal).unwrap().len(), 1);
    l.record(&entry(2, "t2"), b"update two").unwrap();
    // A backup while the ledger is open, with entry 2 not yet acknowledged.
    let b = backup(&live, &dir.path().join("backup")).unwrap();
    assert_eq!((b.entries, b.pending), (2, 1));
    // Releases after the backup reach the journal only.
    l.mark_released("run-1", 2, "t2").unwrap();
    l.record(&entry(3, "t3"), b"update three").unwrap();
    assert_eq!(read_journal(&journal).unwrap().len(), 3);
    let before = epsilon(&l);
    let entries = l.entries().unwrap();
    drop(l);
    std::fs::remove_dir_all(&live).unwrap();

    // The backup alone would forget entry 3 (its ledger named the journal, which is used).
    let back = dir.path().join("restored");
    let r = restore(
        Some(&dir.path().join("backup")),
        None,
        Completeness::Journal,
        &back,
    )
    .unwrap();
    assert_eq!((r.record.from_backup, r.record.from_journal), (2, 1));
    let mut restored = Ledger::open(&back).unwrap();
    assert_eq!(epsilon(&restored), before);
    let got: Vec<_> = restored
        .entries()
        .unwrap()
        .iter()
        .map(|e| (e.round, e.update_sha256.clone()))
        .collect();
    let want: Vec<_> = entries
        .iter()
        .map(|e| (e.round, e.update_sha256.clone()))
        .collect();
    assert_eq!(got, want);
    // Entry 2's bytes came back with the backup; entry 3's are gone, so its task is never
    // answered with a fresh release.
    let (_, two) = restored.find("run-1", 2, "t2").unwrap().unwrap();
    assert_eq!(two.as_deref(), Some(&b"update two"[..]));
    let (e3, three) = restored.find("run-1", 3, "t3").unwrap().unwrap();
    assert!(three.is_none() && e3.released);
    // The restored ledger goes on journalling, after what the journal holds.
    assert_eq!(restored.journal(), Some(journal.as_path()));
    restored.record(&entry(4, "t4"), b"update four").unwrap();
    let journalled = read_journal(&journal).unwrap();
    assert_eq!(journalled.len(), 4);
    assert_eq!(journalled[3].round, 4);
    assert_eq!(restored.restores().unwrap().len(), 1);
    // A restore never lands on a ledger.
    let err = restore(None, Some(&journal), Completeness::Journal, &back).unwrap_err();
    assert!(
        err.to_string().contains("a ledger is here already"),
        "{err}"
    );
    // The journal alone rebuilds the accounting.
    let alone = dir.path().join("from-journal");
    restore(None, Some(&journal), Completeness::Journal, &alone).unwrap();
    let l = Ledger::open(&alone).unwrap();
    assert_eq!(l.entries().unwrap().len(), 4);
    assert!(epsilon(&l) > before);
}

#[test]
fn without_a_journal_a_restore_needs_the_operators_word_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("ledger");
    let mut l = Ledger::open(&live).unwrap();
    l.record(&entry(1, "t1"), b"update one").unwrap();
    drop(l);
    backup(&live, &dir.path().join("backup")).unwrap();
    let from = dir.path().join("backup");
    let err = restore(
        Some(&from),
        None,
        Completeness::Journal,
        &dir.path().join("a"),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("--no-releases-since-backup"),
        "{err}"
    );
    assert!(!dir.path().join("a").join(DB_FILE).exists());
    let r = restore(
        Some(&from),
        None,
        Completeness::NoReleasesSinceBackup,
        &dir.path().join("b"),
    )
    .unwrap();
    assert!(
        r.record.basis.contains("operator stated"),
        "{}",
        r.record.basis
    );
    let report = crate::report::site_report(&dir.path().join("b"), 1e-5, None).unwrap();
    assert_eq!(report.restores.len(), 1);
    assert!(
        report
            .caveats
            .iter()
            .any(|c| c.contains("the figures hold only if that statement is true")),
        "{:?}",
        report.caveats
    );
    // A damaged backup is refused, naming the file.
    std::fs::write(from.join(DB_FILE), b"not a database").unwrap();
    let err = restore(
        Some(&from),
        None,
        Completeness::NoReleasesSinceBackup,
        &dir.path().join("c"),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not match the backup's manifest"),
        "{err}"
    );
    // Backing up into a directory that exists is refused.
    let err = backup(&live, &from).unwrap_err();
    assert!(err.to_string().contains("exists already"), "{err}");
}

#[test]
fn nothing_leaves_while_the_journal_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("ledger");
    let journal_dir = dir.path().join("mount");
    std::fs::create_dir(&journal_dir).unwrap();
    let journal = journal_dir.join("ledger.jsonl");
    let mut l = Ledger::open(&live).unwrap();
    l.set_journal(&journal).unwrap();
    // The journal's volume goes away (a directory where the file was).
    std::fs::create_dir(&journal).unwrap();
    let mut l = Ledger::open(&live).unwrap();
    let err = l.record(&entry(1, "t1"), b"update one").unwrap_err();
    assert!(err.to_string().contains("journal"), "{err}");
    // The spend counts (it is in the database) and the bytes are not handed out for sending.
    assert_eq!(l.entries().unwrap().len(), 1);
    assert!(l.find("run-1", 1, "t1").is_err());
    // Once it is back, the entry reaches the journal before its bytes are handed out.
    std::fs::remove_dir(&journal).unwrap();
    let (_, bytes) = l.find("run-1", 1, "t1").unwrap().unwrap();
    assert!(bytes.is_some());
    assert_eq!(read_journal(&journal).unwrap().len(), 1);
    // A journal inside the ledger's own folder would die with it: refused.
    let err = l.set_journal(&live.join("journal.jsonl")).unwrap_err();
    assert!(
        err.to_string().contains("outside the ledger's folder"),
        "{err}"
    );
    // A journal line that is not an entry is named.
    std::fs::write(&journal, "{\"format\":\"something else\"}\n").unwrap();
    let err = read_journal(&journal).unwrap_err();
    assert!(err.to_string().contains("ledger.jsonl:1"), "{err}");
}
