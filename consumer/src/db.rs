//! How a consumer reaches Postgres: straight to the server, or through a pooler in
//! transaction mode (PgBouncer `pool_mode = transaction`), which is what lets hundreds of
//! consumer processes share a few server connections.
//!
//! Behind a transaction pooler a client keeps its server connection only while a transaction is
//! open, so two things that are fine on a direct connection break:
//! - sqlx prepares a statement (Parse, Describe, Sync) and runs it (Bind, Execute, Sync) in two
//!   round trips; in autocommit the pooler may hand the second one to another server connection,
//!   which does not have the statement. Every statement here therefore runs inside an explicit
//!   transaction, which pins one server connection for both.
//! - named prepared statements (`sqlx_s_1`, ...) outlive the client's turn on a server
//!   connection and collide with another client's of the same name; statements are unnamed
//!   instead (PgBouncer before 1.21 does not track prepared statements).
//!
//! Startup options are not sent either (PgBouncer refuses unknown startup parameters); the
//! custom plans they asked for are what unnamed statements get anyway, as each is planned once
//! with its actual arguments.

use std::fmt;
use std::str::FromStr;

use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgQueryResult, PgRow};
use sqlx::query::{Query, QueryAs};
use sqlx::{FromRow, PgPool, Postgres};

/// How the consumer's Postgres connections are pooled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pooling {
    /// Straight to Postgres: prepared statements are cached per connection.
    #[default]
    Direct,
    /// Through a pooler in transaction mode (PgBouncer `pool_mode = transaction`).
    Transaction,
}

impl FromStr for Pooling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "direct" => Ok(Self::Direct),
            "transaction" => Ok(Self::Transaction),
            other => Err(format!(
                "unknown pooling `{other}`: expected `direct` (connections go straight to Postgres) or \
                 `transaction` (through PgBouncer in pool_mode = transaction)"
            )),
        }
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Transaction => "transaction",
        })
    }
}

/// A consumer's Postgres pool and how to run statements on it.
#[derive(Debug, Clone)]
pub struct Db {
    pool: PgPool,
    pooling: Pooling,
}

impl From<PgPool> for Db {
    /// A pool connected straight to Postgres.
    fn from(pool: PgPool) -> Self {
        Self { pool, pooling: Pooling::Direct }
    }
}

impl Db {
    /// A pool of `max_connections` connections to `url`, set up for `pooling`.
    ///
    /// Direct connections plan every query for its actual arguments (`plan_cache_mode =
    /// force_custom_plan`): a generic plan cached while `applied_versions` was small hash-joins
    /// the whole sink's rows into every batch lookup, and would keep doing so as the table grows.
    pub async fn connect(url: &str, max_connections: u32, pooling: Pooling) -> Result<Self, sqlx::Error> {
        let options: PgConnectOptions = url.parse()?;
        let options = match pooling {
            Pooling::Direct => options.options([("plan_cache_mode", "force_custom_plan")]),
            Pooling::Transaction => options,
        };
        let pool = PgPoolOptions::new().max_connections(max_connections).connect_with(options).await?;
        Ok(Self { pool, pooling })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs a statement that returns rows.
    pub async fn fetch_all<'q, O>(
        &self,
        query: QueryAs<'q, Postgres, O, PgArguments>,
    ) -> Result<Vec<O>, sqlx::Error>
    where
        O: Send + Unpin + for<'r> FromRow<'r, PgRow> + 'q,
    {
        match self.pooling {
            Pooling::Direct => query.fetch_all(&self.pool).await,
            Pooling::Transaction => {
                let mut tx = self.pool.begin().await?;
                let rows = query.persistent(false).fetch_all(&mut *tx).await?;
                tx.commit().await?;
                Ok(rows)
            }
        }
    }

    /// Runs a statement for its effect.
    pub async fn execute(
        &self,
        query: Query<'_, Postgres, PgArguments>,
    ) -> Result<PgQueryResult, sqlx::Error> {
        match self.pooling {
            Pooling::Direct => query.execute(&self.pool).await,
            Pooling::Transaction => {
                let mut tx = self.pool.begin().await?;
                let done = query.persistent(false).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(done)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_round_trips_through_its_name_and_explains_bad_ones() {
        for pooling in [Pooling::Direct, Pooling::Transaction] {
            assert_eq!(pooling.to_string().parse::<Pooling>(), Ok(pooling));
        }
        let err = "session".parse::<Pooling>().unwrap_err();
        assert!(err.contains("`session`") && err.contains("transaction"), "{err}");
    }
}
