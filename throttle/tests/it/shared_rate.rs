//! The shared rate bound across many limiters, and the life of the Redis key.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use resync_throttle::{RateLimiterConfig, SharedRateLimiter, ThrottleError};
use tokio::sync::{Barrier, Mutex};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::support::{assert_rate, config, exists, limiter, limiters, poll_some, pttl, raw, within};

const LIMITERS: usize = 50;
const RATE: f64 = 200.0;
const BURST: u32 = 10;
const RUN: Duration = Duration::from_secs(2);
const HANG: Duration = Duration::from_secs(60);

/// The bound is checked on the slots the Redis server reserved (its clock, shared by every
/// limiter), not on when tasks woke up: scheduling delays cannot blur it, so it holds exactly,
/// on a loaded machine too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_limiters_together_stay_within_the_shared_rate() {
    let config = config(RATE, BURST);
    let limiters = limiters(&config, LIMITERS).await;
    let admitted = Arc::new(Mutex::new(Vec::new()));
    let start = Arc::new(Barrier::new(LIMITERS));
    let mut tasks = JoinSet::new();
    for (index, limiter) in limiters.into_iter().enumerate() {
        let (admitted, start) = (admitted.clone(), start.clone());
        tasks.spawn(async move {
            start.wait().await;
            let deadline = Instant::now() + RUN;
            loop {
                let admission = limiter.admit().await.expect("acquire");
                admitted.lock().await.push((admission.slot_micros, index));
                if Instant::now() >= deadline {
                    break;
                }
            }
        });
    }
    within(HANG, "all limiters finish", async {
        while let Some(done) = tasks.join_next().await {
            done.expect("limiter task");
        }
    })
    .await;

    let mut admitted = admitted.lock().await.clone();
    admitted.sort();
    let slots: Vec<u64> = admitted.iter().map(|(slot, _)| *slot).collect();
    // Slots are rounded up to the µs: allow one interval's worth of rounding.
    let span = Duration::from_micros(slots[slots.len() - 1] - slots[0]);
    let whole_bound = RATE * span.as_secs_f64() + f64::from(BURST) + 1.0;
    assert!(
        slots.len() as f64 <= whole_bound,
        "{} admitted over {span:?}, bound {whole_bound:.1}",
        slots.len()
    );

    let window = Duration::from_secs(1);
    let window_bound = RATE * window.as_secs_f64() + f64::from(BURST);
    let busiest = busiest_window(&slots, window.as_micros() as u64);
    assert!(busiest as f64 <= window_bound, "{busiest} admitted within {window:?}, bound {window_bound:.1}");

    let mut served = [false; LIMITERS];
    for (_, index) in &admitted {
        served[*index] = true;
    }
    let starved: Vec<usize> = (0..LIMITERS).filter(|i| !served[*i]).collect();
    assert!(starved.is_empty(), "limiters {starved:?} never got a permit");
}

/// The most slots in any half-open window `[t, t + window)` (µs); the busiest window starts at
/// a slot, so only those starts need checking. `slots` must be sorted.
fn busiest_window(slots: &[u64], window: u64) -> usize {
    let mut end = 0;
    let mut busiest = 0;
    for (start, at) in slots.iter().enumerate() {
        while end < slots.len() && slots[end] < *at + window {
            end += 1;
        }
        busiest = busiest.max(end - start);
    }
    busiest
}

#[tokio::test]
async fn a_fresh_key_starts_at_max_rate_and_is_not_created_by_reading() {
    let limiter = limiter(config(42.0, 1)).await;
    assert_rate(limiter.current_rate().await.expect("rate"), 42.0, "fresh key");
    assert!(!exists(&mut raw().await, limiter.key()).await, "reading the rate writes nothing");
}

#[tokio::test]
async fn a_lowered_max_rate_clamps_the_stored_rate() {
    let base = RateLimiterConfig { increase_per_sec: 0.0, decrease_factor: 0.5, ..config(100.0, 1) };
    let old = limiter(base.clone()).await;
    let cut = old.throttled(None).await.expect("throttled");
    assert!(cut.cut);
    assert_rate(cut.rate, 50.0, "after the cut");

    let lowered = limiter(RateLimiterConfig { max_rate: 20.0, ..base.clone() }).await;
    assert_rate(lowered.current_rate().await.expect("rate"), 20.0, "new max below the stored rate");
    let raised = limiter(RateLimiterConfig { max_rate: 200.0, ..base }).await;
    assert_rate(raised.current_rate().await.expect("rate"), 50.0, "new max above the stored rate");
}

#[tokio::test]
async fn the_rate_never_drops_below_min_rate() {
    let config = RateLimiterConfig {
        min_rate: 30.0,
        increase_per_sec: 0.0,
        decrease_factor: 0.5,
        cooldown: Duration::from_millis(1),
        ..config(100.0, 1)
    };
    let limiter = limiter(config).await;
    for _ in 0..5 {
        let outcome = poll_some(HANG, "a cut after the cooldown", || async {
            let outcome = limiter.throttled(None).await.expect("throttled");
            outcome.cut.then_some(outcome)
        })
        .await;
        assert!(outcome.rate >= 30.0, "rate {} below min_rate", outcome.rate);
    }
    assert_rate(limiter.current_rate().await.expect("rate"), 30.0, "after many cuts");
}

#[tokio::test]
async fn keys_expire_after_their_last_use_but_not_before_a_hold_ends() {
    let config = RateLimiterConfig {
        idle_ttl: Duration::from_millis(300),
        cooldown: Duration::from_millis(100),
        ..config(100.0, 1)
    };
    let limiter = limiter(config).await;
    let mut conn = raw().await;

    limiter.acquire().await.expect("acquire");
    let ttl = pttl(&mut conn, limiter.key()).await;
    // idle_ttl past the end of the reserved emission interval (10ms at 100/s).
    assert!(ttl > 0 && ttl <= 310, "a used key lives idle_ttl past its last use, PTTL {ttl}");
    poll_some(HANG, "the idle key expires", || {
        let (mut conn, key) = (conn.clone(), limiter.key().to_owned());
        async move { (!exists(&mut conn, &key).await).then_some(()) }
    })
    .await;

    limiter.throttled(Some(Duration::from_secs(30))).await.expect("throttled");
    let ttl = pttl(&mut conn, limiter.key()).await;
    assert!(ttl > 30_000, "a key outlives its hold, PTTL {ttl}");
    redis::cmd("DEL").arg(limiter.key()).query_async::<()>(&mut conn).await.expect("DEL");
}

#[tokio::test]
async fn connect_rejects_an_invalid_config_naming_the_field() {
    let config = RateLimiterConfig { decrease_factor: 1.5, ..config(10.0, 1) };
    match SharedRateLimiter::connect("redis://127.0.0.1:6379", config).await {
        Err(ThrottleError::InvalidConfig { field: "decrease_factor", .. }) => {}
        other => panic!("expected InvalidConfig for decrease_factor, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_redis_is_a_connect_error() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        listener.local_addr().expect("local addr").port()
    };
    let config = RateLimiterConfig { op_timeout: Duration::from_secs(2), ..config(10.0, 1) };
    match SharedRateLimiter::connect(&format!("redis://127.0.0.1:{port}"), config).await {
        Err(ThrottleError::Connect { url, .. }) => assert!(url.contains(&port.to_string())),
        other => panic!("expected a connect error, got {other:?}"),
    }
}
