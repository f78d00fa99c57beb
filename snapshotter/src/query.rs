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
    /// A range's first chunk: `$1` is the chunk size, `$2` the range's last id (as text, NULL:
    /// the table's end).
    pub first_in_range: String,
    /// Every later chunk: `$1` the last id of the previous chunk (as text), `$2` the size, `$3`
    /// the range's last id (NULL: the table's end).
    pub after_in_range: String,
    pub count: String,
    /// Every `$1`-th id in id order (as text), at most `$2` of them: where ranges split.
    pub split_points: String,
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
            if let Some(why) = fare_config::filter_problem(filter) {
                return Err(problem(format!("filter `{filter}`: not one boolean expression: {why}")));
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
        // The output column `id` is text; in ORDER BY a bare `"id"` would name it (output names
        // win there) and sort an integer key in text order, so the key is always qualified
        // with the table's alias: chunks and checkpoints follow the key's own order.
        let key = format!("src.{id}");
        let select = format!(
            "SELECT {key}::text AS id, {}::bigint AS version, {deleted} AS deleted, {data} AS data \
             FROM {table} AS src",
            quote(&source.version_column)
        );
        let upto = |n: u8| format!("(${n}::text IS NULL OR {key} <= CAST(${n} AS {id_type}))");
        let query = Self {
            first_in_range: format!("{select} WHERE {filter} AND {} ORDER BY {key} LIMIT $1", upto(2)),
            after_in_range: format!(
                "{select} WHERE {filter} AND {key} > CAST($1 AS {id_type}) AND {} ORDER BY {key} LIMIT $2",
                upto(3)
            ),
            count: format!("SELECT count(*) FROM {table} WHERE {filter}"),
            split_points: format!(
                "SELECT id FROM (SELECT {id}::text AS id, row_number() OVER (ORDER BY {id}) AS n \
                 FROM {table} WHERE {filter}) numbered WHERE n % $1 = 0 ORDER BY n LIMIT $2"
            ),
        };
        query.check(pool, &source.table).await?;
        Ok(query)
    }

    /// Runs each statement once, on at most one row, so a bad filter or type fails at
    /// `job start` rather than mid-job; in a read-only transaction, like every statement a job
    /// runs against its source (a filter calling `nextval` fails here, changing nothing).
    async fn check(&self, pool: &PgPool, table: &str) -> Result<()> {
        let failed = |e: sqlx::Error| JobError::Source { table: table.to_string(), problem: e.to_string() };
        let mut conn = pool.begin().await.map_err(failed)?;
        sqlx::query("SET TRANSACTION READ ONLY").execute(&mut *conn).await.map_err(failed)?;
        let first = self.chunk(&mut conn, None, None, 1).await?;
        if let Some(row) = first.first() {
            self.chunk(&mut conn, Some(&row.id), Some(&row.id), 1).await?;
        }
        // Planned, not run: both read the whole table.
        let count = sqlx::query(AssertSqlSafe(format!("EXPLAIN {}", self.count)));
        count.fetch_all(&mut *conn).await.map_err(failed)?;
        let split = sqlx::query(AssertSqlSafe(format!("EXPLAIN {}", self.split_points)));
        split.bind(1_i64).bind(1_i64).fetch_all(&mut *conn).await.map_err(failed)?;
        Ok(())
    }

    pub(crate) async fn count(&self, conn: &mut PgConnection) -> Result<i64> {
        sqlx::query_scalar(AssertSqlSafe(self.count.clone()))
            .fetch_one(conn)
            .await
            .map_err(db("counting the source rows"))
    }

    /// Where to split the source into `parts` ranges of about equal size: the last id of each
    /// range but the last (fewer when the source has fewer rows than parts).
    pub(crate) async fn split_points(
        &self,
        conn: &mut PgConnection,
        total: i64,
        parts: i64,
    ) -> Result<Vec<String>> {
        let step = (total + parts - 1) / parts.max(1);
        if parts <= 1 || step == 0 {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(AssertSqlSafe(self.split_points.clone()))
            .bind(step)
            .bind(parts - 1)
            .fetch_all(conn)
            .await
            .map_err(db("splitting the source into ranges"))
    }

    /// The next chunk after `checkpoint` (the first without one), up to and including `upto`
    /// (the table's end without one).
    pub(crate) async fn chunk(
        &self,
        conn: &mut PgConnection,
        checkpoint: Option<&str>,
        upto: Option<&str>,
        size: i64,
    ) -> Result<Vec<SourceRow>> {
        let rows = match checkpoint {
            None => {
                sqlx::query(AssertSqlSafe(self.first_in_range.clone()))
                    .bind(size)
                    .bind(upto)
                    .fetch_all(conn)
                    .await
            }
            Some(last) => {
                let query = sqlx::query(AssertSqlSafe(self.after_in_range.clone()));
                query.bind(last).bind(size).bind(upto).fetch_all(conn).await
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
