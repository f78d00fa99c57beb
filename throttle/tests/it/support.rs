//! Shared test plumbing: limiters on the shared Redis, raw access to their keys, bounded waits.

use std::time::Duration;

use resync_locks::redis_conn::{self, RedisConnection};
use resync_testkit::{Service, service_unreachable, unique_name};
use resync_throttle::{RateLimiterConfig, SharedRateLimiter, ThrottleError};

/// A config on a key no other test (or earlier run) uses.
pub(crate) fn config(max_rate: f64, burst: u32) -> RateLimiterConfig {
    RateLimiterConfig {
        key_prefix: unique_name("throttle-test"),
        sink: "apisim".into(),
        max_rate,
        min_rate: 1.0,
        burst,
        // Test keys need not outlive the test by a minute.
        idle_ttl: Duration::from_secs(10),
        op_timeout: Duration::from_secs(5),
        ..RateLimiterConfig::default()
    }
}

/// A limiter with a connection of its own on the shared Redis; fails the test loudly if Redis
/// is not there.
pub(crate) async fn limiter(config: RateLimiterConfig) -> SharedRateLimiter {
    match SharedRateLimiter::connect(&Service::Redis.url(), config).await {
        Ok(limiter) => limiter,
        Err(e @ (ThrottleError::Connect { .. } | ThrottleError::Unavailable { .. })) => {
            service_unreachable(Service::Redis, e)
        }
        Err(e) => panic!("limiter: {e}"),
    }
}

/// `count` limiters on one config, each with its own connection, as separate processes would be.
pub(crate) async fn limiters(config: &RateLimiterConfig, count: usize) -> Vec<SharedRateLimiter> {
    let mut limiters = Vec::with_capacity(count);
    for _ in 0..count {
        limiters.push(limiter(config.clone()).await);
    }
    limiters
}

pub(crate) use resync_testkit::pttl;

/// A plain connection for looking at keys, on whatever `RESYNC_REDIS_URL` names (one Redis or a
/// cluster's seeds); fails the test loudly if Redis is not there.
pub(crate) async fn raw() -> RedisConnection {
    match redis_conn::connect(&Service::Redis.url(), Duration::from_secs(5)).await {
        Ok(conn) => conn,
        Err(e) => service_unreachable(Service::Redis, e),
    }
}

pub(crate) async fn exists(conn: &mut RedisConnection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query_async(conn).await.expect("EXISTS")
}

pub(crate) use resync_testkit::{poll_some, within};

/// Rates are computed in floating point on the server; compare with room for rounding.
pub(crate) fn assert_rate(actual: f64, expected: f64, what: &str) {
    assert!((actual - expected).abs() < 1e-6, "{what}: rate {actual}, expected {expected}");
}
