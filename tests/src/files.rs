//! Files on disk, for tests that must show what is (and is not) written somewhere.

use std::path::{Path, PathBuf};

/// Every file under `dir`, recursively.
pub fn all(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Panics, naming the file, if any file under any of `roots` contains `secret` (`what` says
/// what it is, for the message).
pub fn assert_nowhere(roots: &[&Path], secret: &[u8], what: &str) {
    for root in roots {
        for f in all(root) {
            let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "{} holds {what}",
                f.display()
            );
        }
    }
}
