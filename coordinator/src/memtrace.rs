//! Opt-in memory probes, for finding out what makes up the coordinator's peak memory.
//!
//! With `FEDFLOW_MEMTRACE=1` in the environment, every [`probe`] prints one line to stderr:
//!
//! ```text
//! memtrace <label> rss=<MB> peak_since_last=<MB> max=<MB> threads=<N>
//! ```
//!
//! `rss` is the process's `VmRSS` now; `peak_since_last` is its `VmHWM` since the previous
//! probe (each probe resets the high-water mark through `/proc/self/clear_refs`, so the
//! peak of each stretch between two probes is seen on its own); `max` is the largest peak
//! seen by any probe so far. Because the probes reset `VmHWM`, an outside observer of the
//! process's `VmHWM` (the overhead benchmark) sees only the stretch since the last probe:
//! read `max` instead while tracing.
//!
//! Without the variable (the default), a probe costs one relaxed atomic load. Linux only:
//! elsewhere probes print nothing.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest `VmHWM` seen by a probe, in kB.
static MAX_KB: AtomicU64 = AtomicU64::new(0);

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FEDFLOW_MEMTRACE").is_some_and(|v| v != "0"))
}

/// `(VmRSS, VmHWM)` of this process in kB and its number of threads, if
/// `/proc/self/status` can be read.
fn rss_and_peak_kb() -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?, field("Threads:")?))
}

/// Prints the process's current and peak resident memory under `label` (see the module
/// docs), when `FEDFLOW_MEMTRACE` is set; does nothing otherwise.
pub fn probe(label: std::fmt::Arguments<'_>) {
    if !enabled() {
        return;
    }
    let Some((rss, peak, threads)) = rss_and_peak_kb() else {
        return;
    };
    // Start the next stretch's peak from the current RSS.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let max = MAX_KB.fetch_max(peak, Ordering::Relaxed).max(peak);
    let mb = |kb: u64| kb as f64 / 1000.0 * 1.024;
    eprintln!(
        "memtrace {label} rss={:.1} peak_since_last={:.1} max={:.1} threads={threads}",
        mb(rss),
        mb(peak),
        mb(max)
    );
}
