//! Consumer throughput with a zero-latency sink (entity locks in Redis and the version store in
//! Postgres on) against a raw lapin consume + ack loop — same broker, queue type and messages,
//! same run.
//!
//!     cargo bench -p resync-consumer --bench consumer
//!
//! `RESYNC_BENCH_EVENTS` (default 20000) events, each for a different entity, so every one is
//! applied (the most expensive path: lock, read, sink call, compare-and-set).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use resync_bus::{
    Destination, Envelope, OutgoingMessage, QueueSpec, RabbitMqConfig, RabbitMqTransport, Stream, Transport,
};
use resync_consumer::service;
use resync_consumer::{
    AppliedStore, Consumer, ConsumerConfig, Pooling, Processor, RetryPolicy, Sink, SinkError, SinkWrite,
};
use resync_locks::Locker;
use resync_migrations::Schema;
use resync_testkit::{Service, service_unreachable, unique_name};
use tokio_util::sync::CancellationToken;

const CONCURRENCY: usize = 512;
const BATCH: usize = 128;

struct NullSink(AtomicU64);

#[async_trait]
impl Sink for NullSink {
    fn name(&self) -> &str {
        "null"
    }

    async fn apply(&self, _: &SinkWrite<'_>) -> Result<(), SinkError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

async fn fill(transport: &Arc<dyn Transport>, queue: &str, n: usize) {
    let events: Vec<OutgoingMessage> = (0..n)
        .map(|i| {
            OutgoingMessage::from_envelope(&Envelope::new(
                "listing.updated",
                i.to_string(),
                1,
                serde_json::json!({"i": i}),
            ))
        })
        .collect();
    for chunk in events.chunks(500) {
        transport
            .publish_batch(&Destination::Queue(queue.to_string()), chunk.to_vec())
            .await
            .expect("publish");
    }
}

async fn raw_consume(url: &str, queue: &str, n: usize) -> Duration {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel.basic_qos(CONCURRENCY as u16, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let start = Instant::now();
    for _ in 0..n {
        let delivery = consumer.next().await.expect("open").expect("delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    start.elapsed()
}

#[tokio::main]
async fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let n: usize = std::env::var("RESYNC_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let amqp = Service::RabbitMq.url();
    let transport: Arc<dyn Transport> = Arc::new(
        RabbitMqTransport::connect(RabbitMqConfig::new(amqp.clone()))
            .await
            .unwrap_or_else(|e| service_unreachable(Service::RabbitMq, e)),
    );
    let schema = Schema::new(unique_name("bench").replace('-', "_")).expect("schema");
    resync_migrations::migrate(&Service::Postgres.url(), &schema)
        .await
        .unwrap_or_else(|e| service_unreachable(Service::Postgres, e));
    let pool = resync_consumer::Db::connect(&Service::Postgres.url(), 8, Pooling::Direct)
        .await
        .expect("pool")
        .pool()
        .clone();
    let locker = Locker::connect(&Service::Redis.url(), service::lock_config(service::DEFAULT_LOCK_LEASE))
        .await
        .unwrap_or_else(|e| service_unreachable(Service::Redis, e));

    let raw_queue = unique_name("bench-raw");
    let queue = unique_name("bench-consumer");
    for q in [&raw_queue, &queue] {
        transport.declare_queue(&QueueSpec::new(q.as_str())).await.expect("queue");
        fill(&transport, q, n).await;
    }
    let raw = raw_consume(&amqp, &raw_queue, n).await;

    let sink = Arc::new(NullSink(AtomicU64::new(0)));
    let processor = Processor::new(
        AppliedStore::new(pool.clone(), schema.clone()),
        locker,
        sink.clone(),
        RetryPolicy::default(),
        format!("{}:", unique_name("bench")),
    );
    let mut config = ConsumerConfig::new("bench", vec![(Stream::Live, queue.clone())]);
    config.concurrency = CONCURRENCY;
    config.prefetch = CONCURRENCY as u16;
    config.batch_size = BATCH;
    let consumer = Consumer::new(transport.clone(), processor, pool.clone(), schema.clone(), config);
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });
    while (sink.0.load(Ordering::Relaxed) as usize) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ours = start.elapsed();
    shutdown.cancel();
    running.await.expect("consumer").expect("consumer ran");

    let (raw_rate, our_rate) = (n as f64 / raw.as_secs_f64(), n as f64 / ours.as_secs_f64());
    println!(
        "consumer vs raw lapin consume+ack: {n} events (one per entity), prefetch/concurrency {CONCURRENCY}"
    );
    println!("{:<52} {:>10.0} ev/s", "raw lapin consume + ack", raw_rate);
    println!("{:<52} {:>10.0} ev/s", "resync consumer (lock + version check + CAS, null sink)", our_rate);
    println!("{:<52} {:>10.0}%", "ratio", 100.0 * our_rate / raw_rate);

    for q in [&raw_queue, &queue] {
        transport.delete_queue(q).await.expect("cleanup");
    }
    sqlx::query(schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&pool).await.expect("cleanup");
}
