//! `resync job` end to end: a resync job SIGKILLed at about 30% and resumed publishes every
//! row of its source table on the resync stream, as resync events of the job.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use fare_config::Topology;
use resync_bus::{Stream, TransportConfig};
use resync_demo::scenario::{Expected, SourceTable};
use resync_migrations::Schema;
use resync_testkit::{Service, service_unreachable, unique_name};

use crate::relay::Process;

const ROWS: usize = 10_000;
const CHUNK: i64 = 200;

fn resync(config_dir: &std::path::Path, schema: &Schema, namespace: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_resync"));
    command
        .env("RESYNC_CONFIG_DIR", config_dir)
        .env("RESYNC_TRANSPORT", "rabbitmq")
        .env("RESYNC_SCHEMA", schema.name())
        .env("RESYNC_NAMESPACE", namespace)
        .env("RESYNC_DATABASE_URL", Service::Postgres.url())
        .env("RESYNC_AMQP_URL", Service::RabbitMq.url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_at_30_percent_resumes_from_its_checkpoint_and_misses_no_entity() {
    let namespace = unique_name("job");
    let schema = Schema::new(namespace.replace('-', "_")).expect("schema");
    if let Err(err) = resync_migrations::migrate(&Service::Postgres.url(), &schema).await {
        service_unreachable(Service::Postgres, err);
    }
    let pool = sqlx::PgPool::connect(&Service::Postgres.url()).await.expect("postgres");
    let rows: BTreeMap<String, Expected> = (0..ROWS)
        .map(|i| {
            let state = Expected {
                version: 1 + (i % 7) as i64,
                deleted: i % 13 == 0,
                data: serde_json::json!({"n": i}),
            };
            (format!("L{i:05}"), state)
        })
        .collect();
    SourceTable::create(&pool, &schema)
        .await
        .expect("source table")
        .insert_all(&pool, &rows)
        .await
        .expect("rows");

    let config_dir = std::env::temp_dir().join(&namespace);
    std::fs::create_dir_all(&config_dir).expect("config dir");
    let listings = format!(
        "name = \"listings\"\npublishes = [\"listing.updated\", \"listing.deleted\"]\n[[sources]]\n\
         entity = \"listing\"\ntable = \"{}.listings\"\ndata_column = \"data\"\ndeleted_column = \"deleted\"\n",
        schema.name()
    );
    std::fs::write(config_dir.join("listings.toml"), listings).expect("config");
    std::fs::write(
        config_dir.join("sync.toml"),
        "name = \"sync\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\nstreams = [\"resync\"]\n",
    )
    .expect("config");
    let transport = match TransportConfig::named("rabbitmq").expect("transport").connect().await {
        Ok(transport) => transport,
        Err(err) => service_unreachable(Service::RabbitMq, err),
    };
    let topology = Topology::desired(&fare_config::load_dir(&config_dir).expect("config"), Some(&namespace));
    fare_config::apply(transport.as_ref(), &topology).await.expect("fare apply");

    let start = ["job", "start", "--entity", "listing", "--rate", "2500", "--chunk-size", &CHUNK.to_string()];
    let mut first = Process(
        resync(&config_dir, &schema, &namespace).args(start).stdout(Stdio::null()).spawn().expect("start"),
    );
    let progress = schema.sql("SELECT id, emitted, total FROM {schema}.jobs");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let job: uuid::Uuid = loop {
        let row: Option<(uuid::Uuid, i64, Option<i64>)> =
            sqlx::query_as(progress.clone()).fetch_optional(&pool).await.expect("job progress");
        if let Some((id, emitted, Some(total))) = row
            && emitted * 10 >= total * 3
        {
            break id;
        }
        assert!(tokio::time::Instant::now() < deadline, "the job never reached 30%: {row:?}");
        assert!(first.0.try_wait().expect("job process").is_none(), "the job process exited early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.0.kill().expect("SIGKILL the job");
    let _ = first.0.wait();
    let (emitted_at_kill,): (i64,) = sqlx::query_as(schema.sql("SELECT emitted FROM {schema}.jobs"))
        .fetch_one(&pool)
        .await
        .expect("progress");
    assert!(emitted_at_kill < ROWS as i64, "killed before the end ({emitted_at_kill} published)");

    let resumed = resync(&config_dir, &schema, &namespace)
        .args(["job", "resume", &job.to_string()])
        .output()
        .expect("resume");
    assert!(resumed.status.success(), "resume failed: {}", String::from_utf8_lossy(&resumed.stderr));
    let status = resync(&config_dir, &schema, &namespace)
        .args(["job", "status", &job.to_string(), "--json"])
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(status["status"], "published", "{status}");
    assert_eq!(status["total"], ROWS);

    let queue = resync_bus::naming::queue_name(Some(&namespace), "sync", Stream::Resync);
    let mut subscription =
        transport.subscribe(&queue, resync_bus::SubscribeOptions { prefetch: 500 }).await.expect("subscribe");
    let mut seen = BTreeSet::new();
    let mut received = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < ROWS {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {ROWS} entities arrived", seen.len());
        for delivery in subscription.next_batch(500, Duration::from_millis(500)).await.expect("receive") {
            let event = delivery.envelope(&Default::default()).expect("a valid envelope");
            assert_eq!((event.stream, event.job_id), (Stream::Resync, Some(job)));
            let expected = &rows[&event.entity_id];
            assert_eq!((event.version, event.deleted), (expected.version, expected.deleted));
            let verb = if expected.deleted { "listing.deleted" } else { "listing.updated" };
            assert_eq!(event.event_type, verb);
            seen.insert(event.entity_id);
            received += 1;
            delivery.ack().await.expect("ack");
        }
    }
    // The chunk in flight at the kill may be sent twice; nothing more.
    assert!(received - ROWS <= CHUNK as usize, "{received} events for {ROWS} rows");

    let _ = subscription.close().await;
    let _ = fare_config::delete(transport.as_ref(), &topology).await;
    let _ = sqlx::query(schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&pool).await;
    let _ = std::fs::remove_dir_all(&config_dir);
}
