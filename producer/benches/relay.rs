//! Relay throughput against a raw lapin publisher with confirms, and commit-to-consumer latency
//! at a steady 1,000 events/s — same broker, same run.
//!
//!     cargo bench -p resync-producer --bench relay
//!
//! `RESYNC_BENCH_EVENTS` (default 20000) sets the backlog size for the throughput phase.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use resync_bus::{Envelope, Filter, QueueSpec, RabbitMqConfig, RabbitMqTransport, Transport};
use resync_producer::{NewEvent, Relay, RelayConfig, Schema, emit, live_topic};
use resync_testkit::{Service, service_unreachable, unique_name};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const BATCH: usize = 500;

fn data(i: usize) -> serde_json::Value {
    serde_json::json!({"title": format!("listing {i}"), "price": i, "tags": ["a", "b"]})
}

async fn fill_outbox(pool: &PgPool, schema: &Schema, n: usize) {
    for start in (0..n).step_by(1000) {
        let mut tx = pool.begin().await.expect("begin");
        for i in start..(start + 1000).min(n) {
            let event = NewEvent::new("listing.updated", (i % 5000).to_string(), data(i));
            emit(&mut tx, schema, &event).await.expect("emit");
        }
        tx.commit().await.expect("commit");
    }
}

async fn pending(pool: &PgPool, schema: &Schema) -> i64 {
    sqlx::query_scalar(schema.sql("SELECT count(*) FROM {schema}.outbox_pending"))
        .fetch_one(pool)
        .await
        .expect("count")
}

fn start_relay(schema: &Schema, namespace: &str, transport: Arc<dyn Transport>) -> CancellationToken {
    let mut config = RelayConfig::new(schema.clone());
    config.namespace = Some(namespace.to_string());
    config.batch_size = BATCH as i64;
    config.poll_interval = Duration::from_millis(50);
    let relay = Relay::new(Service::Postgres.url(), transport, config);
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move { relay.run(token).await });
    shutdown
}

async fn raw_publish(url: &str, exchange: &str, n: usize) -> Duration {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    let bodies: Vec<Vec<u8>> =
        (0..n).map(|i| Envelope::new("listing.updated", i.to_string(), 1, data(i)).to_bytes()).collect();
    let start = Instant::now();
    for chunk in bodies.chunks(BATCH) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for body in chunk {
            let properties = BasicProperties::default().with_delivery_mode(2);
            confirms.push(
                channel
                    .basic_publish(
                        exchange.into(),
                        "listing.updated".into(),
                        BasicPublishOptions::default(),
                        body,
                        properties,
                    )
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            assert!(confirm.await.expect("confirm").is_ack());
        }
    }
    start.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("RESYNC_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let database_url = Service::Postgres.url();
    let amqp_url = Service::RabbitMq.url();
    let schema = Schema::new(unique_name("bench").replace('-', "_")).expect("schema");
    resync_migrations::migrate(&database_url, &schema)
        .await
        .unwrap_or_else(|e| service_unreachable(Service::Postgres, e));
    let pool =
        PgPool::connect(&database_url).await.unwrap_or_else(|e| service_unreachable(Service::Postgres, e));
    let transport: Arc<dyn Transport> = Arc::new(
        RabbitMqTransport::connect(RabbitMqConfig::new(amqp_url.clone()))
            .await
            .unwrap_or_else(|e| service_unreachable(Service::RabbitMq, e)),
    );
    let namespace = unique_name("bench");
    let topic = live_topic(Some(&namespace), "listing");
    let queue = unique_name("bench-q");
    transport.declare_topic(&topic, None).await.expect("topic");
    transport.declare_queue(&QueueSpec::new(&queue)).await.expect("queue");
    transport.bind(&topic, &queue, &Filter::all()).await.expect("bind");

    // Throughput: a backlog of n committed events, relay started cold.
    fill_outbox(&pool, &schema, n).await;
    let start = Instant::now();
    let relay = start_relay(&schema, &namespace, transport.clone());
    while pending(&pool, &schema).await > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let relay_elapsed = start.elapsed();
    relay.cancel();
    let raw_elapsed = raw_publish(&amqp_url, &topic, n).await;
    let (relay_rate, raw_rate) =
        (n as f64 / relay_elapsed.as_secs_f64(), n as f64 / raw_elapsed.as_secs_f64());
    transport.delete_queue(&queue).await.expect("reset queue");
    transport.declare_queue(&QueueSpec::new(&queue)).await.expect("queue");
    transport.bind(&topic, &queue, &Filter::all()).await.expect("bind");

    // Latency: 1,000 events/s for 10 s, one event per transaction, commit to consumer receipt.
    let relay = start_relay(&schema, &namespace, transport.clone());
    let mut subscription = transport.subscribe(&queue, Default::default()).await.expect("subscribe");
    let total = 10_000;
    let receiver = tokio::spawn(async move {
        let mut received: HashMap<Uuid, Instant> = HashMap::new();
        while received.len() < total {
            for d in subscription.next_batch(100, Duration::from_secs(5)).await.expect("next_batch") {
                received.insert(d.envelope(&Default::default()).expect("envelope").id, Instant::now());
                d.ack().await.expect("ack");
            }
        }
        received
    });
    let mut committed: HashMap<Uuid, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        tick.tick().await;
        let mut tx = pool.begin().await.expect("begin");
        let id = emit(&mut tx, &schema, &NewEvent::new("listing.updated", (i % 1000).to_string(), data(i)))
            .await
            .expect("emit")
            .id;
        tx.commit().await.expect("commit");
        committed.insert(id, Instant::now());
    }
    let received = receiver.await.expect("receiver");
    relay.cancel();
    let mut latencies: Vec<Duration> = committed
        .iter()
        .filter_map(|(id, at)| received.get(id).map(|r| r.saturating_duration_since(*at)))
        .collect();
    latencies.sort();

    println!(
        "relay vs raw lapin publisher (confirms, batches of {BATCH}), {n} events, RabbitMQ topic exchange + quorum queue"
    );
    println!("{:<36} {:>12}", "raw lapin publish", format!("{raw_rate:.0} ev/s"));
    println!("{:<36} {:>12}", "relay (outbox -> confirmed publish)", format!("{relay_rate:.0} ev/s"));
    println!("{:<36} {:>11.0}%", "ratio", 100.0 * relay_rate / raw_rate);
    println!(
        "commit -> consumer receipt at 1000 ev/s ({} events): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );

    transport.delete_queue(&queue).await.expect("cleanup");
    transport.delete_topic(&topic).await.expect("cleanup");
    sqlx::query(schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&pool).await.expect("cleanup");
}
