//! Server pushback: how a coordinator that refuses a call for coming too fast says when to
//! try again, and how a site reads it.
//!
//! The delay travels as the `grpc-retry-pushback-ms` metadata entry of a
//! `RESOURCE_EXHAUSTED` status, the key gRPC's own retry design uses for a server's
//! pushback (gRFC A6, "Retry Throttling and Pushback"). A refusal without it (an oversized
//! update, say) is not an invitation to retry.

use std::time::Duration;

use tonic::{Code, Status};

/// The metadata key carrying the pushback, in whole milliseconds (gRFC A6).
pub const PUSHBACK_KEY: &str = "grpc-retry-pushback-ms";

/// The longest pushback a site honours at once: a larger value is read as this, so that a
/// site keeps checking in (and noticing a stop) at least this often.
pub const MAX_PUSHBACK: Duration = Duration::from_secs(60);

/// A `RESOURCE_EXHAUSTED` status saying "try again after `after`".
pub fn slow_down(message: impl Into<String>, after: Duration) -> Status {
    let mut s = Status::new(Code::ResourceExhausted, message);
    let ms = after.as_millis().clamp(1, MAX_PUSHBACK.as_millis());
    s.metadata_mut().insert(
        PUSHBACK_KEY,
        ms.to_string()
            .parse()
            .expect("a decimal number is valid metadata"),
    );
    s
}

/// The delay `s` asks for before the same call is tried again, when it is a pushback;
/// `None` for every other status (including a malformed pushback, which gRFC A6 says to
/// treat as "do not retry").
pub fn pushback(s: &Status) -> Option<Duration> {
    if s.code() != Code::ResourceExhausted {
        return None;
    }
    let ms: u64 = s
        .metadata()
        .get(PUSHBACK_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms).min(MAX_PUSHBACK))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pushback survives the trip through a status's metadata and is capped; other
    /// refusals carry none.
    #[test]
    fn a_pushback_is_read_back_and_nothing_else_is_one() {
        let s = slow_down("slow down", Duration::from_millis(250));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(pushback(&s), Some(Duration::from_millis(250)));
        let long = slow_down("slow down", Duration::from_secs(3600));
        assert_eq!(pushback(&long), Some(MAX_PUSHBACK));
        let tiny = slow_down("slow down", Duration::ZERO);
        assert_eq!(pushback(&tiny), Some(Duration::from_millis(1)));

        assert_eq!(pushback(&Status::resource_exhausted("too big")), None);
        let mut wrong_code = Status::unavailable("away");
        wrong_code
            .metadata_mut()
            .insert(PUSHBACK_KEY, "100".parse().unwrap());
        assert_eq!(pushback(&wrong_code), None);
        let mut malformed = Status::resource_exhausted("x");
        malformed
            .metadata_mut()
            .insert(PUSHBACK_KEY, "soon".parse().unwrap());
        assert_eq!(pushback(&malformed), None);
    }
}
