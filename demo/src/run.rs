//! `resync demo`: the whole system on the local services, in one process (consumers each with
//! their own broker connection, as separate processes would have), then a report.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fare_config::{Catalog, Topology};
use futures::future::join_all;
use rand::Rng;
use resync_apisim::{Config as ApiConfig, Latency};
use resync_bus::{Transport, TransportConfig};
use resync_consumer::service::{DEFAULT_LOCK_LEASE, Runtime, lock_config};
use resync_consumer::store::EntityKey;
use resync_consumer::{Consumer, Outcome, Pooling};
use resync_migrations::Schema;
use resync_producer::{NewEvent, Relay, RelayConfig, ReplayRequest, ReplayTarget};
use resync_snapshotter::JobOptions;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::scenario::{Expected, Mismatch, SourceTable, compare};

/// What the demo runs against and how big it is.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// `rabbitmq` or `sns-sqs`.
    pub transport: String,
    pub database_url: String,
    pub redis_url: String,
    /// Listings created, then updated at random.
    pub entities: usize,
    /// Update transactions after the creates (each updates or deletes one listing).
    pub updates: usize,
    pub writers: usize,
    pub consumers: usize,
    /// Longest wait for the third party to converge.
    pub deadline: Duration,
    /// Keep the schema, queues and topics afterwards (to inspect them).
    pub keep: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            transport: "rabbitmq".into(),
            database_url: "postgres://postgres@127.0.0.1:5432/test".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            entities: 1_000,
            updates: 4_000,
            writers: 8,
            consumers: 4,
            deadline: Duration::from_secs(300),
            keep: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{what}: {detail}")]
    Step { what: &'static str, detail: String },
    #[error(
        "the third party did not converge within {waited:?}: {mismatches} entities differ from the database \
         (is a service down? run scripts/services-up)\n{detail}"
    )]
    NotConverged { waited: Duration, mismatches: usize, detail: String },
}

pub(crate) fn step<E: fmt::Display>(what: &'static str) -> impl FnOnce(E) -> DemoError {
    move |e| DemoError::Step { what, detail: e.to_string() }
}

/// What happened, for the report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub transport: String,
    pub entities: usize,
    pub live_events: i64,
    pub replayed_duplicates: u64,
    pub resync_events: usize,
    pub outcomes: BTreeMap<&'static str, u64>,
    pub retries: u64,
    pub api_writes: u64,
    pub api_stale_overwrites: usize,
    pub api_requests_refused: u64,
    pub mismatches: usize,
    pub elapsed: Duration,
}

impl Report {
    /// The third party ended equal to the database, and no stale write stayed.
    pub fn converged(&self) -> bool {
        self.mismatches == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |k: &str| self.outcomes.get(k).copied().unwrap_or(0);
        writeln!(
            f,
            "resync demo on {} — {} listings, {:.1}s",
            self.transport,
            self.entities,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "  events emitted (outbox)        {:>8}", self.live_events)?;
        writeln!(f, "  duplicates injected (replay)   {:>8}", self.replayed_duplicates)?;
        writeln!(f, "  resync events                  {:>8}", self.resync_events)?;
        writeln!(f, "  applied                        {:>8}", n("applied"))?;
        writeln!(f, "  repaired after a lost lock     {:>8}", n("repaired"))?;
        writeln!(f, "  skipped (unchanged)            {:>8}", n("skipped_unchanged"))?;
        writeln!(f, "  stale (newer already applied)  {:>8}", n("stale"))?;
        writeln!(f, "  duplicates                     {:>8}", n("duplicate"))?;
        writeln!(f, "  retries (429/5xx/timeouts)     {:>8}", self.retries)?;
        writeln!(f, "  requeued for later             {:>8}", n("requeued"))?;
        writeln!(f, "  dead-lettered                  {:>8}", n("dead_lettered"))?;
        writeln!(f, "  third-party writes applied     {:>8}", self.api_writes)?;
        writeln!(f, "  third-party refusals (429/5xx) {:>8}", self.api_requests_refused)?;
        writeln!(f, "  stale overwrites at the API    {:>8}", self.api_stale_overwrites)?;
        let verdict = if self.converged() {
            "YES — the third party equals the database".to_string()
        } else {
            format!("NO — {} entities differ", self.mismatches)
        };
        write!(f, "  final state equals database    {verdict}")
    }
}

/// Everything the demo created, to remove at the end.
pub(crate) struct Stage {
    pub(crate) schema: Schema,
    pub(crate) namespace: String,
    pub(crate) pool: PgPool,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) topology: Topology,
    pub(crate) config_dir: PathBuf,
}

/// Runs the demo and returns its report; an error if a step failed or the third party did
/// not converge in time.
pub async fn run(options: &DemoOptions) -> Result<Report, DemoError> {
    let started = Instant::now();
    let api = resync_apisim::start(faults()).await.map_err(step("starting the API simulator"))?;
    let client = api.client().map_err(step("API simulator client"))?;
    let api_url = api.url();
    let configs = |dir: &std::path::Path, schema: &Schema| write_service_configs(dir, &api_url, schema);
    let stage = provision("demo", &options.transport, &options.database_url, &configs).await?;
    let result = drive(options, &stage, &client).await;
    if !options.keep {
        cleanup(&stage).await;
    }
    let _ = api.shutdown().await;
    let mut report = result?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// 5% server errors, a rate limit, some latency and a few writes that are applied but answered
/// with a timeout.
fn faults() -> ApiConfig {
    ApiConfig {
        rate_limit_per_sec: Some(1_500.0),
        error_rate: 0.05,
        latency: Some(Latency::LogNormal { p50_ms: 2.0, p99_ms: 40.0 }),
        applied_then_timeout_rate: 0.005,
        applied_then_timeout_delay_ms: 1_500,
        ..ApiConfig::default()
    }
}

/// A namespace of topics and queues (`<prefix>-<suffix>`), a schema, and the service configs
/// `write_configs` puts in a fresh directory, provisioned with fare.
pub(crate) async fn provision(
    prefix: &str,
    transport: &str,
    database_url: &str,
    write_configs: &dyn Fn(&std::path::Path, &Schema) -> std::io::Result<()>,
) -> Result<Stage, DemoError> {
    let suffix = format!("{:x}", uuid::Uuid::now_v7().as_u128() & 0xffff_ffff);
    let namespace = format!("{prefix}-{suffix}");
    let schema = Schema::new(format!("resync_{prefix}_{suffix}")).map_err(step("schema name"))?;
    let config_dir = std::env::temp_dir().join(&namespace);
    write_configs(&config_dir, &schema).map_err(step("writing the service configs"))?;
    let catalog = fare_config::load_dir(&config_dir).map_err(step("loading the service configs"))?;
    let transport = TransportConfig::named(transport)
        .map_err(step("choosing the transport"))?
        .connect()
        .await
        .map_err(step("connecting to the broker (run scripts/services-up)"))?;
    let topology = Topology::desired(&catalog, Some(&namespace));
    fare_config::apply(transport.as_ref(), &topology).await.map_err(step("fare apply"))?;
    info!(%namespace, "provisioned topics and queues with fare");
    resync_migrations::migrate(database_url, &schema)
        .await
        .map_err(step("migrating Postgres (run scripts/services-up)"))?;
    let pool = resync_consumer::Db::connect(database_url, 16, Pooling::Direct)
        .await
        .map_err(step("connecting to Postgres"))?
        .pool()
        .clone();
    Ok(Stage { schema, namespace, pool, transport, topology, config_dir })
}

/// `listings.toml` in `dir` (created): the service publishing listings, with its source table
/// in `schema` mapped for resync jobs.
pub(crate) fn write_listings_config(dir: &std::path::Path, schema: &Schema) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("listings.toml"),
        format!(
            "name = \"listings\"\npublishes = [\"listing.created\", \"listing.updated\", \"listing.deleted\"]\n\n\
             [[sources]]\nentity = \"listing\"\ntable = \"{}.listings\"\ndata_column = \"data\"\n\
             deleted_column = \"deleted\"\n",
            schema.name()
        ),
    )
}

fn write_service_configs(dir: &std::path::Path, api_url: &str, schema: &Schema) -> std::io::Result<()> {
    write_listings_config(dir, schema)?;
    std::fs::write(
        dir.join("channel-sync.toml"),
        format!(
            "name = \"channel-sync\"\n\n[[subscriptions]]\ntypes = [\"listing.*\"]\nstreams = [\"live\", \"resync\"]\n\
             max_receive_count = 10\n\n[sink]\nurl = \"{api_url}/entities/listing/{{entity_id}}\"\ntimeout = \"1s\"\n\n\
             [consumer]\nconcurrency = 64\nprefetch = 64\nbatch_size = 32\n"
        ),
    )
}

async fn drive(
    options: &DemoOptions,
    stage: &Stage,
    client: &resync_apisim::Client,
) -> Result<Report, DemoError> {
    let source =
        SourceTable::create(&stage.pool, &stage.schema).await.map_err(step("creating the source table"))?;
    let catalog = fare_config::load_dir(&stage.config_dir).map_err(step("loading the service configs"))?;
    let shutdown = CancellationToken::new();
    let relay = start_relay(options, stage, shutdown.clone()).await?;
    let consumers = start_consumers(options, stage, &catalog, shutdown.clone()).await?;

    write_through_outbox(options, stage, &source).await?;
    let replayed = replay_some(stage).await?;
    let resync_events = run_resync_job(stage, &catalog).await?;
    let converged = wait_until_equal(options, stage, &source, client, &catalog).await;

    shutdown.cancel();
    let tallies: Vec<_> = consumers.iter().map(|(c, _)| c.tally()).collect();
    for (_, handle) in consumers {
        let _ = handle.await;
    }
    let _ = relay.await;
    let mismatches = converged?;

    let mut report = Report {
        transport: options.transport.clone(),
        entities: options.entities,
        live_events: log_extent(stage).await?.events,
        replayed_duplicates: replayed,
        resync_events,
        mismatches,
        ..Report::default()
    };
    for outcome in Outcome::ALL {
        report.outcomes.insert(outcome.label(), tallies.iter().map(|t| t.count(outcome)).sum());
    }
    report.retries = tallies.iter().map(|t| t.retries()).sum();
    let stats = client.stats().await.map_err(step("reading API stats"))?;
    let check = client.check().await.map_err(step("reading the API's write check"))?;
    report.api_writes = check.writes;
    report.api_stale_overwrites = check.stale_overwrites.len();
    report.api_requests_refused =
        stats.by_status.iter().filter(|(s, _)| **s == 429 || **s >= 500).map(|(_, n)| n).sum();
    Ok(report)
}

async fn start_relay(
    options: &DemoOptions,
    stage: &Stage,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, DemoError> {
    let mut config = RelayConfig::new(stage.schema.clone());
    config.namespace = Some(stage.namespace.clone());
    config.poll_interval = Duration::from_millis(100);
    let relay = Relay::new(options.database_url.clone(), stage.transport.clone(), config);
    Ok(tokio::spawn(async move { relay.run(shutdown).await }))
}

type Running = (Arc<Consumer>, tokio::task::JoinHandle<()>);

async fn start_consumers(
    options: &DemoOptions,
    stage: &Stage,
    catalog: &Catalog,
    shutdown: CancellationToken,
) -> Result<Vec<Running>, DemoError> {
    let service = catalog
        .service("channel-sync")
        .ok_or_else(|| DemoError::Step { what: "demo config", detail: "no channel-sync service".into() })?;
    let runtime = Runtime {
        database_url: options.database_url.clone(),
        schema: stage.schema.clone(),
        namespace: Some(stage.namespace.clone()),
        redis_url: options.redis_url.clone(),
        lock: lock_config(DEFAULT_LOCK_LEASE),
        db_pool_size: 4,
        db_pooling: Pooling::Direct,
    };
    let mut running = Vec::new();
    for _ in 0..options.consumers {
        // Each consumer its own broker connection, as a separate process would have.
        let transport = TransportConfig::named(&options.transport)
            .map_err(step("choosing the transport"))?
            .connect()
            .await
            .map_err(step("connecting a consumer to the broker"))?;
        let consumer = Arc::new(
            resync_consumer::service::build(service, transport, &runtime)
                .await
                .map_err(step("starting a consumer"))?,
        );
        let (task_consumer, token) = (consumer.clone(), shutdown.clone());
        let handle = tokio::spawn(async move {
            if let Err(err) = task_consumer.run(token).await {
                tracing::error!(error = %err, "consumer stopped");
            }
        });
        running.push((consumer, handle));
    }
    Ok(running)
}

/// Creates every listing, then updates (2% deletes) random ones from several writers, each
/// change in one transaction with its event.
async fn write_through_outbox(
    options: &DemoOptions,
    stage: &Stage,
    source: &SourceTable,
) -> Result<(), DemoError> {
    let ids: Vec<String> = (0..options.entities).map(|e| format!("L{e:05}")).collect();
    for chunk in ids.chunks(200) {
        let mut tx = stage.pool.begin().await.map_err(step("writing listings"))?;
        for id in chunk {
            let data = json!({"title": format!("listing {id}"), "price": 100});
            write_one(&mut tx, stage, source, "listing.created", id, data).await?;
        }
        tx.commit().await.map_err(step("writing listings"))?;
    }
    info!(listings = ids.len(), "created listings through the outbox");
    let per_writer = options.updates / options.writers.max(1);
    let writers = (0..options.writers.max(1)).map(|_| async {
        for _ in 0..per_writer {
            let (id, delete, price) = {
                let mut rng = rand::rng();
                (
                    ids[rng.random_range(0..ids.len())].clone(),
                    rng.random_bool(0.02),
                    rng.random_range(50..5000),
                )
            };
            let mut tx = stage.pool.begin().await.map_err(step("updating listings"))?;
            if delete {
                write_one(&mut tx, stage, source, "listing.deleted", &id, serde_json::Value::Null).await?;
            } else {
                let data = json!({"title": format!("listing {id}"), "price": price});
                write_one(&mut tx, stage, source, "listing.updated", &id, data).await?;
            }
            tx.commit().await.map_err(step("updating listings"))?;
        }
        Ok::<(), DemoError>(())
    });
    join_all(writers).await.into_iter().collect::<Result<Vec<_>, _>>()?;
    info!(updates = per_writer * options.writers.max(1), "updated listings through the outbox");
    Ok(())
}

async fn write_one(
    tx: &mut sqlx::PgConnection,
    stage: &Stage,
    source: &SourceTable,
    event_type: &str,
    id: &str,
    data: serde_json::Value,
) -> Result<(), DemoError> {
    let mut event = NewEvent::new(event_type, id, data.clone());
    event.deleted = event_type.ends_with(".deleted");
    let emitted = resync_producer::emit(tx, &stage.schema, &event).await.map_err(step("emit"))?;
    let state = Expected { version: emitted.version, deleted: event.deleted, data };
    source.upsert(tx, id, &state).await.map_err(step("writing the source row"))
}

/// Republishes the first tenth of the log to every subscriber: duplicates the consumers must
/// recognise.
async fn replay_some(stage: &Stage) -> Result<u64, DemoError> {
    let log = log_extent(stage).await?;
    let request = ReplayRequest {
        from: log.first_seq,
        to: Some(log.first_seq + (log.events / 10).max(1) - 1),
        entity_type: None,
        target: ReplayTarget::AllSubscribers { namespace: Some(stage.namespace.clone()) },
    };
    let replayed = resync_producer::replay(&stage.pool, &stage.schema, &stage.transport, &request)
        .await
        .map_err(step("replay"))?;
    Ok(replayed.sent)
}

/// A resync job over every listing (as `resync job start --entity listing` runs it), from a
/// snapshot of the table as it is now, while live events may still be in flight: the version
/// rule keeps the two streams correct together. Returns once the sink applied every row.
pub(crate) async fn run_resync_job(stage: &Stage, catalog: &Catalog) -> Result<usize, DemoError> {
    let source = catalog.services.iter().flat_map(|s| s.sources.iter()).find(|s| s.entity == "listing");
    let source = source.ok_or_else(|| DemoError::Step {
        what: "finding the listings source",
        detail: "the demo's listings.toml maps no source".into(),
    })?;
    let sinks = catalog.services.iter().filter(|s| s.sink.is_some()).map(|s| s.sink_name()).collect();
    let options = JobOptions { sinks, ..JobOptions::default() };
    let (pool, schema) = (&stage.pool, &stage.schema);
    let id = resync_snapshotter::start(pool, schema, Some(&stage.namespace), source, &options)
        .await
        .map_err(step("creating the resync job"))?;
    let published = resync_snapshotter::run(pool, schema, stage.transport.as_ref(), id)
        .await
        .map_err(step("running the resync job"))?;
    info!(job = %id, events = published.emitted, "resync job published every listing");
    let done = resync_snapshotter::await_completion(pool, schema, id, Duration::from_millis(200))
        .await
        .map_err(step("waiting for the resync job to complete"))?;
    info!(job = %id, status = %done.status, "resync job applied at the sink");
    Ok(published.emitted as usize)
}

/// Polls until the third party equals the source table and every queue is empty (so the
/// report counts every event); returns the mismatch count at the end (0 when converged).
async fn wait_until_equal(
    options: &DemoOptions,
    stage: &Stage,
    source: &SourceTable,
    client: &resync_apisim::Client,
    catalog: &Catalog,
) -> Result<usize, DemoError> {
    let started = Instant::now();
    loop {
        let expected = source.read_all(&stage.pool).await.map_err(step("reading the source table"))?;
        let actual = client.state().await.map_err(step("reading the API's state"))?;
        let mismatches = compare("listing", &expected, &actual);
        if mismatches.is_empty() && queues_drained(stage).await {
            return Ok(0);
        }
        if started.elapsed() > options.deadline {
            let detail = explain(stage, catalog, &mismatches).await;
            return Err(DemoError::NotConverged {
                waited: started.elapsed(),
                mismatches: mismatches.len(),
                detail,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// For the first few entities that differ: what the database, the third party and the
/// consumers' records (applied version, started call) hold, so a failure explains itself.
async fn explain(stage: &Stage, catalog: &Catalog, mismatches: &[Mismatch]) -> String {
    const SHOWN: usize = 10;
    let sinks: Vec<String> =
        catalog.services.iter().filter(|s| s.sink.is_some()).map(|s| s.sink_name()).collect();
    let store = resync_consumer::AppliedStore::new(stage.pool.clone(), stage.schema.clone());
    let mut out = String::new();
    for mismatch in mismatches.iter().take(SHOWN) {
        out.push_str(&format!(
            "  listing/{}: database {:?}; third party {:?}",
            mismatch.entity_id, mismatch.expected, mismatch.actual
        ));
        for sink in &sinks {
            let key = EntityKey { sink, entity_type: "listing", entity_id: &mismatch.entity_id };
            match store.current(key).await {
                Ok(current) => out.push_str(&format!(
                    "; {sink} applied {:?}, call started for version {:?}",
                    current.applied.map(|a| (a.version, a.deleted, a.data)),
                    current.started
                )),
                Err(err) => out.push_str(&format!("; {sink}: cannot read applied_versions: {err}")),
            }
        }
        out.push('\n');
    }
    if mismatches.len() > SHOWN {
        out.push_str(&format!("  ... and {} more\n", mismatches.len() - SHOWN));
    }
    out
}

async fn queues_drained(stage: &Stage) -> bool {
    for queue in stage.topology.queues.keys() {
        match stage.transport.queue_depth(queue).await {
            Ok(depth) if depth.ready == 0 && depth.in_flight == 0 => {}
            _ => return false,
        }
    }
    true
}

async fn log_extent(stage: &Stage) -> Result<resync_producer::LogExtent, DemoError> {
    resync_producer::extent(&stage.pool, &stage.schema).await.map_err(step("reading the event log"))
}

pub(crate) async fn cleanup(stage: &Stage) {
    let _ = fare_config::delete(stage.transport.as_ref(), &stage.topology).await;
    let _ = sqlx::query(stage.schema.sql("DROP SCHEMA {schema} CASCADE")).execute(&stage.pool).await;
    let _ = std::fs::remove_dir_all(&stage.config_dir);
    let _ = stage.transport.close().await;
}
