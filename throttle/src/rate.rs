//! [`SharedRateLimiter`]: one sink's request rate, shared by every process through Redis.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use redis::{FromRedisValue, Script};
use tokio::time::{Instant, sleep};
use tracing::{debug, info, instrument, warn};

use crate::error::bounded;
use crate::scripts::Scripts;
use crate::{RateLimiterConfig, ThrottleError};
use resync_locks::redis_conn::{self, RedisConnection};

/// A Retry-After longer than this is treated as this long: a hold should bound an outage,
/// not park every consumer for days because of one odd header.
const MAX_HOLD: Duration = Duration::from_secs(24 * 3600);

/// A reserved send slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// How long the caller waited for it.
    pub waited: Duration,
    /// When the slot is, in µs since the epoch on the Redis server's clock (the one clock
    /// every process shares): the shared bound holds exactly over these instants.
    pub slot_micros: u64,
}

/// Paces calls to one sink so that all processes together stay within its (adaptive) rate.
/// Cheap to clone; clones share one multiplexed connection that reconnects by itself.
///
/// Each [`acquire`](Self::acquire), [`throttled`](Self::throttled) and
/// [`current_rate`](Self::current_rate) is one script call; every Redis call is bounded by
/// [`RateLimiterConfig::op_timeout`].
#[derive(Clone)]
pub struct SharedRateLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RedisConnection,
    config: RateLimiterConfig,
    key: String,
    scripts: Scripts,
}

impl std::fmt::Debug for SharedRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRateLimiter").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

/// What [`SharedRateLimiter::throttled`] did with a report of push-back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottledOutcome {
    /// This report cut the shared rate; false when another report already did within the
    /// cooldown.
    pub cut: bool,
    /// The shared rate after the report, in requests per second.
    pub rate: f64,
}

impl SharedRateLimiter {
    /// Connects to `url` (`redis://`, or `rediss://` for TLS; a password in the URL is used for
    /// `AUTH`) with a connection of its own, within `config.op_timeout`.
    pub async fn connect(url: &str, config: RateLimiterConfig) -> Result<Self, ThrottleError> {
        config.validate()?;
        let conn = redis_conn::connect(url, config.op_timeout)
            .await
            .map_err(|reason| ThrottleError::Connect { url: resync_redact::redact_password(url), reason })?;
        Self::with_connection(conn, config)
    }

    /// Uses an existing connection, e.g. one a process shares between the limiters of its
    /// sinks. The connection's own timeouts apply besides `config.op_timeout`.
    pub fn with_connection(conn: RedisConnection, config: RateLimiterConfig) -> Result<Self, ThrottleError> {
        config.validate()?;
        let key = config.key();
        Ok(Self { inner: Arc::new(Inner { conn, config, key, scripts: Scripts::new() }) })
    }

    /// The config this limiter was built with.
    pub fn config(&self) -> &RateLimiterConfig {
        &self.inner.config
    }

    /// The Redis hash holding the shared state.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// Waits until this process may send one request, and returns how long that took.
    ///
    /// Reserves a slot if it is at most `max_wait` away and sleeps until it; a caller further
    /// back reserves nothing, sleeps until its slot would be within reach (plus jitter), and
    /// asks again. Waiters are not served in order. Dropping the future after a reservation
    /// wastes that slot, which errs on the side of sending less.
    pub async fn acquire(&self) -> Result<Duration, ThrottleError> {
        Ok(self.admit().await?.waited)
    }

    /// [`acquire`](Self::acquire), also telling which slot was reserved.
    #[instrument(level = "debug", skip(self), fields(sink = %self.inner.config.sink), err(level = "debug"))]
    pub async fn admit(&self) -> Result<Admission, ThrottleError> {
        let started = Instant::now();
        let max_wait = self.inner.config.max_wait;
        let mut jitter: Option<Jitter> = None;
        loop {
            let reply: (u8, u64, f64, u64) =
                self.run("acquire", &self.inner.scripts.acquire, micros(max_wait)).await?;
            let (reserved, wait, rate) = (reply.0 == 1, Duration::from_micros(reply.1), reply.2);
            self.publish_rate(rate);
            if reserved {
                if !wait.is_zero() {
                    sleep(wait).await;
                }
                let waited = started.elapsed();
                metrics::histogram!("resync_sink_rate_wait_seconds", "sink" => self.sink())
                    .record(waited.as_secs_f64());
                return Ok(Admission { waited, slot_micros: reply.3 });
            }
            let jitter = jitter.get_or_insert_with(|| Jitter::new(rate, max_wait));
            let retry_in = wait.saturating_sub(max_wait) + jitter.next_delay();
            debug!(?wait, ?retry_in, "slot beyond max_wait; retrying later");
            sleep(retry_in).await;
        }
    }

    /// Reports that the third party pushed back (HTTP 429 or 503).
    ///
    /// Cuts the shared rate to `max(min_rate, rate × decrease_factor)` unless any process
    /// already cut it within `cooldown`; the rate then grows back by `increase_per_sec` per
    /// second. With a `retry_after`, every process's next slot is no earlier than now plus
    /// `retry_after` (capped at a day), and traffic resumes evenly spaced, without a burst.
    #[instrument(level = "debug", skip(self), fields(sink = %self.inner.config.sink), err(level = "debug"))]
    pub async fn throttled(&self, retry_after: Option<Duration>) -> Result<ThrottledOutcome, ThrottleError> {
        metrics::counter!("resync_sink_throttled_total", "sink" => self.sink()).increment(1);
        let hold = retry_after.map(|d| {
            if d > MAX_HOLD {
                warn!(sink = %self.inner.config.sink, retry_after = ?d, max = ?MAX_HOLD, "Retry-After capped");
            }
            d.min(MAX_HOLD)
        });
        let hold_us = hold.map_or(-1, micros);
        let (cut, rate): (u8, f64) = self.run("throttled", &self.inner.scripts.throttled, hold_us).await?;
        self.publish_rate(rate);
        let cut = cut == 1;
        if cut {
            info!(sink = %self.inner.config.sink, rate, ?hold, "third party pushed back; shared rate cut");
        }
        Ok(ThrottledOutcome { cut, rate })
    }

    /// The shared rate right now, in requests per second (also published as the gauge
    /// `resync_sink_rate_limit`).
    pub async fn current_rate(&self) -> Result<f64, ThrottleError> {
        let rate: f64 = self.run("read rate", &self.inner.scripts.rate, 0).await?;
        self.publish_rate(rate);
        Ok(rate)
    }

    /// Runs one of the scripts with the config's arguments and one script-specific argument.
    async fn run<T: FromRedisValue>(
        &self,
        op: &'static str,
        script: &Script,
        extra: i64,
    ) -> Result<T, ThrottleError> {
        let config = &self.inner.config;
        let mut invocation = script.key(&self.inner.key);
        invocation
            .arg(config.max_rate)
            .arg(config.min_rate)
            .arg(config.burst)
            .arg(config.increase_per_sec)
            .arg(config.decrease_factor)
            .arg(micros(config.cooldown))
            .arg(micros(config.idle_ttl))
            .arg(extra);
        let mut conn = self.inner.conn.clone();
        bounded(op, &self.inner.key, config.op_timeout, invocation.invoke_async(&mut conn)).await
    }

    fn publish_rate(&self, rate: f64) {
        metrics::gauge!("resync_sink_rate_limit", "sink" => self.sink()).set(rate);
    }

    fn sink(&self) -> String {
        self.inner.config.sink.clone()
    }
}

/// Random extra sleep for callers that found no slot within `max_wait`. Without it, a crowd
/// of waiters would all ask again the instant the queue moves by one slot; the window grows
/// from one emission interval to `max_wait` (at least 10ms) while a caller keeps missing.
struct Jitter {
    window: Duration,
    cap: Duration,
}

impl Jitter {
    fn new(rate: f64, max_wait: Duration) -> Self {
        let cap = max_wait.max(Duration::from_millis(10));
        // `rate` comes from the script, which clamps it to [min_rate, max_rate], both > 0.
        let interval = Duration::try_from_secs_f64(1.0 / rate).unwrap_or(cap);
        Self { window: interval.clamp(Duration::from_millis(1), cap), cap }
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self.window;
        self.window = (self.window * 2).min(self.cap);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_starts_at_one_interval_and_grows_to_max_wait() {
        let max_wait = Duration::from_millis(400);
        let mut jitter = Jitter::new(100.0, max_wait);
        assert_eq!(jitter.window, Duration::from_millis(10));
        for _ in 0..10 {
            assert!(jitter.next_delay() <= max_wait);
        }
        assert_eq!(jitter.window, max_wait);
    }

    #[test]
    fn jitter_has_a_floor_when_max_wait_is_zero() {
        let mut jitter = Jitter::new(0.01, Duration::ZERO);
        assert_eq!(jitter.window, Duration::from_millis(10));
        assert!(jitter.next_delay() <= Duration::from_millis(10));
    }
}
