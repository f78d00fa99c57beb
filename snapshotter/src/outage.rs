//! Riding out Postgres restarts and failovers: a job step that failed because the database was
//! away is tried again, from the job's checkpoints, once the database answers.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;
use uuid::Uuid;

use crate::Result;

/// How long a job waits for its database to come back before it gives up (and is left
/// `failed`, for `resync job resume`). Managed Postgres fails over within a few minutes.
pub(crate) const RIDE_OUT: Duration = Duration::from_secs(300);

/// An attempt that ran this long found the database answering: its failure starts a new outage.
const FRESH_OUTAGE_AFTER: Duration = Duration::from_secs(30);

/// Runs `step` until it ends other than with the database away, or the database has been away
/// for [`RIDE_OUT`]. `step` must be safe to start again (it reads the job's state afresh).
pub(crate) async fn riding_out_database_outages<T, F, Fut>(id: Uuid, what: &str, mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let retry_delays = || resync_bus::backoff(Duration::from_millis(200), Duration::from_secs(5));
    let mut delays = retry_delays();
    let mut away_since: Option<Instant> = None;
    loop {
        let started = Instant::now();
        match step().await {
            Err(err) if err.is_database_unavailable() => {
                if started.elapsed() >= FRESH_OUTAGE_AFTER {
                    (away_since, delays) = (None, retry_delays());
                }
                let since = *away_since.get_or_insert(started);
                if since.elapsed() >= RIDE_OUT {
                    return Err(err);
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(job = %id, step = what, error = %err, retry_in = ?delay, "the database is away; trying again from the checkpoints once it answers");
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}
