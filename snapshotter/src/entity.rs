//! `resync entity show`: everything resync knows of one entity, put together for the first
//! support question ("why didn't listing 42 sync?"): the source row, the entity's events in the
//! log, and per sink what was applied, started, refused and locked, the last job that sent it,
//! and a one-line verdict. Each fact is read through its owner's functions (the producer's log
//! and counter, the consumer's records, this crate's jobs); nothing here writes.

use chrono::{DateTime, Utc};
use fare_config::SourceSpec;
use resync_consumer::records::{self, EntityAtSink, LockHolder};
use resync_locks::redis_conn::RedisConnection;
use resync_migrations::Schema;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::job::JobStatus;
use crate::query::SourceQuery;
use crate::{JobError, Result, db};

/// How many of the entity's newest events the report lists.
const EVENTS_SHOWN: i64 = 10;

#[derive(Debug, Clone, Serialize)]
pub struct EntityReport {
    pub entity_type: String,
    pub entity_id: String,
    /// The version `resync.emit` last assigned (`None`: it never assigned one).
    pub counter_version: Option<i64>,
    /// The entity's row in its source table as a job would read it; `None` when the table has
    /// no such row (or its filter leaves the row out), or no source is mapped for the type.
    pub source: Option<SourceState>,
    /// The entity's newest events in the log, newest first.
    pub events: Vec<LoggedEvent>,
    pub sinks: Vec<SinkView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceState {
    /// resync's version of the row (its counter, else the table's version column).
    pub version: Option<i64>,
    pub deleted: bool,
    pub data: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoggedEvent {
    pub seq: i64,
    pub id: Uuid,
    pub event_type: String,
    pub version: i64,
    pub deleted: bool,
    pub occurred_at: DateTime<Utc>,
    /// `published`, `pending` (not yet published) or `parked` (its type has no topic).
    pub state: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SinkView {
    pub sink: String,
    pub applied: Option<Applied>,
    /// Whether the applied content equals the source row's (`None`: nothing to compare).
    pub content_equals_source: Option<bool>,
    pub intent: Option<Intent>,
    pub dead_letter: Option<DeadLetter>,
    /// The entity's lock at this sink now (`None`: free, or Redis was not asked).
    pub lock: Option<Lock>,
    pub last_job: Option<JobSent>,
    pub verdict: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub version: i64,
    pub deleted: bool,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Intent {
    pub version: i64,
    pub started_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub version: i64,
    pub reason: String,
    pub detail: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Lock {
    pub owner_token: String,
    pub lease_left_ms: u128,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobSent {
    pub id: Uuid,
    pub status: JobStatus,
    pub version: i64,
    pub created_at: DateTime<Utc>,
}

/// Where `inspect_entity` looks.
pub struct Inspect<'a> {
    pub pool: &'a PgPool,
    pub schema: &'a Schema,
    /// The source mapped for the entity type, if any service maps one.
    pub source: Option<&'a SourceSpec>,
    /// The sinks to report on.
    pub sinks: &'a [String],
    /// Where the consumers' locks live, and their namespace (`None`: locks are not looked up).
    pub locks: Option<(&'a mut RedisConnection, Option<&'a str>)>,
}

/// Everything resync knows of one entity.
pub async fn inspect_entity(
    inspect: Inspect<'_>,
    entity_type: &str,
    entity_id: &str,
) -> Result<EntityReport> {
    let Inspect { pool, schema, source, sinks, mut locks } = inspect;
    let counter_version = resync_producer::versions::current(pool, schema, entity_type, entity_id)
        .await
        .map_err(db("reading the entity's version counter"))?;
    let source = match source {
        Some(spec) => SourceQuery::one_row(pool, schema, spec, entity_id).await?.map(|row| SourceState {
            version: row.counted.or(row.declared),
            deleted: row.deleted,
            data: row.data,
        }),
        None => None,
    };
    let events = resync_producer::entity_events(pool, schema, entity_type, entity_id, EVENTS_SHOWN)
        .await
        .map_err(|e| JobError::Source { table: "outbox".into(), problem: e.to_string() })?
        .into_iter()
        .map(|e| LoggedEvent {
            seq: e.seq,
            id: e.id,
            event_type: e.event_type,
            version: e.version,
            deleted: e.deleted,
            occurred_at: e.occurred_at,
            state: e.state,
        })
        .collect();
    let current = counter_version.or(source.as_ref().and_then(|s| s.version));
    let mut views = Vec::with_capacity(sinks.len());
    for sink in sinks {
        let at_sink = records::entity_at_sink(pool, schema, sink, entity_type, entity_id)
            .await
            .map_err(db(format!("reading what sink `{sink}` recorded")))?;
        let lock = match &mut locks {
            Some((redis, namespace)) => {
                let key =
                    records::entity_lock_key(&records::lock_prefix(*namespace), sink, entity_type, entity_id);
                records::lock_holder(redis, &key).await.ok().flatten()
            }
            None => None,
        };
        let last_job = last_job(pool, schema, sink, entity_type, entity_id).await?;
        views.push(sink_view(sink, current, source.as_ref(), at_sink, lock, last_job));
    }
    Ok(EntityReport {
        entity_type: entity_type.to_string(),
        entity_id: entity_id.to_string(),
        counter_version,
        source,
        events,
        sinks: views,
    })
}

fn sink_view(
    sink: &str,
    current: Option<i64>,
    source: Option<&SourceState>,
    at_sink: EntityAtSink,
    lock: Option<LockHolder>,
    last_job: Option<JobSent>,
) -> SinkView {
    let verdict = verdict(current, &at_sink);
    let content_equals_source = match (&at_sink.applied, source) {
        (Some(applied), Some(row)) if !applied.deleted && !row.deleted => Some(applied.data == row.data),
        _ => None,
    };
    SinkView {
        sink: sink.to_string(),
        applied: at_sink.applied.map(|a| Applied {
            version: a.version,
            deleted: a.deleted,
            at: a.applied_at,
        }),
        content_equals_source,
        intent: at_sink.intent.map(|(version, started_at)| Intent { version, started_at }),
        dead_letter: at_sink.dead_letter.map(|d| DeadLetter {
            version: d.version,
            reason: d.reason,
            detail: d.detail,
            at: d.dead_lettered_at,
        }),
        lock: lock.map(|l| Lock { owner_token: l.token, lease_left_ms: l.lease_left.as_millis() }),
        last_job,
        verdict,
    }
}

/// One line on where the sink stands against the entity's current version: `in sync (v9)`,
/// `deleted (v9)`, `dead-lettered: v9 sink-rejected (422 ...); v7 applied`, `in flight: v9
/// since ...; v7 applied`, `never applied: v9 current`, `behind: v7 applied, v9 current, v8
/// dead-lettered sink-rejected`.
pub fn verdict(current: Option<i64>, at_sink: &EntityAtSink) -> String {
    let applied = at_sink.applied.as_ref().map(|a| a.version);
    let applied_note = applied.map_or("never applied".to_string(), |a| format!("v{a} applied"));
    let newer = |version: i64| applied.is_none_or(|a| version > a);
    let dead = at_sink.dead_letter.as_ref().filter(|d| newer(d.version));
    let intent = at_sink.intent.filter(|(version, _)| newer(*version));
    let Some(current) = current else {
        return match applied {
            Some(a) => format!("applied v{a}; the source knows no version of it"),
            None => "unknown: no version at the source, nothing applied".to_string(),
        };
    };
    if let Some(applied) = &at_sink.applied {
        if applied.version == current {
            let state = if applied.deleted { "deleted" } else { "in sync" };
            return format!("{state} (v{current})");
        }
        if applied.version > current {
            return format!("ahead: v{} applied, v{current} current", applied.version);
        }
    }
    if let Some(dead) = dead.filter(|d| d.version >= current) {
        return format!("dead-lettered: v{} {}; {applied_note}", dead.version, reason_of(dead));
    }
    if let Some((version, since)) = intent.filter(|(version, _)| *version >= current) {
        return format!(
            "in flight: v{version} since {}; {applied_note}",
            since.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    let mut line = match applied {
        Some(a) => format!("behind: v{a} applied, v{current} current"),
        None => format!("never applied: v{current} current"),
    };
    if let Some(dead) = dead {
        line.push_str(&format!(", v{} dead-lettered {}", dead.version, reason_of(dead)));
    }
    if let Some((version, since)) = intent {
        line.push_str(&format!(", v{version} in flight since {}", since.format("%Y-%m-%d %H:%M:%S UTC")));
    }
    line
}

fn reason_of(dead: &records::DeadLetterRecord) -> String {
    let detail: String = dead.detail.chars().take(80).collect();
    if detail.is_empty() { dead.reason.clone() } else { format!("{} ({detail})", dead.reason) }
}

/// The newest job sent to `sink` that published the entity, and the version it sent. A job
/// forgets its rows when it completes: this finds jobs in progress.
async fn last_job(
    pool: &PgPool,
    schema: &Schema,
    sink: &str,
    entity_type: &str,
    entity_id: &str,
) -> Result<Option<JobSent>> {
    let sql = schema.sql(
        "SELECT j.id, j.status, r.version, j.created_at FROM {schema}.job_rows r \
         JOIN {schema}.jobs j ON j.id = r.job_id \
         WHERE j.entity_type = $1 AND r.entity_id = $2 AND (j.spec->'sinks') ? $3 \
         ORDER BY j.created_at DESC LIMIT 1",
    );
    let row: Option<(Uuid, String, i64, DateTime<Utc>)> = sqlx::query_as(sql)
        .bind(entity_type)
        .bind(entity_id)
        .bind(sink)
        .fetch_optional(pool)
        .await
        .map_err(db("reading the jobs that sent the entity"))?;
    row.map(|(id, status, version, created_at)| {
        let status =
            status.parse().map_err(|problem: String| JobError::Source { table: "jobs".into(), problem })?;
        Ok(JobSent { id, status, version, created_at })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use resync_consumer::records::{AppliedRecord, DeadLetterRecord};

    fn applied(version: i64, deleted: bool) -> Option<AppliedRecord> {
        Some(AppliedRecord { version, deleted, data: serde_json::json!({}), applied_at: Utc::now() })
    }

    fn dead(version: i64) -> Option<DeadLetterRecord> {
        Some(DeadLetterRecord {
            version,
            reason: "sink-rejected".into(),
            detail: "422 Unprocessable Entity".into(),
            dead_lettered_at: Utc::now(),
        })
    }

    #[test]
    fn each_state_has_its_verdict() {
        let at = |applied, intent, dead_letter| EntityAtSink { applied, intent, dead_letter };
        let now = Utc::now();
        assert_eq!(verdict(Some(9), &at(applied(9, false), None, None)), "in sync (v9)");
        assert_eq!(verdict(Some(9), &at(applied(9, true), None, None)), "deleted (v9)");
        assert_eq!(verdict(Some(9), &at(None, None, None)), "never applied: v9 current");
        assert_eq!(
            verdict(Some(9), &at(applied(7, false), None, dead(8))),
            "behind: v7 applied, v9 current, v8 dead-lettered sink-rejected (422 Unprocessable Entity)"
        );
        assert_eq!(
            verdict(Some(9), &at(applied(7, false), None, dead(9))),
            "dead-lettered: v9 sink-rejected (422 Unprocessable Entity); v7 applied"
        );
        assert!(verdict(Some(9), &at(None, Some((9, now)), None)).starts_with("in flight: v9 since "));
        assert_eq!(
            verdict(Some(9), &at(applied(9, false), None, dead(3))),
            "in sync (v9)",
            "an old letter is history"
        );
        assert_eq!(
            verdict(None, &at(None, None, None)),
            "unknown: no version at the source, nothing applied"
        );
    }
}
