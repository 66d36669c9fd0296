//! Wall-clock time as fedflow records it: whole milliseconds since the Unix epoch.
//!
//! Every durable timestamp (rounds, ledgers, audit logs, reports) and every deadline the
//! round engine keeps is in this unit, from this one function.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock reads before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_after_2020_and_does_not_go_backwards() {
        let a = super::now_ms();
        let b = super::now_ms();
        assert!(a > 1_577_836_800_000, "{a}");
        assert!(b >= a);
    }
}
