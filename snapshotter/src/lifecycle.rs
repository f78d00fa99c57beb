//! A job's life, as the `resync job` commands drive it: start (with `pause-live`, pausing the
//! subscribers' live consumers), pause, resume, cancel, and [`drive`]: publish what is left,
//! wait for the sinks, and end `pause-live` once the job is finished.

use std::time::Duration;

use fare_config::SourceSpec;
use resync_bus::{Stream, TransportConfig};
use resync_consumer::control;
use resync_migrations::Schema;
use sqlx::PgPool;
use tracing::info;
use uuid::Uuid;

use crate::job::{Job, JobOptions, JobStatus, create, get, load_spec, transition};
use crate::notify::notify;
use crate::outage::riding_out_database_outages;
use crate::{Result, await_completion, db, run_reading};

/// Records a new job (status `running`, not yet run: [`drive`] runs it); in `pause-live` mode
/// also pauses the live stream of every service in [`JobOptions::paused_services`] until the
/// job is finished.
pub async fn start(
    pool: &PgPool,
    schema: &Schema,
    namespace: Option<&str>,
    source: &SourceSpec,
    options: &JobOptions,
) -> Result<Uuid> {
    let id = create(pool, schema, namespace, source, options).await?;
    notify(pool, schema, id, "started").await;
    for service in &options.paused_services {
        let reason = format!("resync job {id} (pause-live)");
        control::pause(pool, schema, service, Stream::Live, Some(&reason))
            .await
            .map_err(db(format!("pausing the live consumers of `{service}`")))?;
        info!(job = %id, service = %service, "live consumers paused until the job is finished");
    }
    Ok(id)
}

/// Stops a running job after the chunks in flight (its runner returns; [`resume`] continues).
pub async fn pause(pool: &PgPool, schema: &Schema, id: Uuid) -> Result<Job> {
    let job = transition(pool, schema, id, &[JobStatus::Running], JobStatus::Paused).await?;
    notify(pool, schema, id, "paused").await;
    Ok(job)
}

/// Makes a paused or failed job `running` again, from its checkpoints (then [`drive`] it). A job
/// already under way or finished is returned as it is.
pub async fn resume(pool: &PgPool, schema: &Schema, id: Uuid) -> Result<Job> {
    let job = get(pool, schema, id).await?;
    match job.status {
        JobStatus::Paused | JobStatus::Failed => {
            let job =
                transition(pool, schema, id, &[JobStatus::Paused, JobStatus::Failed], JobStatus::Running)
                    .await?;
            notify(pool, schema, id, "resumed").await;
            Ok(job)
        }
        _ => Ok(job),
    }
}

/// Stops a job for good (any time before it completed) and ends its `pause-live`; returns the
/// job and the services whose live consumers were resumed.
pub async fn cancel(pool: &PgPool, schema: &Schema, id: Uuid) -> Result<(Job, Vec<String>)> {
    let from = [JobStatus::Running, JobStatus::Paused, JobStatus::Failed, JobStatus::Published];
    let job = transition(pool, schema, id, &from, JobStatus::Cancelled).await?;
    notify(pool, schema, id, "cancelled").await;
    let resumed = resume_live(pool, schema, id).await?;
    Ok((job, resumed))
}

/// A step [`drive`] reached, for the caller to show.
#[derive(Debug)]
pub enum Milestone<'a> {
    /// The runner returned: every row published, or the job was paused or cancelled meanwhile.
    Ran(&'a Job),
    /// Waiting for the sinks ended: completed, or cancelled meanwhile.
    Awaited(&'a Job),
    /// `pause-live` ended for this service.
    LiveResumed(&'a str),
}

/// Takes a job as far as it goes: publishes it if it is running (from its checkpoints, reading
/// rows from `source`, through a transport connected for the purpose), waits until its sinks applied every row if it is
/// published (checking every `poll`), and ends `pause-live` once it is finished.
pub async fn drive(
    pool: &PgPool,
    source: &PgPool,
    schema: &Schema,
    transport: &TransportConfig,
    id: Uuid,
    poll: Duration,
    report: &mut dyn FnMut(Milestone<'_>),
) -> Result<Job> {
    let mut job = get(pool, schema, id).await?;
    if job.status == JobStatus::Running {
        let transport = transport.connect().await?;
        let ran = run_reading(pool, source, schema, transport.as_ref(), id).await;
        transport.close().await?;
        job = ran?;
        report(Milestone::Ran(&job));
    }
    if job.status == JobStatus::Published {
        job = riding_out_database_outages(id, "awaiting the sinks", || {
            await_completion(pool, schema, id, poll)
        })
        .await?;
        report(Milestone::Awaited(&job));
    }
    if job.status.is_finished() {
        for service in resume_live(pool, schema, id).await? {
            report(Milestone::LiveResumed(&service));
        }
    }
    Ok(job)
}

/// Ends `pause-live`: the paused services' consumers take their live backlog again. Returns
/// the services resumed.
async fn resume_live(pool: &PgPool, schema: &Schema, id: Uuid) -> Result<Vec<String>> {
    let services = load_spec(pool, schema, id).await?.paused_services;
    for service in &services {
        control::resume(pool, schema, service, Stream::Live)
            .await
            .map_err(db(format!("resuming the live consumers of `{service}`")))?;
    }
    Ok(services)
}
