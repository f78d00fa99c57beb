//! `verify`: the job's source rows, as they are now, against the versions a sink applied.

use resync_migrations::Schema;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::job::load_spec;
use crate::query::VersionSource;
use crate::run::open_snapshot;
use crate::{Result, db};

/// An entity whose applied version at a sink differs from its source row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub entity_id: String,
    /// `None`: resync has no version for the entity yet (never emitted, never sent by a job).
    pub source_version: Option<i64>,
    /// `None`: the sink never applied the entity.
    pub applied_version: Option<i64>,
}

/// What [`verify_job`] found for one sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobVerification {
    pub sink: String,
    /// Source rows compared.
    pub checked: u64,
    /// Every drifting entity, up to [`MAX_DRIFT_LISTED`].
    pub drift: Vec<Drift>,
    pub drift_count: u64,
}

/// Most drifting entities `verify` lists (it counts them all).
pub const MAX_DRIFT_LISTED: usize = 1000;

/// Compares the job's source rows, as they are now, with what `sink` has applied (the
/// consumer's `applied_versions`): an entity is drifting when the sink never applied it or
/// applied another version than the row's.
pub async fn verify_job(pool: &PgPool, schema: &Schema, id: Uuid, sink: &str) -> Result<JobVerification> {
    let spec = load_spec(pool, schema, id).await?;
    let mut reader = open_snapshot(pool).await?;
    let mut report =
        JobVerification { sink: sink.to_string(), checked: 0, drift: Vec::new(), drift_count: 0 };
    let mut checkpoint: Option<String> = None;
    loop {
        let rows = spec.query.chunk(&mut reader, checkpoint.as_deref(), None, 1000).await?;
        let Some(last) = rows.last().map(|r| r.checkpoint.clone()) else { return Ok(report) };
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let applied = resync_consumer::records::applied_versions(pool, schema, sink, &spec.entity_type, &ids)
            .await
            .map_err(db("reading applied versions"))?;
        for row in &rows {
            let applied_version = applied.get(&row.id).copied();
            let source_version = match spec.query.versions {
                VersionSource::Counter => row.counted,
                VersionSource::Column => row.declared,
            };
            if source_version.is_none() || applied_version != source_version {
                report.drift_count += 1;
                if report.drift.len() < MAX_DRIFT_LISTED {
                    report.drift.push(Drift { entity_id: row.id.clone(), source_version, applied_version });
                }
            }
        }
        report.checked += rows.len() as u64;
        checkpoint = Some(last);
    }
}
