//! How long locks last, how often they are renewed, and how long anything may wait.

use std::time::Duration;

use crate::LockError;

/// Timing of locks taken through one [`Locker`](crate::Locker).
///
/// The defaults suit a consumer holding a per-entity lock around a third-party API call:
/// a crashed holder blocks its key for at most `lease`, and a live one renews twice per lease
/// with room for one slow Redis call in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockConfig {
    /// How long a lock survives without renewal (the `PX` of the lock key).
    pub lease: Duration,
    /// How often a held lock is renewed in the background. Must leave room for one Redis
    /// call before the lease runs out: `renew_every + op_timeout < lease`.
    pub renew_every: Duration,
    /// How long [`Locker::acquire`](crate::Locker::acquire) keeps retrying a busy key.
    pub acquire_timeout: Duration,
    /// Upper bound on every single Redis call, connecting included.
    pub op_timeout: Duration,
    /// First delay between acquisition attempts; the delay doubles (with full jitter) up
    /// to `retry_max`.
    pub retry_min: Duration,
    /// Longest delay between acquisition attempts.
    pub retry_max: Duration,
    /// How long the per-key fence counter ([`fence_key`](crate::fence_key)) outlives the last
    /// acquisition.
    /// Fencing tokens are seeded from the Redis server clock, so they keep increasing after
    /// the counter expires or Redis loses its data; the counter only guards against the
    /// server clock stepping back, so this bounds memory, not correctness under a sane clock.
    pub fence_ttl: Duration,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(2),
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(500),
            fence_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl LockConfig {
    /// Checks the relations the lock's safety depends on; the error names the field.
    pub fn validate(&self) -> Result<(), LockError> {
        let invalid = |field: &'static str, reason: String| Err(LockError::InvalidConfig { field, reason });
        if self.lease < Duration::from_millis(1) {
            return invalid("lease", "must be at least 1ms (Redis PX resolution)".into());
        }
        if self.renew_every.is_zero() {
            return invalid("renew_every", "must be positive".into());
        }
        if self.op_timeout.is_zero() {
            return invalid("op_timeout", "must be positive".into());
        }
        // A renewal starts at most `renew_every` after the last success and gives up after
        // `op_timeout`; both must fit in the lease or the lock lapses between two renewals.
        if self.renew_every + self.op_timeout >= self.lease {
            return invalid(
                "renew_every",
                format!(
                    "renew_every ({:?}) + op_timeout ({:?}) must be less than lease ({:?})",
                    self.renew_every, self.op_timeout, self.lease
                ),
            );
        }
        if self.retry_min.is_zero() || self.retry_min > self.retry_max {
            return invalid(
                "retry_min",
                format!("must be positive and at most retry_max ({:?})", self.retry_max),
            );
        }
        if self.fence_ttl < self.lease {
            return invalid("fence_ttl", format!("must be at least the lease ({:?})", self.lease));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(config: LockConfig) -> &'static str {
        match config.validate() {
            Err(LockError::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        LockConfig::default().validate().expect("defaults validate");
    }

    #[test]
    fn renewal_must_fit_in_the_lease() {
        let config = LockConfig {
            lease: Duration::from_secs(3),
            renew_every: Duration::from_secs(2),
            op_timeout: Duration::from_secs(1),
            ..LockConfig::default()
        };
        assert_eq!(field_of(config), "renew_every");
    }

    #[test]
    fn retry_bounds_must_be_ordered() {
        let config = LockConfig {
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_millis(10),
            ..LockConfig::default()
        };
        assert_eq!(field_of(config), "retry_min");
    }

    #[test]
    fn fence_counter_outlives_the_lease() {
        let config = LockConfig { fence_ttl: Duration::from_secs(1), ..LockConfig::default() };
        assert_eq!(field_of(config), "fence_ttl");
    }
}
