//! # resync-snapshotter: full resync jobs
//!
//! Owns resync jobs: reading a source table (as a service's config maps it) in one consistent
//! snapshot, in id order and in chunks, and publishing one resync event per row on the resync
//! stream, paced, with a checkpoint per confirmed chunk in Postgres (table `jobs`) so a runner
//! killed at any point resumes where it stopped and misses no entity. Also the job's life:
//! start, pause, resume, cancel, status.
//!
//! Does not own applying the events (the consumer, whose version rule makes live and resync
//! events safe together and re-sent chunks harmless), nor the source mapping's format
//! (`fare-config`'s [`SourceSpec`]).
//!
//! Also `verify`: the source's versions against what a sink applied.
//!
//! A published job completes once its sinks applied every row ([`await_completion`], read from
//! the consumers' applied versions, so nothing extra is written per event).
//!
//! Parallel readers: the source is split into key ranges when a job first runs; each range is
//! read by its own reader with its own checkpoint, all in one exported snapshot
//! (`pg_export_snapshot`), so the rows published are the table as of one instant.

mod query;

use std::time::Duration;

use chrono::{DateTime, Utc};
use fare_config::SourceSpec;
use futures::{StreamExt, TryStreamExt};
use resync_bus::{Destination, Envelope, Filter, OutgoingMessage, Stream, Transport, TransportError};
use resync_migrations::Schema;
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgPool, Row};
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

pub use query::{SourceQuery, VersionSource};

/// Errors of a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("database: {context}: {source}")]
    Database {
        context: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("source `{table}`: {problem}")]
    Source { table: String, problem: String },
    #[error("publishing: {0}")]
    Publish(#[from] TransportError),
    #[error("no job {0}")]
    NotFound(Uuid),
    #[error("job {id} is {status}: {hint}")]
    State { id: Uuid, status: String, hint: &'static str },
}

type Result<T> = std::result::Result<T, JobError>;

fn db(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> JobError {
    let context = context.into();
    move |source| JobError::Database { context, source }
}

/// What a job was asked to do; stored with it, read again on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub entity_type: String,
    /// The source query, built and checked against the catalog when the job was created.
    pub query: SourceQuery,
    /// Where events go: the entity's resync topic, or straight to subscribers' queues.
    pub destination: JobDestination,
    /// Most rows published per second (`None`: as fast as the broker confirms).
    pub rate: Option<f64>,
    pub chunk_size: i64,
    /// The sinks that must apply every row before the job is `completed`; none: it ends at
    /// `published`.
    #[serde(default)]
    pub sinks: Vec<String>,
    /// `pause-live` mode: the services whose live consumers are paused while the job runs and
    /// resumed when it completes or is cancelled (empty in the default, concurrent mode).
    #[serde(default)]
    pub paused_services: Vec<String>,
    /// Consumers skip the sink call for an entity whose content equals what the sink has.
    #[serde(default)]
    pub skip_unchanged: bool,
    /// Key ranges read in parallel, each by its own reader, all in one exported snapshot.
    #[serde(default = "one")]
    pub readers: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobDestination {
    /// The entity's resync topic (exchange): every subscriber gets what its binding asks for.
    Topic(String),
    /// Straight to these queues, skipping the topic: one SendMessageBatch per ten events and
    /// queue on SQS (no SNS publish quota spent), the default exchange on RabbitMQ.
    Queues(Vec<TargetQueue>),
}

/// A subscriber's resync queue and the event types its subscription takes (patterns as in
/// service configs: `listing.updated`, `listing.*`, `*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetQueue {
    pub queue: String,
    pub types: Vec<String>,
}

impl JobDestination {
    /// Publishes one chunk; to several queues at once, each with the events it subscribes to.
    async fn publish(&self, transport: &dyn Transport, messages: Vec<OutgoingMessage>) -> Result<()> {
        match self {
            JobDestination::Topic(topic) => {
                transport.publish_batch(&Destination::Topic(topic.clone()), messages).await?;
            }
            JobDestination::Queues(queues) => {
                let sends = queues.iter().map(|target| {
                    let filter = Filter::types(target.types.clone());
                    let wanted: Vec<OutgoingMessage> =
                        messages.iter().filter(|m| filter.matches(&m.routing_key)).cloned().collect();
                    let destination = Destination::Queue(target.queue.clone());
                    async move {
                        if wanted.is_empty() {
                            Ok(())
                        } else {
                            transport.publish_batch(&destination, wanted).await
                        }
                    }
                });
                futures::future::try_join_all(sends).await?;
            }
        }
        Ok(())
    }
}

/// How to start a job.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// An extra SQL boolean expression narrowing the source's rows (trusted operator input,
    /// no `;`).
    pub filter: Option<String>,
    pub rate: Option<f64>,
    /// Send straight to these resync queues instead of the topic (none: the topic).
    pub target_queues: Vec<TargetQueue>,
    /// Only the entities this sink had an event of dead-lettered (the consumer records them).
    pub only_rejected_by: Option<String>,
    pub chunk_size: i64,
    /// The sinks whose consumers must apply every row for the job to complete.
    pub sinks: Vec<String>,
    /// `pause-live` mode: pause these services' live consumers for the job's duration.
    pub paused_services: Vec<String>,
    /// Let consumers skip entities whose content the sink already has (no API call).
    pub skip_unchanged: bool,
    /// Parallel readers (key ranges), sharing one snapshot.
    pub readers: u32,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            filter: None,
            rate: None,
            target_queues: Vec::new(),
            only_rejected_by: None,
            chunk_size: 1000,
            sinks: Vec::new(),
            paused_services: Vec::new(),
            skip_unchanged: false,
            readers: DEFAULT_READERS,
        }
    }
}

/// Readers per job unless asked otherwise: enough to keep a broker busy while one reader waits
/// on Postgres, few enough to leave the pool room.
pub const DEFAULT_READERS: u32 = 4;

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: Uuid,
    pub entity_type: String,
    pub status: String,
    pub emitted: i64,
    pub total: Option<i64>,
    /// Rows every sink has accounted for (see [`await_completion`]).
    pub applied: i64,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Job {
    /// Rows per second since the job was created (over its whole life, pauses included).
    pub fn rate(&self) -> f64 {
        let end = self.finished_at.unwrap_or(self.updated_at);
        let seconds = (end - self.created_at).num_milliseconds().max(1) as f64 / 1000.0;
        self.emitted as f64 / seconds
    }

    /// Time left at the current rate, while running.
    pub fn eta(&self) -> Option<Duration> {
        let left = self.total? - self.emitted;
        let rate = self.rate();
        (self.status == "running" && rate > 0.0 && left > 0)
            .then(|| Duration::from_secs_f64(left as f64 / rate))
    }
}

/// Checks the source against the database catalog and records a new job (status `running`).
pub async fn create(
    pool: &PgPool,
    schema: &Schema,
    namespace: Option<&str>,
    source: &SourceSpec,
    options: &JobOptions,
) -> Result<Uuid> {
    let (filter, rejected_by) = (options.filter.as_deref(), options.only_rejected_by.as_deref());
    let query = SourceQuery::build(pool, schema, source, filter, rejected_by).await?;
    let destination = if options.target_queues.is_empty() {
        JobDestination::Topic(resync_bus::naming::topic_name(namespace, &source.entity, Stream::Resync))
    } else {
        JobDestination::Queues(options.target_queues.clone())
    };
    let spec = JobSpec {
        entity_type: source.entity.clone(),
        query,
        destination,
        rate: options.rate,
        chunk_size: options.chunk_size.max(1),
        sinks: options.sinks.clone(),
        paused_services: options.paused_services.clone(),
        skip_unchanged: options.skip_unchanged,
        readers: options.readers.max(1),
    };
    let id = Uuid::now_v7();
    let spec_json = serde_json::to_value(&spec).map_err(|e| JobError::Source {
        table: source.table.clone(),
        problem: format!("cannot record the job: {e}"),
    })?;
    sqlx::query(
        schema
            .sql("INSERT INTO {schema}.jobs (id, entity_type, status, spec) VALUES ($1, $2, 'running', $3)"),
    )
    .bind(id)
    .bind(&source.entity)
    .bind(spec_json)
    .execute(pool)
    .await
    .map_err(db("recording the job"))?;
    info!(job = %id, entity = %source.entity, "job created");
    Ok(id)
}

const JOB_COLUMNS: &str =
    "id, entity_type, status, emitted, total, applied, error, created_at, updated_at, finished_at";

fn job_of(row: &sqlx::postgres::PgRow) -> std::result::Result<Job, sqlx::Error> {
    Ok(Job {
        id: row.try_get("id")?,
        entity_type: row.try_get("entity_type")?,
        status: row.try_get("status")?,
        emitted: row.try_get("emitted")?,
        total: row.try_get("total")?,
        applied: row.try_get("applied")?,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

pub async fn get(pool: &PgPool, schema: &Schema, id: Uuid) -> Result<Job> {
    let sql = schema.sql(&format!("SELECT {JOB_COLUMNS} FROM {{schema}}.jobs WHERE id = $1"));
    let row = sqlx::query(sql).bind(id).fetch_optional(pool).await.map_err(db("reading the job"))?;
    let row = row.ok_or(JobError::NotFound(id))?;
    job_of(&row).map_err(db("reading the job"))
}

/// The newest jobs first.
pub async fn list(pool: &PgPool, schema: &Schema, limit: i64) -> Result<Vec<Job>> {
    let sql =
        schema.sql(&format!("SELECT {JOB_COLUMNS} FROM {{schema}}.jobs ORDER BY created_at DESC LIMIT $1"));
    let rows = sqlx::query(sql).bind(limit).fetch_all(pool).await.map_err(db("listing jobs"))?;
    rows.iter().map(job_of).collect::<std::result::Result<_, _>>().map_err(db("listing jobs"))
}

/// Moves a job from one of `from` to `to`; a runner sees it after its current chunk.
pub async fn transition(pool: &PgPool, schema: &Schema, id: Uuid, from: &[&str], to: &str) -> Result<Job> {
    let from: Vec<String> = from.iter().map(|s| s.to_string()).collect();
    let sql = schema.sql(
        "UPDATE {schema}.jobs SET status = $3, updated_at = clock_timestamp(), \
         finished_at = CASE WHEN $3 IN ('cancelled') THEN clock_timestamp() ELSE finished_at END, \
         error = CASE WHEN $3 = 'running' THEN NULL ELSE error END \
         WHERE id = $1 AND status = ANY($2)",
    );
    let changed =
        sqlx::query(sql).bind(id).bind(&from).bind(to).execute(pool).await.map_err(db("updating the job"))?;
    let job = get(pool, schema, id).await?;
    if changed.rows_affected() == 0 && job.status != to {
        return Err(JobError::State { id, status: job.status, hint: "that change does not apply to it" });
    }
    Ok(job)
}

/// Runs a `running` job to its end (or until it is paused or cancelled): reads its source in
/// one snapshot, range by range in parallel, from each range's checkpoint on, publishes each
/// chunk and checkpoints it. Returns the job as it stands after.
///
/// A run that fails leaves the job `failed` with its error (never `running` with nobody
/// running it); `resync job resume` runs it again from its checkpoints.
pub async fn run(pool: &PgPool, schema: &Schema, transport: &dyn Transport, id: Uuid) -> Result<Job> {
    let job = get(pool, schema, id).await?;
    if job.status != "running" {
        let hint = "only a running job runs (`resync job resume` continues a paused or failed one)";
        return Err(JobError::State { id, status: job.status, hint });
    }
    let ran = run_ranges(pool, schema, transport, job).await;
    if let Err(err) = &ran {
        let sql = schema.sql(
            "UPDATE {schema}.jobs SET status = 'failed', error = $2, updated_at = clock_timestamp() \
             WHERE id = $1 AND status = 'running'",
        );
        if let Err(mark) = sqlx::query(sql).bind(id).bind(err.to_string()).execute(pool).await {
            warn!(job = %id, error = %mark, "could not mark the job failed");
        }
    }
    ran
}

async fn run_ranges(pool: &PgPool, schema: &Schema, transport: &dyn Transport, job: Job) -> Result<Job> {
    let id = job.id;
    let spec = load_spec(pool, schema, id).await?;
    // One snapshot for the whole run: every row as of one instant, however long the run. The
    // readers import it; this transaction keeps it alive until they are done.
    let mut snapshot = open_snapshot(pool).await?;
    if job.total.is_none() {
        plan_ranges(pool, schema, &mut snapshot, id, &spec).await?;
    }
    let snapshot_id: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut *snapshot)
        .await
        .map_err(db("exporting the snapshot"))?;
    let ranges = pending_ranges(pool, schema, id).await?;
    // Each reader holds a connection for its range; leave two for the snapshot and checkpoints.
    let readers = (pool.options().get_max_connections() as usize).saturating_sub(2).max(1);
    let run = RangeRun { pool, schema, transport, id, spec: &spec, snapshot: &snapshot_id };
    let pacer = tokio::sync::Mutex::new(Pacer::new(spec.rate));
    let outcomes: Vec<RangeEnd> =
        futures::stream::iter(ranges.into_iter().map(|range| run.read(range, &pacer)))
            .buffer_unordered(readers)
            .try_collect()
            .await?;
    drop(snapshot);
    if outcomes.contains(&RangeEnd::Stopped) {
        info!(job = %id, "job paused or cancelled; stopped after the chunks in flight");
        return get(pool, schema, id).await;
    }
    finish(pool, schema, id).await
}

/// A key range of a job, as stored in `job_ranges`.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Range {
    range_no: i32,
    after_id: Option<String>,
    upto_id: Option<String>,
    checkpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeEnd {
    Done,
    /// The job was paused or cancelled meanwhile.
    Stopped,
}

/// Counts the job's rows and splits them into ranges, in the run's snapshot; records both in
/// one transaction, so a runner killed before that plans again.
async fn plan_ranges(
    pool: &PgPool,
    schema: &Schema,
    snapshot: &mut sqlx::PgConnection,
    id: Uuid,
    spec: &JobSpec,
) -> Result<()> {
    let total = spec.query.count(snapshot).await?;
    let points = spec.query.split_points(snapshot, total, i64::from(spec.readers)).await?;
    let mut bounds: Vec<Option<String>> = vec![None];
    bounds.extend(points.into_iter().map(Some));
    bounds.push(None);
    let (afters, uptos): (Vec<Option<String>>, Vec<Option<String>>) =
        bounds.windows(2).map(|pair| (pair[0].clone(), pair[1].clone())).unzip();
    let mut tx = pool.begin().await.map_err(db("planning the job's ranges"))?;
    let sql = schema.sql(
        "INSERT INTO {schema}.job_ranges (job_id, range_no, after_id, upto_id) \
         SELECT $1, (n - 1)::int, a, u FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS r(a, u, n)",
    );
    sqlx::query(sql)
        .bind(id)
        .bind(&afters)
        .bind(&uptos)
        .execute(&mut *tx)
        .await
        .map_err(db("planning the job's ranges"))?;
    let sql = schema.sql("UPDATE {schema}.jobs SET total = $2 WHERE id = $1");
    sqlx::query(sql).bind(id).bind(total).execute(&mut *tx).await.map_err(db("recording the total"))?;
    tx.commit().await.map_err(db("planning the job's ranges"))?;
    info!(job = %id, total, ranges = afters.len(), "source counted and split");
    Ok(())
}

async fn pending_ranges(pool: &PgPool, schema: &Schema, id: Uuid) -> Result<Vec<Range>> {
    let sql = schema.sql(
        "SELECT range_no, after_id, upto_id, checkpoint FROM {schema}.job_ranges \
         WHERE job_id = $1 AND NOT done ORDER BY range_no",
    );
    sqlx::query_as(sql).bind(id).fetch_all(pool).await.map_err(db("reading the job's ranges"))
}

/// What every reader of one run shares.
struct RangeRun<'a> {
    pool: &'a PgPool,
    schema: &'a Schema,
    transport: &'a dyn Transport,
    id: Uuid,
    spec: &'a JobSpec,
    /// The exported snapshot every reader imports.
    snapshot: &'a str,
}

impl RangeRun<'_> {
    /// Publishes one range chunk by chunk from its checkpoint, in the shared snapshot.
    async fn read(&self, range: Range, pacer: &tokio::sync::Mutex<Pacer>) -> Result<RangeEnd> {
        let mut reader = import_snapshot(self.pool, self.snapshot).await?;
        let size = self.spec.chunk_size;
        let mut checkpoint = range.checkpoint.clone().or_else(|| range.after_id.clone());
        loop {
            let rows = self
                .spec
                .query
                .chunk(&mut reader, checkpoint.as_deref(), range.upto_id.as_deref(), size)
                .await?;
            let last = rows.last().map(|r| r.id.clone());
            let done = (rows.len() as i64) < size;
            let rows = versioned(self.pool, self.schema, self.spec, rows).await?;
            if !rows.is_empty() {
                pacer.lock().await.wait(rows.len()).await;
                let sent: Vec<(String, i64)> = rows.iter().map(|r| (r.id.clone(), r.version)).collect();
                let (entity_type, id, skip) = (&self.spec.entity_type, self.id, self.spec.skip_unchanged);
                let messages = rows.into_iter().map(|row| row.message(entity_type, id, skip)).collect();
                self.spec.destination.publish(self.transport, messages).await?;
                let saved = Saved { range: range.range_no, last: last.as_deref(), done, sent: &sent };
                if !save_checkpoint(self.pool, self.schema, self.id, saved).await? {
                    return Ok(RangeEnd::Stopped);
                }
            } else if !save_checkpoint(self.pool, self.schema, self.id, Saved::empty(range.range_no)).await? {
                return Ok(RangeEnd::Stopped);
            }
            if done {
                return Ok(RangeEnd::Done);
            }
            checkpoint = last;
        }
    }
}

/// Gives each row the version its event is sent with: resync's counter (the version
/// `resync.emit` last assigned, read in the job's snapshot with the row), so a resync event and
/// the live events around it are ordered by the same counter; or, for a service that publishes
/// its own events ([`VersionSource::Column`]), the table's version column.
///
/// An entity resync never counted (rows written without `resync.emit`, e.g. loaded before resync
/// was adopted) gets its first version now: the table's version column if it names one, else 1,
/// recorded in the counter so the next `resync.emit` continues after it. If an emit recorded
/// one first (after the job's snapshot), the row is left out: that live event carries newer
/// state than the snapshot's.
async fn versioned(
    pool: &PgPool,
    schema: &Schema,
    spec: &JobSpec,
    rows: Vec<query::ReadRow>,
) -> Result<Vec<SourceRow>> {
    let entity_type = &spec.entity_type;
    let first_version = |row: &query::ReadRow| row.declared.unwrap_or(1).max(1);
    if spec.query.versions == VersionSource::Column {
        let rows = rows.into_iter().map(|row| SourceRow {
            version: first_version(&row),
            id: row.id,
            deleted: row.deleted,
            data: row.data,
        });
        return Ok(rows.collect());
    }
    let (uncounted, seeds): (Vec<&str>, Vec<i64>) = rows
        .iter()
        .filter(|row| row.counted.is_none())
        .map(|row| (row.id.as_str(), first_version(row)))
        .unzip();
    let seeded: std::collections::HashMap<String, i64> = if uncounted.is_empty() {
        Default::default()
    } else {
        let sql = schema.sql(
            "INSERT INTO {schema}.entity_versions (entity_type, entity_id, version) \
             SELECT $1, i, v FROM unnest($2::text[], $3::bigint[]) AS s(i, v) \
             ON CONFLICT (entity_type, entity_id) DO NOTHING RETURNING entity_id, version",
        );
        sqlx::query_as(sql)
            .bind(entity_type)
            .bind(&uncounted)
            .bind(&seeds)
            .fetch_all(pool)
            .await
            .map_err(db("giving entities resync never counted their first version"))?
            .into_iter()
            .collect()
    };
    let disagreeing: Vec<&str> = rows.iter().filter(|r| r.disagrees()).map(|r| r.id.as_str()).collect();
    if let Some(first) = disagreeing.first() {
        warn!(entity = %entity_type, rows = disagreeing.len(), first = %first,
            "the table's version column disagrees with resync.emit's versions; sending resync's");
    }
    let mut emitted_since = 0_usize;
    let mut versioned = Vec::with_capacity(rows.len());
    for row in rows {
        let version = match (row.counted, seeded.get(&row.id)) {
            (Some(counted), _) => counted,
            (None, Some(seed)) => *seed,
            (None, None) => {
                emitted_since += 1;
                continue;
            }
        };
        versioned.push(SourceRow { id: row.id, version, deleted: row.deleted, data: row.data });
    }
    if emitted_since > 0 {
        info!(entity = %entity_type, rows = emitted_since,
            "left out rows first emitted after the job's snapshot: their live events are newer");
    }
    Ok(versioned)
}

/// A read-only transaction that sees the database as of one instant until it ends.
async fn open_snapshot(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut tx = pool.begin().await.map_err(db("opening the snapshot"))?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(db("opening the snapshot"))?;
    Ok(tx)
}

/// A read-only transaction on a snapshot another transaction exported (`pg_export_snapshot`).
async fn import_snapshot(
    pool: &PgPool,
    snapshot: &str,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    // Postgres takes no parameter here; an exported snapshot id is hex digits and dashes.
    if !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(JobError::Source {
            table: String::new(),
            problem: format!("odd snapshot id `{snapshot}`"),
        });
    }
    let mut tx = open_snapshot(pool).await?;
    sqlx::query(AssertSqlSafe(format!("SET TRANSACTION SNAPSHOT '{snapshot}'")))
        .execute(&mut *tx)
        .await
        .map_err(db("importing the job's snapshot"))?;
    Ok(tx)
}

/// What the job was asked to do, as recorded when it was created.
pub async fn load_spec(pool: &PgPool, schema: &Schema, id: Uuid) -> Result<JobSpec> {
    let sql = schema.sql("SELECT spec FROM {schema}.jobs WHERE id = $1");
    let spec: serde_json::Value =
        sqlx::query_scalar(sql).bind(id).fetch_one(pool).await.map_err(db("reading the job spec"))?;
    serde_json::from_value(spec).map_err(|e| JobError::Source {
        table: String::new(),
        problem: format!("job {id} was recorded by another version of resync: {e}"),
    })
}

/// A confirmed chunk of one range.
struct Saved<'a> {
    range: i32,
    /// The chunk's last id (none for an empty chunk: the range had nothing left).
    last: Option<&'a str>,
    /// The range has no rows after this chunk.
    done: bool,
    sent: &'a [(String, i64)],
}

impl Saved<'_> {
    fn empty(range: i32) -> Self {
        Saved { range, last: None, done: true, sent: &[] }
    }
}

/// Records a confirmed chunk and what it sent, in one transaction; `false` if the job is no
/// longer running (paused, cancelled).
async fn save_checkpoint(pool: &PgPool, schema: &Schema, id: Uuid, saved: Saved<'_>) -> Result<bool> {
    let (ids, versions): (Vec<&str>, Vec<i64>) = saved.sent.iter().map(|(i, v)| (i.as_str(), *v)).unzip();
    let mut tx = pool.begin().await.map_err(db("saving the checkpoint"))?;
    // A chunk sent again after a crash may meet its rows: keep the newer version.
    let rows_sql = schema.sql(
        "INSERT INTO {schema}.job_rows (job_id, entity_id, version) SELECT $1, * FROM unnest($2::text[], $3::bigint[]) \
         ON CONFLICT (job_id, entity_id) DO UPDATE SET version = GREATEST(job_rows.version, EXCLUDED.version)",
    );
    sqlx::query(rows_sql)
        .bind(id)
        .bind(&ids)
        .bind(&versions)
        .execute(&mut *tx)
        .await
        .map_err(db("recording sent rows"))?;
    let range_sql = schema.sql(
        "UPDATE {schema}.job_ranges SET checkpoint = COALESCE($3, checkpoint), done = $4 \
         WHERE job_id = $1 AND range_no = $2",
    );
    sqlx::query(range_sql)
        .bind(id)
        .bind(saved.range)
        .bind(saved.last)
        .bind(saved.done)
        .execute(&mut *tx)
        .await
        .map_err(db("saving the checkpoint"))?;
    let sql = schema.sql(
        "UPDATE {schema}.jobs SET emitted = emitted + $2, updated_at = clock_timestamp() \
         WHERE id = $1 RETURNING status",
    );
    let status: String = sqlx::query_scalar(sql)
        .bind(id)
        .bind(saved.sent.len() as i64)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("saving the checkpoint"))?;
    tx.commit().await.map_err(db("saving the checkpoint"))?;
    Ok(status == "running")
}

async fn finish(pool: &PgPool, schema: &Schema, id: Uuid) -> Result<Job> {
    let sql = schema.sql(
        "UPDATE {schema}.jobs SET status = 'published', finished_at = clock_timestamp(), \
         updated_at = clock_timestamp() WHERE id = $1 AND status = 'running'",
    );
    sqlx::query(sql).bind(id).execute(pool).await.map_err(db("finishing the job"))?;
    let job = get(pool, schema, id).await?;
    info!(job = %id, emitted = job.emitted, "every row published");
    Ok(job)
}

/// After a job is published, waits until its sinks have accounted for every row it sent, then
/// marks it `completed`. A row is accounted for at a sink when the sink recorded a newer
/// version of the entity (superseded by a live event), or the version sent since the job
/// started (applied, or skipped as unchanged), or dead-lettered one of these. Rows are checked in id
/// order, chunk by chunk; progress is kept in `jobs.applied`. Returns when completed, or when
/// the job is cancelled meanwhile.
pub async fn await_completion(pool: &PgPool, schema: &Schema, id: Uuid, poll: Duration) -> Result<Job> {
    let spec = load_spec(pool, schema, id).await?;
    if spec.sinks.is_empty() {
        return get(pool, schema, id).await;
    }
    analyze_job_rows(pool, schema).await;
    let rows_sql = schema.sql(
        "SELECT entity_id, version FROM {schema}.job_rows WHERE job_id = $1 AND entity_id > $2 \
         ORDER BY entity_id LIMIT $3",
    );
    // One primary-key probe per (row, sink), whatever the statistics say: `LIMIT 1` keeps each
    // lookup a subquery the planner cannot turn into a scan of the whole sink, which it did on
    // the stale statistics of a table a resync fills faster than autovacuum analyzes it.
    let records_sql = schema.sql(
        "SELECT s.sink, k.entity_id, r.version, r.at \
         FROM unnest($3::text[]) AS k(entity_id) CROSS JOIN unnest($1::text[]) AS s(sink) \
         CROSS JOIN LATERAL ( \
           (SELECT version, applied_at AS at FROM {schema}.applied_versions \
            WHERE sink = s.sink AND entity_type = $2 AND entity_id = k.entity_id LIMIT 1) \
           UNION ALL \
           (SELECT version, dead_lettered_at FROM {schema}.dead_lettered_entities \
            WHERE sink = s.sink AND entity_type = $2 AND entity_id = k.entity_id LIMIT 1)) r",
    );
    // The same version recorded before the job started does not count: a resync re-sends it.
    let started = get(pool, schema, id).await?.created_at;
    let mut after = String::new();
    let mut accounted = 0_i64;
    loop {
        let rows: Vec<(String, i64)> = sqlx::query_as(rows_sql.clone())
            .bind(id)
            .bind(&after)
            .bind(spec.chunk_size)
            .fetch_all(pool)
            .await
            .map_err(db("reading the job's rows"))?;
        let Some((last, _)) = rows.last().cloned() else {
            return complete(pool, schema, id, accounted).await;
        };
        // Only the rows not yet accounted for are checked again on the next poll.
        let mut pending = rows.clone();
        loop {
            let job = get(pool, schema, id).await?;
            if job.status != "published" {
                return Ok(job);
            }
            let ids: Vec<&str> = pending.iter().map(|(id, _)| id.as_str()).collect();
            let records: Vec<(String, String, i64, DateTime<Utc>)> = sqlx::query_as(records_sql.clone())
                .bind(&spec.sinks)
                .bind(&spec.entity_type)
                .bind(&ids)
                .fetch_all(pool)
                .await
                .map_err(db("checking what the sinks applied"))?;
            pending = unaccounted(&pending, &spec.sinks, &records, started);
            if pending.is_empty() {
                break;
            }
            tokio::time::sleep(poll).await;
        }
        accounted += rows.len() as i64;
        let sql =
            schema.sql("UPDATE {schema}.jobs SET applied = $2, updated_at = clock_timestamp() WHERE id = $1");
        sqlx::query(sql).bind(id).bind(accounted).execute(pool).await.map_err(db("recording progress"))?;
        after = last;
    }
}

/// Refreshes the statistics of `job_rows`, which publishing just filled: planned on statistics
/// from when it was empty, reading a chunk in id order became a sort of every row of the job
/// (measured: 40 ms per poll at 40,000 rows). Only the plan depends on it, so a failure (say,
/// a role that does not own the table) is logged, not returned.
async fn analyze_job_rows(pool: &PgPool, schema: &Schema) {
    if let Err(err) = sqlx::query(schema.sql("ANALYZE {schema}.job_rows")).execute(pool).await {
        warn!(error = %err, "could not refresh the statistics of job_rows; waiting may be slower");
    }
}

/// The rows some sink has not accounted for: a sink accounts for a row with a newer version,
/// or the row's version recorded since the job started (applied, skipped as unchanged, or
/// dead-lettered).
fn unaccounted(
    rows: &[(String, i64)],
    sinks: &[String],
    records: &[(String, String, i64, DateTime<Utc>)],
    started: DateTime<Utc>,
) -> Vec<(String, i64)> {
    // Per (sink, entity): the highest version a record accounts for. A same-version record
    // from before the job does not count (the job re-sent that version), so it covers only
    // lower versions.
    let mut covered: std::collections::HashMap<(&str, &str), i64> = std::collections::HashMap::new();
    for (sink, id, version, at) in records {
        let covers = if *at >= started { *version } else { *version - 1 };
        let best = covered.entry((sink.as_str(), id.as_str())).or_insert(covers);
        *best = (*best).max(covers);
    }
    rows.iter()
        .filter(|(id, version)| {
            sinks
                .iter()
                .any(|sink| covered.get(&(sink.as_str(), id.as_str())).is_none_or(|best| best < version))
        })
        .cloned()
        .collect()
}

async fn complete(pool: &PgPool, schema: &Schema, id: Uuid, accounted: i64) -> Result<Job> {
    let mut tx = pool.begin().await.map_err(db("completing the job"))?;
    let sql = schema.sql(
        "UPDATE {schema}.jobs SET status = 'completed', updated_at = clock_timestamp() \
         WHERE id = $1 AND status = 'published'",
    );
    sqlx::query(sql).bind(id).execute(&mut *tx).await.map_err(db("completing the job"))?;
    let sql = schema.sql("DELETE FROM {schema}.job_rows WHERE job_id = $1");
    sqlx::query(sql).bind(id).execute(&mut *tx).await.map_err(db("completing the job"))?;
    tx.commit().await.map_err(db("completing the job"))?;
    info!(job = %id, rows = accounted, "every row applied at every sink: job completed");
    get(pool, schema, id).await
}

/// Paces chunks to at most `rate` rows per second (a token bucket refilled continuously, one
/// chunk of burst).
struct Pacer {
    rate: Option<f64>,
    next: Instant,
    warned: bool,
}

impl Pacer {
    fn new(rate: Option<f64>) -> Self {
        Self { rate: rate.filter(|r| *r > 0.0), next: Instant::now(), warned: false }
    }

    async fn wait(&mut self, rows: usize) {
        let Some(rate) = self.rate else { return };
        tokio::time::sleep_until(self.next).await;
        let now = Instant::now();
        if !self.warned && self.next + Duration::from_secs(1) < now {
            self.warned = true;
            warn!(rate, "publishing is slower than the job's rate (said once per run)");
        }
        self.next = self.next.max(now) + Duration::from_secs_f64(rows as f64 / rate);
    }
}

/// One source row, ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRow {
    pub id: String,
    pub version: i64,
    pub deleted: bool,
    pub data: serde_json::Value,
}

impl SourceRow {
    fn message(self, entity_type: &str, job: Uuid, skip_unchanged: bool) -> OutgoingMessage {
        let verb = if self.deleted { "deleted" } else { "updated" };
        let mut event = Envelope::new(&format!("{entity_type}.{verb}"), self.id, self.version, self.data);
        event.stream = Stream::Resync;
        event.job_id = Some(job);
        event.deleted = self.deleted;
        let mut message = OutgoingMessage::from_envelope(&event);
        if skip_unchanged {
            message.attributes.insert(resync_bus::attr::SKIP_UNCHANGED.into(), "true".into());
        }
        message
    }
}

/// An entity whose applied version at a sink differs from its source row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub entity_id: String,
    /// `None`: resync has no version for the entity yet (never emitted, never sent by a job).
    pub source_version: Option<i64>,
    /// `None`: the sink never applied the entity.
    pub applied_version: Option<i64>,
}

/// What `verify` found for one sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub sink: String,
    /// Source rows compared.
    pub checked: u64,
    /// Every drifting entity, up to [`MAX_DRIFT_LISTED`].
    pub drift: Vec<Drift>,
    pub drift_count: u64,
}

/// Most drifting entities `verify` lists (it counts them all).
pub const MAX_DRIFT_LISTED: usize = 1000;

/// Compares the job's source rows, as they are now, with what `sink` has applied (the
/// consumer's `applied_versions`): an entity is drifting when the sink never applied it or
/// applied another version than the row's.
pub async fn verify(pool: &PgPool, schema: &Schema, id: Uuid, sink: &str) -> Result<Verification> {
    let spec = load_spec(pool, schema, id).await?;
    let mut reader = open_snapshot(pool).await?;
    let applied_sql = schema.sql(
        "SELECT entity_id, version FROM {schema}.applied_versions \
         WHERE sink = $1 AND entity_type = $2 AND entity_id = ANY($3)",
    );
    let mut report = Verification { sink: sink.to_string(), checked: 0, drift: Vec::new(), drift_count: 0 };
    let mut checkpoint: Option<String> = None;
    loop {
        let rows = spec.query.chunk(&mut reader, checkpoint.as_deref(), None, 1000).await?;
        let Some(last) = rows.last().map(|r| r.id.clone()) else { return Ok(report) };
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let applied: std::collections::HashMap<String, i64> = sqlx::query_as(applied_sql.clone())
            .bind(sink)
            .bind(&spec.entity_type)
            .bind(&ids)
            .fetch_all(pool)
            .await
            .map_err(db("reading applied versions"))?
            .into_iter()
            .collect();
        for row in &rows {
            let applied_version = applied.get(&row.id).copied();
            let source_version = match spec.query.versions {
                VersionSource::Counter => row.counted,
                VersionSource::Column => row.declared,
            };
            if source_version.is_none() || applied_version != source_version {
                report.drift_count += 1;
                if report.drift.len() < MAX_DRIFT_LISTED {
                    report.drift.push(Drift { entity_id: row.id.clone(), source_version, applied_version });
                }
            }
        }
        report.checked += rows.len() as u64;
        checkpoint = Some(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_accounted_for_by_a_newer_version_or_its_own_since_the_job_started() {
        let started = Utc::now();
        let before = started - chrono::TimeDelta::seconds(5);
        let after = started + chrono::TimeDelta::seconds(5);
        let rows: Vec<(String, i64)> = [("a", 3), ("b", 3), ("c", 3), ("d", 3), ("e", 3)]
            .iter()
            .map(|(id, v)| (id.to_string(), *v))
            .collect();
        let record = |id: &str, version, at| ("crm".to_string(), id.to_string(), version, at);
        let records = [
            record("a", 4, before), // newer, whenever: accounted
            record("b", 3, after),  // the version sent, since the job started: accounted
            record("c", 3, before), // the version sent, from before the job: not yet
            record("d", 2, after),  // older: not yet
            record("c", 2, after),
        ];
        let sinks = ["crm".to_string()];
        let ids = |rows: Vec<(String, i64)>| rows.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(unaccounted(&rows, &sinks, &records, started)), ["c", "d", "e"], "e: never recorded");
        let two_sinks = ["crm".to_string(), "search".to_string()];
        assert_eq!(
            ids(unaccounted(&rows, &two_sinks, &records, started)).len(),
            5,
            "no row is accounted for at the second sink"
        );
    }
}
