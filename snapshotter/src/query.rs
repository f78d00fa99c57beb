//! The SQL a job reads its source with, built once from the source mapping and checked against
//! the catalog: every identifier comes from config, is validated there, exists in the table and
//! is quoted here; the id's type comes from Postgres itself. The only expression from config is
//! the optional filter, written by the service's owners and run in a read-only transaction.
//!
//! Each row is read with resync's own version of its entity (`entity_versions`, the counter
//! `resync.emit` bumps) in the same statement, hence the same snapshot as the row: a row and
//! the version its last event carried always belong together.

use fare_config::{SourceData, SourceSpec};
use resync_migrations::Schema;
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};

use crate::{JobError, Result, db};

/// One source row as read, before its version is settled (see `versioned` in the crate root).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReadRow {
    pub(crate) id: String,
    /// The row's key as a checkpoint: the id for a one-column key, a JSON array of the
    /// columns' text values for a composite one.
    pub(crate) checkpoint: String,
    /// The version `resync.emit` last assigned to the entity; `None`: it never emitted one.
    pub(crate) counted: Option<i64>,
    /// The table's own `version_column`, if the source names one.
    pub(crate) declared: Option<i64>,
    pub(crate) deleted: bool,
    pub(crate) data: serde_json::Value,
}

impl ReadRow {
    /// The row's table column differs from resync's counter.
    pub(crate) fn disagrees(&self) -> bool {
        matches!((self.counted, self.declared), (Some(c), Some(d)) if c != d)
    }
}

/// Rows the start-up check compares a declared version column on.
const VERSION_SAMPLE: i64 = 1000;

/// Where a job's versions come from, decided when it is created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionSource {
    /// resync's counter (what `resync.emit` assigned); a declared column is only checked.
    #[default]
    Counter,
    /// The table's `version_column`, as is: the source declares one and `resync.emit` was
    /// never called for the entity type (the service publishes its own events).
    Column,
}

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
    #[serde(default)]
    pub versions: VersionSource,
    /// One row by its id as text (`$1`). Not stored with a job: only `entity show` uses it.
    #[serde(skip)]
    pub one: String,
}

/// A source's key in SQL, over the table aliased `src`. The output column `id` is text; in
/// ORDER BY a bare `"id"` would name it (output names win there) and sort an integer key in
/// text order, so key columns are always qualified: chunks and checkpoints follow the key's own
/// order.
struct KeySql {
    /// The entity id: the column's text, or the columns' texts joined by `:`.
    id_text: String,
    /// A checkpoint: the id for one column; a JSON array of the columns' texts for several.
    checkpoint_text: String,
    /// The key columns, for `ORDER BY`.
    order: String,
    /// The key as one value to compare: `src.c` or `(src.c1, src.c2)`.
    tuple: String,
    types: Vec<String>,
}

impl KeySql {
    fn new(columns: &[String], types: Vec<String>) -> Self {
        let qualified: Vec<String> = columns.iter().map(|c| format!("src.{}", quote(c))).collect();
        let texts: Vec<String> = qualified.iter().map(|c| format!("{c}::text")).collect();
        let (checkpoint_text, tuple) = match qualified.as_slice() {
            [one] => (format!("{one}::text"), one.clone()),
            _ => (
                format!("jsonb_build_array({})::text", texts.join(", ")),
                format!("({})", qualified.join(", ")),
            ),
        };
        Self { id_text: entity_id_text(columns), checkpoint_text, order: qualified.join(", "), tuple, types }
    }

    /// The checkpoint parameter `$n`, as a value comparable with `tuple`.
    fn param(&self, n: u8) -> String {
        match self.types.as_slice() {
            [one] => format!("CAST(${n} AS {one})"),
            many => {
                let parts: Vec<String> =
                    many.iter().enumerate().map(|(i, t)| format!("CAST(${n}::jsonb->>{i} AS {t})")).collect();
                format!("({})", parts.join(", "))
            }
        }
    }
}

/// The entity id of a row of the table aliased `src`: its key column as text, or its key
/// columns' texts joined by `:`.
pub(crate) fn entity_id_text(columns: &[String]) -> String {
    let texts: Vec<String> = columns.iter().map(|c| format!("src.{}::text", quote(c))).collect();
    texts.join(" || ':' || ")
}

/// An SQL string literal (standard_conforming_strings: only `'` needs doubling).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

pub(crate) fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// `schema.table` or `table`, quoted.
pub(crate) fn quoted_table(table: &str) -> String {
    table.split('.').map(quote).collect::<Vec<_>>().join(".")
}

impl SourceQuery {
    /// Checks the table and columns exist and builds the statements. `schema` is resync's (its
    /// version counter); `rejected_by` limits the job to the entities that sink dead-lettered
    /// (table `dead_lettered_entities`).
    pub(crate) async fn build(
        pool: &PgPool,
        schema: &Schema,
        source: &SourceSpec,
        extra_filter: Option<&str>,
        rejected_by: Option<&str>,
    ) -> Result<Self> {
        let query = Self::prepare(pool, schema, source, extra_filter, rejected_by).await?;
        query.check(pool, source).await?;
        Ok(query)
    }

    /// The statements, unchecked (a declared version column that disagrees with resync's is
    /// for `check` to refuse; looking one row up shows it instead).
    async fn prepare(
        pool: &PgPool,
        schema: &Schema,
        source: &SourceSpec,
        extra_filter: Option<&str>,
        rejected_by: Option<&str>,
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
        let key_types =
            source.key_columns.iter().map(|column| type_of(column)).collect::<Result<Vec<_>>>()?;
        let key = KeySql::new(&source.key_columns, key_types);
        let declared = match &source.version_column {
            Some(column) => {
                type_of(column)?;
                format!("{}::bigint", quote(column))
            }
            None => "NULL::bigint".into(),
        };
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
        let mut filter = [source.filter.as_deref(), extra_filter]
            .into_iter()
            .flatten()
            .map(|f| format!("({f})"))
            .collect::<Vec<_>>();
        let entity = literal(&source.entity);
        if let Some(sink) = rejected_by {
            filter.push(resync_consumer::records::dead_lettered_condition(
                schema,
                &key.id_text,
                &literal(sink),
                &entity,
            ));
        }
        let filter = if filter.is_empty() { "true".to_string() } else { filter.join(" AND ") };
        // A subquery rather than a join: the filter and data columns name the table's columns
        // unqualified, and a join would make a table column called `version` ambiguous.
        let counted = resync_producer::versions::counter_expression(schema, &entity, &key.id_text);
        let KeySql { id_text, checkpoint_text, order, tuple, .. } = &key;
        let select = format!(
            "SELECT {id_text} AS id, {checkpoint_text} AS checkpoint, {counted} AS counted, {declared} AS declared, \
             {deleted} AS deleted, {data} AS data FROM {table} AS src"
        );
        let upto = |n: u8| format!("(${n}::text IS NULL OR {tuple} <= {})", key.param(n));
        let versions = version_source(pool, schema, source).await?;
        let one = if source.key_columns.len() == 1 {
            format!("{select} WHERE {filter} AND {tuple} = {}", key.param(1))
        } else {
            format!("{select} WHERE {filter} AND {id_text} = $1")
        };
        let query = Self {
            versions,
            first_in_range: format!("{select} WHERE {filter} AND {} ORDER BY {order} LIMIT $1", upto(2)),
            after_in_range: format!(
                "{select} WHERE {filter} AND {tuple} > {} AND {} ORDER BY {order} LIMIT $2",
                key.param(1),
                upto(3)
            ),
            count: format!("SELECT count(*) FROM {table} AS src WHERE {filter}"),
            split_points: format!(
                "SELECT checkpoint FROM (SELECT {checkpoint_text} AS checkpoint, row_number() OVER (ORDER BY {order}) AS n \
                 FROM {table} AS src WHERE {filter}) numbered WHERE n % $1 = 0 ORDER BY n LIMIT $2"
            ),
            one,
        };
        Ok(query)
    }

    /// The row of entity `id` as a job would read it (`None`: the source has no such row, or
    /// the source's filter leaves it out).
    pub(crate) async fn one_row(
        pool: &PgPool,
        schema: &Schema,
        source: &SourceSpec,
        id: &str,
    ) -> Result<Option<ReadRow>> {
        let query = Self::prepare(pool, schema, source, None, None).await?;
        let row = sqlx::query(AssertSqlSafe(query.one.clone()))
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(db("reading the entity's source row"))?;
        row.map(|row| read_row(&row)).transpose()
    }

    /// Runs each statement once, on a sample of rows, so a bad filter or type fails at
    /// `job start` rather than mid-job; in a read-only transaction, like every statement a job
    /// runs against its source (a filter calling `nextval` fails here, changing nothing). A
    /// declared version column must hold the versions `resync.emit` assigned on the sample.
    async fn check(&self, pool: &PgPool, source: &SourceSpec) -> Result<()> {
        let table = &source.table;
        let failed = |e: sqlx::Error| JobError::Source { table: table.to_string(), problem: e.to_string() };
        let mut conn = pool.begin().await.map_err(failed)?;
        sqlx::query("SET TRANSACTION READ ONLY").execute(&mut *conn).await.map_err(failed)?;
        let sample = self.chunk(&mut conn, None, None, VERSION_SAMPLE).await?;
        if let Some(row) = sample.first() {
            self.chunk(&mut conn, Some(&row.checkpoint), Some(&row.checkpoint), 1).await?;
        }
        if self.versions == VersionSource::Counter
            && let Some(problem) = version_disagreement(source, &sample)
        {
            return Err(JobError::Source { table: table.to_string(), problem });
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
    ) -> Result<Vec<ReadRow>> {
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
        rows.iter().map(read_row).collect()
    }
}

fn read_row(row: &sqlx::postgres::PgRow) -> Result<ReadRow> {
    let decoded = || -> std::result::Result<ReadRow, sqlx::Error> {
        Ok(ReadRow {
            id: row.try_get("id")?,
            checkpoint: row.try_get("checkpoint")?,
            counted: row.try_get("counted")?,
            declared: row.try_get("declared")?,
            deleted: row.try_get("deleted")?,
            data: row.try_get("data")?,
        })
    };
    decoded().map_err(db("decoding a source row"))
}

/// A declared version column is the version source only where `resync.emit` has no say: no
/// entity of the type was ever emitted. Anywhere else resync's counter is.
async fn version_source(pool: &PgPool, schema: &Schema, source: &SourceSpec) -> Result<VersionSource> {
    if source.version_column.is_none() {
        return Ok(VersionSource::Counter);
    }
    let emitted = resync_producer::versions::any_counted(pool, schema, &source.entity)
        .await
        .map_err(db("looking for versions resync.emit assigned"))?;
    Ok(if emitted { VersionSource::Counter } else { VersionSource::Column })
}

/// What is wrong when a sample's declared version column differs from resync's counter: the
/// entities named, with both versions, and what to do.
fn version_disagreement(source: &SourceSpec, sample: &[ReadRow]) -> Option<String> {
    let column = source.version_column.as_deref()?;
    let differing: Vec<&ReadRow> = sample.iter().filter(|row| row.disagrees()).collect();
    if differing.is_empty() {
        return None;
    }
    let listed = differing
        .iter()
        .take(5)
        .map(|r| {
            let (declared, counted) = (r.declared.unwrap_or_default(), r.counted.unwrap_or_default());
            format!("{} {}: column {declared}, resync.emit {counted}", source.entity, r.id)
        })
        .collect::<Vec<_>>()
        .join("; ");
    Some(format!(
        "version column `{column}` disagrees with the versions resync.emit assigned in {} of the first {} rows \
         ({listed}{}); remove `version_column` from the source to send resync's own versions, or keep the \
         column equal to the version resync.emit returns",
        differing.len(),
        sample.len(),
        if differing.len() > 5 { "; ..." } else { "" }
    ))
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
