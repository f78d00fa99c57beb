//! resync's version counter (`entity_versions`): the version `resync.emit` last assigned to
//! each entity. The producer owns the table (`resync.emit` bumps it); resync jobs read it in
//! their snapshot and give entities it never counted their first version, through this module.

use std::collections::HashMap;

use resync_migrations::Schema;
use sqlx::PgPool;

/// A SQL expression, for a query reading a source table, giving the counter's version of the
/// row's entity (NULL: never counted): `entity_type` is a SQL literal (quoted by the caller),
/// `key_text` the row's key as text. A fragment rather than a function because a job must read
/// the version in the same snapshot, and the same statement, as the row.
pub fn counter_expression(schema: &Schema, entity_type: &str, key_text: &str) -> String {
    format!(
        "(SELECT ev.version FROM {}.entity_versions AS ev \
          WHERE ev.entity_type = {entity_type} AND ev.entity_id = {key_text})",
        schema.ident()
    )
}

/// The version `resync.emit` last assigned to one entity (`None`: never).
pub async fn current(
    pool: &PgPool,
    schema: &Schema,
    entity_type: &str,
    entity_id: &str,
) -> Result<Option<i64>, sqlx::Error> {
    let sql =
        schema.sql("SELECT version FROM {schema}.entity_versions WHERE entity_type = $1 AND entity_id = $2");
    sqlx::query_scalar(sql).bind(entity_type).bind(entity_id).fetch_optional(pool).await
}

/// The next version of each entity, as `resync.emit` would assign it, but above `floors` (the
/// version a sink holds, for an entity the counter has none of or a lower one). The counter
/// rows stay locked until the caller's transaction ends, so an `emit` of the same entity waits
/// and then gets a newer version: whatever it carries is ordered after what the caller sends.
/// Lock the same entities in the same order everywhere: `ids` are locked in the order given.
pub async fn allocate_next(
    conn: &mut sqlx::PgConnection,
    schema: &Schema,
    entity_type: &str,
    ids: &[&str],
    floors: &[i64],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let sql = schema.sql(
        "INSERT INTO {schema}.entity_versions AS ev (entity_type, entity_id, version) \
         SELECT $1, i, f + 1 FROM unnest($2::text[], $3::bigint[]) WITH ORDINALITY AS s(i, f, n) ORDER BY n \
         ON CONFLICT (entity_type, entity_id) DO UPDATE SET version = GREATEST(ev.version + 1, EXCLUDED.version) \
         RETURNING entity_id, version",
    );
    let rows: Vec<(String, i64)> =
        sqlx::query_as(sql).bind(entity_type).bind(ids).bind(floors).fetch_all(conn).await?;
    Ok(rows.into_iter().collect())
}

/// Whether `resync.emit` ever assigned a version to an entity of this type.
pub async fn any_counted(pool: &PgPool, schema: &Schema, entity_type: &str) -> Result<bool, sqlx::Error> {
    let sql = schema.sql("SELECT EXISTS (SELECT 1 FROM {schema}.entity_versions WHERE entity_type = $1)");
    sqlx::query_scalar(sql).bind(entity_type).fetch_one(pool).await
}

/// Records first versions for entities the counter has none for; returns those recorded. An
/// entity that got a version meanwhile (a `resync.emit` since the caller looked) keeps it and
/// is not in the result.
pub async fn seed_first_versions(
    pool: &PgPool,
    schema: &Schema,
    entity_type: &str,
    entity_ids: &[&str],
    versions: &[i64],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let sql = schema.sql(
        "INSERT INTO {schema}.entity_versions (entity_type, entity_id, version) \
         SELECT $1, i, v FROM unnest($2::text[], $3::bigint[]) AS s(i, v) \
         ON CONFLICT (entity_type, entity_id) DO NOTHING RETURNING entity_id, version",
    );
    let rows: Vec<(String, i64)> =
        sqlx::query_as(sql).bind(entity_type).bind(entity_ids).bind(versions).fetch_all(pool).await?;
    Ok(rows.into_iter().collect())
}
