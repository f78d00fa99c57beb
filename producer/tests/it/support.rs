//! A fresh outbox schema, topic and queue per test, a relay running in the background, and a
//! collector that drains the queue; everything is removed when the test ends, also on panic.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use resync_bus::{
    Envelope, Filter, QueueSpec, RabbitMqConfig, RabbitMqTransport, SnsSqsConfig, SnsSqsTransport,
    Subscription, Transport,
};
use resync_producer::{Relay, RelayConfig, RelayStatus, Schema, live_topic};
use resync_testkit::{Service, service_unreachable, unique_name};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

pub(crate) async fn rabbitmq_at(url: &str) -> Arc<dyn Transport> {
    let mut config = RabbitMqConfig::new(url);
    config.connection_name = unique_name("producer-it");
    match RabbitMqTransport::connect(config).await {
        Ok(t) => Arc::new(t),
        Err(err) => service_unreachable(Service::RabbitMq, err),
    }
}

pub(crate) async fn rabbitmq() -> Arc<dyn Transport> {
    rabbitmq_at(&Service::RabbitMq.url()).await
}

pub(crate) async fn sns_sqs() -> Arc<dyn Transport> {
    let mut config = SnsSqsConfig::from_env();
    config.endpoint_url = Some(Service::SnsSqs.url());
    match SnsSqsTransport::connect(config).await {
        Ok(t) => Arc::new(t),
        Err(err) => service_unreachable(Service::SnsSqs, err),
    }
}

/// One test's world: an outbox schema, a namespace whose `listing` live topic feeds `queue`.
pub(crate) struct World {
    pub(crate) database_url: String,
    pub(crate) schema: Schema,
    pub(crate) pool: PgPool,
    pub(crate) namespace: String,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) queues: Vec<String>,
}

impl World {
    pub(crate) async fn new(transport: Arc<dyn Transport>, queues: usize, pool_size: u32) -> Self {
        init_tracing();
        let database_url = Service::Postgres.url();
        let schema = Schema::new(unique_name("t").replace('-', "_")).expect("schema name");
        if let Err(err) = resync_migrations::migrate(&database_url, &schema).await {
            service_unreachable(Service::Postgres, err);
        }
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .connect(&database_url)
            .await
            .unwrap_or_else(|e| service_unreachable(Service::Postgres, e));
        let namespace = unique_name("p");
        let topic = live_topic(Some(&namespace), "listing");
        transport.declare_topic(&topic, None).await.expect("declare topic");
        let mut names = Vec::new();
        for _ in 0..queues {
            let queue = unique_name("q");
            transport.declare_queue(&QueueSpec::new(&queue)).await.expect("declare queue");
            transport.bind(&topic, &queue, &Filter::all()).await.expect("bind");
            names.push(queue);
        }
        Self { database_url, schema, pool, namespace, transport, queues: names }
    }

    pub(crate) fn relay_config(&self) -> RelayConfig {
        let mut config = RelayConfig::new(self.schema.clone());
        config.namespace = Some(self.namespace.clone());
        config.poll_interval = Duration::from_millis(200);
        config.standby_poll = Duration::from_millis(200);
        config.max_backoff = Duration::from_secs(1);
        config
    }

    /// Starts a relay publishing through `transport` and reading the database at `database_url`.
    pub(crate) fn start_relay(&self, database_url: &str, transport: Arc<dyn Transport>) -> RunningRelay {
        let relay = Arc::new(Relay::new(database_url, transport, self.relay_config()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (relay, shutdown) = (relay.clone(), shutdown.clone());
            async move { relay.run(shutdown).await }
        });
        RunningRelay { relay, shutdown, task }
    }

    pub(crate) async fn subscribe(&self, queue: usize) -> Box<dyn Subscription> {
        self.transport.subscribe(&self.queues[queue], Default::default()).await.expect("subscribe")
    }

    pub(crate) async fn pending(&self) -> i64 {
        sqlx::query_scalar(self.schema.sql("SELECT count(*) FROM {schema}.outbox_pending"))
            .fetch_one(&self.pool)
            .await
            .expect("count pending")
    }

    async fn delete(&self) {
        let _ = sqlx::query(self.schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&self.pool).await;
        for queue in &self.queues {
            let _ = self.transport.delete_queue(queue).await;
        }
        let _ = self.transport.delete_topic(&live_topic(Some(&self.namespace), "listing")).await;
    }
}

pub(crate) struct RunningRelay {
    pub(crate) relay: Arc<Relay>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) task: JoinHandle<()>,
}

impl RunningRelay {
    pub(crate) async fn wait_for(&self, status: RelayStatus) {
        let mut rx = self.relay.status();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| *s == status))
            .await
            .unwrap_or_else(|_| panic!("relay did not reach {status:?} within 30s"))
            .expect("relay status");
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("relay task");
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

/// Drains a subscription in receive order, acking everything, from now on (so queues stay
/// short while writers run). Once the expected ids are sent, it returns when all of them have
/// arrived and the queue then stays quiet.
///
/// It fails when events are missing and none arrived for `stall`: a lost event stops progress,
/// a slow broker (the SNS/SQS emulator on a loaded machine delivers a few events a second) only
/// slows it, so how fast the machine is does not decide the outcome.
pub(crate) fn spawn_collector(
    mut subscription: Box<dyn Subscription>,
    stall: Duration,
) -> (tokio::sync::oneshot::Sender<HashSet<Uuid>>, JoinHandle<Vec<Envelope>>) {
    let (tx, mut expected_rx) = tokio::sync::oneshot::channel::<HashSet<Uuid>>();
    let task = tokio::spawn(async move {
        let mut last_progress = tokio::time::Instant::now();
        let mut received = Vec::new();
        let mut seen = HashSet::new();
        let mut expected: Option<HashSet<Uuid>> = None;
        loop {
            if expected.is_none() {
                expected = expected_rx.try_recv().ok();
            }
            let all_arrived = expected.as_ref().is_some_and(|e| e.is_subset(&seen));
            let wait = if all_arrived { Duration::from_millis(1500) } else { Duration::from_millis(500) };
            let batch = subscription.next_batch(100, wait).await.expect("next_batch");
            if batch.is_empty() && all_arrived {
                return received;
            }
            if !batch.is_empty() {
                last_progress = tokio::time::Instant::now();
            } else if last_progress.elapsed() > stall {
                let missing = expected.map_or(0, |e| e.difference(&seen).count());
                panic!(
                    "{missing} expected events still missing and none arrived for {stall:?} ({} received)",
                    seen.len()
                );
            }
            for delivery in batch {
                let envelope = delivery.envelope(&Default::default()).expect("valid envelope");
                seen.insert(envelope.id);
                received.push(envelope);
                delivery.ack().await.expect("ack");
            }
        }
    });
    (tx, task)
}

/// Asserts that, in receive order, every entity's versions strictly increase.
pub(crate) fn assert_versions_increase(received: &[Envelope]) {
    let mut last: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for e in received {
        if let Some(previous) = last.insert(&e.entity_id, e.version) {
            assert!(
                e.version > previous,
                "entity {} got version {} after {previous}",
                e.entity_id,
                e.version
            );
        }
    }
}

/// What concurrent writers did.
#[derive(Default)]
pub(crate) struct Written {
    pub(crate) committed: HashSet<Uuid>,
    pub(crate) rolled_back: HashSet<Uuid>,
}

/// Runs `writers` concurrent writers until `target` events are committed. Each transaction
/// emits 1 to 4 events on random entities; 10% roll back; 3% stay open 100-600 ms (long
/// transactions that commit after later ones).
pub(crate) async fn write_concurrently(
    pool: &PgPool,
    schema: &Schema,
    writers: usize,
    target: usize,
    entities: u32,
) -> Written {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let committed_count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let (pool, schema, committed_count) = (pool.clone(), schema.clone(), committed_count.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(writer as u64);
            let mut written = Written::default();
            while committed_count.load(Ordering::SeqCst) < target {
                let mut tx = pool.begin().await.expect("begin");
                let mut ids = Vec::new();
                // Entities in a fixed order within a transaction, as applications do to avoid
                // deadlocks on the per-entity version rows.
                let mut entity_ids: Vec<u32> =
                    (0..rng.random_range(1..=4)).map(|_| rng.random_range(0..entities)).collect();
                entity_ids.sort_unstable();
                for entity in entity_ids {
                    let data = serde_json::json!({"title": format!("listing {entity}"), "writer": writer});
                    let event = resync_producer::NewEvent::new("listing.updated", entity.to_string(), data);
                    ids.push(resync_producer::emit(&mut tx, &schema, &event).await.expect("emit").id);
                }
                if rng.random_bool(0.03) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
                }
                if rng.random_bool(0.10) {
                    tx.rollback().await.expect("rollback");
                    written.rolled_back.extend(ids);
                } else {
                    tx.commit().await.expect("commit");
                    committed_count.fetch_add(ids.len(), Ordering::SeqCst);
                    written.committed.extend(ids);
                }
            }
            written
        }));
    }
    let mut all = Written::default();
    for task in tasks {
        let written = task.await.expect("writer");
        all.committed.extend(written.committed);
        all.rolled_back.extend(written.rolled_back);
    }
    all
}

impl World {
    /// Events the relay has published (the log minus the pending set).
    pub(crate) async fn published(&self) -> i64 {
        sqlx::query_scalar(self.schema.sql(
            "SELECT (SELECT count(*) FROM {schema}.outbox) - (SELECT count(*) FROM {schema}.outbox_pending)",
        ))
        .fetch_one(&self.pool)
        .await
        .expect("count published")
    }
}

/// Polls `condition` every 50 ms until it holds; panics after `limit` (a hang guard).
pub(crate) async fn eventually<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Written {
    pub(crate) fn merge(mut self, other: Written) -> Written {
        self.committed.extend(other.committed);
        self.rolled_back.extend(other.rolled_back);
        self
    }
}
