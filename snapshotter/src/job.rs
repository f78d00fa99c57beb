//! What a job is and its record in `jobs`: the spec it was created with, its status and
//! progress. Status changes go through [`JobStatus`] and [`transition`]; the lifecycle module
//! decides which ones apply.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fare_config::SourceSpec;
use resync_bus::Stream;
use resync_migrations::Schema;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use tracing::info;
use uuid::Uuid;

use crate::deletes::{DeleteLimit, DeletePlan, Missing, missing_entities, over_limit};
use crate::query::SourceQuery;
use crate::{JobError, Result, db};

/// Where a job is in its life.
///
/// `running` → `published` (every row sent) → `completed` (every sink applied every row; a
/// job without sinks ends at `published`). `running` ⇄ `paused`; a run that fails leaves it
/// `failed` until resumed; `cancelled` from any state before `completed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Running,
    Paused,
    Failed,
    Published,
    Completed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Failed,
        JobStatus::Published,
        JobStatus::Completed,
        JobStatus::Cancelled,
    ];

    /// The word stored in `jobs.status` and printed.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Failed => "failed",
            JobStatus::Published => "published",
            JobStatus::Completed => "completed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Nothing more happens to the job.
    pub const fn is_finished(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Cancelled)
    }

    /// Work is under way: rows being published, or sinks being waited for.
    pub const fn is_in_progress(self) -> bool {
        matches!(self, JobStatus::Running | JobStatus::Published)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, not `write_str`: list columns align the status with `{:<9}`.
        f.pad(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown job status `{s}`"))
    }
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
    /// `--delete-missing`: tombstones for what the sink holds and the source lacks.
    #[serde(default)]
    pub delete_missing: Option<DeletePlan>,
    /// `--notify`: where each change of the job's state is POSTed.
    #[serde(default)]
    pub notify: Option<String>,
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
    /// Also delete, at this sink, the entities it holds that the source no longer has, up to
    /// the limit (refused above it, before anything is sent).
    pub delete_missing: Option<(String, DeleteLimit)>,
    /// An http(s) URL to POST each change of the job's state to.
    pub notify: Option<String>,
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
            delete_missing: None,
            notify: None,
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
    pub status: JobStatus,
    pub emitted: i64,
    pub total: Option<i64>,
    /// Rows every sink has accounted for (see [`await_completion`]).
    pub applied: i64,
    /// Tombstones sent (`--delete-missing`).
    pub deleted: i64,
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
        (self.status == JobStatus::Running && rate > 0.0 && left > 0)
            .then(|| Duration::from_secs_f64(left as f64 / rate))
    }
}

/// Checks the source against the database catalog and records a new job (status `running`).
/// [`crate::start`] also pauses live consumers in `pause-live` mode.
pub(crate) async fn create(
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
        delete_missing: options
            .delete_missing
            .as_ref()
            .map(|(sink, limit)| delete_plan(source, options, sink, *limit)),
        notify: options.notify.clone(),
    };
    if let Some(plan) = &spec.delete_missing {
        let missing = missing_entities(pool, schema, &spec.entity_type, plan).await?;
        if !missing.within_limit() {
            return Err(over_limit(&missing, plan.limit));
        }
    }
    let id = Uuid::now_v7();
    let spec_json = serde_json::to_value(&spec).map_err(|e| JobError::Source {
        table: source.table.clone(),
        problem: format!("cannot record the job: {e}"),
    })?;
    sqlx::query(
        schema.sql("INSERT INTO {schema}.jobs (id, entity_type, status, spec) VALUES ($1, $2, $3, $4)"),
    )
    .bind(id)
    .bind(&source.entity)
    .bind(JobStatus::Running.as_str())
    .bind(spec_json)
    .execute(pool)
    .await
    .map_err(db("recording the job"))?;
    info!(job = %id, entity = %source.entity, "job created");
    Ok(id)
}

fn delete_plan(source: &SourceSpec, options: &JobOptions, sink: &str, limit: DeleteLimit) -> DeletePlan {
    DeletePlan {
        sink: sink.to_string(),
        table: crate::query::quoted_table(&source.table),
        id_text: crate::query::entity_id_text(&source.key_columns),
        scope: options.filter.clone(),
        as_row: applied_as_row(source),
        limit,
    }
}

/// The row a sink's applied content came from, as `jsonb`: the data column holding the content,
/// or the data columns as its keys, and the key column(s) from the entity id. Validated
/// identifiers hold no quote, so they are safe as literals.
fn applied_as_row(source: &SourceSpec) -> String {
    let key: Vec<String> = match source.key_columns.as_slice() {
        [one] => vec![format!("'{one}', p.entity_id")],
        many => many
            .iter()
            .enumerate()
            .map(|(i, column)| format!("'{column}', split_part(p.entity_id, ':', {})", i + 1))
            .collect(),
    };
    let key = key.join(", ");
    match &source.data {
        fare_config::SourceData::Column(column) => format!("jsonb_build_object('{column}', p.data, {key})"),
        fare_config::SourceData::Columns(_) => format!("(p.data || jsonb_build_object({key}))"),
    }
}

/// What `--delete-missing` would delete now, for `--dry-run`: nothing is recorded or sent.
pub async fn preview_deletes(
    pool: &PgPool,
    schema: &Schema,
    source: &SourceSpec,
    options: &JobOptions,
) -> Result<Option<Missing>> {
    let Some((sink, limit)) = &options.delete_missing else { return Ok(None) };
    let plan = delete_plan(source, options, sink, *limit);
    missing_entities(pool, schema, &source.entity, &plan).await.map(Some)
}

const JOB_COLUMNS: &str =
    "id, entity_type, status, emitted, total, applied, deleted, error, created_at, updated_at, finished_at";

fn job_of(row: &sqlx::postgres::PgRow) -> std::result::Result<Job, sqlx::Error> {
    Ok(Job {
        id: row.try_get("id")?,
        entity_type: row.try_get("entity_type")?,
        status: row
            .try_get::<String, _>("status")?
            .parse()
            .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
        emitted: row.try_get("emitted")?,
        total: row.try_get("total")?,
        applied: row.try_get("applied")?,
        deleted: row.try_get("deleted")?,
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

/// A job and what each sink's consumers did with its events (sink → outcome → events).
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    #[serde(flatten)]
    pub job: Job,
    pub outcomes: std::collections::BTreeMap<String, std::collections::BTreeMap<String, i64>>,
}

/// [`get`], with the outcomes the consumers counted.
pub async fn report(pool: &PgPool, schema: &Schema, id: Uuid) -> Result<JobReport> {
    let job = get(pool, schema, id).await?;
    let mut outcomes: std::collections::BTreeMap<String, std::collections::BTreeMap<String, i64>> =
        std::collections::BTreeMap::new();
    let counted = resync_consumer::records::job_outcomes(pool, schema, id)
        .await
        .map_err(db("reading what the sinks did with the job's events"))?;
    for (sink, outcome, events) in counted {
        outcomes.entry(sink).or_default().insert(outcome, events);
    }
    Ok(JobReport { job, outcomes })
}

/// The newest jobs first.
pub async fn list(pool: &PgPool, schema: &Schema, limit: i64) -> Result<Vec<Job>> {
    let sql =
        schema.sql(&format!("SELECT {JOB_COLUMNS} FROM {{schema}}.jobs ORDER BY created_at DESC LIMIT $1"));
    let rows = sqlx::query(sql).bind(limit).fetch_all(pool).await.map_err(db("listing jobs"))?;
    rows.iter().map(job_of).collect::<std::result::Result<_, _>>().map_err(db("listing jobs"))
}

/// Moves a job from one of `from` to `to`; a runner sees it after its current chunk. Moving to
/// `running` clears the last error; to `cancelled` records when it finished.
pub(crate) async fn transition(
    pool: &PgPool,
    schema: &Schema,
    id: Uuid,
    from: &[JobStatus],
    to: JobStatus,
) -> Result<Job> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let sql = schema.sql(
        "UPDATE {schema}.jobs SET status = $3, updated_at = clock_timestamp(), \
         finished_at = CASE WHEN $4 THEN clock_timestamp() ELSE finished_at END, \
         error = CASE WHEN $5 THEN NULL ELSE error END \
         WHERE id = $1 AND status = ANY($2)",
    );
    let changed = sqlx::query(sql)
        .bind(id)
        .bind(&from)
        .bind(to.as_str())
        .bind(to == JobStatus::Cancelled)
        .bind(to == JobStatus::Running)
        .execute(pool)
        .await
        .map_err(db("updating the job"))?;
    let job = get(pool, schema, id).await?;
    if changed.rows_affected() == 0 && job.status != to {
        return Err(JobError::State { id, status: job.status, hint: "that change does not apply to it" });
    }
    Ok(job)
}

/// Sets the status of a job that is `from`, with `error` recorded (or kept, if `None`), and
/// `finished_at` stamped when it becomes `published` (every row sent: the runner's end);
/// returns whether it was `from`. For the runner's and completion's own moves.
pub(crate) async fn set_status_if(
    executor: impl sqlx::PgExecutor<'_>,
    schema: &Schema,
    id: Uuid,
    from: JobStatus,
    to: JobStatus,
    error: Option<&str>,
) -> std::result::Result<bool, sqlx::Error> {
    let sql = schema.sql(
        "UPDATE {schema}.jobs SET status = $3, error = COALESCE($4, error), updated_at = clock_timestamp(), \
         finished_at = CASE WHEN $5 THEN clock_timestamp() ELSE finished_at END \
         WHERE id = $1 AND status = $2",
    );
    let changed = sqlx::query(sql)
        .bind(id)
        .bind(from.as_str())
        .bind(to.as_str())
        .bind(error)
        .bind(to == JobStatus::Published)
        .execute(executor)
        .await?;
    Ok(changed.rows_affected() > 0)
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
