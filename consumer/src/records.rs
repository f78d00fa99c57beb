//! What other parts of resync read of the consumer's records, as typed functions: the applied
//! versions, sink intents and dead-lettered entities a sink holds, and its entity locks in
//! Redis. The consumer owns these (it writes them through [`crate::AppliedStore`] and its
//! locker); jobs, `verify`, `entity show` and the demo's report read them only through this
//! module, so their SQL and key formats live in one crate.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use resync_migrations::Schema;
use sqlx::PgPool;

/// A sink's record of one entity: a version it applied (or skipped as unchanged), or a version
/// it dead-lettered, and when.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SinkRecord {
    pub sink: String,
    pub entity_id: String,
    pub version: i64,
    pub at: DateTime<Utc>,
}

/// Every sink's applied and dead-lettered records of these entities (up to two per sink and
/// entity).
pub async fn sink_records(
    pool: &PgPool,
    schema: &Schema,
    sinks: &[String],
    entity_type: &str,
    entity_ids: &[&str],
) -> Result<Vec<SinkRecord>, sqlx::Error> {
    // One primary-key probe per (entity, sink), whatever the statistics say: `LIMIT 1` keeps
    // each lookup a subquery the planner cannot turn into a scan of the whole sink, which it did
    // on the stale statistics of a table a resync fills faster than autovacuum analyzes it.
    let sql = schema.sql(
        "SELECT s.sink, k.entity_id, r.version, r.at \
         FROM unnest($3::text[]) AS k(entity_id) CROSS JOIN unnest($1::text[]) AS s(sink) \
         CROSS JOIN LATERAL ( \
           (SELECT version, applied_at AS at FROM {schema}.applied_versions \
            WHERE sink = s.sink AND entity_type = $2 AND entity_id = k.entity_id LIMIT 1) \
           UNION ALL \
           (SELECT version, dead_lettered_at FROM {schema}.dead_lettered_entities \
            WHERE sink = s.sink AND entity_type = $2 AND entity_id = k.entity_id LIMIT 1)) r",
    );
    sqlx::query_as(sql).bind(sinks).bind(entity_type).bind(entity_ids).fetch_all(pool).await
}

/// What one sink holds of one entity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntityAtSink {
    pub applied: Option<AppliedRecord>,
    /// A call started for this version and not yet recorded as applied or refused.
    pub intent: Option<(i64, DateTime<Utc>)>,
    pub dead_letter: Option<DeadLetterRecord>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AppliedRecord {
    pub version: i64,
    pub deleted: bool,
    pub data: serde_json::Value,
    pub applied_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DeadLetterRecord {
    pub version: i64,
    pub reason: String,
    pub detail: String,
    pub dead_lettered_at: DateTime<Utc>,
}

/// Everything `sink` recorded of one entity.
pub async fn entity_at_sink(
    pool: &PgPool,
    schema: &Schema,
    sink: &str,
    entity_type: &str,
    entity_id: &str,
) -> Result<EntityAtSink, sqlx::Error> {
    let key = "WHERE sink = $1 AND entity_type = $2 AND entity_id = $3";
    let applied = schema
        .sql(&format!("SELECT version, deleted, data, applied_at FROM {{schema}}.applied_versions {key}"));
    let intent = schema.sql(&format!("SELECT version, started_at FROM {{schema}}.sink_intents {key}"));
    let dead_letter = schema.sql(&format!(
        "SELECT version, reason, detail, dead_lettered_at FROM {{schema}}.dead_lettered_entities {key}"
    ));
    Ok(EntityAtSink {
        applied: sqlx::query_as(applied)
            .bind(sink)
            .bind(entity_type)
            .bind(entity_id)
            .fetch_optional(pool)
            .await?,
        intent: sqlx::query_as(intent)
            .bind(sink)
            .bind(entity_type)
            .bind(entity_id)
            .fetch_optional(pool)
            .await?,
        dead_letter: sqlx::query_as(dead_letter)
            .bind(sink)
            .bind(entity_type)
            .bind(entity_id)
            .fetch_optional(pool)
            .await?,
    })
}

/// The Redis key of an entity's lock at `sink`, under the consumers' `lock_prefix`
/// ([`lock_prefix`]).
pub fn entity_lock_key(lock_prefix: &str, sink: &str, entity_type: &str, entity_id: &str) -> String {
    format!("{lock_prefix}resync:lock:{sink}:{entity_type}:{entity_id}")
}

/// What the consumers of a namespace put before their lock keys.
pub fn lock_prefix(namespace: Option<&str>) -> String {
    namespace.map(|ns| format!("{ns}:")).unwrap_or_default()
}

/// Who holds an entity's lock now: the holder's owner token and how long its lease has left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    pub token: String,
    pub lease_left: std::time::Duration,
}

/// The holder of the lock at `key`, if any.
pub async fn lock_holder(
    redis: &mut resync_locks::redis_conn::RedisConnection,
    key: &str,
) -> Result<Option<LockHolder>, redis::RedisError> {
    let (token, pttl): (Option<String>, i64) =
        redis::pipe().cmd("GET").arg(key).cmd("PTTL").arg(key).query_async(redis).await?;
    Ok(token.map(|token| LockHolder {
        token,
        lease_left: std::time::Duration::from_millis(u64::try_from(pttl).unwrap_or(0)),
    }))
}

/// What each sink's consumers did with a resync job's events: `(sink, outcome, events)`, the
/// outcome as `resync_consumer_events_total` labels it (`applied`, `skipped_unchanged`, `stale`,
/// `duplicate`, `dead_lettered`, `repaired`).
pub async fn job_outcomes(
    pool: &PgPool,
    schema: &Schema,
    job: uuid::Uuid,
) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    let sql = schema.sql(
        "SELECT sink, outcome, events FROM {schema}.job_outcomes WHERE job_id = $1 ORDER BY sink, outcome",
    );
    sqlx::query_as(sql).bind(job).fetch_all(pool).await
}

/// The version `sink` applied of each of these entities that it applied at all.
pub async fn applied_versions(
    pool: &PgPool,
    schema: &Schema,
    sink: &str,
    entity_type: &str,
    entity_ids: &[&str],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let sql = schema.sql(
        "SELECT entity_id, version FROM {schema}.applied_versions \
         WHERE sink = $1 AND entity_type = $2 AND entity_id = ANY($3)",
    );
    let rows: Vec<(String, i64)> =
        sqlx::query_as(sql).bind(sink).bind(entity_type).bind(entity_ids).fetch_all(pool).await?;
    Ok(rows.into_iter().collect())
}

/// A SQL query, for a job's statement, of the entities a sink holds as present: columns
/// `entity_id`, `version` and `data` (the content last applied), for the sink `$1` and entity
/// type `$2`. A fragment rather than a function because the job joins it with its source table
/// in one statement.
pub fn present_at_sink_query(schema: &Schema) -> String {
    format!(
        "SELECT entity_id, version, data FROM {}.applied_versions \
         WHERE sink = $1 AND entity_type = $2 AND NOT deleted",
        schema.ident()
    )
}

/// A SQL condition, for a query reading a source table, that holds for rows whose entity `sink`
/// dead-lettered: `key_text` is the row's key as text, `sink` and `entity_type` are SQL
/// literals (quoted by the caller). A fragment rather than a function because a job reads it in
/// its own snapshot, in the same statement as the rows.
pub fn dead_lettered_condition(schema: &Schema, key_text: &str, sink: &str, entity_type: &str) -> String {
    format!(
        "{key_text} IN (SELECT entity_id FROM {}.dead_lettered_entities \
         WHERE sink = {sink} AND entity_type = {entity_type})",
        schema.ident()
    )
}
