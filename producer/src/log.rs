//! The event log kept after publishing: replaying a range, and trimming old events.

use std::sync::Arc;
use std::time::Duration;

use resync_bus::{Destination, Filter, OutgoingMessage, Transport, TransportError};
use resync_migrations::Schema;
use sqlx::PgPool;
use tracing::info;

use crate::relay::PendingRow;

/// Where replayed events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayTarget {
    /// Their live topics: every subscriber gets them again.
    AllSubscribers { namespace: Option<String> },
    /// One queue (a service's live queue): only that service gets them, and only the types
    /// it subscribes to there (the rest are skipped and counted).
    Queue { queue: String, subscribed: Filter },
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    pub sent: u64,
    /// Events of types the target service does not subscribe to: not sent.
    pub not_subscribed: u64,
}

/// A range of the log to republish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRequest {
    /// First sequence number, inclusive.
    pub from: i64,
    /// Last sequence number, inclusive; `None` for the end of the log.
    pub to: Option<i64>,
    pub entity_type: Option<String>,
    pub target: ReplayTarget,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log database error while {doing}: {source}")]
    Database { doing: &'static str, source: sqlx::Error },
    #[error("replaying events {first_seq}..={last_seq} failed: {source}")]
    Publish { first_seq: i64, last_seq: i64, source: TransportError },
    #[error("invalid request: {0}")]
    Invalid(String),
}

const PAGE: i64 = 500;

/// Republishes a range of the log in sequence order. Events keep their ids and versions, so
/// consumers that already applied them skip them.
pub async fn replay(
    pool: &PgPool,
    schema: &Schema,
    transport: &Arc<dyn Transport>,
    request: &ReplayRequest,
) -> Result<Replayed, LogError> {
    if request.to.is_some_and(|to| to < request.from) {
        return Err(LogError::Invalid(format!("--to {:?} is before --from {}", request.to, request.from)));
    }
    let sql = schema.sql(
        "SELECT seq, id, event_type, entity_type, entity_id, version, occurred_at, deleted, data, traceparent \
         FROM {schema}.outbox WHERE seq >= $1 AND seq <= $2 AND ($3::text IS NULL OR entity_type = $3) \
         ORDER BY seq LIMIT $4",
    );
    let mut next = request.from;
    let mut replayed = Replayed::default();
    loop {
        let rows: Vec<PendingRow> = sqlx::query_as(sql.clone())
            .bind(next)
            .bind(request.to.unwrap_or(i64::MAX))
            .bind(&request.entity_type)
            .bind(PAGE)
            .fetch_all(pool)
            .await
            .map_err(|source| LogError::Database { doing: "reading the log", source })?;
        let Some(last) = rows.last() else { break };
        let (first_seq, last_seq) = (rows[0].seq, last.seq);
        next = last_seq + 1;
        let count = rows.len() as u64;
        let groups = destinations(rows, &request.target);
        let sent: u64 = groups.iter().map(|(_, messages)| messages.len() as u64).sum();
        replayed.not_subscribed += count - sent;
        for (destination, messages) in groups {
            transport.publish_batch(&destination, messages).await.map_err(|source| LogError::Publish {
                first_seq,
                last_seq,
                source,
            })?;
        }
        replayed.sent += sent;
        info!(first_seq, last_seq, sent = replayed.sent, "replayed");
    }
    metrics::counter!("resync_replayed_total").increment(replayed.sent);
    Ok(replayed)
}

fn destinations(rows: Vec<PendingRow>, target: &ReplayTarget) -> Vec<(Destination, Vec<OutgoingMessage>)> {
    let mut groups: Vec<(Destination, Vec<OutgoingMessage>)> = Vec::new();
    for row in rows {
        let destination = match target {
            ReplayTarget::AllSubscribers { namespace } => {
                Destination::Topic(crate::live_topic(namespace.as_deref(), &row.entity_type))
            }
            ReplayTarget::Queue { subscribed, .. } if !subscribed.matches(&row.event_type) => continue,
            ReplayTarget::Queue { queue, .. } => Destination::Queue(queue.clone()),
        };
        let message = OutgoingMessage::from_envelope(&row.envelope());
        match groups.iter_mut().find(|(d, _)| *d == destination) {
            Some((_, messages)) => messages.push(message),
            None => groups.push((destination, vec![message])),
        }
    }
    groups
}

/// Deletes published events older than `older_than` from the log, in chunks so writers are
/// never blocked for long. Unpublished events are never deleted. Returns how many went.
pub async fn prune(pool: &PgPool, schema: &Schema, older_than: Duration) -> Result<u64, LogError> {
    let sql = schema.sql(
        "DELETE FROM {schema}.outbox WHERE seq IN ( \
             SELECT o.seq FROM {schema}.outbox o \
             WHERE o.occurred_at < now() - make_interval(secs => $1) \
               AND NOT EXISTS (SELECT 1 FROM {schema}.outbox_pending p WHERE p.seq = o.seq) \
               AND NOT EXISTS (SELECT 1 FROM {schema}.outbox_parked k WHERE k.seq = o.seq) \
             ORDER BY o.seq LIMIT 10000)",
    );
    let mut deleted = 0;
    loop {
        let done = sqlx::query(sql.clone())
            .bind(older_than.as_secs_f64())
            .execute(pool)
            .await
            .map_err(|source| LogError::Database { doing: "pruning the log", source })?
            .rows_affected();
        deleted += done;
        if done == 0 {
            break;
        }
    }
    info!(deleted, ?older_than, "pruned the event log");
    Ok(deleted)
}

/// Events the relay parked, per entity type: how many, the first and last sequence numbers,
/// and why (the newest reason).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Parked {
    pub entity_type: String,
    pub events: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub reason: String,
}

/// One entity's event as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LoggedEvent {
    pub seq: i64,
    pub id: uuid::Uuid,
    pub event_type: String,
    pub version: i64,
    pub deleted: bool,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    /// `pending` (the relay has not published it yet), `parked` (its type has no topic) or
    /// `published`.
    pub state: String,
}

/// The newest `limit` events of one entity, newest first. Reads the entity type's part of the
/// log (it has no index by entity: emitting stays one index cheaper), so it is for looking one
/// entity up, not for a loop.
pub async fn entity_events(
    pool: &PgPool,
    schema: &Schema,
    entity_type: &str,
    entity_id: &str,
    limit: i64,
) -> Result<Vec<LoggedEvent>, LogError> {
    let sql = schema.sql(
        "SELECT o.seq, o.id, o.event_type, o.version, o.deleted, o.occurred_at, \
                CASE WHEN k.seq IS NOT NULL THEN 'parked' WHEN p.seq IS NOT NULL THEN 'pending' \
                     ELSE 'published' END AS state \
         FROM {schema}.outbox o \
         LEFT JOIN {schema}.outbox_pending p ON p.seq = o.seq \
         LEFT JOIN {schema}.outbox_parked k ON k.seq = o.seq \
         WHERE o.entity_type = $1 AND o.entity_id = $2 ORDER BY o.seq DESC LIMIT $3",
    );
    sqlx::query_as(sql)
        .bind(entity_type)
        .bind(entity_id)
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(|source| LogError::Database { doing: "reading an entity's events", source })
}

/// What the relay parked, by entity type.
pub async fn parked(pool: &PgPool, schema: &Schema) -> Result<Vec<Parked>, LogError> {
    let sql = schema.sql(
        "SELECT entity_type, count(*) AS events, min(seq) AS first_seq, max(seq) AS last_seq, \
                (array_agg(reason ORDER BY seq DESC))[1] AS reason \
         FROM {schema}.outbox_parked GROUP BY entity_type ORDER BY entity_type",
    );
    sqlx::query_as(sql)
        .fetch_all(pool)
        .await
        .map_err(|source| LogError::Database { doing: "reading parked events", source })
}

/// Puts the parked events of `entity_type` back in line for the relay, in their order (once
/// a topic exists for them); returns how many.
pub async fn release_parked(pool: &PgPool, schema: &Schema, entity_type: &str) -> Result<u64, LogError> {
    let sql = schema.sql(
        "WITH released AS (DELETE FROM {schema}.outbox_parked WHERE entity_type = $1 RETURNING seq) \
         INSERT INTO {schema}.outbox_pending SELECT seq FROM released ON CONFLICT DO NOTHING",
    );
    let released = sqlx::query(sql)
        .bind(entity_type)
        .execute(pool)
        .await
        .map_err(|source| LogError::Database { doing: "releasing parked events", source })?
        .rows_affected();
    let notify = sqlx::query("SELECT pg_notify($1, '')").bind(schema.notify_channel());
    notify.execute(pool).await.map_err(|source| LogError::Database { doing: "waking the relay", source })?;
    Ok(released)
}

/// Gives up on the parked events of `entity_type`: they are never published (they stay in
/// the log); returns how many.
pub async fn drop_parked(pool: &PgPool, schema: &Schema, entity_type: &str) -> Result<u64, LogError> {
    let sql = schema.sql("DELETE FROM {schema}.outbox_parked WHERE entity_type = $1");
    Ok(sqlx::query(sql)
        .bind(entity_type)
        .execute(pool)
        .await
        .map_err(|source| LogError::Database { doing: "dropping parked events", source })?
        .rows_affected())
}

/// How much of the event log is kept: events and the first sequence number (1 when empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct LogExtent {
    pub events: i64,
    pub first_seq: i64,
}

/// The events kept in the log and where it starts (what `replay` can still send).
pub async fn extent(pool: &PgPool, schema: &Schema) -> Result<LogExtent, LogError> {
    let sql =
        schema.sql("SELECT count(*) AS events, coalesce(min(seq), 1) AS first_seq FROM {schema}.outbox");
    sqlx::query_as(sql)
        .fetch_one(pool)
        .await
        .map_err(|source| LogError::Database { doing: "reading the event log's extent", source })
}
