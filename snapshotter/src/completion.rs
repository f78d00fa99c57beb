//! Completion: a published job is `completed` once every sink it names has accounted for
//! every row it sent (read from the consumers' records, so nothing extra is written per event).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use resync_consumer::records::{SinkRecord, sink_records};
use resync_migrations::Schema;
use sqlx::PgPool;
use tracing::{info, warn};
use uuid::Uuid;

use crate::job::{Job, JobStatus, get, load_spec, set_status_if};
use crate::{Result, db};

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
            if job.status != JobStatus::Published {
                return Ok(job);
            }
            let ids: Vec<&str> = pending.iter().map(|(id, _)| id.as_str()).collect();
            let records = sink_records(pool, schema, &spec.sinks, &spec.entity_type, &ids)
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
    records: &[SinkRecord],
    started: DateTime<Utc>,
) -> Vec<(String, i64)> {
    // Per (sink, entity): the highest version a record accounts for. A same-version record
    // from before the job does not count (the job re-sent that version), so it covers only
    // lower versions.
    let mut covered: HashMap<(&str, &str), i64> = HashMap::new();
    for SinkRecord { sink, entity_id, version, at } in records {
        let covers = if *at >= started { *version } else { *version - 1 };
        let best = covered.entry((sink.as_str(), entity_id.as_str())).or_insert(covers);
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
    set_status_if(&mut *tx, schema, id, JobStatus::Published, JobStatus::Completed, None)
        .await
        .map_err(db("completing the job"))?;
    let sql = schema.sql("DELETE FROM {schema}.job_rows WHERE job_id = $1");
    sqlx::query(sql).bind(id).execute(&mut *tx).await.map_err(db("completing the job"))?;
    tx.commit().await.map_err(db("completing the job"))?;
    info!(job = %id, rows = accounted, "every row applied at every sink: job completed");
    crate::notify::notify(pool, schema, id, "completed").await;
    get(pool, schema, id).await
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
        let record = |id: &str, version, at| SinkRecord {
            sink: "crm".to_string(),
            entity_id: id.to_string(),
            version,
            at,
        };
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
