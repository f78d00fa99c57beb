//! Emitting an event inside the caller's transaction.

use sqlx::PgConnection;
use uuid::Uuid;

use resync_migrations::Schema;

/// An event to record. The database assigns its id, version and sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// `<entity>.<verb>`, e.g. `listing.updated`.
    pub event_type: String,
    pub entity_id: String,
    /// The entity's full state after the change.
    pub data: serde_json::Value,
    pub deleted: bool,
    pub traceparent: Option<String>,
}

impl NewEvent {
    pub fn new(event_type: impl Into<String>, entity_id: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            event_type: event_type.into(),
            entity_id: entity_id.into(),
            data,
            deleted: false,
            traceparent: None,
        }
    }

    /// The entity part of the type.
    pub fn entity_type(&self) -> &str {
        self.event_type.split('.').next().unwrap_or_default()
    }
}

/// What the database assigned to an emitted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct EmittedEvent {
    /// Global order in the event log.
    pub seq: i64,
    pub id: Uuid,
    /// The entity's new version.
    pub version: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// The event was refused (bad type, oversized data...): the message says which and why.
    #[error("{0}")]
    Invalid(String),
    #[error("emitting {event_type} for {entity_id} failed: {source}")]
    Database { event_type: String, entity_id: String, source: sqlx::Error },
}

/// Records `event` in the transaction (or connection) `conn`: it is published if and only if
/// that transaction commits.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use resync_producer::{emit, NewEvent, Schema};
/// let schema = Schema::new("resync")?;
/// let mut tx = pool.begin().await?;
/// sqlx::query("UPDATE listings SET title = 'flat' WHERE id = 42").execute(&mut *tx).await?;
/// emit(&mut tx, &schema, &NewEvent::new("listing.updated", "42", serde_json::json!({"title": "flat"}))).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub async fn emit(
    conn: &mut PgConnection,
    schema: &Schema,
    event: &NewEvent,
) -> Result<EmittedEvent, EmitError> {
    let sql = schema.sql("SELECT seq, id, version FROM {schema}.emit($1, $2, $3, $4, $5, $6)");
    sqlx::query_as::<_, EmittedEvent>(sql)
        .bind(event.entity_type())
        .bind(&event.entity_id)
        .bind(&event.event_type)
        .bind(&event.data)
        .bind(event.deleted)
        .bind(&event.traceparent)
        .fetch_one(conn)
        .await
        .map_err(|source| match &source {
            sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "22023" || c == "54000") => {
                EmitError::Invalid(db.message().to_string())
            }
            _ => EmitError::Database {
                event_type: event.event_type.clone(),
                entity_id: event.entity_id.clone(),
                source,
            },
        })
}
