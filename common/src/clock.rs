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

/// Seconds since the Unix epoch as an RFC 3339 UTC timestamp (`2026-12-03T19:05:00Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A Unix-ms time as people read it in reports: `2026-12-03 19:05:00 UTC`.
pub fn utc(ms: i64) -> String {
    let secs = u64::try_from(ms.div_euclid(1000)).unwrap_or(0);
    let t = rfc3339(secs);
    format!("{} {} UTC", &t[..10], &t[11..19])
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_reads_as_a_date_and_time() {
        assert_eq!(super::utc(951_825_599_999), "2000-02-29 11:59:59 UTC");
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn reads_after_2020_and_does_not_go_backwards() {
        let a = super::now_ms();
        let b = super::now_ms();
        assert!(a > 1_577_836_800_000, "{a}");
        assert!(b >= a);
    }
}
