//! Honouring the coordinator's pushback: a call refused for coming too fast (a
//! `RESOURCE_EXHAUSTED` status with a `grpc-retry-pushback-ms` delay, see
//! [`fedflow_proto::pushback`]) is made again after the delay asked for, as often as the
//! coordinator asks. Every other outcome, success or error, goes back to the caller as it
//! came.
//!
//! The coordinator refuses such a call before reading anything of it, so making it again is
//! safe for every call a site makes, uploads included. Each wait is stretched by a random
//! factor of up to one half, so sites refused together do not all come back together.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tonic::Status;

/// Calls `call` until its outcome is anything but a pushback, sleeping what each pushback
/// asks (plus jitter) in between. `site` names the caller in the log.
pub(crate) async fn paced<T, Fut>(
    site: &str,
    what: &str,
    mut call: impl FnMut() -> Fut,
) -> Result<T, Status>
where
    Fut: Future<Output = Result<T, Status>>,
{
    loop {
        let status = match call().await {
            Err(s) => s,
            ok => return ok,
        };
        let Some(after) = fedflow_proto::pushback::pushback(&status) else {
            return Err(status);
        };
        let wait = jittered(after, rand::rng().random_range(0.0..0.5));
        tracing::info!(
            site,
            "{what}: the coordinator asks to slow down ({}); calling again in {wait:?}",
            status.message()
        );
        tokio::time::sleep(wait).await;
    }
}

/// `after` stretched by `1 + extra`.
fn jittered(after: Duration, extra: f64) -> Duration {
    after.mul_f64(1.0 + extra)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Pushbacks are waited out and the call made again; any other refusal ends it.
    #[tokio::test]
    async fn a_pushback_is_waited_out_and_other_errors_are_returned() {
        let calls = AtomicUsize::new(0);
        let started = std::time::Instant::now();
        let out = paced("site-a", "polling", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(fedflow_proto::pushback::slow_down(
                        "slow down",
                        Duration::from_millis(20),
                    ))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(out.unwrap(), 2);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(40), "waited {waited:?}");

        let calls = AtomicUsize::new(0);
        let err = paced("site-a", "uploading", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Status::resource_exhausted("the update is too large")) }
        })
        .await
        .unwrap_err();
        assert_eq!(err.message(), "the update is too large");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "not made again");
    }

    #[test]
    fn jitter_only_lengthens_the_wait() {
        let d = Duration::from_millis(200);
        assert_eq!(jittered(d, 0.0), d);
        assert_eq!(jittered(d, 0.5), Duration::from_millis(300));
    }
}
