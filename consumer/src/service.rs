//! Building a consumer for a service from its fare config: its queues, its HTTP sink, its
//! consumer settings. Shared by `resync consume` and the demo.

use std::sync::Arc;
use std::time::Duration;

use fare_config::ServiceConfig;
use resync_bus::Transport;
use resync_locks::{LockConfig, LockError, Locker};
use resync_migrations::Schema;

use resync_throttle::{
    AdaptiveConcurrency, Budget, CircuitConfig, ConcurrencyConfig, QuotaConfig, RateLimiterConfig,
    SharedCircuit, SharedQuota, SharedRateLimiter,
};

use crate::autoscale::Autoscaler;
use crate::sink::Sink;
use crate::sink::http::{HttpSink, HttpSinkConfigError};
use crate::sink::throttled::ThrottledSink;
use crate::{AppliedStore, Consumer, ConsumerConfig, Db, Pooling, Processor, RetryPolicy};

/// Where a consumer keeps its state and how it locks, besides what the service config says.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub database_url: String,
    pub schema: Schema,
    pub namespace: Option<String>,
    pub redis_url: String,
    pub lock: LockConfig,
    /// Postgres connections per consumer process: a batch needs two statements, so a few
    /// suffice, and many processes stay within the server's `max_connections`.
    pub db_pool_size: u32,
    /// Straight to Postgres, or through a transaction-mode pooler (beyond some tens of
    /// processes, see `deploy/README.md`).
    pub db_pooling: Pooling,
}

/// The entity-lock lease `resync consume` uses unless told otherwise (`--lock-lease`).
pub const DEFAULT_LOCK_LEASE: Duration = Duration::from_secs(15);

/// How a consumer locks entities with leases of `lease`: renewed every third of it, each Redis
/// call bounded by a fifth of it (at most 2 s).
///
/// The consumer never uses fencing tokens (the version rule's compare-and-set in Postgres is
/// what stops a stale writer), so the per-key fence counter need not outlive a lease: Redis
/// then holds the keys of the entities touched within one lease, not ~160 bytes per entity for
/// a day (1.6 GB after a 10-million-entity resync with the lock crate's default).
pub fn lock_config(lease: Duration) -> LockConfig {
    LockConfig {
        lease,
        renew_every: lease / 3,
        op_timeout: (lease / 5).min(Duration::from_secs(2)),
        fence_ttl: lease,
        ..LockConfig::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{file}: service `{service}` has no [sink] section; `resync consume` needs one", file = .file.display())]
    NoSink { service: String, file: std::path::PathBuf },
    #[error("{file}: [sink] {source}", file = .file.display())]
    Sink { file: std::path::PathBuf, source: HttpSinkConfigError },
    #[error("service `{service}` subscribes to nothing: add a [[subscriptions]] section")]
    NoQueues { service: String },
    #[error("cannot connect to Postgres (RESYNC_DATABASE_URL): {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot connect to Redis (RESYNC_REDIS_URL): {0}")]
    Locks(#[from] LockError),
    #[error(
        "{file}: [sink] timeout = {timeout:?} needs an entity-lock lease (--lock-lease) of at least {needed:?}, \
         not {lease:?}: a call is started only while its lock holds for the whole call",
        file = .file.display()
    )]
    LeaseTooShort { file: std::path::PathBuf, timeout: Duration, lease: Duration, needed: Duration },
    #[error("{file}: [sink.rate_limit]: {source}", file = .file.display())]
    Throttle { file: std::path::PathBuf, source: resync_throttle::ThrottleError },
    #[error("{file}: [sink.circuit]: {source}", file = .file.display())]
    Circuit { file: std::path::PathBuf, source: resync_throttle::ThrottleError },
}

/// The sink's circuit breaker, shared through Redis by every consumer of the sink (`None`:
/// `[sink.circuit] enabled = false`).
pub async fn sink_circuit(
    service: &ServiceConfig,
    sink: &dyn Sink,
    runtime: &Runtime,
) -> Result<Option<SharedCircuit>, BuildError> {
    let spec = service.sink.as_ref().map(|s| s.circuit).unwrap_or_default();
    if !spec.enabled {
        return Ok(None);
    }
    let config = CircuitConfig {
        key_prefix: runtime.namespace.clone().unwrap_or_else(|| "resync".into()),
        sink: sink.name().to_string(),
        failure_threshold: spec.failure_threshold,
        min_probe_interval: spec.min_probe_interval,
        max_probe_interval: spec.max_probe_interval,
        // A probe outlives its call's timeout before another process may probe instead.
        probe_lease: sink.call_timeout().unwrap_or(Duration::from_secs(10)) + Duration::from_secs(5),
        ..CircuitConfig::default()
    };
    let circuit = SharedCircuit::connect(&runtime.redis_url, config)
        .await
        .map_err(|source| BuildError::Circuit { file: service.source_file.clone(), source })?;
    Ok(Some(circuit))
}

/// The HTTP sink a service's `[sink]` section describes.
pub fn http_sink(service: &ServiceConfig) -> Result<HttpSink, BuildError> {
    let spec = service.sink.as_ref().ok_or_else(|| BuildError::NoSink {
        service: service.name.clone(),
        file: service.source_file.clone(),
    })?;
    HttpSink::new(spec, &service.name)
        .map_err(|source| BuildError::Sink { file: service.source_file.clone(), source })
}

/// The service's HTTP sink behind its shared rate limit and adaptive concurrency, as its
/// config asks (either may be off).
pub async fn throttled_sink(service: &ServiceConfig, runtime: &Runtime) -> Result<ThrottledSink, BuildError> {
    let http = http_sink(service)?;
    let sink_name = http.name().to_string();
    let throttle_error = |source| BuildError::Throttle { file: service.source_file.clone(), source };
    let limit = service.sink.as_ref().and_then(|s| s.rate_limit.as_ref());
    let key_prefix = runtime.namespace.clone().unwrap_or_else(|| "resync".into());
    let rate = match limit.and_then(|l| l.per_second.map(|per_second| (l, per_second))) {
        Some((limit, per_second)) => {
            let config = RateLimiterConfig {
                key_prefix: key_prefix.clone(),
                sink: sink_name.clone(),
                max_rate: per_second,
                min_rate: limit.min_per_second,
                burst: limit.burst,
                // Back from the floor to the maximum in about 20 s without overload answers.
                increase_per_sec: per_second / 20.0,
                ..RateLimiterConfig::default()
            };
            Some(SharedRateLimiter::connect(&runtime.redis_url, config).await.map_err(throttle_error)?)
        }
        None => None,
    };
    let quota = match limit.filter(|l| !l.quotas.is_empty() || l.max_in_flight.is_some()) {
        Some(limit) => {
            let config = QuotaConfig {
                key_prefix,
                sink: sink_name.clone(),
                budgets: limit.quotas.iter().map(|q| Budget { limit: q.limit, window: q.window }).collect(),
                max_in_flight: limit.max_in_flight,
                // A call's place outlives its timeout before the fleet may reuse it.
                in_flight_lease: http.call_timeout().unwrap_or(Duration::from_secs(10))
                    + Duration::from_secs(5),
                ..QuotaConfig::default()
            };
            Some(SharedQuota::connect(&runtime.redis_url, config).await.map_err(throttle_error)?)
        }
        None => None,
    };
    let concurrency = if service.consumer.adaptive_concurrency {
        let config = ConcurrencyConfig {
            sink: sink_name,
            max: service.consumer.concurrency,
            initial: service.consumer.concurrency.min(4),
            ..ConcurrencyConfig::default()
        };
        Some(AdaptiveConcurrency::new(config).map_err(throttle_error)?)
    } else {
        None
    };
    let adaptive_rate = limit.is_some_and(|l| l.adaptive);
    let sink = ThrottledSink::new(Box::new(http), rate, adaptive_rate, concurrency);
    Ok(match quota {
        Some(quota) => sink.with_quota(quota),
        None => sink,
    })
}

/// A consumer of every queue of `service`, applying to its HTTP sink.
pub async fn build(
    service: &ServiceConfig,
    transport: Arc<dyn Transport>,
    runtime: &Runtime,
) -> Result<Consumer, BuildError> {
    Ok(build_with_autoscaler(service, transport, runtime).await?.0)
}

/// A consumer as [`build`] makes it, and the sampler of its autoscaling signals (run it beside
/// the consumer to publish them).
pub async fn build_with_autoscaler(
    service: &ServiceConfig,
    transport: Arc<dyn Transport>,
    runtime: &Runtime,
) -> Result<(Consumer, Autoscaler), BuildError> {
    let sink = Arc::new(throttled_sink(service, runtime).await?);
    if let Some(timeout) = sink.call_timeout() {
        // A call must fit in a lease (a short one is renewed before the call).
        let needed = timeout + crate::process::LEASE_MARGIN;
        if runtime.lock.lease < needed {
            let file = service.source_file.clone();
            return Err(BuildError::LeaseTooShort { file, timeout, lease: runtime.lock.lease, needed });
        }
    }
    let queues = service.queues(runtime.namespace.as_deref());
    let Some((_, first)) = queues.first() else {
        return Err(BuildError::NoQueues { service: service.name.clone() });
    };
    let circuit = sink_circuit(service, sink.as_ref(), runtime).await?;
    let max_hold = service.sink.as_ref().map(|s| s.circuit.max_hold).unwrap_or_default();
    let retry =
        RetryPolicy { max_receive_count: first.max_receive_count, max_hold, ..RetryPolicy::default() };
    let db = Db::connect(&runtime.database_url, runtime.db_pool_size, runtime.db_pooling).await?;
    let locker = Locker::connect(&runtime.redis_url, runtime.lock.clone()).await?;
    let lock_prefix = crate::records::lock_prefix(runtime.namespace.as_deref());
    let store = AppliedStore::new(db.clone(), runtime.schema.clone());
    let subscribed: Vec<_> =
        queues.iter().map(|(stream, _)| (*stream, service.subscribed(*stream))).collect();
    let mut processor =
        Processor::new(store, locker, sink.clone(), retry, lock_prefix).only_subscribed(subscribed);
    if let Some(circuit) = circuit.clone() {
        processor = processor.with_circuit(circuit);
    }
    let mut config = ConsumerConfig::new(
        service.name.clone(),
        queues.into_iter().map(|(stream, q)| (stream, q.name)).collect(),
    );
    config.concurrency = service.consumer.concurrency;
    config.prefetch = service.consumer.prefetch;
    config.batch_size = service.consumer.batch_size;
    let autoscaler = Autoscaler {
        transport: transport.clone(),
        queues: config.queues.iter().map(|(_, queue)| queue.clone()).collect(),
        tally: processor.tally(),
        sink,
        circuit,
        interval: Duration::from_secs(5),
        drain_target: Duration::from_secs(60),
    };
    Ok((Consumer::new(transport, processor, db, runtime.schema.clone(), config), autoscaler))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_locks_are_valid_and_keep_no_fence_counter_past_a_lease() {
        for lease in [Duration::from_secs(1), Duration::from_secs(15), Duration::from_secs(120)] {
            let config = lock_config(lease);
            assert!(config.validate().is_ok(), "{config:?}");
            assert_eq!(config.fence_ttl, lease);
        }
    }
}
