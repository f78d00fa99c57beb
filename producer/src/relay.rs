//! The relay: publishes committed events from the outbox, in sequence order, with broker
//! confirmation, then forgets them as pending.
//!
//! Several relays may run; they elect one leader with a Postgres advisory lock held on the
//! leader's own connection, which is also the connection it reads and deletes pending events
//! with. If the leader dies or loses the database, its session ends, the lock is released,
//! and a standby (polling every `standby_poll`) takes over: a relay that is not holding the
//! lock cannot touch the pending set. A crash between publish and delete republishes that
//! batch (at least once; consumers drop duplicates by version).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use resync_bus::{Destination, Envelope, OutgoingMessage, Stream, Transport, TransportError};
use resync_migrations::Schema;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

/// Relay settings. Defaults suit production; tests shorten the intervals.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub schema: Schema,
    /// Prefix of topic names (see `resync_bus::naming`).
    pub namespace: Option<String>,
    /// Most events read and published per round.
    pub batch_size: i64,
    /// Fallback wake-up when no NOTIFY arrives (lost notifications, pooler in between).
    pub poll_interval: Duration,
    /// How often a standby tries to become leader.
    pub standby_poll: Duration,
    /// Longest pause between reconnect attempts after a failure.
    pub max_backoff: Duration,
}

impl RelayConfig {
    pub fn new(schema: Schema) -> Self {
        Self {
            schema,
            namespace: None,
            batch_size: 500,
            poll_interval: Duration::from_millis(500),
            standby_poll: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// What the relay is doing; `/readyz` is ready in `Standby` and `Leader`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayStatus {
    Starting,
    Standby,
    Leader,
    Reconnecting,
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay database error while {doing}: {source}")]
    Database { doing: &'static str, source: sqlx::Error },
    #[error("publishing {events} events failed: {source}")]
    Publish { events: usize, source: TransportError },
}

fn db(doing: &'static str) -> impl FnOnce(sqlx::Error) -> RelayError {
    move |source| RelayError::Database { doing, source }
}

/// Advisory lock namespace for relay leadership (first key); the second is the schema's hash.
const LEADER_LOCK_CLASS: i32 = 0x7265_6c79; // "rely"

pub struct Relay {
    database_url: String,
    transport: Arc<dyn Transport>,
    config: RelayConfig,
    status: watch::Sender<RelayStatus>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct PendingRow {
    pub(crate) seq: i64,
    pub(crate) id: Uuid,
    pub(crate) event_type: String,
    pub(crate) entity_type: String,
    pub(crate) entity_id: String,
    pub(crate) version: i64,
    pub(crate) occurred_at: DateTime<Utc>,
    pub(crate) deleted: bool,
    pub(crate) data: serde_json::Value,
    pub(crate) traceparent: Option<String>,
}

impl PendingRow {
    pub(crate) fn envelope(self) -> Envelope {
        Envelope {
            id: self.id,
            event_type: self.event_type,
            entity_type: self.entity_type,
            entity_id: self.entity_id,
            version: self.version,
            stream: Stream::Live,
            job_id: None,
            occurred_at: self.occurred_at,
            deleted: self.deleted,
            data: self.data,
            traceparent: self.traceparent,
        }
    }
}

impl Relay {
    pub fn new(database_url: impl Into<String>, transport: Arc<dyn Transport>, config: RelayConfig) -> Self {
        let (status, _) = watch::channel(RelayStatus::Starting);
        Self { database_url: database_url.into(), transport, config, status }
    }

    /// Follows the relay's status (for health endpoints and tests).
    pub fn status(&self) -> watch::Receiver<RelayStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` is cancelled: stands by, leads, recovers from database and broker
    /// loss with backoff. On shutdown the batch in flight is finished first.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut delays = self.backoff();
        while !shutdown.is_cancelled() {
            match self.lead_when_elected(&shutdown, &mut delays).await {
                Ok(()) => break,
                Err(err) => {
                    self.status.send_replace(RelayStatus::Reconnecting);
                    metrics::counter!("resync_relay_errors_total").increment(1);
                    let delay = delays.next().unwrap_or(self.config.max_backoff);
                    error!(error = %err, retry_in = ?delay, "relay failed; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        metrics::gauge!("resync_relay_leader").set(0.0);
        self.status.send_replace(RelayStatus::Stopped);
        info!("relay stopped");
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        resync_bus::backoff(Duration::from_millis(200), self.config.max_backoff)
    }

    async fn lead_when_elected(
        &self,
        shutdown: &CancellationToken,
        delays: &mut backon::ExponentialBackoff,
    ) -> Result<(), RelayError> {
        let mut conn = PgConnection::connect(&self.database_url).await.map_err(db("connecting"))?;
        if !self.wait_for_leadership(&mut conn, shutdown).await? {
            return Ok(());
        }
        *delays = self.backoff();
        info!(schema = %self.config.schema, "relay is the leader");
        metrics::gauge!("resync_relay_leader").set(1.0);
        self.status.send_replace(RelayStatus::Leader);
        let result = self.publish_until_shutdown(&mut conn, shutdown).await;
        metrics::gauge!("resync_relay_leader").set(0.0);
        result
    }

    /// Returns `true` once this relay holds the leader lock, `false` on shutdown.
    async fn wait_for_leadership(
        &self,
        conn: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> Result<bool, RelayError> {
        loop {
            let elected: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                .bind(LEADER_LOCK_CLASS)
                .bind(self.config.schema.name())
                .fetch_one(&mut *conn)
                .await
                .map_err(db("trying the leader lock"))?;
            if elected {
                return Ok(true);
            }
            if self.status.send_replace(RelayStatus::Standby) != RelayStatus::Standby {
                info!("another relay is the leader; standing by");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(self.config.standby_poll) => {}
            }
        }
    }

    async fn publish_until_shutdown(
        &self,
        conn: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let mut listener =
            PgListener::connect(&self.database_url).await.map_err(db("connecting the listener"))?;
        listener.listen(&self.config.schema.notify_channel()).await.map_err(db("LISTEN"))?;
        let mut last_depth_check = Instant::now() - Duration::from_secs(60);
        while !shutdown.is_cancelled() {
            let batch = self.fetch_pending(conn).await?;
            if batch.is_empty() {
                // Nothing is pending: both gauges say so, rather than their last busy value.
                metrics::gauge!("resync_relay_lag_seconds").set(0.0);
                metrics::gauge!("resync_relay_pending_events").set(0.0);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    notified = listener.recv() => { notified.map_err(db("waiting for NOTIFY"))?; }
                    _ = tokio::time::sleep(self.config.poll_interval) => {}
                }
                continue;
            }
            if last_depth_check.elapsed() > Duration::from_secs(5) {
                self.record_pending_count(conn).await?;
                last_depth_check = Instant::now();
            }
            self.publish_batch(conn, batch).await?;
        }
        Ok(())
    }

    async fn fetch_pending(&self, conn: &mut PgConnection) -> Result<Vec<PendingRow>, RelayError> {
        let sql = self.config.schema.sql(
            "SELECT o.seq, o.id, o.event_type, o.entity_type, o.entity_id, o.version, o.occurred_at, \
                    o.deleted, o.data, o.traceparent \
             FROM {schema}.outbox_pending p JOIN {schema}.outbox o ON o.seq = p.seq \
             ORDER BY p.seq LIMIT $1",
        );
        sqlx::query_as(sql)
            .bind(self.config.batch_size)
            .fetch_all(conn)
            .await
            .map_err(db("reading pending events"))
    }

    async fn record_pending_count(&self, conn: &mut PgConnection) -> Result<(), RelayError> {
        let sql = self.config.schema.sql("SELECT count(*) FROM {schema}.outbox_pending");
        let pending: i64 =
            sqlx::query_scalar(sql).fetch_one(conn).await.map_err(db("counting pending events"))?;
        metrics::gauge!("resync_relay_pending_events").set(pending as f64);
        Ok(())
    }

    /// Publishes one batch (grouped by topic, order kept within each) and then deletes it from
    /// the pending set.
    async fn publish_batch(&self, conn: &mut PgConnection, batch: Vec<PendingRow>) -> Result<(), RelayError> {
        let (first_seq, last_seq, events) = (batch[0].seq, batch[batch.len() - 1].seq, batch.len());
        let lag = (Utc::now() - batch[0].occurred_at).num_milliseconds().max(0) as f64 / 1000.0;
        metrics::gauge!("resync_relay_lag_seconds").set(lag);
        let seqs: Vec<i64> = batch.iter().map(|r| r.seq).collect();
        let span = info_span!("relay_batch", first_seq, last_seq, events);
        async {
            let held_back = self.parked_types(conn, &batch).await?;
            let mut parked = 0;
            for group in self.group_by_topic(batch) {
                let count = group.messages.len();
                let reason = if held_back.contains(&group.entity_type) {
                    format!("earlier `{}` events are parked", group.entity_type)
                } else {
                    match self
                        .transport
                        .publish_batch(&Destination::Topic(group.topic.clone()), group.messages)
                        .await
                    {
                        Ok(()) => continue,
                        Err(TransportError::NotFound(_)) => format!(
                            "no topic `{}`: no service config publishes `{}` events (run `fare apply`), \
                             or the type is a typo",
                            group.topic, group.entity_type
                        ),
                        Err(source) => return Err(RelayError::Publish { events: count, source }),
                    }
                };
                warn!(entity_type = %group.entity_type, events = count, %reason,
                    "events parked; later events of other types flow on (`resync outbox release` or `drop`)");
                self.park(conn, &group.entity_type, &group.seqs, &reason).await?;
                parked += count;
            }
            let sql = self.config.schema.sql("DELETE FROM {schema}.outbox_pending WHERE seq = ANY($1)");
            sqlx::query(sql).bind(&seqs).execute(conn).await.map_err(db("marking events published"))?;
            metrics::counter!("resync_relay_published_total").increment((events - parked) as u64);
            metrics::counter!("resync_relay_parked_total").increment(parked as u64);
            debug!("published");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// The entity types of `batch` that have parked events: their later events are parked
    /// too, so an entity's events stay in order.
    async fn parked_types(
        &self,
        conn: &mut PgConnection,
        batch: &[PendingRow],
    ) -> Result<Vec<String>, RelayError> {
        let types: Vec<&str> = batch.iter().map(|r| r.entity_type.as_str()).collect();
        let sql = self
            .config
            .schema
            .sql("SELECT DISTINCT entity_type FROM {schema}.outbox_parked WHERE entity_type = ANY($1)");
        sqlx::query_scalar(sql).bind(&types).fetch_all(conn).await.map_err(db("reading parked entity types"))
    }

    /// Sets events aside (they leave `outbox_pending` with the rest of the batch).
    async fn park(
        &self,
        conn: &mut PgConnection,
        entity_type: &str,
        seqs: &[i64],
        reason: &str,
    ) -> Result<(), RelayError> {
        let sql = self.config.schema.sql(
            "INSERT INTO {schema}.outbox_parked (seq, entity_type, reason) \
             SELECT unnest($1::bigint[]), $2, $3 ON CONFLICT DO NOTHING",
        );
        let query = sqlx::query(sql).bind(seqs).bind(entity_type).bind(reason);
        query.execute(conn).await.map_err(db("parking unroutable events"))?;
        Ok(())
    }

    fn group_by_topic(&self, batch: Vec<PendingRow>) -> Vec<TopicGroup> {
        let mut groups: Vec<TopicGroup> = Vec::new();
        for row in batch {
            let topic = crate::live_topic(self.config.namespace.as_deref(), &row.entity_type);
            let seq = row.seq;
            let entity_type = row.entity_type.clone();
            let message = OutgoingMessage::from_envelope(&row.envelope());
            match groups.iter_mut().find(|g| g.topic == topic) {
                Some(group) => {
                    group.seqs.push(seq);
                    group.messages.push(message);
                }
                None => {
                    groups.push(TopicGroup { topic, entity_type, seqs: vec![seq], messages: vec![message] })
                }
            }
        }
        groups
    }
}

/// The events of a batch bound for one topic (one entity type), in sequence order.
struct TopicGroup {
    topic: String,
    entity_type: String,
    seqs: Vec<i64>,
    messages: Vec<OutgoingMessage>,
}
