//! `--notify URL`: a JSON document POSTed at each change of a job's state (started, paused,
//! resumed, completed, failed, cancelled), for a chat hook or an orchestrator. Sent by whichever
//! process made the change. Best effort: a receiver that is down or refuses is logged, and never
//! holds up or fails the job.

use std::time::Duration;

use resync_migrations::Schema;
use serde::Serialize;
use sqlx::PgPool;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::job::{Job, get, load_spec};

/// What a notification says: the event and the job as it stands after it.
#[derive(Serialize)]
struct Notice<'a> {
    event: &'a str,
    job: &'a Job,
}

const ATTEMPTS: u32 = 3;

/// Tells the job's `--notify` URL (if it has one) that `event` happened.
pub(crate) async fn notify(pool: &PgPool, schema: &Schema, id: Uuid, event: &str) {
    let Ok(spec) = load_spec(pool, schema, id).await else { return };
    let Some(url) = spec.notify else { return };
    let job = match get(pool, schema, id).await {
        Ok(job) => job,
        Err(err) => {
            warn!(job = %id, event, error = %err, "job notification not sent: cannot read the job");
            return;
        }
    };
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(5)).build() {
        Ok(client) => client,
        Err(err) => {
            warn!(job = %id, event, error = %err, "job notification not sent");
            return;
        }
    };
    let notice = Notice { event, job: &job };
    let mut delays = resync_bus::backoff(Duration::from_millis(200), Duration::from_secs(2));
    for attempt in 1..=ATTEMPTS {
        match client.post(&url).json(&notice).send().await.and_then(|r| r.error_for_status()) {
            Ok(_) => {
                debug!(job = %id, event, "job notification sent");
                return;
            }
            Err(err) if attempt < ATTEMPTS => {
                debug!(job = %id, event, error = %err, "job notification failed; retrying");
                tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(2))).await;
            }
            Err(err) => warn!(job = %id, event, url = %url, error = %err, "job notification not delivered"),
        }
    }
}
