//! The runner: reads a `running` job's source in one snapshot, range by range in parallel,
//! from each range's checkpoint on, publishes each chunk and checkpoints it, until every range
//! is done (the job is then `published`) or the job is paused or cancelled.

use std::collections::HashMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use resync_bus::{Destination, Envelope, Filter, OutgoingMessage, Stream, Transport};
use resync_migrations::Schema;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

use crate::job::{Job, JobDestination, JobSpec, JobStatus, get, load_spec, set_status_if};
use crate::outage::riding_out_database_outages;
use crate::query::{self, VersionSource};
use crate::{JobError, Result, db};

/// Runs a `running` job to its end (or until it is paused or cancelled): reads its source in
/// one snapshot, range by range in parallel, from each range's checkpoint on, publishes each
/// chunk and checkpoints it. Returns the job as it stands after.
///
/// A run that loses its database (a restart, a failover) starts again from its checkpoints,
/// in a new snapshot, once the database answers (for up to five minutes). A run that fails
/// otherwise leaves the job `failed` with its error (never `running` with nobody running it);
/// `resync job resume` runs it again from its checkpoints.
pub async fn run(pool: &PgPool, schema: &Schema, transport: &dyn Transport, id: Uuid) -> Result<Job> {
    run_reading(pool, pool, schema, transport, id).await
}

/// [`run`], reading the source rows (in one snapshot) from `source`, e.g. a hot standby, so a
/// resync puts no read load on the primary; the job's state and the versions of entities
/// resync never counted are written through `pool`.
pub async fn run_reading(
    pool: &PgPool,
    source: &PgPool,
    schema: &Schema,
    transport: &dyn Transport,
    id: Uuid,
) -> Result<Job> {
    let job = get(pool, schema, id).await?;
    if job.status != JobStatus::Running {
        let hint = "only a running job runs (`resync job resume` continues a paused or failed one)";
        return Err(JobError::State { id, status: job.status, hint });
    }
    let ran =
        riding_out_database_outages(id, "publishing", || run_once(pool, source, schema, transport, id)).await;
    if let Err(err) = &ran {
        let (from, to, error) = (JobStatus::Running, JobStatus::Failed, err.to_string());
        match set_status_if(pool, schema, id, from, to, Some(&error)).await {
            Ok(true) => crate::notify::notify(pool, schema, id, "failed").await,
            Ok(false) => {}
            Err(mark) => warn!(job = %id, error = %mark, "could not mark the job failed"),
        }
    }
    ran
}

/// One attempt, on the job as it stands now: an earlier attempt may have planned its ranges,
/// and it may have been paused or cancelled meanwhile.
async fn run_once(
    pool: &PgPool,
    source: &PgPool,
    schema: &Schema,
    transport: &dyn Transport,
    id: Uuid,
) -> Result<Job> {
    let job = get(pool, schema, id).await?;
    if job.status != JobStatus::Running {
        return Ok(job);
    }
    run_ranges(pool, source, schema, transport, job).await
}

async fn run_ranges(
    pool: &PgPool,
    source: &PgPool,
    schema: &Schema,
    transport: &dyn Transport,
    job: Job,
) -> Result<Job> {
    let id = job.id;
    let spec = load_spec(pool, schema, id).await?;
    // One snapshot for the whole run: every row as of one instant, however long the run. The
    // readers import it; this transaction keeps it alive until they are done.
    let mut snapshot = open_snapshot(source).await?;
    if job.total.is_none() {
        plan_ranges(pool, schema, &mut snapshot, id, &spec).await?;
    }
    let snapshot_id: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut *snapshot)
        .await
        .map_err(db("exporting the snapshot"))?;
    let ranges = pending_ranges(pool, schema, id).await?;
    // Each reader holds a connection of `source` for its range; leave one for the snapshot, and
    // one for the checkpoints when the state shares the pool.
    let spare = if std::ptr::eq(pool, source) { 2 } else { 1 };
    let readers = (source.options().get_max_connections() as usize).saturating_sub(spare).max(1);
    let run = RangeRun { pool, source, schema, transport, id, spec: &spec, snapshot: &snapshot_id };
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
    if let Some(plan) = &spec.delete_missing {
        crate::deletes::send_tombstones(pool, schema, transport, id, &spec, plan).await?;
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
    /// Where the rows are read (the primary, or a standby).
    source: &'a PgPool,
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
        let mut reader = import_snapshot(self.source, self.snapshot).await?;
        let size = self.spec.chunk_size;
        let mut checkpoint = range.checkpoint.clone().or_else(|| range.after_id.clone());
        loop {
            let rows = self
                .spec
                .query
                .chunk(&mut reader, checkpoint.as_deref(), range.upto_id.as_deref(), size)
                .await?;
            let last = rows.last().map(|r| r.checkpoint.clone());
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
    let seeded: HashMap<String, i64> = if uncounted.is_empty() {
        HashMap::new()
    } else {
        resync_producer::versions::seed_first_versions(pool, schema, entity_type, &uncounted, &seeds)
            .await
            .map_err(db("giving entities resync never counted their first version"))?
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
pub(crate) async fn open_snapshot(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
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
    record_sent_rows(&mut tx, schema, id, &ids, &versions).await?;
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
    Ok(status == JobStatus::Running.as_str())
}

/// Records rows the job sent, which it then waits to see applied. A chunk sent again after a
/// crash may meet its rows: the newer version stays.
pub(crate) async fn record_sent_rows(
    conn: &mut sqlx::PgConnection,
    schema: &Schema,
    id: Uuid,
    ids: &[&str],
    versions: &[i64],
) -> Result<()> {
    let rows_sql = schema.sql(
        "INSERT INTO {schema}.job_rows (job_id, entity_id, version) SELECT $1, * FROM unnest($2::text[], $3::bigint[]) \
         ON CONFLICT (job_id, entity_id) DO UPDATE SET version = GREATEST(job_rows.version, EXCLUDED.version)",
    );
    sqlx::query(rows_sql)
        .bind(id)
        .bind(ids)
        .bind(versions)
        .execute(conn)
        .await
        .map_err(db("recording sent rows"))?;
    Ok(())
}

async fn finish(pool: &PgPool, schema: &Schema, id: Uuid) -> Result<Job> {
    set_status_if(pool, schema, id, JobStatus::Running, JobStatus::Published, None)
        .await
        .map_err(db("finishing the job"))?;
    let job = get(pool, schema, id).await?;
    info!(job = %id, emitted = job.emitted, "every row published");
    Ok(job)
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
    pub(crate) fn message(self, entity_type: &str, job: Uuid, skip_unchanged: bool) -> OutgoingMessage {
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

impl JobDestination {
    /// Publishes one chunk; to several queues at once, each with the events it subscribes to.
    pub(crate) async fn publish(
        &self,
        transport: &dyn Transport,
        messages: Vec<OutgoingMessage>,
    ) -> Result<()> {
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
