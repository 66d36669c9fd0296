//! Per-caller limits: how many calls one caller may have in flight at once, and how many
//! it may start per second (a token bucket: `burst` calls at once, refilled at `rate` per
//! second). A caller over either limit gets `RESOURCE_EXHAUSTED` and the coordinator goes
//! on serving everyone else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The limits per caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallLimits {
    /// Calls one caller may have in flight at once (long polls and transfers included).
    pub max_concurrent: usize,
    /// Sustained calls per second per caller.
    pub rate_per_sec: f64,
    /// Calls a caller may start at once after being idle.
    pub burst: f64,
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitExceeded {
    /// Too many calls in flight.
    Concurrency(usize),
    /// Calls started too fast; the caller's next call is admitted after this long.
    Rate(Duration),
}

/// How long a caller over its concurrency limit is asked to wait: long enough for a poll or
/// a transfer of its own to end, short enough not to stall a round.
const CONCURRENCY_PUSHBACK: Duration = Duration::from_millis(250);

impl LimitExceeded {
    /// How long the caller is asked to wait before calling again.
    pub fn retry_after(&self) -> Duration {
        match self {
            LimitExceeded::Concurrency(_) => CONCURRENCY_PUSHBACK,
            LimitExceeded::Rate(wait) => *wait,
        }
    }
}

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitExceeded::Concurrency(n) => {
                write!(
                    f,
                    "more than {n} calls in flight from this caller (limits.max_concurrent_calls)"
                )
            }
            LimitExceeded::Rate(_) => {
                f.write_str("calls arrive faster than limits.requests_per_second allows; slow down")
            }
        }
    }
}

#[derive(Debug)]
struct Usage {
    in_flight: usize,
    tokens: f64,
    last: Instant,
}

/// Tracks every caller's usage; cheap to clone.
#[derive(Debug, Clone)]
pub struct CallLimiter {
    limits: CallLimits,
    usage: Arc<Mutex<HashMap<String, Usage>>>,
}

/// Callers tracked before idle ones are forgotten.
const PRUNE_AT: usize = 10_000;

impl CallLimiter {
    /// A limiter applying `limits` to every caller.
    pub fn new(limits: CallLimits) -> CallLimiter {
        CallLimiter {
            limits,
            usage: Arc::default(),
        }
    }

    /// Admits one call from `caller` at `now`, or says which limit it would exceed. The
    /// call counts as in flight until the guard is dropped.
    pub fn admit(&self, caller: &str, now: Instant) -> Result<CallGuard, LimitExceeded> {
        let mut map = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= PRUNE_AT && !map.contains_key(caller) {
            let (rate, burst) = (self.limits.rate_per_sec, self.limits.burst);
            map.retain(|_, u| {
                u.in_flight > 0
                    || u.tokens + rate * now.duration_since(u.last).as_secs_f64() < burst
            });
        }
        let u = map.entry(caller.to_string()).or_insert(Usage {
            in_flight: 0,
            tokens: self.limits.burst,
            last: now,
        });
        u.tokens = (u.tokens
            + self.limits.rate_per_sec * now.saturating_duration_since(u.last).as_secs_f64())
        .min(self.limits.burst);
        u.last = now;
        if u.in_flight >= self.limits.max_concurrent {
            return Err(LimitExceeded::Concurrency(self.limits.max_concurrent));
        }
        if u.tokens < 1.0 {
            let wait = (1.0 - u.tokens) / self.limits.rate_per_sec;
            return Err(LimitExceeded::Rate(Duration::from_secs_f64(wait)));
        }
        u.tokens -= 1.0;
        u.in_flight += 1;
        Ok(CallGuard {
            limiter: self.clone(),
            caller: caller.to_string(),
        })
    }
}

/// A call in flight; dropping it ends the call.
#[derive(Debug)]
pub struct CallGuard {
    limiter: CallLimiter,
    caller: String,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut map = self.limiter.usage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = map.get_mut(&self.caller) {
            u.in_flight = u.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> CallLimiter {
        CallLimiter::new(CallLimits {
            max_concurrent: 2,
            rate_per_sec: 10.0,
            burst: 3.0,
        })
    }

    /// Concurrency is counted per caller and freed when the guard drops.
    #[test]
    fn concurrency_is_per_caller_and_released() {
        let l = limiter();
        let t = Instant::now();
        let a1 = l.admit("a", t).unwrap();
        let _a2 = l.admit("a", t).unwrap();
        assert_eq!(l.admit("a", t).unwrap_err(), LimitExceeded::Concurrency(2));
        let _b = l.admit("b", t).unwrap();
        drop(a1);
        assert!(l.admit("a", t).is_ok());
    }

    /// The bucket allows `burst` calls at once, then `rate` per second.
    #[test]
    fn rate_refills_over_time() {
        let l = limiter();
        let t = Instant::now();
        for _ in 0..3 {
            drop(l.admit("a", t).unwrap());
        }
        // 10 per second: one token after 100 ms, not before; the refusal says how long.
        let refused = l.admit("a", t).unwrap_err();
        assert_eq!(refused.retry_after(), Duration::from_millis(100));
        let wait = l
            .admit("a", t + Duration::from_millis(90))
            .unwrap_err()
            .retry_after();
        assert!(
            wait > Duration::from_millis(9) && wait < Duration::from_millis(11),
            "{wait:?}"
        );
        assert!(l.admit("a", t + Duration::from_millis(101)).is_ok());
        assert!(l.admit("b", t).is_ok(), "another caller has its own bucket");
    }
}
