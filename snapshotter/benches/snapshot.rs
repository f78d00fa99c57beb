//! Snapshot rows/s published to RabbitMQ by a resync job, against a raw read of the same rows
//! (one `SELECT ... ORDER BY id` streamed) and a raw lapin publish with confirms in batches of
//! the job's chunk size, to the same exchange and queue, in the same run.
//!
//!     cargo bench -p resync-snapshotter --bench snapshot
//!
//! `RESYNC_BENCH_ROWS` (default 100000) sets the source table's size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fare_config::{SourceData, SourceSpec};
use futures::TryStreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use resync_bus::{Envelope, Filter, QueueSpec, RabbitMqConfig, RabbitMqTransport, Stream, Transport};
use resync_migrations::Schema;
use resync_snapshotter::JobOptions;
use resync_testkit::{Service, service_unreachable, unique_name};
use sqlx::{PgPool, Row};

const CHUNK: i64 = 1000;

async fn create_source(pool: &PgPool, schema: &Schema, rows: usize) {
    let create = "CREATE TABLE {schema}.listings \
                  (id text PRIMARY KEY, version bigint NOT NULL, deleted boolean NOT NULL, data jsonb NOT NULL)";
    sqlx::query(schema.sql(create)).execute(pool).await.expect("create the source table");
    let fill = "INSERT INTO {schema}.listings SELECT 'L' || lpad(i::text, 8, '0'), 1 + i % 7, i % 97 = 0, \
                jsonb_build_object('title', 'listing ' || i, 'price', i, 'tags', jsonb_build_array('a', 'b')) \
                FROM generate_series(1, $1) AS i";
    sqlx::query(schema.sql(fill)).bind(rows as i64).execute(pool).await.expect("fill the source table");
    sqlx::query(schema.sql("VACUUM ANALYZE {schema}.listings")).execute(pool).await.expect("vacuum");
}

/// Reads every row in id order in one statement and publishes it with confirms, in batches.
async fn raw_read_and_publish(
    pool: &PgPool,
    schema: &Schema,
    amqp_url: &str,
    exchange: &str,
) -> (usize, Duration) {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    let start = Instant::now();
    let sql = schema.sql("SELECT id, version, deleted, data FROM {schema}.listings ORDER BY id");
    let mut rows = sqlx::query(sql).fetch(pool);
    let mut confirms = Vec::with_capacity(CHUNK as usize);
    let mut sent = 0;
    while let Some(row) = rows.try_next().await.expect("read") {
        let deleted: bool = row.get("deleted");
        let verb = if deleted { "listing.deleted" } else { "listing.updated" };
        let mut event = Envelope::new(verb, row.get::<String, _>("id"), row.get("version"), row.get("data"));
        event.stream = Stream::Resync;
        let properties = BasicProperties::default().with_delivery_mode(2);
        let options = BasicPublishOptions::default();
        let body = event.to_bytes();
        confirms.push(
            channel
                .basic_publish(exchange.into(), verb.into(), options, &body, properties)
                .await
                .expect("publish"),
        );
        sent += 1;
        if confirms.len() == CHUNK as usize {
            for confirm in confirms.drain(..) {
                assert!(confirm.await.expect("confirm").is_ack());
            }
        }
    }
    for confirm in confirms {
        assert!(confirm.await.expect("confirm").is_ack());
    }
    (sent, start.elapsed())
}

/// Creates and runs a job to `published`; returns how long the run took.
async fn job(
    pool: &PgPool,
    schema: &Schema,
    namespace: &str,
    transport: &dyn Transport,
    readers: u32,
) -> Duration {
    let source = SourceSpec {
        entity: "listing".into(),
        table: format!("{}.listings", schema.name()),
        key_columns: vec!["id".into()],
        version_column: Some("version".into()),
        data: SourceData::Column("data".into()),
        deleted_column: Some("deleted".into()),
        filter: None,
    };
    let options = JobOptions { chunk_size: CHUNK, readers, ..Default::default() };
    let id =
        resync_snapshotter::start(pool, schema, Some(namespace), &source, &options).await.expect("create");
    let start = Instant::now();
    let job = resync_snapshotter::run(pool, schema, transport, id).await.expect("run");
    assert_eq!(job.status, resync_snapshotter::JobStatus::Published);
    start.elapsed()
}

async fn reset_queue(transport: &dyn Transport, topic: &str, queue: &str) {
    let _ = transport.delete_queue(queue).await;
    transport.declare_queue(&QueueSpec::new(queue)).await.expect("queue");
    transport.bind(topic, queue, &Filter::all()).await.expect("bind");
}

#[tokio::main]
async fn main() {
    let rows: usize = std::env::var("RESYNC_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let database_url = Service::Postgres.url();
    let amqp_url = Service::RabbitMq.url();
    let namespace = unique_name("bench");
    let schema = Schema::new(namespace.replace('-', "_")).expect("schema");
    resync_migrations::migrate(&database_url, &schema)
        .await
        .unwrap_or_else(|e| service_unreachable(Service::Postgres, e));
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect(&database_url)
        .await
        .unwrap_or_else(|e| service_unreachable(Service::Postgres, e));
    let transport: Arc<dyn Transport> = Arc::new(
        RabbitMqTransport::connect(RabbitMqConfig::new(amqp_url.clone()))
            .await
            .unwrap_or_else(|e| service_unreachable(Service::RabbitMq, e)),
    );
    create_source(&pool, &schema, rows).await;
    let topic = resync_bus::naming::topic_name(Some(&namespace), "listing", Stream::Resync);
    let queue = unique_name("bench-q");
    transport.declare_topic(&topic, None).await.expect("topic");

    reset_queue(transport.as_ref(), &topic, &queue).await;
    let (sent, raw) = raw_read_and_publish(&pool, &schema, &amqp_url, &topic).await;
    assert_eq!(sent, rows);
    let mut figures = vec![("raw read + raw lapin publish".to_string(), raw)];
    for readers in [1, 4] {
        reset_queue(transport.as_ref(), &topic, &queue).await;
        let elapsed = job(&pool, &schema, &namespace, transport.as_ref(), readers).await;
        figures.push((format!("resync job, {readers} reader(s)"), elapsed));
    }

    println!(
        "snapshot -> RabbitMQ (topic exchange + quorum queue), {rows} rows, chunks/confirm batches of {CHUNK}"
    );
    let rate = |d: &Duration| rows as f64 / d.as_secs_f64();
    for (name, elapsed) in &figures {
        println!(
            "{name:<34} {:>10.0} rows/s {:>7.0}% of raw",
            rate(elapsed),
            100.0 * rate(elapsed) / rate(&raw)
        );
    }

    transport.delete_queue(&queue).await.expect("cleanup");
    transport.delete_topic(&topic).await.expect("cleanup");
    sqlx::query(schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&pool).await.expect("cleanup");
}
