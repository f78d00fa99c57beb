//! The applied-version store in Postgres: what each sink has, per entity, and the
//! compare-and-set that records a new applied version.

use std::collections::HashMap;

use resync_migrations::Schema;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

use crate::decision::Applied;

/// One entity's applied state, with the data needed to re-send it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AppliedState {
    pub version: i64,
    pub content_hash: Vec<u8>,
    pub deleted: bool,
    pub data: serde_json::Value,
    pub event_id: Uuid,
}

impl AppliedState {
    pub fn applied(&self) -> Applied {
        Applied { version: self.version, content_hash: self.content_hash.clone() }
    }
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

#[derive(sqlx::FromRow)]
struct AppliedRow {
    entity_type: String,
    entity_id: String,
    #[sqlx(flatten)]
    state: AppliedState,
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
    /// The row was not at the expected version; here is what it is now.
    Conflict(Option<AppliedState>),
}

/// A Postgres pool for the applied-version store, `max_connections` wide.
///
/// Connections plan every query for its actual arguments (`plan_cache_mode =
/// force_custom_plan`): a generic plan cached while `applied_versions` was small hash-joins
/// the whole sink's rows into every batch lookup, and would keep doing so as the table grows.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options.options([("plan_cache_mode", "force_custom_plan")]))
        .await
}

#[derive(Clone)]
pub struct AppliedStore {
    pool: PgPool,
    schema: Schema,
}

impl AppliedStore {
    pub fn new(pool: PgPool, schema: Schema) -> Self {
        Self { pool, schema }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub async fn get(&self, key: EntityKey<'_>) -> Result<Option<AppliedState>, sqlx::Error> {
        sqlx::query_as(self.schema.sql(
            "SELECT version, content_hash, deleted, data, event_id FROM {schema}.applied_versions \
             WHERE sink = $1 AND entity_type = $2 AND entity_id = $3",
        ))
        .bind(key.sink)
        .bind(key.entity_type)
        .bind(key.entity_id)
        .fetch_optional(&self.pool)
        .await
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
        let recorded = query.execute(&self.pool).await?.rows_affected() == 1;
        if recorded { Ok(Cas::Recorded) } else { Ok(Cas::Conflict(self.get(key).await?)) }
    }

    /// The applied state of many entities of `sink` in one query; absent entities were never
    /// applied.
    pub async fn get_many(
        &self,
        sink: &str,
        entities: &[&EntityId],
    ) -> Result<HashMap<EntityId, AppliedState>, sqlx::Error> {
        if entities.is_empty() {
            return Ok(HashMap::new());
        }
        let (types, ids): (Vec<&str>, Vec<&str>) =
            entities.iter().map(|e| (e.entity_type.as_str(), e.entity_id.as_str())).unzip();
        let rows: Vec<AppliedRow> = sqlx::query_as(self.schema.sql(
            "SELECT a.entity_type, a.entity_id, a.version, a.content_hash, a.deleted, a.data, a.event_id \
                 FROM {schema}.applied_versions a \
                 JOIN unnest($2::text[], $3::text[]) AS k(entity_type, entity_id) \
                   ON a.entity_type = k.entity_type AND a.entity_id = k.entity_id \
                 WHERE a.sink = $1",
        ))
        .bind(sink)
        .bind(types)
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| (EntityId { entity_type: row.entity_type, entity_id: row.entity_id }, row.state))
            .collect())
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
        let recorded: Vec<(String, String)> = sqlx::query_as(self.schema.sql(
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
        .bind(expected)
        .fetch_all(&self.pool)
        .await?;
        let recorded: std::collections::HashSet<(String, String)> = recorded.into_iter().collect();
        Ok(requests
            .iter()
            .map(|r| recorded.contains(&(r.entity.entity_type.clone(), r.entity.entity_id.clone())))
            .collect())
    }
}
