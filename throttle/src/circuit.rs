//! [`SharedCircuit`]: one sink's circuit breaker, shared by every process through Redis.
//!
//! Closed, calls go through. A run of `failure_threshold` outage failures in a row (counted
//! over every process; a success from a process that saw a failure resets the count) opens
//! it: nobody calls the sink until the probe is due. Then one call in the whole fleet is
//! the probe (half-open); its success closes the circuit for everyone, its failure opens it
//! again for twice as long (from `min_probe_interval` up to `max_probe_interval`). A probe whose
//! process vanished is given to another after `probe_lease`.
//!
//! Each process keeps a local view so a closed circuit costs no Redis call per sink call: a
//! process learns that the circuit opened from its own failures or from [`SharedCircuit::is_open`],
//! which reads the state at most once per `refresh_every`; while the circuit is not closed,
//! [`SharedCircuit::gate`] asks Redis at most once per `refresh_every`, so every process sees
//! the circuit close within about that long.
//!
//! The hash (`{prefix}:circuit:{sink}`), times in ms of the Redis server's clock: `state`
//! (0 closed, 1 open, 2 half-open), `failures` (the run so far while closed), `opened_at`,
//! `retry_at` (the next probe is due), `backoff` (the current wait between probes),
//! `probe_until` (the probe in flight holds the half-open state until then).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::Script;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::ThrottleError;
use crate::error::bounded;
use resync_locks::redis_conn::{self, RedisConnection};

/// One sink's circuit, as every process sharing it should configure it.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitConfig {
    /// First part of the Redis key, so environments (and tests) sharing a Redis stay apart.
    pub key_prefix: String,
    /// The sink; second part of the key and the `sink` label of metrics.
    pub sink: String,
    /// Outage failures in a row, over every process, that open the circuit.
    pub failure_threshold: u32,
    /// The wait before the first probe once the circuit opens.
    pub min_probe_interval: Duration,
    /// The longest wait between probes (it doubles after each failed probe).
    pub max_probe_interval: Duration,
    /// How long a probe may take before another process may probe instead (the call's
    /// timeout and a margin): a prober that died must not keep the circuit open.
    pub probe_lease: Duration,
    /// How often a process re-reads the state from Redis while it is not closed, and while it
    /// is closed and the process makes no calls (so it notices an opening).
    pub refresh_every: Duration,
    /// How long the Redis key outlives its last write.
    pub idle_ttl: Duration,
    /// Upper bound on every single Redis call, connecting included.
    pub op_timeout: Duration,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            key_prefix: "resync".into(),
            sink: "default".into(),
            failure_threshold: 10,
            min_probe_interval: Duration::from_secs(1),
            max_probe_interval: Duration::from_secs(60),
            probe_lease: Duration::from_secs(15),
            refresh_every: Duration::from_secs(1),
            idle_ttl: Duration::from_secs(24 * 3600),
            op_timeout: Duration::from_secs(2),
        }
    }
}

impl CircuitConfig {
    /// The Redis hash holding this sink's circuit: `{key_prefix}:circuit:{sink}`.
    pub fn key(&self) -> String {
        format!("{}:circuit:{}", self.key_prefix, self.sink)
    }

    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), ThrottleError> {
        let invalid = |field: &'static str, reason: String| {
            Err(ThrottleError::InvalidConfig { config: "CircuitConfig", field, reason })
        };
        if self.key_prefix.is_empty() || self.sink.is_empty() {
            return invalid("sink", "the key prefix and the sink must not be empty".into());
        }
        if self.failure_threshold == 0 {
            return invalid("failure_threshold", "must be at least 1".into());
        }
        if self.min_probe_interval < Duration::from_millis(1) {
            return invalid("min_probe_interval", "must be at least 1ms".into());
        }
        if self.max_probe_interval < self.min_probe_interval {
            return invalid(
                "max_probe_interval",
                format!("must be at least min_probe_interval ({:?})", self.min_probe_interval),
            );
        }
        for (field, value) in [
            ("probe_lease", self.probe_lease),
            ("refresh_every", self.refresh_every),
            ("idle_ttl", self.idle_ttl),
            ("op_timeout", self.op_timeout),
        ] {
            if value < Duration::from_millis(1) {
                return invalid(field, "must be at least 1ms".into());
            }
        }
        Ok(())
    }
}

/// Where a circuit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    /// No calls until the next probe is due.
    Open,
    /// One probe is in flight somewhere in the fleet; everyone else waits for its answer.
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half-open",
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            0 => CircuitState::Closed,
            1 => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    /// The value of the gauge `resync_sink_circuit_state`: 0 closed, 1 open, 2 half-open.
    fn gauge(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::Open => 1.0,
            CircuitState::HalfOpen => 2.0,
        }
    }
}

/// What [`SharedCircuit::gate`] says about a call about to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Closed: call.
    Pass,
    /// Call: this is the fleet's probe. Report its result with `probe = true`.
    Probe,
    /// Do not call; ask again after this long (at most `refresh_every`).
    Hold(Duration),
}

/// A sink's circuit breaker shared through Redis. Cheap to clone; clones share the local view.
#[derive(Clone)]
pub struct SharedCircuit {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RedisConnection,
    config: CircuitConfig,
    key: String,
    scripts: Scripts,
    local: Mutex<Local>,
    /// This process reported a failure since its last reported success: its next success is
    /// reported, which ends the fleet's run of failures.
    dirty: AtomicBool,
    /// One question to Redis at a time per process while the circuit is not closed.
    asking: tokio::sync::Mutex<()>,
}

/// This process's view of the circuit.
struct Local {
    state: CircuitState,
    /// The view is trusted until then; past it, the next question goes to Redis.
    fresh_until: Instant,
}

impl std::fmt::Debug for SharedCircuit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCircuit").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl SharedCircuit {
    /// Connects to `url` (`redis://` or `rediss://`) with a connection of its own.
    pub async fn connect(url: &str, config: CircuitConfig) -> Result<Self, ThrottleError> {
        config.validate()?;
        let conn = redis_conn::connect(url, config.op_timeout)
            .await
            .map_err(|reason| ThrottleError::Connect { url: resync_redact::redact_password(url), reason })?;
        Self::with_connection(conn, config)
    }

    /// Uses an existing connection (e.g. the rate limiter's).
    pub fn with_connection(conn: RedisConnection, config: CircuitConfig) -> Result<Self, ThrottleError> {
        config.validate()?;
        let key = config.key();
        let local = Mutex::new(Local { state: CircuitState::Closed, fresh_until: Instant::now() });
        let inner = Inner {
            conn,
            config,
            key,
            scripts: Scripts::new(),
            local,
            dirty: AtomicBool::new(false),
            asking: tokio::sync::Mutex::new(()),
        };
        let circuit = Self { inner: Arc::new(inner) };
        circuit.publish(CircuitState::Closed);
        Ok(circuit)
    }

    pub fn config(&self) -> &CircuitConfig {
        &self.inner.config
    }

    /// The Redis hash holding the shared state.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// This process's view, without asking Redis.
    pub fn state(&self) -> CircuitState {
        self.local().state
    }

    /// Whether the circuit is not closed, read from Redis when the local view is older than
    /// `refresh_every` (a process that makes no calls learns of an opening this way).
    pub async fn is_open(&self) -> Result<bool, ThrottleError> {
        if self.local().fresh_until <= Instant::now() {
            let (code, open_ms): (u8, i64) = self.run("circuit read", &self.inner.scripts.peek, &[]).await?;
            let state = CircuitState::from_code(code);
            self.set_local(state, self.inner.config.refresh_every);
            let open_for = Duration::from_millis(u64::try_from(open_ms).unwrap_or(0));
            metrics::gauge!("resync_sink_circuit_open_seconds", "sink" => self.sink())
                .set(open_for.as_secs_f64());
        }
        Ok(self.state() != CircuitState::Closed)
    }

    /// May a call be made now? Costs no Redis call while the local view is closed.
    pub async fn gate(&self) -> Result<Gate, ThrottleError> {
        if let Some(gate) = self.cached_gate() {
            return Ok(gate);
        }
        let _one = self.inner.asking.lock().await;
        if let Some(gate) = self.cached_gate() {
            return Ok(gate);
        }
        let lease = millis(self.inner.config.probe_lease);
        let (code, wait_ms): (u8, i64) =
            self.run("circuit admit", &self.inner.scripts.admit, &[lease]).await?;
        let refresh = self.inner.config.refresh_every;
        Ok(match code {
            0 => {
                self.set_local(CircuitState::Closed, refresh);
                Gate::Pass
            }
            3 => {
                // Others in this process hold while the probe is out; its result updates the view.
                self.set_local(CircuitState::HalfOpen, refresh);
                info!(sink = %self.inner.config.sink, "sink circuit half-open: this call is the probe");
                self.count_transition(CircuitState::HalfOpen);
                Gate::Probe
            }
            code => {
                let wait = Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)).min(refresh);
                self.set_local(CircuitState::from_code(code), wait);
                Gate::Hold(wait.max(Duration::from_millis(1)))
            }
        })
    }

    /// Reports a call that succeeded. Costs no Redis call unless this process saw a failure
    /// since its last report, or its view is not closed.
    pub async fn succeeded(&self, probe: bool) -> Result<CircuitState, ThrottleError> {
        let quiet =
            !probe && self.state() == CircuitState::Closed && !self.inner.dirty.load(Ordering::Relaxed);
        if quiet {
            return Ok(CircuitState::Closed);
        }
        let (code, changed, open_ms): (u8, u8, i64) =
            self.run("circuit success", &self.inner.scripts.succeeded, &[]).await?;
        self.inner.dirty.store(false, Ordering::Relaxed);
        let state = CircuitState::from_code(code);
        self.set_local(state, self.inner.config.refresh_every);
        if changed == 1 {
            let open_for = Duration::from_millis(u64::try_from(open_ms).unwrap_or(0));
            info!(sink = %self.inner.config.sink, ?open_for, "sink circuit closed: the third party answers again");
            self.count_transition(state);
            metrics::gauge!("resync_sink_circuit_open_seconds", "sink" => self.sink()).set(0.0);
        }
        Ok(state)
    }

    /// Reports a call that failed because the third party is down (connection refused or
    /// reset, timeout, 5xx). `retry_after`, the third party's hint, delays the next probe
    /// (up to `max_probe_interval`).
    pub async fn failed(
        &self,
        probe: bool,
        retry_after: Option<Duration>,
    ) -> Result<CircuitState, ThrottleError> {
        self.inner.dirty.store(true, Ordering::Relaxed);
        let config = &self.inner.config;
        let args = [
            i64::from(config.failure_threshold),
            millis(config.min_probe_interval),
            millis(config.max_probe_interval),
            i64::from(probe),
            retry_after.map_or(-1, millis),
        ];
        let (code, changed): (u8, u8) =
            self.run("circuit failure", &self.inner.scripts.failed, &args).await?;
        let state = CircuitState::from_code(code);
        // Not closed: the next gate asks Redis when the next probe is due.
        let fresh = if state == CircuitState::Closed { config.refresh_every } else { Duration::ZERO };
        self.set_local(state, fresh);
        if changed == 1 {
            if probe {
                warn!(sink = %config.sink, "sink circuit open again: the probe failed");
            } else {
                warn!(
                    sink = %config.sink, failures = config.failure_threshold,
                    "sink circuit open: the third party is down; holding its events (nothing is dead-lettered for it)"
                );
            }
            self.count_transition(state);
        }
        Ok(state)
    }

    fn cached_gate(&self) -> Option<Gate> {
        let local = self.local();
        let now = Instant::now();
        match local.state {
            CircuitState::Closed => Some(Gate::Pass),
            _ if local.fresh_until > now => Some(Gate::Hold(local.fresh_until - now)),
            _ => None,
        }
    }

    fn set_local(&self, state: CircuitState, fresh_for: Duration) {
        let mut local = self.local();
        local.state = state;
        local.fresh_until = Instant::now() + fresh_for;
        drop(local);
        self.publish(state);
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        // A panic while holding this lock cannot leave the two plain fields inconsistent.
        self.inner.local.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, state: CircuitState) {
        metrics::gauge!("resync_sink_circuit_state", "sink" => self.sink()).set(state.gauge());
    }

    fn count_transition(&self, to: CircuitState) {
        metrics::counter!("resync_sink_circuit_transitions_total", "sink" => self.sink(), "to" => to.as_str())
            .increment(1);
    }

    fn sink(&self) -> String {
        self.inner.config.sink.clone()
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        script: &Script,
        args: &[i64],
    ) -> Result<T, ThrottleError> {
        let mut invocation = script.key(&self.inner.key);
        invocation.arg(millis(self.inner.config.idle_ttl));
        for arg in args {
            invocation.arg(*arg);
        }
        let mut conn = self.inner.conn.clone();
        bounded(op, &self.inner.key, self.inner.config.op_timeout, invocation.invoke_async(&mut conn)).await
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Shared by every script: the server clock and the stored state. KEYS: the hash.
/// ARGV[1]: idle ttl ms; the script's own arguments follow.
const PRELUDE: &str = r"
local key = KEYS[1]
local ttl = tonumber(ARGV[1])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local s = redis.call('HMGET', key, 'state', 'failures', 'opened_at', 'retry_at', 'backoff', 'probe_until')
local state = tonumber(s[1]) or 0
local failures = tonumber(s[2]) or 0
local opened_at = tonumber(s[3]) or now
local retry_at = tonumber(s[4]) or 0
local backoff = tonumber(s[5]) or 0
local probe_until = tonumber(s[6]) or 0
";

/// Returns {state, ms open (0 when closed)}.
const PEEK: &str = r"
if state == 0 then return {0, 0} end
return {state, now - opened_at}
";

/// ARGV[2]: probe lease ms. Returns {0, 0} closed; {1, ms until the probe is due} open;
/// {2, ms the probe in flight may still take} half-open; {3, 0}: the caller is the probe.
const ADMIT: &str = r"
if state == 0 then return {0, 0} end
if state == 1 and now < retry_at then return {1, retry_at - now} end
if state == 2 and now < probe_until then return {2, probe_until - now} end
redis.call('HSET', key, 'state', 2, 'probe_until', now + tonumber(ARGV[2]))
redis.call('PEXPIRE', key, ttl)
return {3, 0}
";

/// ARGV[2]: failure threshold, [3]: min probe interval ms, [4]: max ms, [5]: 1 if the call was
/// the probe, [6]: the third party's retry-after ms or -1. Returns {state, 1 if this changed it}.
const FAILED: &str = r"
local threshold = tonumber(ARGV[2])
local min_wait = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local hint = tonumber(ARGV[6])
local function open(wait)
  local resume_at = now + wait
  if hint > 0 then resume_at = math.max(resume_at, now + math.min(hint, max_wait)) end
  redis.call('HSET', key, 'state', 1, 'backoff', wait, 'retry_at', resume_at, 'failures', 0)
  redis.call('PEXPIRE', key, ttl)
end
if state == 0 then
  failures = redis.call('HINCRBY', key, 'failures', 1)
  redis.call('PEXPIRE', key, ttl)
  if failures >= threshold then
    redis.call('HSET', key, 'opened_at', now)
    open(min_wait)
    return {1, 1}
  end
  return {0, 0}
end
-- A failed probe waits twice as long; other calls that failed meanwhile change nothing.
if ARGV[5] == '1' and state == 2 then
  open(math.min(max_wait, math.max(min_wait, backoff * 2)))
  return {1, 1}
end
return {state, 0}
";

/// Returns {state, 1 if this closed the circuit, ms it was open}.
const SUCCEEDED: &str = r"
if state == 0 then
  if failures > 0 then redis.call('HSET', key, 'failures', 0) end
  return {0, 0, 0}
end
redis.call('HSET', key, 'state', 0, 'failures', 0)
redis.call('HDEL', key, 'opened_at', 'retry_at', 'backoff', 'probe_until')
redis.call('PEXPIRE', key, ttl)
return {0, 1, now - opened_at}
";

struct Scripts {
    peek: Script,
    admit: Script,
    failed: Script,
    succeeded: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Self {
            peek: with_prelude(PEEK),
            admit: with_prelude(ADMIT),
            failed: with_prelude(FAILED),
            succeeded: with_prelude(SUCCEEDED),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_out_of_range_name_their_field() {
        let field = |config: CircuitConfig| match config.validate() {
            Err(ThrottleError::InvalidConfig { field, .. }) => field,
            other => panic!("expected an invalid config, got {other:?}"),
        };
        assert!(CircuitConfig::default().validate().is_ok());
        assert_eq!(field(CircuitConfig { failure_threshold: 0, ..Default::default() }), "failure_threshold");
        let backwards = CircuitConfig {
            min_probe_interval: Duration::from_secs(5),
            max_probe_interval: Duration::from_secs(1),
            ..Default::default()
        };
        assert_eq!(field(backwards), "max_probe_interval");
        assert_eq!(field(CircuitConfig { probe_lease: Duration::ZERO, ..Default::default() }), "probe_lease");
    }
}
