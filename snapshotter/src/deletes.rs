//! `job start --delete-missing`: a tombstone for every entity a sink holds as present that the
//! source table no longer has (deleted without an event: a hard `DELETE`, a bug, delete events
//! dead-lettered and purged), sent on the job's path with a new version, within a guard.
//!
//! An entity is missing when the source table has no row with its id. With the job's
//! `--filter`, the filter is evaluated on the row as it was, rebuilt from the content the sink
//! last applied (the data column, or the data columns' keys, and the id): an entity outside it,
//! or whose content does not say, is never deleted.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use resync_migrations::Schema;
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgPool};
use tracing::{info, warn};
use uuid::Uuid;

use crate::job::JobSpec;
use crate::query::VersionSource;
use crate::run::SourceRow;
use crate::{JobError, Result, db};

/// What a job with `--delete-missing` compares, recorded with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeletePlan {
    /// The sink whose present entities are compared with the source.
    pub sink: String,
    /// The source table, quoted for SQL.
    pub table: String,
    /// The entity id of a row of the table aliased `src`, as SQL.
    pub id_text: String,
    /// The job's `--filter`, evaluated on the content the sink last applied.
    pub scope: Option<String>,
    /// A `jsonb` expression over `p.data` (the content applied) and `p.entity_id` giving the
    /// row as the table would hold it, for `scope`.
    pub as_row: String,
    pub limit: DeleteLimit,
}

/// The most entities one job may delete: a number, or a share of what the sink holds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum DeleteLimit {
    Count(u64),
    Percent(f64),
}

impl DeleteLimit {
    /// How many deletes this limit allows when the sink holds `present` entities.
    pub fn allowed(self, present: u64) -> u64 {
        match self {
            DeleteLimit::Count(count) => count,
            DeleteLimit::Percent(percent) => (present as f64 * percent / 100.0).floor() as u64,
        }
    }
}

impl FromStr for DeleteLimit {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        let text = text.trim();
        let invalid = || format!("`{text}`: expected a number of entities (`500`) or a share (`10%`)");
        match text.strip_suffix('%') {
            Some(percent) => {
                let percent: f64 = percent.trim().parse().map_err(|_| invalid())?;
                if !(0.0..=100.0).contains(&percent) {
                    return Err(format!("`{text}`: a share between 0% and 100%"));
                }
                Ok(DeleteLimit::Percent(percent))
            }
            None => text.parse().map(DeleteLimit::Count).map_err(|_| invalid()),
        }
    }
}

impl fmt::Display for DeleteLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeleteLimit::Count(count) => write!(f, "{count}"),
            DeleteLimit::Percent(percent) => write!(f, "{percent}%"),
        }
    }
}

/// The entities a sink holds as present that the source lacks, and how many it holds.
#[derive(Debug, Clone, Serialize)]
pub struct Missing {
    pub sink: String,
    /// Entities the sink holds as present (applied, not deleted).
    pub present: u64,
    /// Those the source has no row for (within the scope): id and the version the sink holds.
    pub entities: Vec<(String, i64)>,
    /// How many deletes the job's limit allows.
    pub allowed: u64,
}

impl Missing {
    pub fn within_limit(&self) -> bool {
        self.entities.len() as u64 <= self.allowed
    }
}

/// What `plan` would delete now.
pub(crate) async fn missing_entities(
    pool: &PgPool,
    schema: &Schema,
    entity_type: &str,
    plan: &DeletePlan,
) -> Result<Missing> {
    let present_sql = resync_consumer::records::present_at_sink_query(schema);
    let (table, id_text) = (&plan.table, &plan.id_text);
    let scope = plan.scope.as_deref().map_or(String::new(), |filter| {
        let as_row = &plan.as_row;
        format!(" AND EXISTS (SELECT 1 FROM jsonb_populate_record(NULL::{table}, {as_row}) AS src WHERE ({filter}))")
    });
    let missing_sql = format!(
        "SELECT p.entity_id, p.version FROM ({present_sql}) p \
         WHERE NOT EXISTS (SELECT 1 FROM {table} AS src WHERE {id_text} = p.entity_id){scope} ORDER BY p.entity_id"
    );
    let entities: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(missing_sql))
        .bind(&plan.sink)
        .bind(entity_type)
        .fetch_all(pool)
        .await
        .map_err(db(format!("finding the entities sink `{}` holds that {table} lacks", plan.sink)))?;
    let count_sql = format!("SELECT count(*) FROM ({present_sql}) p");
    let present: i64 = sqlx::query_scalar(AssertSqlSafe(count_sql))
        .bind(&plan.sink)
        .bind(entity_type)
        .fetch_one(pool)
        .await
        .map_err(db(format!("counting what sink `{}` holds", plan.sink)))?;
    let present = u64::try_from(present).unwrap_or(0);
    Ok(Missing { sink: plan.sink.clone(), present, entities, allowed: plan.limit.allowed(present) })
}

/// The refusal when `missing` is over its limit.
pub(crate) fn over_limit(missing: &Missing, limit: DeleteLimit) -> JobError {
    let sample: Vec<&str> = missing.entities.iter().take(5).map(|(id, _)| id.as_str()).collect();
    JobError::TooManyDeletes {
        sink: missing.sink.clone(),
        deletes: missing.entities.len() as u64,
        present: missing.present,
        limit: limit.to_string(),
        allowed: missing.allowed,
        sample: sample.join(", "),
    }
}

/// Entities tombstoned per transaction (their version counters stay locked until it ends).
const CHUNK: usize = 100;

/// Sends the tombstones of a job's plan once every row is published; returns how many. Checks
/// the limit again first: nothing is sent over it.
pub(crate) async fn send_tombstones(
    pool: &PgPool,
    schema: &Schema,
    transport: &dyn resync_bus::Transport,
    id: Uuid,
    spec: &JobSpec,
    plan: &DeletePlan,
) -> Result<u64> {
    let missing = missing_entities(pool, schema, &spec.entity_type, plan).await?;
    if !missing.within_limit() {
        return Err(over_limit(&missing, plan.limit));
    }
    let mut sent_total = 0;
    for chunk in missing.entities.chunks(CHUNK) {
        let tombstones = versioned_tombstones(pool, schema, spec, plan, chunk).await?;
        if tombstones.is_empty() {
            continue;
        }
        let sent: Vec<(String, i64)> = tombstones.iter().map(|t| (t.id.clone(), t.version)).collect();
        let messages = tombstones.into_iter().map(|t| t.message(&spec.entity_type, id, false)).collect();
        spec.destination.publish(transport, messages).await?;
        record_tombstones(pool, schema, id, &sent).await?;
        sent_total += sent.len() as u64;
    }
    info!(job = %id, sink = %plan.sink, deleted = sent_total, "tombstones sent for entities the source no longer has");
    Ok(sent_total)
}

/// The chunk's entities still missing, each with the version its tombstone carries: the next
/// one from resync's counter (as `resync.emit` would give it, locked against a concurrent
/// re-creation, which then comes after), or, for a service that versions its own events, one
/// above what the sink holds. A deadlock with an application transaction emitting several of
/// these entities in another order makes one of the two give way: the chunk is tried again.
async fn versioned_tombstones(
    pool: &PgPool,
    schema: &Schema,
    spec: &JobSpec,
    plan: &DeletePlan,
    chunk: &[(String, i64)],
) -> Result<Vec<SourceRow>> {
    let mut attempt = 1;
    loop {
        match tombstones_in_one_transaction(pool, schema, spec, plan, chunk).await {
            Err(JobError::Database { source, .. }) if is_deadlock(&source) && attempt < 5 => {
                warn!(error = %source, "tombstone versions deadlocked with an emit; trying again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn tombstones_in_one_transaction(
    pool: &PgPool,
    schema: &Schema,
    spec: &JobSpec,
    plan: &DeletePlan,
    chunk: &[(String, i64)],
) -> Result<Vec<SourceRow>> {
    let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
    let held: Vec<i64> = chunk.iter().map(|(_, version)| *version).collect();
    let mut tx = pool.begin().await.map_err(db("allocating tombstone versions"))?;
    let versions: HashMap<String, i64> = match spec.query.versions {
        VersionSource::Counter => {
            resync_producer::versions::allocate_next(&mut tx, schema, &spec.entity_type, &ids, &held)
                .await
                .map_err(db("allocating tombstone versions"))?
        }
        VersionSource::Column => chunk.iter().map(|(id, version)| (id.clone(), version + 1)).collect(),
    };
    // Under the counter locks: a row created meanwhile is seen now, and its entity spared.
    let (table, id_text) = (&plan.table, &plan.id_text);
    let still_missing_sql = format!(
        "SELECT k.id FROM unnest($1::text[]) AS k(id) \
         WHERE NOT EXISTS (SELECT 1 FROM {table} AS src WHERE {id_text} = k.id)"
    );
    let still_missing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(still_missing_sql))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("checking the entities are still missing"))?;
    tx.commit().await.map_err(db("allocating tombstone versions"))?;
    Ok(still_missing
        .into_iter()
        .filter_map(|id| {
            let version = *versions.get(&id)?;
            Some(SourceRow { id, version, deleted: true, data: serde_json::Value::Null })
        })
        .collect())
}

fn is_deadlock(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.code().as_deref() == Some("40P01"))
}

/// The tombstones sent are rows the job waits to see applied, and count as deleted.
async fn record_tombstones(pool: &PgPool, schema: &Schema, id: Uuid, sent: &[(String, i64)]) -> Result<()> {
    let (ids, versions): (Vec<&str>, Vec<i64>) = sent.iter().map(|(i, v)| (i.as_str(), *v)).unzip();
    let mut tx = pool.begin().await.map_err(db("recording tombstones"))?;
    crate::run::record_sent_rows(&mut tx, schema, id, &ids, &versions).await?;
    let count_sql = schema
        .sql("UPDATE {schema}.jobs SET deleted = deleted + $2, updated_at = clock_timestamp() WHERE id = $1");
    sqlx::query(count_sql)
        .bind(id)
        .bind(sent.len() as i64)
        .execute(&mut *tx)
        .await
        .map_err(db("recording tombstones"))?;
    tx.commit().await.map_err(db("recording tombstones"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_as_counts_or_shares() {
        assert_eq!("500".parse(), Ok(DeleteLimit::Count(500)));
        assert_eq!("10%".parse(), Ok(DeleteLimit::Percent(10.0)));
        assert_eq!(DeleteLimit::Percent(10.0).allowed(2_000), 200);
        assert_eq!(DeleteLimit::Count(3).allowed(2_000), 3);
        assert!("ten".parse::<DeleteLimit>().is_err());
        assert!("150%".parse::<DeleteLimit>().is_err());
    }
}
