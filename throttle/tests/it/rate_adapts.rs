//! The shared rate adapts: one cut per cooldown however many processes report, then linear
//! growth back to `max_rate`.

use std::sync::Arc;
use std::time::Duration;

use resync_throttle::{RateLimiterConfig, ThrottledOutcome};
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::{assert_rate, config, limiters, poll_some, within};

const REPORTERS: usize = 50;
const MAX_RATE: f64 = 100.0;
const COOLDOWN: Duration = Duration::from_secs(1);
const HANG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reports_at_once_cut_the_rate_once_per_cooldown_then_it_grows_back() {
    // Halve on a cut, and grow back by 100/s per second: from 50 to 100 in half a second.
    let config = RateLimiterConfig {
        decrease_factor: 0.5,
        increase_per_sec: 100.0,
        cooldown: COOLDOWN,
        ..config(MAX_RATE, 1)
    };
    let limiters = limiters(&config, REPORTERS).await;
    let before_reports = Instant::now();
    let outcomes = report_at_once(&limiters).await;

    let cuts: Vec<&ThrottledOutcome> = outcomes.iter().filter(|o| o.cut).collect();
    assert_eq!(cuts.len(), 1, "{REPORTERS} simultaneous reports must cut once: {outcomes:?}");
    assert_rate(cuts[0].rate, MAX_RATE * 0.5, "the one cut");
    // A second cut would have halved 50 (plus a little growth) again, to below 50.
    let lowest = outcomes.iter().map(|o| o.rate).fold(f64::INFINITY, f64::min);
    assert!(lowest >= MAX_RATE * 0.5 - 1e-6, "a report saw rate {lowest}: cut more than once");

    let limiter = &limiters[0];
    let deadline = Instant::now() + HANG;
    let mut samples = Vec::new();
    loop {
        let rate = limiter.current_rate().await.expect("current_rate");
        samples.push(rate);
        if rate >= MAX_RATE - 1e-6 {
            break;
        }
        assert!(Instant::now() < deadline, "the rate did not grow back to max_rate: {samples:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(samples.windows(2).all(|w| w[0] <= w[1]), "the rate only grows between cuts: {samples:?}");
    assert!(samples.iter().all(|r| *r <= MAX_RATE + 1e-6), "the rate never exceeds max_rate: {samples:?}");

    let (second, second_rate) = poll_some(HANG, "a report after the cooldown cuts again", || async {
        let outcome = limiter.throttled(None).await.expect("throttled");
        outcome.cut.then_some((Instant::now(), outcome.rate))
    })
    .await;
    assert!(
        second - before_reports >= COOLDOWN,
        "second cut {:?} after the first reports, before the cooldown of {COOLDOWN:?}",
        second - before_reports
    );
    // The cut came a cooldown after the first, by when the rate was back at max_rate.
    assert_rate(second_rate, MAX_RATE * 0.5, "the second cut");
}

/// Every limiter reports push-back at the same moment, as consumers hit by one burst of 429s.
async fn report_at_once(limiters: &[resync_throttle::SharedRateLimiter]) -> Vec<ThrottledOutcome> {
    let start = Arc::new(Barrier::new(limiters.len()));
    let mut tasks = JoinSet::new();
    for limiter in limiters {
        let (limiter, start) = (limiter.clone(), start.clone());
        tasks.spawn(async move {
            start.wait().await;
            limiter.throttled(None).await.expect("throttled")
        });
    }
    within(HANG, "all reports answered", async {
        let mut outcomes = Vec::new();
        while let Some(outcome) = tasks.join_next().await {
            outcomes.push(outcome.expect("reporter task"));
        }
        outcomes
    })
    .await
}

#[tokio::test]
async fn a_cut_frees_no_extra_burst() {
    // 10/s with a burst of 10: ten quick acquisitions book the next second. Halving the rate
    // doubles the burst tolerance in time (9 intervals: 0.9 s -> 1.8 s); if the booked second
    // were not stretched with it, the next acquisition would go out at once.
    let config = RateLimiterConfig { decrease_factor: 0.5, increase_per_sec: 0.0, ..config(10.0, 10) };
    let limiter = crate::support::limiter(config).await;
    let before = Instant::now();
    for _ in 0..10 {
        limiter.acquire().await.expect("acquire");
    }
    assert!(limiter.throttled(None).await.expect("throttled").cut);
    let setup = before.elapsed();
    limiter.acquire().await.expect("acquire");
    // Stretched, the 11th slot is 2 × (1 s - setup) - 1.8 s after the cut, so the 11th
    // acquisition returns no earlier than 200 ms - setup after `before` (less 1 ms for the
    // Redis clock against this process's clock).
    let returned = before.elapsed();
    assert!(
        returned + setup + Duration::from_millis(1) >= Duration::from_millis(200),
        "11th acquisition {returned:?} after the start (setup {setup:?}): the cut freed burst slots"
    );
}
