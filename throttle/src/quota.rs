//! [`SharedQuota`]: one sink's budgets over fixed windows (per minute, hour, day, or any length)
//! and its limit on calls in flight, shared by every process through Redis.
//!
//! A window of length `W` is `[k·W, (k+1)·W)` on the Redis server's clock since the Unix epoch,
//! so minutes, hours and days turn on the UTC boundaries third parties usually count by (a
//! daily quota resets at 00:00 UTC). Every call takes one unit of every budget, whatever its
//! answer: third parties count requests, not successes. A spent budget refuses every call,
//! fleet-wide, until its window turns; the consumer holds its events meanwhile, as for an open
//! circuit.
//!
//! Calls in flight are tokens in a sorted set scored by the end of their lease: a process that
//! dies mid-call frees its token when the lease ends, never later.
//!
//! Keys: the hash `{prefix}:quota:{{sink}}` holds, per window length `W` in ms, the window's
//! index (`i:W`) and the units taken in it (`u:W`); the sorted set `{prefix}:quota:{{sink}}:in-flight`
//! the tokens. The sink is a Redis Cluster hash tag, so one script may touch both.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use redis::Script;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::ThrottleError;
use crate::error::bounded;
use resync_locks::redis_conn::{self, RedisConnection};

/// At most this many calls in one window of this length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub limit: u64,
    /// At least a second, at most 31 days.
    pub window: Duration,
}

impl Budget {
    /// The `window` label of metrics and logs: `minute`, `hour`, `day`, else seconds (`900s`).
    pub fn label(&self) -> String {
        match self.window.as_secs() {
            60 => "minute".into(),
            3600 => "hour".into(),
            86_400 => "day".into(),
            secs => format!("{secs}s"),
        }
    }
}

/// One sink's quota, as every process sharing it should configure it.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaConfig {
    /// First part of the Redis keys, so environments (and tests) sharing a Redis stay apart.
    pub key_prefix: String,
    /// The sink; part of the keys and the `sink` label of metrics.
    pub sink: String,
    pub budgets: Vec<Budget>,
    /// Calls in flight to the sink across every process; `None`: no limit.
    pub max_in_flight: Option<u32>,
    /// How long a call's in-flight token lasts if its process never releases it (the call's
    /// timeout and a margin).
    pub in_flight_lease: Duration,
    /// Upper bound on every single Redis call, connecting included.
    pub op_timeout: Duration,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            key_prefix: "resync".into(),
            sink: "default".into(),
            budgets: Vec::new(),
            max_in_flight: None,
            in_flight_lease: Duration::from_secs(30),
            op_timeout: Duration::from_secs(2),
        }
    }
}

const MIN_WINDOW: Duration = Duration::from_secs(1);
const MAX_WINDOW: Duration = Duration::from_secs(31 * 86_400);

impl QuotaConfig {
    /// The hash of the budgets: `{key_prefix}:quota:{{sink}}`.
    pub fn key(&self) -> String {
        format!("{}:quota:{{{}}}", self.key_prefix, self.sink)
    }

    /// The sorted set of calls in flight.
    pub fn in_flight_key(&self) -> String {
        format!("{}:in-flight", self.key())
    }

    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), ThrottleError> {
        let invalid = |field: &'static str, reason: String| {
            Err(ThrottleError::InvalidConfig { config: "QuotaConfig", field, reason })
        };
        if self.key_prefix.is_empty() || self.sink.is_empty() {
            return invalid("sink", "the key prefix and the sink must not be empty".into());
        }
        if self.budgets.is_empty() && self.max_in_flight.is_none() {
            return invalid("budgets", "give at least one budget or max_in_flight".into());
        }
        for budget in &self.budgets {
            if budget.limit == 0 {
                return invalid("budgets", format!("a limit of 0 per {:?} would never call", budget.window));
            }
            if !(MIN_WINDOW..=MAX_WINDOW).contains(&budget.window) || budget.window.subsec_nanos() != 0 {
                return invalid(
                    "budgets",
                    format!("window {:?}: expected whole seconds from 1s to 31 days", budget.window),
                );
            }
        }
        let mut windows: Vec<_> = self.budgets.iter().map(|b| b.window).collect();
        windows.sort();
        if windows.windows(2).any(|pair| pair[0] == pair[1]) {
            return invalid("budgets", "two budgets over the same window".into());
        }
        if self.max_in_flight == Some(0) {
            return invalid("max_in_flight", "must be at least 1".into());
        }
        for (field, value) in [("in_flight_lease", self.in_flight_lease), ("op_timeout", self.op_timeout)] {
            if value < Duration::from_millis(1) {
                return invalid(field, "must be at least 1ms".into());
            }
        }
        Ok(())
    }
}

/// What [`SharedQuota::take`] answered.
#[derive(Debug)]
pub enum QuotaGate {
    /// Call now; give the ticket back with [`SharedQuota::release`] when the call is over.
    Granted(QuotaTicket),
    /// A budget is spent: no call before its window turns, in `resets_in`.
    Spent { window: Duration, resets_in: Duration },
    /// `max_in_flight` calls are out across the fleet: ask again soon.
    Busy,
}

/// One call's place among the calls in flight (empty without `max_in_flight`).
#[derive(Debug)]
#[must_use = "release the ticket when the call is over, or its place stays taken until its lease ends"]
pub struct QuotaTicket {
    token: Option<String>,
}

/// A sink's budgets and in-flight limit shared through Redis. Cheap to clone.
#[derive(Clone)]
pub struct SharedQuota {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RedisConnection,
    config: QuotaConfig,
    key: String,
    in_flight_key: String,
    take: Script,
    release: Script,
    /// This process's view: a budget is spent until then.
    spent_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for SharedQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedQuota").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

/// Takes one unit of every budget and, with a limit, a place in flight: all or nothing.
///
/// KEYS: the budgets hash, the in-flight set. ARGV: max in flight (0: none), lease ms, token,
/// then per budget its window ms and limit. Returns {0, remaining per budget...} when granted,
/// {1, the spent window ms, ms until it turns}, or {2} when the fleet's calls in flight are at
/// the limit. The hash lives as long as its longest window; the set as long as its last lease.
const TAKE: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local max_in_flight = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])

local budgets = {}
local spent_window, spent_reset = 0, -1
for i = 4, #ARGV, 2 do
  local window, limit = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local index = math.floor(now / window)
  local state = redis.call('HMGET', KEYS[1], 'i:' .. window, 'u:' .. window)
  local used = 0
  if tonumber(state[1]) == index then used = tonumber(state[2]) or 0 end
  if used >= limit then
    local reset = (index + 1) * window - now
    if reset > spent_reset then spent_window, spent_reset = window, reset end
  end
  budgets[#budgets + 1] = {window, index, used, limit}
end
if spent_reset >= 0 then
  return {1, spent_window, spent_reset}
end

if max_in_flight > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_in_flight then
    return {2}
  end
  redis.call('ZADD', KEYS[2], now + lease, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], lease)
end

local reply, longest = {0}, 0
for _, b in ipairs(budgets) do
  redis.call('HSET', KEYS[1], 'i:' .. b[1], b[2], 'u:' .. b[1], b[3] + 1)
  reply[#reply + 1] = b[4] - b[3] - 1
  longest = math.max(longest, b[1])
end
if longest > 0 then
  redis.call('PEXPIRE', KEYS[1], longest + 60000)
end
return reply
";

/// Gives a place in flight back. KEYS: the in-flight set. ARGV: the token.
const RELEASE: &str = r"
return redis.call('ZREM', KEYS[1], ARGV[1])
";

impl SharedQuota {
    /// Connects to `url` (`redis://` or `rediss://`) with a connection of its own.
    pub async fn connect(url: &str, config: QuotaConfig) -> Result<Self, ThrottleError> {
        config.validate()?;
        let conn = redis_conn::connect(url, config.op_timeout)
            .await
            .map_err(|reason| ThrottleError::Connect { url: resync_redact::redact_password(url), reason })?;
        Self::with_connection(conn, config)
    }

    /// Uses an existing connection (e.g. the rate limiter's).
    pub fn with_connection(conn: RedisConnection, config: QuotaConfig) -> Result<Self, ThrottleError> {
        config.validate()?;
        let inner = Inner {
            conn,
            key: config.key(),
            in_flight_key: config.in_flight_key(),
            config,
            take: Script::new(TAKE),
            release: Script::new(RELEASE),
            spent_until: Mutex::new(None),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    pub fn config(&self) -> &QuotaConfig {
        &self.inner.config
    }

    /// Asks for one call: one unit of every budget and, with `max_in_flight`, a place in flight.
    pub async fn take(&self) -> Result<QuotaGate, ThrottleError> {
        let config = &self.inner.config;
        let token = config.max_in_flight.map(|_| format!("{:016x}", rand::rng().random::<u64>()));
        let mut invocation = self.inner.take.key(&self.inner.key);
        invocation
            .key(&self.inner.in_flight_key)
            .arg(config.max_in_flight.unwrap_or(0))
            .arg(millis(config.in_flight_lease))
            .arg(token.as_deref().unwrap_or(""));
        for budget in &config.budgets {
            invocation.arg(millis(budget.window)).arg(budget.limit);
        }
        let mut conn = self.inner.conn.clone();
        let reply: Vec<i64> =
            bounded("quota take", &self.inner.key, config.op_timeout, invocation.invoke_async(&mut conn))
                .await?;
        Ok(match reply.as_slice() {
            [0, remaining @ ..] => {
                self.publish_remaining(remaining);
                self.resumed();
                QuotaGate::Granted(QuotaTicket { token })
            }
            [1, window, reset, ..] => {
                let window = Duration::from_millis(u64::try_from(*window).unwrap_or(0));
                let resets_in = Duration::from_millis(u64::try_from(*reset).unwrap_or(0));
                self.spent(window, resets_in);
                QuotaGate::Spent { window, resets_in }
            }
            _ => QuotaGate::Busy,
        })
    }

    /// Gives the ticket's place in flight back (nothing to do without `max_in_flight`).
    pub async fn release(&self, ticket: QuotaTicket) -> Result<(), ThrottleError> {
        let Some(token) = ticket.token else { return Ok(()) };
        let mut invocation = self.inner.release.key(&self.inner.in_flight_key);
        invocation.arg(token);
        let mut conn = self.inner.conn.clone();
        let op_timeout = self.inner.config.op_timeout;
        let _removed: i64 = bounded(
            "quota release",
            &self.inner.in_flight_key,
            op_timeout,
            invocation.invoke_async(&mut conn),
        )
        .await?;
        Ok(())
    }

    /// How long this process last heard a budget is spent for, from now (`None`: not spent).
    pub fn spent_for(&self) -> Option<Duration> {
        let until = (*self.local())?;
        until.checked_duration_since(Instant::now()).filter(|left| !left.is_zero())
    }

    fn spent(&self, window: Duration, resets_in: Duration) {
        let until = Instant::now() + resets_in;
        let was = self.local().replace(until);
        if was.is_none_or(|was| was <= Instant::now()) {
            let label = Budget { limit: 0, window }.label();
            warn!(sink = %self.inner.config.sink, window = %label, ?resets_in,
                "sink quota spent: holding every call to it until the window turns");
            metrics::counter!("resync_sink_quota_spent_total", "sink" => self.sink(), "window" => label)
                .increment(1);
        }
    }

    fn resumed(&self) {
        if self.local().take().is_some() {
            info!(sink = %self.inner.config.sink, "sink quota window turned: calling again");
        }
    }

    fn publish_remaining(&self, remaining: &[i64]) {
        for (budget, left) in self.inner.config.budgets.iter().zip(remaining) {
            metrics::gauge!("resync_sink_quota_remaining", "sink" => self.sink(), "window" => budget.label())
                .set(*left as f64);
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A panic while holding this lock cannot leave the Option half-written.
        self.inner.spent_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sink(&self) -> String {
        self.inner.config.sink.clone()
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(config: QuotaConfig) -> &'static str {
        match config.validate() {
            Err(ThrottleError::InvalidConfig { config: "QuotaConfig", field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    fn per(limit: u64, secs: u64) -> Budget {
        Budget { limit, window: Duration::from_secs(secs) }
    }

    #[test]
    fn a_quota_needs_a_budget_or_an_in_flight_limit() {
        assert_eq!(field_of(QuotaConfig::default()), "budgets");
        QuotaConfig { max_in_flight: Some(4), ..Default::default() }.validate().expect("valid");
        QuotaConfig { budgets: vec![per(10, 86_400)], ..Default::default() }.validate().expect("valid");
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = || QuotaConfig { budgets: vec![per(10, 60)], ..Default::default() };
        let cases = [
            (QuotaConfig { sink: String::new(), ..base() }, "sink"),
            (QuotaConfig { budgets: vec![per(0, 60)], ..base() }, "budgets"),
            (QuotaConfig { budgets: vec![per(1, 0)], ..base() }, "budgets"),
            (QuotaConfig { budgets: vec![per(1, 32 * 86_400)], ..base() }, "budgets"),
            (
                QuotaConfig {
                    budgets: vec![Budget { limit: 1, window: Duration::from_millis(1500) }],
                    ..base()
                },
                "budgets",
            ),
            (QuotaConfig { budgets: vec![per(1, 60), per(2, 60)], ..base() }, "budgets"),
            (QuotaConfig { max_in_flight: Some(0), ..base() }, "max_in_flight"),
            (QuotaConfig { in_flight_lease: Duration::ZERO, ..base() }, "in_flight_lease"),
        ];
        for (config, field) in cases {
            assert_eq!(field_of(config), field);
        }
    }

    #[test]
    fn windows_are_labelled_by_name_or_seconds() {
        assert_eq!(per(1, 60).label(), "minute");
        assert_eq!(per(1, 3600).label(), "hour");
        assert_eq!(per(1, 86_400).label(), "day");
        assert_eq!(per(1, 900).label(), "900s");
    }

    #[test]
    fn the_sink_is_a_hash_tag_shared_by_both_keys() {
        let config = QuotaConfig { key_prefix: "prod".into(), sink: "crm".into(), ..Default::default() };
        assert_eq!(config.key(), "prod:quota:{crm}");
        assert_eq!(config.in_flight_key(), "prod:quota:{crm}:in-flight");
    }
}
