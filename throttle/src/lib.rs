//! `resync-throttle`: lets hundreds of consumer processes share one third party's rate limit.
//!
//! Owns four primitives a consumer wraps around every sink call:
//!
//! - [`SharedRateLimiter`]: the sink's request rate, shared by every process through one Redis
//!   hash. A GCRA limiter (one Lua script call per request, Redis `TIME` as the common clock)
//!   whose rate adapts across all processes: [`SharedRateLimiter::throttled`] cuts it
//!   multiplicatively when the third party answers 429/503, at most once per cooldown no
//!   matter how many processes report, and it grows back linearly to `max_rate`. A
//!   Retry-After becomes a hold that every process's next slot waits for.
//! - [`SharedCircuit`]: the sink's circuit breaker, shared by every process through another
//!   Redis hash. A run of outage failures opens it; one probe at a time across the fleet,
//!   with growing intervals, closes it again, and every process resumes within a second.
//! - [`SharedQuota`]: the sink's budgets over fixed windows (per minute, hour, day) and its
//!   calls in flight across the fleet. A spent budget refuses every call until its window
//!   turns.
//! - [`AdaptiveConcurrency`]: how many calls this process keeps in flight to the sink, found
//!   by AIMD on overload answers and latency, in memory (no Redis).
//!
//! Metrics (through the `metrics` facade, label `sink`): gauges `resync_sink_rate_limit`,
//! `resync_sink_concurrency_limit`, `resync_sink_circuit_state` (0 closed, 1 open, 2
//! half-open) and `resync_sink_circuit_open_seconds`; counters `resync_sink_throttled_total`
//! and `resync_sink_circuit_transitions_total` (label `to`); histogram
//! `resync_sink_rate_wait_seconds`.
//!
//! Does not own: calling the sink, classifying its answers, retries and backoff, or what to do
//! when Redis is unreachable (fail closed, or send without the shared limit): the consumer
//! decides all of that. Not here either: fairness between waiters (slots go to whoever asks
//! when one is free), and Redis Cluster beyond "one key per sink" (which is cluster-safe).
//!
//! ```no_run
//! use std::time::Duration;
//! use resync_throttle::{
//!     AdaptiveConcurrency, ConcurrencyConfig, CallOutcome, RateLimiterConfig, SharedRateLimiter,
//! };
//!
//! # async fn demo() -> Result<(), resync_throttle::ThrottleError> {
//! let config = RateLimiterConfig { sink: "crm".into(), max_rate: 50.0, ..Default::default() };
//! let rate = SharedRateLimiter::connect("redis://127.0.0.1:6379", config).await?;
//! let concurrency =
//!     AdaptiveConcurrency::new(ConcurrencyConfig { sink: "crm".into(), ..Default::default() })?;
//!
//! let permit = concurrency.acquire().await;
//! rate.acquire().await?;
//! let started = std::time::Instant::now();
//! let status = 429; // call the third party here
//! match status {
//!     429 | 503 => {
//!         let retry_after = Some(Duration::from_secs(2)); // from the Retry-After header
//!         rate.throttled(retry_after).await?;
//!         permit.done(CallOutcome::Overloaded);
//!     }
//!     200..=299 => permit.done(CallOutcome::Success { latency: started.elapsed() }),
//!     _ => permit.done(CallOutcome::Failed),
//! }
//! # Ok(()) }
//! ```

mod circuit;
mod concurrency;
mod config;
mod error;
mod quota;
mod rate;
mod scripts;

pub use circuit::{CircuitConfig, CircuitState, Gate, SharedCircuit};
pub use concurrency::{AdaptiveConcurrency, CallOutcome, ConcurrencyConfig, ConcurrencyPermit};
pub use config::RateLimiterConfig;
pub use error::ThrottleError;
pub use quota::{Budget, QuotaConfig, QuotaGate, QuotaTicket, SharedQuota};
pub use rate::{Admission, SharedRateLimiter, ThrottledOutcome};
