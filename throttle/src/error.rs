//! The one error type of the crate, with variants a caller can act on.

use std::future::Future;
use std::time::Duration;

use redis::{RedisError, RedisResult};
use tokio::time::timeout;

/// Everything that can go wrong configuring a limiter or talking to Redis about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ThrottleError {
    /// Redis could not be reached or dropped the connection. Transient: retry later, or decide
    /// whether the sink may be called without the shared limit (the consumer's choice).
    #[error("redis unavailable during {op} of {key:?}: {source}")]
    Unavailable {
        op: &'static str,
        key: String,
        #[source]
        source: RedisError,
    },

    /// Redis did not answer within `op_timeout`. Transient: retry later.
    #[error("no reply from redis within {limit:?} during {op} of {key:?}")]
    NoReply { op: &'static str, key: String, limit: Duration },

    /// Redis answered with an error that retrying will not fix (permissions, the key holding
    /// another type, a script error).
    #[error("redis rejected {op} of {key:?}: {source}")]
    Redis {
        op: &'static str,
        key: String,
        #[source]
        source: RedisError,
    },

    /// The first connection failed (bad URL, refused, TLS or authentication failure).
    #[error("cannot connect to redis at {url}: {reason}")]
    Connect { url: String, reason: String },

    /// A config field is out of range; `config` names the struct, `field` the field.
    #[error("invalid {config}.{field}: {reason}")]
    InvalidConfig { config: &'static str, field: &'static str, reason: String },
}

impl ThrottleError {
    /// True when retrying later may succeed: Redis was unreachable or slow.
    pub fn is_transient(&self) -> bool {
        matches!(self, ThrottleError::Unavailable { .. } | ThrottleError::NoReply { .. })
    }

    /// Sorts a client error into "Redis is (temporarily) not there" and "Redis said no".
    pub(crate) fn from_redis(op: &'static str, key: &str, source: RedisError) -> Self {
        let key = key.to_owned();
        if resync_locks::redis_conn::is_unavailable(&source) {
            ThrottleError::Unavailable { op, key, source }
        } else {
            ThrottleError::Redis { op, key, source }
        }
    }
}

/// Every Redis call of the crate goes through here, so none can wait longer than `limit`.
pub(crate) async fn bounded<T>(
    op: &'static str,
    key: &str,
    limit: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, ThrottleError> {
    match timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(ThrottleError::from_redis(op, key, e)),
        Err(_) => Err(ThrottleError::NoReply { op, key: key.to_owned(), limit }),
    }
}
