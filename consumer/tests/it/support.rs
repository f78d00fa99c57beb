//! A recording sink with injectable faults, and a world per test (schema, queue, locker).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use resync_bus::{
    Destination, Envelope, OutgoingMessage, QueueSpec, RabbitMqConfig, RabbitMqTransport, SnsSqsConfig,
    SnsSqsTransport, Stream, Transport,
};
use resync_consumer::{
    AppliedStore, Consumer, ConsumerConfig, Db, Pooling, Processor, RetryPolicy, Sink, SinkError, SinkWrite,
};
use resync_locks::{LockConfig, Locker};
use resync_migrations::Schema;
use resync_testkit::{Service, service_unreachable, unique_name};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

pub(crate) async fn rabbitmq() -> Arc<dyn Transport> {
    let mut config = RabbitMqConfig::new(Service::RabbitMq.url());
    config.connection_name = unique_name("consumer-it");
    match RabbitMqTransport::connect(config).await {
        Ok(t) => Arc::new(t),
        Err(err) => service_unreachable(Service::RabbitMq, err),
    }
}

pub(crate) async fn sns_sqs() -> Arc<dyn Transport> {
    let mut config = SnsSqsConfig::from_env();
    config.endpoint_url = Some(Service::SnsSqs.url());
    match SnsSqsTransport::connect(config).await {
        Ok(t) => Arc::new(t),
        Err(err) => service_unreachable(Service::SnsSqs, err),
    }
}

/// One applied write as the third party saw it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Write {
    pub(crate) entity: String,
    pub(crate) version: i64,
    pub(crate) deleted: bool,
}

/// Faults the recording sink injects.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Fail this many calls in a row with a transient error first.
    pub(crate) transient_first: AtomicU32,
    /// Take this long before applying (longer than the lock lease simulates a lost lock).
    pub(crate) latency: Mutex<Duration>,
    /// Reject writes to these entity ids with a 422.
    pub(crate) reject: Mutex<Vec<String>>,
    /// Hold writes of this version until `release` (after signalling `entered`).
    pub(crate) hold_version: Mutex<Option<i64>>,
    /// The held call then times out without landing.
    pub(crate) fail_held: std::sync::atomic::AtomicBool,
    pub(crate) entered: tokio::sync::Notify,
    pub(crate) release: tokio::sync::Notify,
}

/// The third party: applies writes in arrival order and remembers them all.
#[derive(Default)]
pub(crate) struct RecordingSink {
    pub(crate) writes: Mutex<Vec<Write>>,
    pub(crate) faults: Faults,
    pub(crate) calls: AtomicU32,
}

impl RecordingSink {
    /// The final state: entity -> (version, deleted) of the last write.
    pub(crate) fn state(&self) -> HashMap<String, (i64, bool)> {
        let mut state = HashMap::new();
        for w in self.writes.lock().unwrap().iter() {
            state.insert(w.entity.clone(), (w.version, w.deleted));
        }
        state
    }

    /// Stale writes not followed by a write of the newest version seen before them: a stale
    /// state the third party kept.
    pub(crate) fn unrepaired_stale_writes(&self) -> Vec<Write> {
        let writes = self.writes.lock().unwrap().clone();
        self.stale_overwrites()
            .into_iter()
            .filter(|stale| {
                let at = writes.iter().rposition(|w| w == stale).unwrap_or(0);
                let newest_before =
                    writes[..at].iter().filter(|w| w.entity == stale.entity).map(|w| w.version).max();
                !writes[at + 1..].iter().any(|w| w.entity == stale.entity && Some(w.version) >= newest_before)
            })
            .collect()
    }

    /// Writes of a version older than one already written for the same entity.
    pub(crate) fn stale_overwrites(&self) -> Vec<Write> {
        let mut newest: HashMap<&str, i64> = HashMap::new();
        let writes = self.writes.lock().unwrap();
        let mut stale = Vec::new();
        for w in writes.iter() {
            let seen = newest.entry(&w.entity).or_insert(w.version);
            if w.version < *seen {
                stale.push(w.clone());
            }
            *seen = (*seen).max(w.version);
        }
        stale
    }
}

#[async_trait]
impl Sink for RecordingSink {
    fn name(&self) -> &str {
        "recording"
    }

    async fn apply(&self, write: &SinkWrite<'_>) -> Result<(), SinkError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let transient = self
            .faults
            .transient_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if transient.is_ok() {
            return Err(SinkError::Transient {
                reason: "injected 503".into(),
                retry_after: Some(Duration::from_millis(50)),
                outage: true,
            });
        }
        if self.faults.reject.lock().unwrap().iter().any(|id| id == write.entity_id) {
            return Err(SinkError::Rejected { status: 422, body: "{\"error\":\"title too long\"}".into() });
        }
        let hold = *self.faults.hold_version.lock().unwrap() == Some(write.version);
        if hold {
            self.faults.entered.notify_one();
            self.faults.release.notified().await;
            if self.faults.fail_held.load(Ordering::SeqCst) {
                return Err(SinkError::Transient {
                    reason: "injected timeout".into(),
                    retry_after: None,
                    outage: true,
                });
            }
        }
        let latency = *self.faults.latency.lock().unwrap();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        self.writes.lock().unwrap().push(Write {
            entity: write.entity_id.to_string(),
            version: write.version,
            deleted: write.deleted,
        });
        Ok(())
    }
}

pub(crate) struct World {
    pub(crate) schema: Schema,
    pub(crate) pool: PgPool,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) queue: String,
    pub(crate) namespace: String,
    pub(crate) sink: Arc<RecordingSink>,
}

impl World {
    pub(crate) async fn new(transport: Arc<dyn Transport>) -> Self {
        init_tracing();
        let schema = Schema::new(unique_name("c").replace('-', "_")).expect("schema");
        if let Err(err) = resync_migrations::migrate(&Service::Postgres.url(), &schema).await {
            service_unreachable(Service::Postgres, err);
        }
        let pool = Db::connect(&Service::Postgres.url(), 10, Pooling::Direct)
            .await
            .unwrap_or_else(|e| service_unreachable(Service::Postgres, e))
            .pool()
            .clone();
        let queue = unique_name("cq");
        let mut spec = QueueSpec::new(&queue);
        spec.max_receive_count = 3;
        transport.declare_queue(&spec).await.expect("queue");
        Self {
            schema,
            pool,
            transport,
            queue,
            namespace: unique_name("ns"),
            sink: Arc::new(RecordingSink::default()),
        }
    }

    pub(crate) async fn locker(&self, lease: Duration) -> Locker {
        let config = LockConfig {
            op_timeout: (lease / 4).min(Duration::from_secs(2)),
            ..resync_consumer::service::lock_config(lease)
        };
        Locker::connect(&Service::Redis.url(), config)
            .await
            .unwrap_or_else(|e| service_unreachable(Service::Redis, e))
    }

    pub(crate) async fn processor(&self, lease: Duration) -> Processor {
        self.processor_through(lease, self.pool.clone().into()).await
    }

    /// A processor whose applied-version store uses `db`.
    pub(crate) async fn processor_through(&self, lease: Duration, db: Db) -> Processor {
        let retry = RetryPolicy {
            max_receive_count: 3,
            min_backoff: Duration::from_millis(20),
            ..RetryPolicy::default()
        };
        let store = AppliedStore::new(db, self.schema.clone());
        Processor::new(
            store,
            self.locker(lease).await,
            self.sink.clone(),
            retry,
            format!("{}:", self.namespace),
        )
    }

    /// A consumer with its own broker connection, as a separate process would have.
    pub(crate) async fn consumer(&self, transport: Arc<dyn Transport>, lease: Duration) -> Consumer {
        self.consumer_through(transport, lease, self.pool.clone().into()).await
    }

    /// A consumer whose Postgres statements (versions, pause state) go through `db`.
    pub(crate) async fn consumer_through(
        &self,
        transport: Arc<dyn Transport>,
        lease: Duration,
        db: Db,
    ) -> Consumer {
        let mut config = ConsumerConfig::new("svc", vec![(Stream::Live, self.queue.clone())]);
        config.pause_poll = Duration::from_millis(300);
        config.concurrency = 8;
        let processor = self.processor_through(lease, db.clone()).await;
        Consumer::new(transport, processor, db, self.schema.clone(), config)
    }

    /// Runs `consumers` until the sink holds `expected` and the queue is drained.
    pub(crate) async fn run_until_applied(
        &self,
        consumers: Vec<Consumer>,
        expected: &HashMap<String, (i64, bool)>,
        limit: Duration,
    ) {
        let sink = self.sink.clone();
        let (transport, queue) = (self.transport.clone(), self.queue.clone());
        run_until(consumers, limit, || {
            let (sink, transport, queue, expected) =
                (sink.clone(), transport.clone(), queue.clone(), expected.clone());
            async move {
                sink.state() == expected
                    && transport.queue_depth(&queue).await.map(|d| d.ready == 0).unwrap_or(false)
            }
        })
        .await;
    }

    pub(crate) async fn publish(&self, events: &[Envelope]) {
        for chunk in events.chunks(100) {
            let messages = chunk.iter().map(OutgoingMessage::from_envelope).collect();
            self.transport
                .publish_batch(&Destination::Queue(self.queue.clone()), messages)
                .await
                .expect("publish");
        }
    }

    async fn delete(&self) {
        let _ = sqlx::query(self.schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&self.pool).await;
        let _ = self.transport.delete_queue(&self.queue).await;
    }
}

/// Runs `body` in a fresh world and removes it afterwards, also when `body` panics.
pub(crate) async fn with_world<F, Fut>(world: World, body: F)
where
    F: FnOnce(Arc<World>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let world = Arc::new(world);
    let outcome = tokio::spawn(body(world.clone())).await;
    world.delete().await;
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
}

/// Runs consumers until `done` holds (polled every 50 ms; `limit` is a hang guard), then
/// shuts them down gracefully.
pub(crate) async fn run_until<F, Fut>(consumers: Vec<Consumer>, limit: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    for consumer in consumers {
        let token = shutdown.clone();
        tasks.push(tokio::spawn(async move { consumer.run(token).await }));
    }
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "consumers did not finish within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    for task in tasks {
        task.await.expect("consumer task").expect("consumer ran without error");
    }
}

/// The final state of every entity of [`history`]: its newest version and whether it ends deleted.
pub(crate) fn newest_states(entities: usize, versions: i64) -> HashMap<String, (i64, bool)> {
    history(entities, versions)
        .into_iter()
        .filter(|e| e.version == versions)
        .map(|e| (e.entity_id, (e.version, e.deleted)))
        .collect()
}

/// `n` versions per entity for `entities` entities, the last of each sometimes a tombstone.
pub(crate) fn history(entities: usize, versions: i64) -> Vec<Envelope> {
    let mut events = Vec::new();
    for e in 0..entities {
        for v in 1..=versions {
            let mut event = Envelope::new(
                "listing.updated",
                e.to_string(),
                v,
                serde_json::json!({"title": format!("{e} v{v}")}),
            );
            event.deleted = v == versions && e % 7 == 0;
            events.push(event);
        }
    }
    events
}
