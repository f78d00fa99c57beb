//! Pausing and resuming a service's stream: a row in `paused_streams` that every consumer of
//! the service polls, so one command reaches hundreds of consumers without a broadcast channel.

use std::collections::HashSet;

use resync_bus::Stream;
use resync_migrations::Schema;
use sqlx::PgPool;

use crate::db::Db;

/// Marks a stream paused; consumers stop taking messages from it at their next poll.
pub async fn pause(
    pool: &PgPool,
    schema: &Schema,
    service: &str,
    stream: Stream,
    reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(schema.sql(
        "INSERT INTO {schema}.paused_streams (service, stream, reason) VALUES ($1, $2, $3) \
         ON CONFLICT (service, stream) DO UPDATE SET reason = EXCLUDED.reason",
    ))
    .bind(service)
    .bind(stream.as_str())
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Resumes a stream; returns whether it was paused.
pub async fn resume(
    pool: &PgPool,
    schema: &Schema,
    service: &str,
    stream: Stream,
) -> Result<bool, sqlx::Error> {
    let done =
        sqlx::query(schema.sql("DELETE FROM {schema}.paused_streams WHERE service = $1 AND stream = $2"))
            .bind(service)
            .bind(stream.as_str())
            .execute(pool)
            .await?;
    Ok(done.rows_affected() > 0)
}

/// The streams of `service` that are paused now (read by every consumer, hence through [`Db`]).
pub async fn paused_streams(db: &Db, schema: &Schema, service: &str) -> Result<HashSet<Stream>, sqlx::Error> {
    let rows: Vec<(String,)> = db
        .fetch_all(
            sqlx::query_as(schema.sql("SELECT stream FROM {schema}.paused_streams WHERE service = $1"))
                .bind(service),
        )
        .await?;
    Ok(rows.iter().filter_map(|(s,)| s.parse().ok()).collect())
}
