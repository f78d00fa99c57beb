//! A Retry-After reported through one limiter holds back every limiter on the same sink.

use std::time::Duration;

use resync_throttle::RateLimiterConfig;
use tokio::time::Instant;

use crate::support::{config, limiter, within};

const HOLD: Duration = Duration::from_millis(400);
const RATE: f64 = 10.0;
const HANG: Duration = Duration::from_secs(30);

/// Acquisitions return after the hold measured from an instant taken before the report.
/// The hold is computed on the Redis clock and slept on this process's monotonic clock; the
/// two may run apart by NTP slewing (at most 0.05 %, 0.2 ms over the hold) and the script
/// rounds waits to whole microseconds, so allow one millisecond.
const CLOCK_TOLERANCE: Duration = Duration::from_millis(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_hold_makes_other_instances_wait_then_traffic_resumes_paced() {
    // A burst of 5 would let 5 requests out at once after a quiet period; after a hold they
    // must come one emission interval apart instead.
    let config = RateLimiterConfig { burst: 5, ..config(RATE, 5) };
    let reporter = limiter(config.clone()).await;
    let waiter = limiter(config.clone()).await;
    // max_wait below the hold: this one gets a "not yet" hint and must come back by itself.
    let far = limiter(RateLimiterConfig { max_wait: Duration::from_millis(50), ..config }).await;

    let before = Instant::now();
    reporter.throttled(Some(HOLD)).await.expect("throttled");
    let (first, second) =
        within(HANG, "both instances acquire", async { tokio::join!(acquire_at(&waiter), acquire_at(&far)) })
            .await;
    for (name, at) in [("waiter", first), ("far", second)] {
        assert!(
            at + CLOCK_TOLERANCE >= before + HOLD,
            "{name} acquired {:?} after the report, inside the {HOLD:?} hold",
            at - before
        );
    }

    // Two more: four admissions since the hold ended, one emission interval apart.
    acquire_at(&waiter).await;
    let fourth = acquire_at(&far).await;
    let paced = HOLD + 3 * Duration::from_secs_f64(1.0 / RATE);
    assert!(
        fourth + CLOCK_TOLERANCE >= before + paced,
        "fourth admission {:?} after the report: the hold released a burst (expected >= {paced:?})",
        fourth - before
    );
}

async fn acquire_at(limiter: &resync_throttle::SharedRateLimiter) -> Instant {
    limiter.acquire().await.expect("acquire");
    Instant::now()
}
