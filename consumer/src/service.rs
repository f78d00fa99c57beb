//! Building a consumer for a service from its fare config: its queues, its HTTP sink, its
//! consumer settings. Shared by `resync consume` and the demo.

use std::sync::Arc;

use fare_config::ServiceConfig;
use resync_bus::Transport;
use resync_locks::{LockConfig, LockError, Locker};
use resync_migrations::Schema;

use crate::sink::http::{HttpSink, HttpSinkConfig, HttpSinkConfigError};
use crate::{AppliedStore, Consumer, ConsumerConfig, Processor, RetryPolicy};

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
}

/// The HTTP sink a service's `[sink]` section describes.
pub fn http_sink(service: &ServiceConfig) -> Result<HttpSink, BuildError> {
    let spec = service.sink.as_ref().ok_or_else(|| BuildError::NoSink {
        service: service.name.clone(),
        file: service.source_file.clone(),
    })?;
    let config = HttpSinkConfig {
        name: spec.name.clone(),
        url: spec.url.clone(),
        method: spec.method.clone(),
        delete_method: spec.delete_method.clone(),
        headers: spec.headers.clone(),
        timeout: spec.timeout,
    };
    HttpSink::new(&config, &service.name)
        .map_err(|source| BuildError::Sink { file: service.source_file.clone(), source })
}

/// A consumer of every queue of `service`, applying to its HTTP sink.
pub async fn build(
    service: &ServiceConfig,
    transport: Arc<dyn Transport>,
    runtime: &Runtime,
) -> Result<Consumer, BuildError> {
    let sink = Arc::new(http_sink(service)?);
    let queues = service.queues(runtime.namespace.as_deref());
    let Some((_, first)) = queues.first() else {
        return Err(BuildError::NoQueues { service: service.name.clone() });
    };
    let retry = RetryPolicy { max_receive_count: first.max_receive_count, ..RetryPolicy::default() };
    let pool = crate::store::connect(&runtime.database_url, runtime.db_pool_size).await?;
    let locker = Locker::connect(&runtime.redis_url, runtime.lock.clone()).await?;
    let lock_prefix = runtime.namespace.as_ref().map(|ns| format!("{ns}:")).unwrap_or_default();
    let store = AppliedStore::new(pool.clone(), runtime.schema.clone());
    let processor = Processor::new(store, locker, sink, retry, lock_prefix);
    let mut config = ConsumerConfig::new(
        service.name.clone(),
        queues.into_iter().map(|(stream, q)| (stream, q.name)).collect(),
    );
    config.concurrency = service.consumer.concurrency;
    config.prefetch = service.consumer.prefetch;
    config.batch_size = service.consumer.batch_size;
    Ok(Consumer::new(transport, processor, pool, runtime.schema.clone(), config))
}
