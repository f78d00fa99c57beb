//! `resync-migrations`: the Postgres schema resync owns, as sqlx migrations.
//!
//! Owns: the SQL under `migrations/sql/` (the outbox, the event log, per-entity versions, the
//! `emit` function services in any language call) and installing it into a named schema
//! ([`Schema`], `resync` by default). Migrations are written without schema prefixes and run
//! with `search_path` set to the target schema, so several installations (one per test, or one
//! per tenant) can live in one database; functions pin their `search_path` at creation.
//! Does not own: reading or writing that data (the `producer` crate and others do).

use std::fmt;

use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection};

/// The embedded migrations, in order.
pub static MIGRATOR: Migrator = sqlx::migrate!("./sql");

/// The longest schema name: the NOTIFY channel `resync_outbox_<schema>` must fit Postgres'
/// 63-byte identifier limit.
pub const MAX_SCHEMA_LEN: usize = 48;

/// A validated Postgres schema name: lowercase letters, digits and `_`, starting with a letter
/// or `_`, at most [`MAX_SCHEMA_LEN`] bytes. Safe to splice into SQL via [`Schema::ident`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Schema(String);

/// `host:port/database` of a Postgres URL, for error messages (never the password).
pub fn server(database_url: &str) -> String {
    match database_url.parse::<sqlx::postgres::PgConnectOptions>() {
        Ok(options) => format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("(default database)")
        ),
        Err(_) => "(an unreadable RESYNC_DATABASE_URL)".into(),
    }
}

/// Whether `err` means Postgres is away for now (a restart, a failover, a dropped
/// connection) rather than that the statement is wrong: connection failures, SQLSTATE class 08
/// (connection exception) and 57P01-57P03 (shut down by an administrator or a crash, not yet
/// accepting connections). Worth trying again once the server is back.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "invalid schema name `{0}`: use lowercase letters, digits and `_`, starting with a letter \
         or `_`, at most {MAX_SCHEMA_LEN} characters"
    )]
    InvalidSchema(String),
    #[error("cannot connect to Postgres at {server} (RESYNC_DATABASE_URL) for schema `{schema}`: {source}")]
    Connect { server: String, schema: String, source: sqlx::Error },
    #[error("preparing schema `{schema}` failed: {source}")]
    Prepare { schema: String, source: sqlx::Error },
    #[error("migrating schema `{schema}` failed: {source}")]
    Migrate { schema: String, source: sqlx::migrate::MigrateError },
    #[error(
        "schema `{schema}` is not migrated ({applied} of {total} migrations applied): run `resync migrate` \
         with the same database and schema (RESYNC_DATABASE_URL, RESYNC_SCHEMA)"
    )]
    NotMigrated { schema: String, applied: usize, total: usize },
    #[error("cannot read the migrations of schema `{schema}`: {source}")]
    Check { schema: String, source: sqlx::Error },
}

impl Schema {
    pub fn new(name: impl Into<String>) -> Result<Self, MigrationError> {
        let name = name.into();
        let mut chars = name.chars();
        let valid = matches!(chars.next(), Some('a'..='z' | '_'))
            && name.len() <= MAX_SCHEMA_LEN
            && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
        if valid { Ok(Self(name)) } else { Err(MigrationError::InvalidSchema(name)) }
    }

    /// `RESYNC_SCHEMA`, or `resync`.
    pub fn from_env() -> Result<Self, MigrationError> {
        Self::new(std::env::var("RESYNC_SCHEMA").unwrap_or_else(|_| "resync".into()))
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// The schema as a quoted SQL identifier. Validation guarantees it needs no escaping.
    pub fn ident(&self) -> String {
        format!("\"{}\"", self.0)
    }

    /// `template` with every `{schema}` replaced by the quoted schema name, marked safe for
    /// sqlx: the only spliced text is the validated schema identifier; values still go in as
    /// bind parameters.
    pub fn sql(&self, template: &str) -> sqlx::SqlStr {
        use sqlx::SqlSafeStr;
        sqlx::AssertSqlSafe(template.replace("{schema}", &self.ident())).into_sql_str()
    }

    /// The channel `emit` notifies on after each event.
    pub fn notify_channel(&self) -> String {
        format!("resync_outbox_{}", self.0)
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Creates the schema if needed and applies every pending migration to it. Idempotent and
/// safe to run concurrently (sqlx serialises migrations with an advisory lock).
pub async fn migrate(database_url: &str, schema: &Schema) -> Result<(), MigrationError> {
    let name = schema.name().to_string();
    let mut conn = PgConnection::connect(database_url).await.map_err(|source| MigrationError::Connect {
        server: server(database_url),
        schema: name.clone(),
        source,
    })?;
    let prepare = schema.sql("CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}");
    sqlx::raw_sql(prepare)
        .execute(&mut conn)
        .await
        .map_err(|source| MigrationError::Prepare { schema: name.clone(), source })?;
    MIGRATOR
        .run(&mut conn)
        .await
        .map_err(|source| MigrationError::Migrate { schema: name.clone(), source })?;
    tracing::info!(schema = %schema, "migrations applied");
    let _ = conn.close().await;
    Ok(())
}

/// Checks that every migration is applied to `schema`, so a process started against a new
/// database says to run `resync migrate` instead of failing on a missing table later.
pub async fn ensure_migrated(database_url: &str, schema: &Schema) -> Result<(), MigrationError> {
    let name = schema.name().to_string();
    let check = |source| MigrationError::Check { schema: name.clone(), source };
    let mut conn = PgConnection::connect(database_url).await.map_err(|source| MigrationError::Connect {
        server: server(database_url),
        schema: name.clone(),
        source,
    })?;
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("{}._sqlx_migrations", schema.ident()))
        .fetch_one(&mut conn)
        .await
        .map_err(check)?;
    let applied: Vec<i64> = match table {
        Some(_) => {
            sqlx::query_scalar(schema.sql("SELECT version FROM {schema}._sqlx_migrations WHERE success"))
                .fetch_all(&mut conn)
                .await
                .map_err(check)?
        }
        None => Vec::new(),
    };
    let _ = conn.close().await;
    let total = MIGRATOR.iter().count();
    let done = MIGRATOR.iter().filter(|m| applied.contains(&m.version)).count();
    if done < total {
        return Err(MigrationError::NotMigrated { schema: name, applied: done, total });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_validated() {
        assert!(Schema::new("resync").is_ok());
        assert!(Schema::new("_t_1").is_ok());
        for bad in ["", "Resync", "1abc", "a-b", "a\"b", &"x".repeat(49)] {
            assert!(Schema::new(bad).is_err(), "{bad}");
        }
        assert_eq!(Schema::new("resync").unwrap().ident(), "\"resync\"");
    }
}
