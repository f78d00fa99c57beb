//! The applied-version store in Postgres: what each sink has, per entity, and the
//! compare-and-set that records a new applied version.

use resync_migrations::Schema;
use sqlx::PgPool;
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

/// The outcome of a compare-and-set.
#[derive(Debug, Clone, PartialEq)]
pub enum Cas {
    Recorded,
    /// The row was not at the expected version; here is what it is now.
    Conflict(Option<AppliedState>),
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
}
