//! The one error type of the crate, with variants a caller can act on.

use std::time::Duration;

use redis::RedisError;

/// Why a [`LockGuard`](crate::LockGuard) no longer holds its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// A renewal found the key gone or owned by someone else: another holder may be working.
    TakenOver,
    /// The lease ran out before a renewal succeeded (Redis unreachable, or renewal stalled).
    Expired,
    /// This guard released the lock (explicitly or by being dropped).
    Released,
}

/// Everything that can go wrong taking, renewing or releasing a lock.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The key stayed held by others for the whole acquire timeout.
    #[error("lock {key:?} still held by another owner after waiting {waited:?}")]
    Timeout { key: String, waited: Duration },

    /// The lock is no longer held by this guard; do not commit work done under it.
    #[error("lock {key:?} was lost: {reason:?}")]
    Lost { key: String, reason: LostReason },

    /// Redis could not be reached or dropped the connection. Transient: retry later.
    #[error("redis unavailable during {op} of lock {key:?}: {source}")]
    Unavailable {
        op: &'static str,
        key: String,
        #[source]
        source: RedisError,
    },

    /// Redis did not answer within `op_timeout`. Transient: retry later.
    #[error("no reply from redis within {limit:?} during {op} of lock {key:?}")]
    NoReply { op: &'static str, key: String, limit: Duration },

    /// Redis answered with an error that retrying will not fix (permissions, wrong key type,
    /// script error).
    #[error("redis rejected {op} of lock {key:?}: {source}")]
    Redis {
        op: &'static str,
        key: String,
        #[source]
        source: RedisError,
    },

    /// The first connection failed (bad URL, refused, TLS or authentication failure).
    #[error("cannot connect to redis at {url}: {reason}")]
    Connect { url: String, reason: String },

    /// A [`LockConfig`](crate::LockConfig) field breaks a relation the locks rely on.
    #[error("invalid lock config: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
}

impl LockError {
    /// True when retrying later may succeed: the key was busy or Redis was unreachable.
    pub fn is_transient(&self) -> bool {
        matches!(self, LockError::Timeout { .. } | LockError::Unavailable { .. } | LockError::NoReply { .. })
    }

    /// Sorts a client error into "Redis is (temporarily) not there" and "Redis said no".
    pub(crate) fn from_redis(op: &'static str, key: &str, source: RedisError) -> Self {
        let key = key.to_owned();
        if crate::redis_conn::is_unavailable(&source) {
            LockError::Unavailable { op, key, source }
        } else {
            LockError::Redis { op, key, source }
        }
    }
}
