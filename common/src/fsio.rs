//! Crash-safe file replacement: write a temporary file beside the target, fsync, rename.

#[cfg(unix)]
use std::fs::File;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Distinguishes temporary files of concurrent writers within one process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes` so that a crash leaves either the old file or the new one,
/// never a half-written file.
///
/// The bytes go to a temporary file in the same directory (a rename is only atomic within one
/// file system), which is flushed to disk before it is renamed over `path`; on Unix the
/// directory is then synced so the rename itself survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| {
        file.write_all(bytes).map_err(|e| Error::io(path, e))
    })
}

/// Like [`write_atomic`], but the content is produced by `write`, which gets the temporary
/// file (opened for writing, empty) and may write it piece by piece, so a large file never
/// has to exist in memory whole. Whatever `write` returns is handed back once the file is
/// durable and in place.
///
/// The same guarantees hold: `write` must leave its data in the file itself (flush any
/// buffering writer before returning); the file is then synced, renamed over `path` and the
/// directory synced. If `write` fails, the temporary file is removed, `path` is untouched
/// and the error is returned.
pub fn write_atomic_with<T>(
    path: &Path,
    write: impl FnOnce(&mut fs::File) -> Result<T>,
) -> Result<T> {
    let file_name = path.file_name().ok_or_else(|| Error::DataFile {
        path: path.to_path_buf(),
        reason: "path does not name a file".to_owned(),
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);

    let result = write_and_rename(&tmp, path, write);
    if result.is_err() {
        // Best effort: the temporary file is garbage either way, and the original error is
        // the one worth reporting.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_dir(&dir);
    result
}

fn write_and_rename<T>(
    tmp: &Path,
    path: &Path,
    write: impl FnOnce(&mut fs::File) -> Result<T>,
) -> Result<T> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| Error::io(tmp, e))?;
    let out = write(&mut file)?;
    file.sync_all().map_err(|e| Error::io(tmp, e))?;
    drop(file);
    fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(out)
}

/// Syncs a directory so a rename in it is durable; a no-op where directories cannot be opened.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        // The new file is complete and in place; failing to sync the directory only weakens
        // durability across a power cut, which is not worth failing the write for.
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.txt")]);
    }

    #[test]
    fn write_atomic_with_streams_and_a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        write_atomic(&path, b"old").unwrap();
        let n = write_atomic_with(&path, |f| {
            f.write_all(b"ne").map_err(|e| Error::io(&path, e))?;
            f.write_all(b"w").map_err(|e| Error::io(&path, e))?;
            Ok(3)
        })
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"half").map_err(|e| Error::io(&path, e))?;
            Err::<(), _>(Error::DataFile {
                path: path.clone(),
                reason: "stopped half way".into(),
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("half way"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.bin")]);
    }

    #[test]
    fn missing_directory_is_an_io_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("out.txt");
        let err = write_atomic(&path, b"x").unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert!(!dir.path().join("nope").exists());
    }
}
