//! Crash points for tests of the real binaries: a process aborts itself at a named point,
//! as `kill -9` would, when [`FAILPOINT_ENV`] names that point.

/// Environment variable naming the point at which the process aborts itself. The
/// coordinator knows `after-commit-round-N` (right after round N is committed, before the
/// model is handed to anyone); the site client knows the points named in its privacy
/// ledger's documentation.
pub const FAILPOINT_ENV: &str = "FEDFLOW_FAILPOINT";

/// Aborts the process when [`FAILPOINT_ENV`] equals `name`.
pub fn failpoint(name: &str) {
    if std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == name) {
        eprintln!("{FAILPOINT_ENV}={name}: aborting");
        std::process::abort();
    }
}
