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

/// A source table of `rows`, a `listings` service mapping it, a `sync` service subscribed on
/// the resync stream, their topology on RabbitMQ, and resync's schema.
struct Setup {
    /// The shared Postgres, unless a test runs its own.
    database_url: String,
    namespace: String,
    schema: Schema,
    pool: sqlx::PgPool,
    config_dir: std::path::PathBuf,
    transport: std::sync::Arc<dyn resync_bus::Transport>,
    topology: Topology,
    rows: BTreeMap<String, Expected>,
}

impl Setup {
    async fn new(count: usize) -> Self {
        Self::on(Service::Postgres.url(), count).await
    }

    async fn on(database_url: String, count: usize) -> Self {
        let namespace = unique_name("job");
        let schema = Schema::new(namespace.replace('-', "_")).expect("schema");
        if let Err(err) = resync_migrations::migrate(&database_url, &schema).await {
            service_unreachable(Service::Postgres, err);
        }
        let pool = sqlx::PgPool::connect(&database_url).await.expect("postgres");
        let rows: BTreeMap<String, Expected> = (0..count)
            .map(|i| {
                let state = Expected {
                    version: 1 + (i % 7) as i64,
                    deleted: i % 13 == 0,
                    data: serde_json::json!({"n": i}),
                };
                (format!("L{i:05}"), state)
            })
            .collect();
        let table = SourceTable::create(&pool, &schema).await.expect("source table");
        table.insert_all(&pool, &rows).await.expect("rows");
        let config_dir = std::env::temp_dir().join(&namespace);
        std::fs::create_dir_all(&config_dir).expect("config dir");
        let listings = format!(
            "name = \"listings\"\npublishes = [\"listing.updated\", \"listing.deleted\"]\n[[sources]]\n\
             entity = \"listing\"\ntable = \"{}.listings\"\ndata_column = \"data\"\ndeleted_column = \"deleted\"\n\
             version_column = \"version\"\n",
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
        let topology =
            Topology::desired(&fare_config::load_dir(&config_dir).expect("config"), Some(&namespace));
        fare_config::apply(transport.as_ref(), &topology).await.expect("fare apply");
        Self { database_url, namespace, schema, pool, config_dir, transport, topology, rows }
    }

    fn resync(&self) -> Command {
        let mut command = resync(&self.config_dir, &self.schema, &self.namespace);
        command.env("RESYNC_DATABASE_URL", &self.database_url);
        command
    }

    /// Receives resync events from the sync service's queue until `expected` distinct entities
    /// arrived; checks each against its row and the job; returns the ids and the event count.
    async fn receive(&self, job: uuid::Uuid, expected: usize) -> (BTreeSet<String>, usize) {
        let queue = resync_bus::naming::queue_name(Some(&self.namespace), "sync", Stream::Resync);
        let options = resync_bus::SubscribeOptions { prefetch: 500 };
        let mut subscription = self.transport.subscribe(&queue, options).await.expect("subscribe");
        let (mut seen, mut received) = (BTreeSet::new(), 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while seen.len() < expected {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {expected} entities arrived",
                seen.len()
            );
            for delivery in subscription.next_batch(500, Duration::from_millis(500)).await.expect("receive") {
                let event = delivery.envelope(&Default::default()).expect("a valid envelope");
                assert_eq!((event.stream, event.job_id), (Stream::Resync, Some(job)));
                let row = &self.rows[&event.entity_id];
                assert_eq!((event.version, event.deleted), (row.version, row.deleted));
                let verb = if row.deleted { "listing.deleted" } else { "listing.updated" };
                assert_eq!(event.event_type, verb);
                seen.insert(event.entity_id);
                received += 1;
                delivery.ack().await.expect("ack");
            }
        }
        // Anything beyond the expected entities would arrive within a short wait.
        let extra = subscription.next_batch(500, Duration::from_millis(500)).await.expect("receive");
        for delivery in extra {
            let event = delivery.envelope(&Default::default()).expect("a valid envelope");
            seen.insert(event.entity_id);
            received += 1;
            delivery.ack().await.expect("ack");
        }
        let _ = subscription.close().await;
        (seen, received)
    }

    async fn cleanup(self) {
        let _ = fare_config::delete(self.transport.as_ref(), &self.topology).await;
        let _ = sqlx::query(self.schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&self.pool).await;
        let _ = std::fs::remove_dir_all(&self.config_dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_at_30_percent_resumes_from_its_checkpoint_and_misses_no_entity() {
    let setup = Setup::new(ROWS).await;
    let chunk = CHUNK.to_string();
    let start =
        ["job", "start", "--entity", "listing", "--rate", "2500", "--chunk-size", &chunk, "--readers", "4"];
    let mut first = Process(setup.resync().args(start).stdout(Stdio::null()).spawn().expect("start"));
    let progress = setup.schema.sql("SELECT id, emitted, total FROM {schema}.jobs");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let job: uuid::Uuid = loop {
        let row: Option<(uuid::Uuid, i64, Option<i64>)> =
            sqlx::query_as(progress.clone()).fetch_optional(&setup.pool).await.expect("job progress");
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
    let (emitted_at_kill,): (i64,) = sqlx::query_as(setup.schema.sql("SELECT emitted FROM {schema}.jobs"))
        .fetch_one(&setup.pool)
        .await
        .expect("progress");
    assert!(emitted_at_kill < ROWS as i64, "killed before the end ({emitted_at_kill} published)");

    let resumed = setup.resync().args(["job", "resume", &job.to_string()]).output().expect("resume");
    assert!(resumed.status.success(), "resume failed: {}", String::from_utf8_lossy(&resumed.stderr));
    let status = setup.resync().args(["job", "status", &job.to_string(), "--json"]).output().expect("status");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(status["status"], "published", "{status}");
    assert_eq!(status["total"], ROWS);

    let (seen, received) = setup.receive(job, ROWS).await;
    assert_eq!(seen.len(), ROWS, "every entity, once the job resumed");
    // The chunk each of the 4 readers had in flight at the kill may be sent twice; nothing more.
    assert!(received - ROWS <= 4 * CHUNK as usize, "{received} events for {ROWS} rows");
    setup.cleanup().await;
}

/// After a sink refused some entities (recorded by the consumer), `--only-rejected` resends
/// exactly those, to that service only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_rejected_resends_exactly_the_entities_the_sink_dead_lettered() {
    let setup = Setup::new(300).await;
    let rejected = ["L00007", "L00026", "L00150", "L00299"];
    for id in rejected {
        sqlx::query(setup.schema.sql(
            "INSERT INTO {schema}.dead_lettered_entities (sink, entity_type, entity_id, version, reason) \
             VALUES ('sync', 'listing', $1, 1, 'sink-rejected-422')",
        ))
        .bind(id)
        .execute(&setup.pool)
        .await
        .expect("record a rejection");
    }
    let other_sink = "INSERT INTO {schema}.dead_lettered_entities (sink, entity_type, entity_id, version, reason) \
                      VALUES ('elsewhere', 'listing', 'L00001', 1, 'sink-rejected-400')";
    sqlx::query(setup.schema.sql(other_sink)).execute(&setup.pool).await.expect("another sink's rejection");

    let args = ["job", "start", "--entity", "listing", "--target-service", "sync", "--only-rejected"];
    let started = setup.resync().args(args).output().expect("job start");
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let stdout = String::from_utf8_lossy(&started.stdout);
    let job: uuid::Uuid = stdout
        .lines()
        .find_map(|l| l.strip_prefix("job "))
        .and_then(|id| id.trim().parse().ok())
        .unwrap_or_else(|| panic!("no job id in {stdout}"));

    let (seen, received) = setup.receive(job, rejected.len()).await;
    assert_eq!(seen, rejected.iter().map(|s| s.to_string()).collect(), "exactly the rejected entities");
    assert_eq!(received, rejected.len());
    setup.cleanup().await;
}

/// `job verify` compares the source with what a sink applied: an entity never applied and one
/// applied at an older version are listed, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_lists_exactly_the_entities_a_sink_has_not_applied_at_their_source_version() {
    let setup = Setup::new(500).await;
    let started =
        setup.resync().args(["job", "start", "--entity", "listing", "--detach"]).output().expect("start");
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let stdout = String::from_utf8_lossy(&started.stdout);
    let job = stdout.lines().find_map(|l| l.strip_prefix("job ")).expect("job id").trim().to_string();
    let (missing, behind) = ("L00042", "L00321");
    for (id, row) in &setup.rows {
        if id == missing {
            continue;
        }
        let version = if id == behind { row.version - 1 } else { row.version };
        sqlx::query(setup.schema.sql(
            "INSERT INTO {schema}.applied_versions \
             (sink, entity_type, entity_id, version, content_hash, deleted, data, event_id) \
             VALUES ('sync', 'listing', $1, $2, '\\x00', $3, '{}', gen_random_uuid())",
        ))
        .bind(id)
        .bind(version.max(0))
        .bind(row.deleted)
        .execute(&setup.pool)
        .await
        .expect("applied version");
    }

    let verified =
        setup.resync().args(["job", "verify", &job, "--sink", "sync", "--json"]).output().expect("verify");
    assert_eq!(
        verified.status.code(),
        Some(1),
        "drift makes verify fail: {}",
        String::from_utf8_lossy(&verified.stderr)
    );
    let reports: serde_json::Value = serde_json::from_slice(&verified.stdout).expect("json");
    let report = &reports[0];
    assert_eq!(
        (report["checked"].as_u64(), report["drift_count"].as_u64()),
        (Some(500), Some(2)),
        "{report}"
    );
    let listed: Vec<(&str, Option<i64>)> = report["drift"]
        .as_array()
        .expect("drift")
        .iter()
        .map(|d| (d["entity_id"].as_str().expect("id"), d["applied_version"].as_i64()))
        .collect();
    assert_eq!(listed, [(missing, None), (behind, Some(setup.rows[behind].version - 1))]);
    setup.cleanup().await;
}

/// Parallel readers share one exported snapshot: rows updated after a job started are published
/// as they were when it started, also by the ranges read after the update (here one reader at a
/// time, so ranges 2 to 4 start after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_readers_publish_the_table_as_of_one_snapshot() {
    const ROWS: usize = 2000;
    let setup = Setup::new(ROWS).await;
    let catalog = fare_config::load_dir(&setup.config_dir).expect("config");
    let source = catalog.services.iter().flat_map(|s| s.sources.iter()).next().expect("a source").clone();
    let options = resync_snapshotter::JobOptions {
        rate: Some(2000.0),
        chunk_size: 100,
        readers: 4,
        ..Default::default()
    };
    let (pool, schema) = (setup.pool.clone(), setup.schema.clone());
    let job = resync_snapshotter::start(&pool, &schema, Some(&setup.namespace), &source, &options)
        .await
        .expect("create the job");
    // Room for the snapshot, one reader and the checkpoints: the four ranges run one after another.
    let narrow =
        sqlx::postgres::PgPoolOptions::new().max_connections(3).connect(&Service::Postgres.url()).await;
    let narrow = narrow.expect("postgres");
    let transport = setup.transport.clone();
    let runner = tokio::spawn(async move {
        resync_snapshotter::run(&narrow, &schema, transport.as_ref(), job).await.expect("run the job")
    });
    let progress = setup.schema.sql("SELECT emitted FROM {schema}.jobs");
    loop {
        let emitted: i64 =
            sqlx::query_scalar(progress.clone()).fetch_one(&setup.pool).await.expect("progress");
        if emitted > 0 {
            break;
        }
        assert!(!runner.is_finished(), "the job ended before its first checkpoint was seen");
        tokio::task::yield_now().await;
    }
    let bumped = setup.schema.sql("UPDATE {schema}.listings SET version = version + 100");
    sqlx::query(bumped).execute(&setup.pool).await.expect("update every row");
    let finished = runner.await.expect("runner");
    assert_eq!((finished.status, finished.emitted), (resync_snapshotter::JobStatus::Published, ROWS as i64));
    let ranges: Vec<(i32, bool)> = sqlx::query_as(
        setup
            .schema
            .sql("SELECT range_no, done FROM {schema}.job_ranges WHERE job_id = $1 ORDER BY range_no"),
    )
    .bind(job)
    .fetch_all(&setup.pool)
    .await
    .expect("ranges");
    assert_eq!(ranges, [(0, true), (1, true), (2, true), (3, true)]);
    // `receive` checks every event against the rows as they were before the update.
    let (seen, received) = setup.receive(job, ROWS).await;
    assert_eq!((seen.len(), received), (ROWS, ROWS));
    setup.cleanup().await;
}

/// A job publishes every row of a table keyed by `key_type` exactly once (but for the chunk a
/// reader may repeat after a crash, which does not happen here), and `job verify` counts every
/// row once, with chunk sizes and reader counts where the ids' text order differs from their
/// native order (1, 10, 100, 101, ..., 2, 20, ...): a job once read integer keys in text
/// order against a numeric checkpoint and skipped rows.
async fn every_row_of_a_keyed_table_is_published_once(key: &[(&str, &str)], ids: &[String]) {
    let key_type = key.iter().map(|(name, t)| format!("{name} {t}")).collect::<Vec<_>>().join(", ");
    let namespace = unique_name("keys");
    let schema = Schema::new(namespace.replace('-', "_")).expect("schema");
    if let Err(err) = resync_migrations::migrate(&Service::Postgres.url(), &schema).await {
        service_unreachable(Service::Postgres, err);
    }
    let pool = sqlx::PgPool::connect(&Service::Postgres.url()).await.expect("postgres");
    let table = format!("{}.items", schema.name());
    let names: Vec<&str> = key.iter().map(|(name, _)| *name).collect();
    let create = format!(
        "CREATE TABLE {table} ({key_type}, version bigint NOT NULL, data jsonb, PRIMARY KEY ({}))",
        names.join(", ")
    );
    sqlx::query(sqlx::AssertSqlSafe(create)).execute(&pool).await.expect("create the table");
    // A composite key's entity id is its columns' values joined by `:`.
    let parts: Vec<String> = key
        .iter()
        .enumerate()
        .map(|(i, (_, t))| format!("CAST(split_part(id, ':', {}) AS {t})", i + 1))
        .collect();
    let insert = format!(
        "INSERT INTO {table} ({}, version, data) SELECT {}, 1, jsonb_build_object('id', id) FROM unnest($1::text[]) id",
        names.join(", "),
        parts.join(", ")
    );
    sqlx::query(sqlx::AssertSqlSafe(insert)).bind(ids).execute(&pool).await.expect("rows");
    let config_dir = std::env::temp_dir().join(&namespace);
    std::fs::create_dir_all(&config_dir).expect("config dir");
    let key_config = match names.as_slice() {
        ["id"] => String::new(),
        many => format!("id_columns = {many:?}\n"),
    };
    let items = format!(
        "name = \"items\"\npublishes = [\"item.updated\"]\n[[sources]]\nentity = \"item\"\ntable = \"{table}\"\n\
         data_column = \"data\"\n{key_config}"
    );
    std::fs::write(config_dir.join("items.toml"), items).expect("config");
    let sync = "name = \"sync\"\n[[subscriptions]]\ntypes = [\"item.*\"]\nstreams = [\"resync\"]\n";
    std::fs::write(config_dir.join("sync.toml"), sync).expect("config");
    let transport = match TransportConfig::named("rabbitmq").expect("transport").connect().await {
        Ok(transport) => transport,
        Err(err) => service_unreachable(Service::RabbitMq, err),
    };
    let topology = Topology::desired(&fare_config::load_dir(&config_dir).expect("config"), Some(&namespace));
    fare_config::apply(transport.as_ref(), &topology).await.expect("fare apply");
    let queue = resync_bus::naming::queue_name(Some(&namespace), "sync", Stream::Resync);

    for (chunk, readers) in [("7", "1"), ("10", "3"), ("1000", "2")] {
        let args = ["job", "start", "--entity", "item", "--chunk-size", chunk, "--readers", readers];
        let started = resync(&config_dir, &schema, &namespace).args(args).output().expect("job start");
        assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
        let stdout = String::from_utf8_lossy(&started.stdout);
        let job = stdout.lines().find_map(|l| l.strip_prefix("job ")).expect("job id").trim().to_string();

        let mut subscription = transport.subscribe(&queue, Default::default()).await.expect("subscribe");
        let mut seen = BTreeMap::<String, usize>::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let batch = subscription.next_batch(100, Duration::from_millis(500)).await.expect("receive");
            // `job start` returned once every event was confirmed: an empty queue is the end.
            if batch.is_empty() && transport.queue_depth(&queue).await.expect("depth").ready == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{key_type}: {} of {} rows",
                seen.len(),
                ids.len()
            );
            for delivery in batch {
                let event = delivery.envelope(&Default::default()).expect("a valid envelope");
                assert_eq!(event.data["id"].as_str(), Some(event.entity_id.as_str()), "{key_type}");
                *seen.entry(event.entity_id).or_default() += 1;
                delivery.ack().await.expect("ack");
            }
        }
        let _ = subscription.close().await;
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "{key_type}, chunks of {chunk}, {readers} readers: sent twice {twice:?}");
        let want: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(
            seen.keys().collect::<BTreeSet<_>>(),
            want,
            "{key_type}, chunks of {chunk}, {readers} readers"
        );

        let verify = ["job", "verify", &job, "--sink", "sync", "--json"];
        let verified = resync(&config_dir, &schema, &namespace).args(verify).output().expect("verify");
        let reports: serde_json::Value = serde_json::from_slice(&verified.stdout).expect("verify json");
        assert_eq!(reports[0]["checked"].as_u64(), Some(ids.len() as u64), "{key_type}: {reports}");
    }
    let _ = fare_config::delete(transport.as_ref(), &topology).await;
    let _ = sqlx::query(schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&pool).await;
    let _ = std::fs::remove_dir_all(&config_dir);
}

fn numbers(count: i64, scale: i64) -> Vec<String> {
    (1..=count).map(|n| (n * scale).to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_integer_keys_publishes_every_row_once() {
    every_row_of_a_keyed_table_is_published_once(&[("id", "integer")], &numbers(300, 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_bigint_keys_publishes_every_row_once() {
    // Past 2^32, and of different lengths, so text order and numeric order differ.
    every_row_of_a_keyed_table_is_published_once(&[("id", "bigint")], &numbers(300, 33_333_333)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_uuid_keys_publishes_every_row_once() {
    let ids: Vec<String> = (0..300).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    every_row_of_a_keyed_table_is_published_once(&[("id", "uuid")], &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_text_keys_publishes_every_row_once() {
    every_row_of_a_keyed_table_is_published_once(&[("id", "text")], &numbers(300, 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_a_composite_key_publishes_every_row_once_in_key_order() {
    // Tenants and ids whose text order differs from their numeric order, ids repeated across
    // tenants: (2, 10) comes after (2, 9), and (10, 1) after (9, 300).
    let ids: Vec<String> =
        (1..=12).flat_map(|tenant| (1..=25).map(move |id| format!("{tenant}:{}", id * 12))).collect();
    every_row_of_a_keyed_table_is_published_once(&[("tenant_id", "integer"), ("id", "bigint")], &ids).await;
}

/// `--source-url` reads the rows from a hot standby (the test's own primary and its streaming
/// replica): with the standby's replay paused, a row inserted on the primary afterwards is not
/// published, so the rows came from the standby; the job's state went to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reads_its_rows_from_a_hot_standby_with_source_url() {
    let primary = resync_testkit::OwnPostgres::start();
    let setup = Setup::on(primary.url(), 300).await;
    let standby = primary.start_standby();
    let table = format!("{}.listings", setup.schema.name());
    resync_testkit::poll_some(Duration::from_secs(60), "the standby has the rows", || {
        let count = standby.psql(&format!("SELECT count(*) FROM {table}"));
        async move { (count == "300").then_some(()) }
    })
    .await;
    standby.psql("SELECT pg_wal_replay_pause()");
    let late = format!("INSERT INTO {table} (id, version, deleted, data) VALUES ('late', 1, false, '{{}}')");
    primary.psql(&late);

    let args = ["job", "start", "--entity", "listing", "--source-url", &standby.url()];
    let started = setup.resync().args(args).output().expect("job start");
    assert!(started.status.success(), "job start: {}", String::from_utf8_lossy(&started.stderr));
    let stdout = String::from_utf8_lossy(&started.stdout);
    let job: uuid::Uuid =
        stdout.lines().find_map(|l| l.strip_prefix("job ")?.trim().parse().ok()).expect("job id");

    let (seen, received) = setup.receive(job, 300).await;
    assert_eq!((seen.len(), received), (300, 300), "the standby's rows, each once");
    assert!(!seen.contains("late"), "a row the standby had not replayed was not read");
    let status: String = sqlx::query_scalar(setup.schema.sql("SELECT status FROM {schema}.jobs"))
        .fetch_one(&setup.pool)
        .await
        .expect("the job's state is on the primary");
    assert_eq!(status, "published");
    standby.psql("SELECT pg_wal_replay_resume()");
    setup.cleanup().await;
}

/// A source `filter` is one boolean expression that cannot change the query around it, and a
/// job's start-up check is read-only: a filter that closes the query's parentheses is refused
/// by name (it once sent 1,200 events for 300 rows, or looped for ever), and one that calls
/// `nextval` fails without advancing the sequence (it once advanced it 300 times).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_cannot_escape_its_expression_and_the_start_check_writes_nothing() {
    let setup = Setup::new(30).await;
    let sequence = format!("{}.ticket", setup.schema.name());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SEQUENCE {sequence}")))
        .execute(&setup.pool)
        .await
        .expect("sequence");
    let listings = |filter: &str| {
        format!(
            "name = \"listings\"\npublishes = [\"listing.updated\", \"listing.deleted\"]\n[[sources]]\n\
             entity = \"listing\"\ntable = \"{}.listings\"\ndata_column = \"data\"\ndeleted_column = \"deleted\"\n\
             filter = \"{filter}\"\n",
            setup.schema.name()
        )
    };
    for (filter, expected) in [
        ("1=1) OR (true", "sources[0].filter"),
        (&format!("nextval('{sequence}') > 0") as &str, "read-only transaction"),
    ] {
        std::fs::write(setup.config_dir.join("listings.toml"), listings(filter)).expect("config");
        let started =
            setup.resync().args(["job", "start", "--entity", "listing"]).output().expect("job start");
        let stderr = String::from_utf8_lossy(&started.stderr);
        assert!(!started.status.success(), "`{filter}` was accepted");
        assert!(stderr.contains(expected), "`{filter}`: {stderr}");
    }
    let called: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT is_called FROM {sequence}")))
        .fetch_one(&setup.pool)
        .await
        .expect("sequence state");
    assert!(!called, "the start-up check advanced the sequence");
    let jobs: i64 = sqlx::query_scalar(setup.schema.sql("SELECT count(*) FROM {schema}.jobs"))
        .fetch_one(&setup.pool)
        .await
        .expect("jobs");
    assert_eq!(jobs, 0, "a job that cannot start leaves no job behind");
    setup.cleanup().await;
}

/// A job whose run fails is `failed` with its error, not `running` for ever; `job resume` runs
/// it again once the cause is mended, and resuming a finished job says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_run_fails_is_failed_with_its_error_and_resumes() {
    let setup = Setup::new(50).await;
    let started =
        setup.resync().args(["job", "start", "--entity", "listing", "--detach"]).output().expect("start");
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let stdout = String::from_utf8_lossy(&started.stdout);
    let job = stdout.lines().find_map(|l| l.strip_prefix("job ")).expect("job id").trim().to_string();
    let renamed = setup.schema.sql("ALTER TABLE {schema}.listings RENAME TO listings_away");
    sqlx::query(renamed).execute(&setup.pool).await.expect("take the source away");

    let resumed = setup.resync().args(["job", "resume", &job]).output().expect("resume");
    assert!(!resumed.status.success(), "a run without its source table fails");
    let status = setup.resync().args(["job", "status", &job]).output().expect("status");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains(" failed ") && status.contains("error: "), "{status}");
    assert!(status.contains("listings"), "the error names what failed: {status}");

    let back = setup.schema.sql("ALTER TABLE {schema}.listings_away RENAME TO listings");
    sqlx::query(back).execute(&setup.pool).await.expect("put the source back");
    let resumed = setup.resync().args(["job", "resume", &job]).output().expect("resume");
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let json = setup.resync().args(["job", "status", &job, "--json"]).output().expect("status");
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status json");
    assert_eq!((json["status"].as_str(), json["emitted"].as_i64()), (Some("published"), Some(50)), "{json}");
    assert!(json["error"].is_null(), "the old error is cleared: {json}");

    let cancelled = setup.resync().args(["job", "cancel", &job]).output().expect("cancel");
    assert!(cancelled.status.success(), "{}", String::from_utf8_lossy(&cancelled.stderr));
    let again = setup.resync().args(["job", "resume", &job]).output().expect("resume");
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success() && said.contains("is cancelled: nothing to resume"), "{said}");
    setup.cleanup().await;
}

/// A source that names its own version column must hold the versions `resync.emit` assigned:
/// a job whose sample disagrees refuses to start, naming the entities and both versions (it
/// once sent the column's versions, and live events after them were dropped as stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_column_that_disagrees_with_resync_emit_is_refused_naming_the_entities() {
    let setup = Setup::new(30).await;
    // Column versions are 1 + i % 7: L00000 holds 1 (as emit's first), L00003 and L00010 hold 4.
    for id in ["L00000", "L00003", "L00010"] {
        let emit =
            setup.schema.sql("SELECT version FROM {schema}.emit('listing', $1, 'listing.updated', '{}')");
        sqlx::query(emit).bind(id).execute(&setup.pool).await.expect("resync.emit");
    }
    let started = setup.resync().args(["job", "start", "--entity", "listing"]).output().expect("job start");
    let stderr = String::from_utf8_lossy(&started.stderr);
    assert!(!started.status.success(), "a disagreeing version column was accepted");
    for named in ["version column `version` disagrees", "listing L00003: column 4, resync.emit 1", "L00010"] {
        assert!(stderr.contains(named), "`{named}` not in: {stderr}");
    }
    assert!(!stderr.contains("L00000"), "an agreeing row is not named: {stderr}");
    let jobs: i64 = sqlx::query_scalar(setup.schema.sql("SELECT count(*) FROM {schema}.jobs"))
        .fetch_one(&setup.pool)
        .await
        .expect("jobs");
    assert_eq!(jobs, 0, "a refused job leaves no job behind");
    setup.cleanup().await;
}

/// A source mapped with `data_columns`, a `filter` and no `deleted_column`: exactly the rows the
/// filter keeps go out, each as `listing.updated` whose data is an object of the named columns
/// (a row's own `deleted` column is then plain data, never a tombstone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_sends_data_columns_of_the_filtered_rows_and_no_tombstones_without_a_deleted_column() {
    let setup = Setup::new(100).await;
    let listings = format!(
        "name = \"listings\"\npublishes = [\"listing.updated\", \"listing.deleted\"]\n[[sources]]\n\
         entity = \"listing\"\ntable = \"{}.listings\"\ndata_columns = [\"data\", \"deleted\"]\n\
         version_column = \"version\"\nfilter = \"version > 3\"\n",
        setup.schema.name()
    );
    std::fs::write(setup.config_dir.join("listings.toml"), listings).expect("config");
    let args = ["job", "start", "--entity", "listing", "--chunk-size", "9"];
    let started = setup.resync().args(args).output().expect("job start");
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));

    let kept: BTreeMap<&String, &Expected> = setup.rows.iter().filter(|(_, row)| row.version > 3).collect();
    let queue = resync_bus::naming::queue_name(Some(&setup.namespace), "sync", Stream::Resync);
    let mut subscription = setup.transport.subscribe(&queue, Default::default()).await.expect("subscribe");
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let batch = subscription.next_batch(100, Duration::from_millis(500)).await.expect("receive");
        // `job start` returned once every event was confirmed: an empty queue is the end.
        if batch.is_empty() && setup.transport.queue_depth(&queue).await.expect("depth").ready == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} of {} rows arrived", seen.len(), kept.len());
        for delivery in batch {
            let event = delivery.envelope(&Default::default()).expect("a valid envelope");
            let row = kept
                .get(&event.entity_id)
                .unwrap_or_else(|| panic!("{} is outside the filter", event.entity_id));
            assert_eq!((event.event_type.as_str(), event.deleted), ("listing.updated", false));
            assert_eq!(event.data, serde_json::json!({"data": row.data, "deleted": row.deleted}));
            assert_eq!(event.version, row.version);
            seen.insert(event.entity_id);
            delivery.ack().await.expect("ack");
        }
    }
    let _ = subscription.close().await;
    assert_eq!(seen.len(), kept.len(), "every row the filter keeps, once");
    assert!(kept.values().any(|row| row.deleted), "the sample holds a row marked deleted");
    setup.cleanup().await;
}
