//! How fast one sink may be called by all processes together, and how that rate adapts.

use std::time::Duration;

use crate::ThrottleError;

/// The shared rate limit of one sink, used by every [`SharedRateLimiter`](crate::SharedRateLimiter)
/// built with the same `key_prefix` and `sink`.
///
/// The third party sees at most `rate × W + burst - 1` requests in any window of length `W`
/// (plus what Redis and network latency shift into the window). To stay under a limit of
/// `N` requests per second with `burst = b`, set `max_rate = N - b + 1`.
///
/// Every process sharing a sink should run with the same values: each computes the rate from
/// its own config (a rolling deploy mixes both for a while, which is harmless), and the state
/// in Redis is clamped to the bounds of whoever reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimiterConfig {
    /// First part of the Redis key, so environments (and tests) sharing a Redis stay apart.
    pub key_prefix: String,
    /// The sink this limit belongs to; second part of the key and the `sink` label of metrics.
    pub sink: String,
    /// Requests per second when the third party does not push back; a fresh key starts here.
    pub max_rate: f64,
    /// The adaptive rate never drops below this many requests per second.
    pub min_rate: f64,
    /// How many requests may go out at once after a quiet period (1 = evenly spaced).
    pub burst: u32,
    /// How much the rate grows per second since the last cut (additive increase), back up to
    /// `max_rate`. 0 keeps a cut rate until the key expires.
    pub increase_per_sec: f64,
    /// The rate is multiplied by this on a cut (multiplicative decrease); in (0, 1).
    pub decrease_factor: f64,
    /// At most one cut per `cooldown` across all processes: many consumers seeing the same
    /// burst of 429s cut the rate once, not once each.
    pub cooldown: Duration,
    /// Longest slot reservation ahead of time. A caller further back in the queue reserves
    /// nothing, sleeps, and asks again, so a crowd of waiters cannot book the future.
    pub max_wait: Duration,
    /// How long the Redis key outlives its last use (and any reservation or hold in it).
    /// Must be at least `cooldown`, so a cut is remembered for its whole cooldown.
    pub idle_ttl: Duration,
    /// Upper bound on every single Redis call, connecting included.
    pub op_timeout: Duration,
}

impl Default for RateLimiterConfig {
    fn default() -> Self {
        Self {
            key_prefix: "resync".into(),
            sink: "default".into(),
            max_rate: 10.0,
            min_rate: 1.0,
            burst: 1,
            increase_per_sec: 1.0,
            decrease_factor: 0.7,
            cooldown: Duration::from_secs(1),
            max_wait: Duration::from_secs(1),
            idle_ttl: Duration::from_secs(60),
            op_timeout: Duration::from_secs(2),
        }
    }
}

impl RateLimiterConfig {
    /// The Redis hash holding this sink's shared state: `{key_prefix}:throttle:{sink}`.
    pub fn key(&self) -> String {
        format!("{}:throttle:{}", self.key_prefix, self.sink)
    }

    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), ThrottleError> {
        let invalid = |field: &'static str, reason: String| {
            Err(ThrottleError::InvalidConfig { config: "RateLimiterConfig", field, reason })
        };
        if self.key_prefix.is_empty() {
            return invalid("key_prefix", "must not be empty".into());
        }
        if self.sink.is_empty() {
            return invalid("sink", "must not be empty".into());
        }
        if !(self.max_rate.is_finite() && self.max_rate > 0.0) {
            return invalid("max_rate", format!("must be a number > 0 (got {})", self.max_rate));
        }
        if !(self.min_rate.is_finite() && self.min_rate > 0.0 && self.min_rate <= self.max_rate) {
            return invalid(
                "min_rate",
                format!("must be > 0 and at most max_rate ({}) (got {})", self.max_rate, self.min_rate),
            );
        }
        if self.burst == 0 {
            return invalid("burst", "must be at least 1".into());
        }
        if !(self.increase_per_sec.is_finite() && self.increase_per_sec >= 0.0) {
            return invalid(
                "increase_per_sec",
                format!("must be a number >= 0 (got {})", self.increase_per_sec),
            );
        }
        if !(self.decrease_factor > 0.0 && self.decrease_factor < 1.0) {
            return invalid(
                "decrease_factor",
                format!("must be strictly between 0 and 1 (got {})", self.decrease_factor),
            );
        }
        if self.cooldown.is_zero() {
            return invalid(
                "cooldown",
                "must be positive, or every process's 429 cuts the rate again".into(),
            );
        }
        if self.idle_ttl < self.cooldown || self.idle_ttl < Duration::from_millis(1) {
            return invalid(
                "idle_ttl",
                format!("must be at least cooldown ({:?}) and 1ms (got {:?})", self.cooldown, self.idle_ttl),
            );
        }
        if self.op_timeout.is_zero() {
            return invalid("op_timeout", "must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(config: RateLimiterConfig) -> &'static str {
        match config.validate() {
            Err(ThrottleError::InvalidConfig { config: "RateLimiterConfig", field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        RateLimiterConfig::default().validate().expect("defaults validate");
    }

    #[test]
    fn key_joins_prefix_and_sink() {
        let config =
            RateLimiterConfig { key_prefix: "prod".into(), sink: "crm".into(), ..Default::default() };
        assert_eq!(config.key(), "prod:throttle:crm");
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = RateLimiterConfig::default;
        let cases = [
            (RateLimiterConfig { key_prefix: String::new(), ..base() }, "key_prefix"),
            (RateLimiterConfig { sink: String::new(), ..base() }, "sink"),
            (RateLimiterConfig { max_rate: 0.0, ..base() }, "max_rate"),
            (RateLimiterConfig { max_rate: f64::NAN, ..base() }, "max_rate"),
            (RateLimiterConfig { max_rate: f64::INFINITY, ..base() }, "max_rate"),
            (RateLimiterConfig { min_rate: 0.0, ..base() }, "min_rate"),
            (RateLimiterConfig { min_rate: 20.0, max_rate: 10.0, ..base() }, "min_rate"),
            (RateLimiterConfig { burst: 0, ..base() }, "burst"),
            (RateLimiterConfig { increase_per_sec: -1.0, ..base() }, "increase_per_sec"),
            (RateLimiterConfig { decrease_factor: 0.0, ..base() }, "decrease_factor"),
            (RateLimiterConfig { decrease_factor: 1.0, ..base() }, "decrease_factor"),
            (RateLimiterConfig { decrease_factor: f64::NAN, ..base() }, "decrease_factor"),
            (RateLimiterConfig { cooldown: Duration::ZERO, ..base() }, "cooldown"),
            (RateLimiterConfig { idle_ttl: Duration::from_millis(500), ..base() }, "idle_ttl"),
            (RateLimiterConfig { op_timeout: Duration::ZERO, ..base() }, "op_timeout"),
        ];
        for (config, field) in cases {
            assert_eq!(field_of(config), field);
        }
    }

    #[test]
    fn message_names_struct_field_and_value() {
        let err = RateLimiterConfig { max_rate: -3.0, ..Default::default() }.validate().unwrap_err();
        assert_eq!(err.to_string(), "invalid RateLimiterConfig.max_rate: must be a number > 0 (got -3)");
    }

    #[test]
    fn a_zero_max_wait_is_allowed() {
        // Reserve only slots that are due now; waiters then poll with backoff.
        RateLimiterConfig { max_wait: Duration::ZERO, ..Default::default() }.validate().expect("valid");
    }
}
