//! The applied-version store in Postgres: what each sink has, per entity, and the
//! compare-and-set that records a new applied version.

use std::collections::HashMap;

use resync_migrations::Schema;
use uuid::Uuid;

use crate::db::Db;

use crate::decision::{Applied, Resend};
use crate::sink::Origin;

/// One entity's applied state, with the data needed to re-send it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AppliedState {
    pub version: i64,
    pub content_hash: Vec<u8>,
    pub deleted: bool,
    pub data: serde_json::Value,
    pub event_id: Uuid,
    /// How the rule treats this event if the sink has its version already (not stored: a
    /// property of the event, see [`Resend`]).
    #[sqlx(skip)]
    pub resend: Resend,
    /// Which stream the event came on (not stored: a recorded state re-sent is `Live`).
    #[sqlx(skip)]
    pub origin: Origin,
}

impl AppliedState {
    pub fn applied(&self) -> Applied {
        Applied { version: self.version, content_hash: self.content_hash.clone() }
    }
}

/// What the version rule needs to know about an entity: its recorded applied state, and the
/// newest version whose sink call started (`sink_intents`), which may be ahead of it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Current {
    pub applied: Option<AppliedState>,
    pub started: Option<i64>,
}

/// Identifies one entity at one sink.
#[derive(Debug, Clone, Copy)]
pub struct EntityKey<'a> {
    pub sink: &'a str,
    pub entity_type: &'a str,
    pub entity_id: &'a str,
}

/// An entity of one sink, owned: the key of batch reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityId {
    pub entity_type: String,
    pub entity_id: String,
}

/// A row of the batch read: every column optional, as the entity may be unknown.
#[derive(sqlx::FromRow)]
struct CurrentRow {
    entity_type: String,
    entity_id: String,
    version: Option<i64>,
    content_hash: Option<Vec<u8>>,
    deleted: Option<bool>,
    data: Option<serde_json::Value>,
    event_id: Option<Uuid>,
    started: Option<i64>,
}

impl CurrentRow {
    fn into_current(self) -> (EntityId, Current) {
        let applied = match (self.version, self.content_hash, self.deleted, self.data, self.event_id) {
            (Some(version), Some(content_hash), Some(deleted), Some(data), Some(event_id)) => {
                Some(AppliedState {
                    version,
                    content_hash,
                    deleted,
                    data,
                    event_id,
                    resend: Resend::Never,
                    origin: Origin::Live,
                })
            }
            _ => None,
        };
        let entity = EntityId { entity_type: self.entity_type, entity_id: self.entity_id };
        (entity, Current { applied, started: self.started })
    }
}

/// One compare-and-set of a batch: record `new` if the entity is still at `expected`.
#[derive(Debug, Clone)]
pub struct CasRequest<'a> {
    pub entity: &'a EntityId,
    pub expected: Option<i64>,
    pub new: &'a AppliedState,
}

/// The outcome of a compare-and-set.
#[derive(Debug, Clone, PartialEq)]
pub enum Cas {
    Recorded,
    /// The row was not at the expected version; here is what it is now (`None`: no row).
    Conflict(Option<AppliedState>),
    /// The row was not at the expected version, and what it is now was not read (a batch
    /// compare-and-set reports only which requests were recorded).
    ConflictUnread,
}

/// The applied state and started version of each key `k` (entity_type, entity_id) of sink `$1`,
/// as joins for a statement's FROM clause.
///
/// One primary-key probe per key, whatever the statistics say: without the `LIMIT 1` (which
/// keeps each lookup a subquery the planner cannot flatten) a plain join becomes a hash join
/// over every row of the sink when the statistics were taken while a new sink's tables were
/// still small, as a first resync fills them faster than autovacuum analyzes (measured: most of
/// Postgres's time in a 100,000-entity resync went to such scans).
const PROBE_CURRENT: &str = "\
    LEFT JOIN LATERAL (SELECT version, content_hash, deleted, data, event_id FROM {schema}.applied_versions \
                       WHERE sink = $1 AND entity_type = k.entity_type AND entity_id = k.entity_id LIMIT 1) a ON true \
    LEFT JOIN LATERAL (SELECT version FROM {schema}.sink_intents \
                       WHERE sink = $1 AND entity_type = k.entity_type AND entity_id = k.entity_id LIMIT 1) i ON true";

#[derive(Clone)]
pub struct AppliedStore {
    db: Db,
    schema: Schema,
}

impl AppliedStore {
    pub fn new(db: impl Into<Db>, schema: Schema) -> Self {
        Self { db: db.into(), schema }
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub async fn get(&self, key: EntityKey<'_>) -> Result<Option<AppliedState>, sqlx::Error> {
        let query = sqlx::query_as(self.schema.sql(
            "SELECT version, content_hash, deleted, data, event_id FROM {schema}.applied_versions \
             WHERE sink = $1 AND entity_type = $2 AND entity_id = $3",
        ))
        .bind(key.sink)
        .bind(key.entity_type)
        .bind(key.entity_id);
        Ok(self.db.fetch_all(query).await?.into_iter().next())
    }

    /// Records `new` as applied if the entity is still at `expected` (`None`: never applied).
    pub async fn compare_and_set(
        &self,
        key: EntityKey<'_>,
        expected: Option<i64>,
        new: &AppliedState,
    ) -> Result<Cas, sqlx::Error> {
        let query = match expected {
            None => sqlx::query(self.schema.sql(
                "INSERT INTO {schema}.applied_versions \
                   (sink, entity_type, entity_id, version, content_hash, deleted, data, event_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            )),
            Some(_) => sqlx::query(self.schema.sql(
                "UPDATE {schema}.applied_versions SET version = $4, content_hash = $5, deleted = $6, \
                   data = $7, event_id = $8, applied_at = clock_timestamp() \
                 WHERE sink = $1 AND entity_type = $2 AND entity_id = $3 AND version = $9",
            )),
        }
        .bind(key.sink)
        .bind(key.entity_type)
        .bind(key.entity_id)
        .bind(new.version)
        .bind(&new.content_hash)
        .bind(new.deleted)
        .bind(&new.data)
        .bind(new.event_id);
        let query = match expected {
            Some(version) => query.bind(version),
            None => query,
        };
        let recorded = self.db.execute(query).await?.rows_affected() == 1;
        if recorded { Ok(Cas::Recorded) } else { Ok(Cas::Conflict(self.get(key).await?)) }
    }

    /// The applied state and started version of many entities of `sink` in one query.
    pub async fn get_many(
        &self,
        sink: &str,
        entities: &[&EntityId],
    ) -> Result<HashMap<EntityId, Current>, sqlx::Error> {
        if entities.is_empty() {
            return Ok(HashMap::new());
        }
        let (types, ids): (Vec<&str>, Vec<&str>) =
            entities.iter().map(|e| (e.entity_type.as_str(), e.entity_id.as_str())).unzip();
        let query = sqlx::query_as(self.schema.sql(
            &"SELECT k.entity_type, k.entity_id, a.version, a.content_hash, a.deleted, a.data, a.event_id, \
                     i.version AS started \
              FROM unnest($2::text[], $3::text[]) AS k(entity_type, entity_id) {probe_current}"
                .replace("{probe_current}", PROBE_CURRENT),
        ))
        .bind(sink)
        .bind(types)
        .bind(ids);
        let rows: Vec<CurrentRow> = self.db.fetch_all(query).await?;
        Ok(rows.into_iter().map(CurrentRow::into_current).collect())
    }

    /// [`AppliedStore::get_many`] for a batch of events (entity, event version), which also
    /// records, in the same statement, the intent of every event that may be sent: newer than
    /// what is applied and not behind another started call. Returns the state as it was before
    /// (the version rule needs that); an intent recorded for an event that then turns out
    /// stale or fails is harmless, as the version rule reads it only against older events.
    pub async fn read_and_mark(
        &self,
        sink: &str,
        events: &[(&EntityId, i64)],
    ) -> Result<HashMap<EntityId, Current>, sqlx::Error> {
        if events.is_empty() {
            return Ok(HashMap::new());
        }
        let types: Vec<&str> = events.iter().map(|(e, _)| e.entity_type.as_str()).collect();
        let ids: Vec<&str> = events.iter().map(|(e, _)| e.entity_id.as_str()).collect();
        let versions: Vec<i64> = events.iter().map(|(_, v)| *v).collect();
        let query = sqlx::query_as(self.schema.sql(
            &"WITH cur AS ( \
               SELECT k.entity_type, k.entity_id, k.mine, a.version, a.content_hash, a.deleted, a.data, \
                      a.event_id, i.version AS started \
               FROM unnest($2::text[], $3::text[], $4::bigint[]) AS k(entity_type, entity_id, mine) \
               {probe_current}), \
             marked AS ( \
               INSERT INTO {schema}.sink_intents (sink, entity_type, entity_id, version) \
               SELECT $1, entity_type, entity_id, mine FROM cur \
               WHERE mine > coalesce(version, 0) AND coalesce(started, 0) <= mine \
               ON CONFLICT (sink, entity_type, entity_id) DO UPDATE \
                 SET version = greatest(sink_intents.version, excluded.version), started_at = clock_timestamp()) \
             SELECT entity_type, entity_id, version, content_hash, deleted, data, event_id, started FROM cur"
                .replace("{probe_current}", PROBE_CURRENT),
        ))
        .bind(sink)
        .bind(types)
        .bind(ids)
        .bind(versions);
        let rows: Vec<CurrentRow> = self.db.fetch_all(query).await?;
        Ok(rows.into_iter().map(CurrentRow::into_current).collect())
    }

    /// One entity's applied state and started version.
    pub async fn current(&self, key: EntityKey<'_>) -> Result<Current, sqlx::Error> {
        let entity =
            EntityId { entity_type: key.entity_type.to_string(), entity_id: key.entity_id.to_string() };
        Ok(self.get_many(key.sink, &[&entity]).await?.remove(&entity).unwrap_or_default())
    }

    /// Records, before the sink calls, that calls for these versions start (kept at the
    /// highest version per entity), in one statement.
    pub async fn record_intents(&self, sink: &str, intents: &[(&EntityId, i64)]) -> Result<(), sqlx::Error> {
        if intents.is_empty() {
            return Ok(());
        }
        let types: Vec<&str> = intents.iter().map(|(e, _)| e.entity_type.as_str()).collect();
        let ids: Vec<&str> = intents.iter().map(|(e, _)| e.entity_id.as_str()).collect();
        let versions: Vec<i64> = intents.iter().map(|(_, v)| *v).collect();
        let query = sqlx::query(self.schema.sql(
            "INSERT INTO {schema}.sink_intents (sink, entity_type, entity_id, version) \
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[]) \
             ON CONFLICT (sink, entity_type, entity_id) DO UPDATE \
               SET version = greatest(sink_intents.version, excluded.version), started_at = clock_timestamp()",
        ))
        .bind(sink)
        .bind(types)
        .bind(ids)
        .bind(versions);
        self.db.execute(query).await?;
        Ok(())
    }

    /// Forgets the intent of `version` after the sink refused it for good (nothing landed).
    pub async fn clear_intent(&self, key: EntityKey<'_>, version: i64) -> Result<(), sqlx::Error> {
        let query = sqlx::query(self.schema.sql(
            "DELETE FROM {schema}.sink_intents WHERE sink = $1 AND entity_type = $2 AND entity_id = $3 \
             AND version = $4",
        ))
        .bind(key.sink)
        .bind(key.entity_type)
        .bind(key.entity_id)
        .bind(version);
        self.db.execute(query).await?;
        Ok(())
    }

    /// Adds to the counts of what this sink did with resync jobs' events: `(job, outcome label,
    /// events)`, in one statement.
    pub async fn add_job_outcomes(
        &self,
        sink: &str,
        counts: &[(uuid::Uuid, &str, i64)],
    ) -> Result<(), sqlx::Error> {
        if counts.is_empty() {
            return Ok(());
        }
        let jobs: Vec<uuid::Uuid> = counts.iter().map(|(job, _, _)| *job).collect();
        let outcomes: Vec<&str> = counts.iter().map(|(_, outcome, _)| *outcome).collect();
        let events: Vec<i64> = counts.iter().map(|(_, _, n)| *n).collect();
        let query = sqlx::query(self.schema.sql(
            "INSERT INTO {schema}.job_outcomes AS o (job_id, sink, outcome, events) \
             SELECT j, $1, o, n FROM unnest($2::uuid[], $3::text[], $4::bigint[]) AS c(j, o, n) \
             ON CONFLICT (job_id, sink, outcome) DO UPDATE SET events = o.events + EXCLUDED.events",
        ))
        .bind(sink)
        .bind(jobs)
        .bind(outcomes)
        .bind(events);
        self.db.execute(query).await?;
        Ok(())
    }

    /// Remembers that an event of the entity was dead-lettered (the newest such version wins),
    /// so the entities a sink refused can be resent once it is fixed.
    pub async fn record_dead_letter(
        &self,
        key: EntityKey<'_>,
        version: i64,
        reason: &str,
        detail: &str,
    ) -> Result<(), sqlx::Error> {
        let query = sqlx::query(self.schema.sql(
            "INSERT INTO {schema}.dead_lettered_entities AS d \
               (sink, entity_type, entity_id, version, reason, detail) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (sink, entity_type, entity_id) DO UPDATE \
               SET version = EXCLUDED.version, reason = EXCLUDED.reason, detail = EXCLUDED.detail, \
                   dead_lettered_at = clock_timestamp() \
               WHERE d.version <= EXCLUDED.version",
        ))
        .bind(key.sink)
        .bind(key.entity_type)
        .bind(key.entity_id)
        .bind(version)
        .bind(reason)
        .bind(detail);
        self.db.execute(query).await?;
        Ok(())
    }

    /// Many compare-and-sets in one statement (one commit); returns, per request in order,
    /// whether it was recorded. Each entity may appear at most once.
    pub async fn compare_and_set_many(
        &self,
        sink: &str,
        requests: &[CasRequest<'_>],
    ) -> Result<Vec<bool>, sqlx::Error> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let types: Vec<&str> = requests.iter().map(|r| r.entity.entity_type.as_str()).collect();
        let ids: Vec<&str> = requests.iter().map(|r| r.entity.entity_id.as_str()).collect();
        let versions: Vec<i64> = requests.iter().map(|r| r.new.version).collect();
        let hashes: Vec<&[u8]> = requests.iter().map(|r| r.new.content_hash.as_slice()).collect();
        let deleted: Vec<bool> = requests.iter().map(|r| r.new.deleted).collect();
        let data: Vec<&serde_json::Value> = requests.iter().map(|r| &r.new.data).collect();
        let event_ids: Vec<Uuid> = requests.iter().map(|r| r.new.event_id).collect();
        let expected: Vec<Option<i64>> = requests.iter().map(|r| r.expected).collect();
        let query = sqlx::query_as(self.schema.sql(
            "WITH input AS ( \
               SELECT * FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bytea[], $6::bool[], \
                                    $7::jsonb[], $8::uuid[], $9::bigint[]) \
                 AS t(entity_type, entity_id, version, content_hash, deleted, data, event_id, expected)), \
             updated AS ( \
               UPDATE {schema}.applied_versions a SET version = i.version, content_hash = i.content_hash, \
                 deleted = i.deleted, data = i.data, event_id = i.event_id, applied_at = clock_timestamp() \
               FROM input i \
               WHERE a.sink = $1 AND a.entity_type = i.entity_type AND a.entity_id = i.entity_id \
                 AND i.expected IS NOT NULL AND a.version = i.expected \
               RETURNING a.entity_type, a.entity_id), \
             inserted AS ( \
               INSERT INTO {schema}.applied_versions \
                 (sink, entity_type, entity_id, version, content_hash, deleted, data, event_id) \
               SELECT $1, entity_type, entity_id, version, content_hash, deleted, data, event_id \
               FROM input WHERE expected IS NULL \
               ON CONFLICT DO NOTHING \
               RETURNING entity_type, entity_id) \
             SELECT entity_type, entity_id FROM updated UNION ALL SELECT entity_type, entity_id FROM inserted",
        ))
        .bind(sink)
        .bind(types)
        .bind(ids)
        .bind(versions)
        .bind(hashes)
        .bind(deleted)
        .bind(data)
        .bind(event_ids)
        .bind(expected);
        let recorded: Vec<(String, String)> = self.db.fetch_all(query).await?;
        let recorded: std::collections::HashSet<(String, String)> = recorded.into_iter().collect();
        Ok(requests
            .iter()
            .map(|r| recorded.contains(&(r.entity.entity_type.clone(), r.entity.entity_id.clone())))
            .collect())
    }
}
