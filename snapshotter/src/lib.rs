//! # resync-snapshotter: full resync jobs
//!
//! Owns resync jobs (tables `jobs`, `job_ranges`, `job_rows`): reading a source table (as a
//! service's config maps it) in one consistent snapshot, in id order and in chunks, and
//! publishing one resync event per row on the resync stream, paced, with a checkpoint per
//! confirmed chunk so a runner killed at any point resumes where it stopped and misses no
//! entity; the job's life ([`JobStatus`]: start, pause, resume, cancel, drive to completion);
//! completion; `verify`; and `entity show` ([`inspect_entity`]), which reads one entity's row
//! the way a job does and puts it beside what the log, the counter and each sink hold.
//!
//! Does not own applying the events (the consumer, whose version rule makes live and resync
//! events safe together and re-sent chunks harmless, and whose records a job reads through
//! `resync_consumer::records`), the version counter (the producer's `versions`), nor the source
//! mapping's format (`fare-config`'s [`fare_config::SourceSpec`]).
//!
//! Layout, in the order a job lives:
//! - [`job`](crate::job): what a job is ([`JobSpec`], [`Job`], [`JobStatus`]) and its record;
//! - `lifecycle`: start, pause, resume, cancel, [`drive`] (publish, then await completion, then
//!   end `pause-live`);
//! - `run`: the runner. Parallel readers: the source is split into key ranges when a job first
//!   runs; each range is read by its own reader with its own checkpoint, all in one exported
//!   snapshot (`pg_export_snapshot`), so the rows published are the table as of one instant;
//! - `completion`: a published job completes once its sinks applied every row
//!   ([`await_completion`], read from the consumers' applied versions, so nothing extra is
//!   written per event);
//! - `verify`: the source's versions against what a sink applied;
//! - `entity`: everything resync knows of one entity, with a verdict per sink.

mod completion;
mod deletes;
pub mod entity;
pub mod job;
mod lifecycle;
mod notify;
mod outage;
mod query;
mod run;
mod verify;

use resync_bus::TransportError;
use uuid::Uuid;

pub use completion::await_completion;
pub use deletes::{DeleteLimit, DeletePlan, Missing};
pub use entity::{EntityReport, Inspect, inspect_entity};
pub use job::{
    DEFAULT_READERS, Job, JobDestination, JobOptions, JobReport, JobSpec, JobStatus, TargetQueue, get, list,
    load_spec, preview_deletes, report,
};
pub use lifecycle::{Milestone, cancel, drive, pause, resume, start};
pub use query::{SourceQuery, VersionSource};
pub use run::{SourceRow, run, run_reading};
pub use verify::{Drift, JobVerification, MAX_DRIFT_LISTED, verify_job};

/// Errors of a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("database: {context}: {source}")]
    Database {
        context: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("source `{table}`: {problem}")]
    Source { table: String, problem: String },
    #[error("publishing: {0}")]
    Publish(#[from] TransportError),
    #[error("no job {0}")]
    NotFound(Uuid),
    #[error("job {id} is {status}: {hint}")]
    State { id: Uuid, status: JobStatus, hint: &'static str },
    #[error(
        "refusing to delete {deletes} entities at sink `{sink}` (it holds {present}): over --max-deletes {limit} \
         ({allowed} allowed); the first: {sample}. Check the source table, or raise --max-deletes"
    )]
    TooManyDeletes { sink: String, deletes: u64, present: u64, limit: String, allowed: u64, sample: String },
}

impl JobError {
    /// True when Postgres was away (restarting, failing over): the step may be tried again
    /// once it is back.
    pub fn is_database_unavailable(&self) -> bool {
        matches!(self, JobError::Database { source, .. } if resync_migrations::is_unavailable(source))
    }
}

pub(crate) type Result<T> = std::result::Result<T, JobError>;

pub(crate) fn db(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> JobError {
    let context = context.into();
    move |source| JobError::Database { context, source }
}
