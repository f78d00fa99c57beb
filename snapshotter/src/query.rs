//! The SQL a job reads its source with, built once from the source mapping and checked against
//! the catalog: every identifier comes from config, is validated there, exists in the table and
//! is quoted here; the id's type comes from Postgres itself. The only expression from config is
//! the optional filter, written by the service's owners and run in a read-only transaction.

use fare_config::{SourceData, SourceSpec};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};

use crate::{JobError, Result, SourceRow, db};

/// The statements a job runs against its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceQuery {
    /// The first chunk: `$1` is the chunk size.
    pub first: String,
    /// Every later chunk: `$1` the last id of the previous chunk (as text), `$2` the size.
    pub after: String,
    pub count: String,
}

/// Limits a job to the entities a sink had dead-lettered (table `dead_lettered_entities`).
pub(crate) struct Rejected<'a> {
    pub(crate) schema: &'a resync_migrations::Schema,
    pub(crate) sink: &'a str,
}

/// An SQL string literal (standard_conforming_strings: only `'` needs doubling).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// `schema.table` or `table`, quoted.
fn quoted_table(table: &str) -> String {
    table.split('.').map(quote).collect::<Vec<_>>().join(".")
}

impl SourceQuery {
    /// Checks the table and columns exist and builds the statements.
    pub(crate) async fn build(
        pool: &PgPool,
        source: &SourceSpec,
        extra_filter: Option<&str>,
        rejected: Option<Rejected<'_>>,
    ) -> Result<Self> {
        let table = quoted_table(&source.table);
        let problem = |problem: String| JobError::Source { table: source.table.clone(), problem };
        let columns = columns_of(pool, &table).await?.ok_or_else(|| problem("no such table".into()))?;
        let type_of = |column: &str| {
            columns
                .iter()
                .find(|(name, _)| name == column)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| problem(format!("no column `{column}` (columns: {})", names(&columns))))
        };
        let id_type = type_of(&source.id_column)?;
        type_of(&source.version_column)?;
        let data = match &source.data {
            SourceData::Column(column) => {
                type_of(column)?;
                format!("to_jsonb({})", quote(column))
            }
            SourceData::Columns(list) => {
                let mut pairs = Vec::new();
                for column in list {
                    type_of(column)?;
                    // Validated identifiers hold no quote, so the name is a safe literal.
                    pairs.push(format!("'{column}', {}", quote(column)));
                }
                format!("jsonb_build_object({})", pairs.join(", "))
            }
        };
        let deleted = match &source.deleted_column {
            Some(column) => {
                type_of(column)?;
                format!("COALESCE({}::boolean, false)", quote(column))
            }
            None => "false".into(),
        };
        for filter in [source.filter.as_deref(), extra_filter].into_iter().flatten() {
            if filter.contains(';') {
                return Err(problem(format!("filter `{filter}`: one boolean expression, without `;`")));
            }
        }
        let id = quote(&source.id_column);
        let mut filter = [source.filter.as_deref(), extra_filter]
            .into_iter()
            .flatten()
            .map(|f| format!("({f})"))
            .collect::<Vec<_>>();
        if let Some(rejected) = rejected {
            filter.push(format!(
                "{id}::text IN (SELECT entity_id FROM {}.dead_lettered_entities WHERE sink = {} AND entity_type = {})",
                quote(rejected.schema.name()),
                literal(rejected.sink),
                literal(&source.entity)
            ));
        }
        let filter = if filter.is_empty() { "true".to_string() } else { filter.join(" AND ") };
        let select = format!(
            "SELECT {id}::text AS id, {}::bigint AS version, {deleted} AS deleted, {data} AS data FROM {table}",
            quote(&source.version_column)
        );
        let query = Self {
            first: format!("{select} WHERE {filter} ORDER BY {id} LIMIT $1"),
            after: format!("{select} WHERE {filter} AND {id} > CAST($1 AS {id_type}) ORDER BY {id} LIMIT $2"),
            count: format!("SELECT count(*) FROM {table} WHERE {filter}"),
        };
        query.check(pool, &source.table).await?;
        Ok(query)
    }

    /// Runs each statement once, on at most one row, so a bad filter or type fails at
    /// `job start` rather than mid-job.
    async fn check(&self, pool: &PgPool, table: &str) -> Result<()> {
        let failed = |e: sqlx::Error| JobError::Source { table: table.to_string(), problem: e.to_string() };
        let mut conn = pool.acquire().await.map_err(failed)?;
        let first = self.chunk(&mut conn, None, 1).await?;
        if let Some(row) = first.first() {
            self.chunk(&mut conn, Some(&row.id), 1).await?;
        }
        sqlx::query(AssertSqlSafe(format!("EXPLAIN {}", self.count)))
            .fetch_all(&mut *conn)
            .await
            .map_err(failed)?;
        Ok(())
    }

    pub(crate) async fn count(&self, conn: &mut PgConnection) -> Result<i64> {
        sqlx::query_scalar(AssertSqlSafe(self.count.clone()))
            .fetch_one(conn)
            .await
            .map_err(db("counting the source rows"))
    }

    /// The next chunk after `checkpoint` (the first without one).
    pub(crate) async fn chunk(
        &self,
        conn: &mut PgConnection,
        checkpoint: Option<&str>,
        size: i64,
    ) -> Result<Vec<SourceRow>> {
        let rows = match checkpoint {
            None => sqlx::query(AssertSqlSafe(self.first.clone())).bind(size).fetch_all(conn).await,
            Some(last) => {
                sqlx::query(AssertSqlSafe(self.after.clone())).bind(last).bind(size).fetch_all(conn).await
            }
        }
        .map_err(db("reading a chunk of the source"))?;
        rows.iter()
            .map(|row| {
                Ok(SourceRow {
                    id: row.try_get("id")?,
                    version: row.try_get("version")?,
                    deleted: row.try_get("deleted")?,
                    data: row.try_get("data")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(db("decoding a source row"))
    }
}

fn names(columns: &[(String, String)]) -> String {
    columns.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
}

/// The table's columns and their types, or `None` if it does not exist.
async fn columns_of(pool: &PgPool, table: &str) -> Result<Option<Vec<(String, String)>>> {
    let oid: Option<sqlx::postgres::types::Oid> = sqlx::query_scalar("SELECT to_regclass($1)::oid")
        .bind(table)
        .fetch_one(pool)
        .await
        .map_err(db("looking the source table up"))?;
    let Some(oid) = oid else { return Ok(None) };
    let rows = sqlx::query(
        "SELECT attname::text AS name, format_type(atttypid, atttypmod) AS type FROM pg_attribute \
         WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(oid)
    .fetch_all(pool)
    .await
    .map_err(db("reading the source table's columns"))?;
    let columns = rows
        .iter()
        .map(|r| Ok((r.try_get("name")?, r.try_get("type")?)))
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(db("reading the source table's columns"))?;
    Ok(Some(columns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_schema_qualified_tables_split() {
        assert_eq!(quoted_table("app.listings"), "\"app\".\"listings\"");
        assert_eq!(quote("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("o'brien"), "'o''brien'");
    }
}
