//! Processing one delivery: decode, lock the entity, apply the version rule, call the sink
//! with retries, record the applied version with a compare-and-set, repair after a lost lock,
//! then settle the delivery (ack, nack for later, or dead-letter with the reason).

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use resync_bus::{DeadLetter, DeadLetterReason, DecodeLimits, Delivery, Envelope};
use resync_locks::Locker;
use tracing::{Instrument, debug, info_span, warn};

use crate::decision::{Decision, content_hash, decide};
use crate::sink::{Sink, SinkError, SinkWrite};
use crate::store::{AppliedState, AppliedStore, Cas, EntityKey};

/// How one event is retried and when it is given up.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Sink calls per delivery before the delivery is returned to the queue for later.
    pub max_attempts: u32,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Deliveries of one message before it is dead-lettered as `max-receives-exceeded`.
    pub max_receive_count: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_receive_count: 5,
        }
    }
}

/// What happened to an event; also the `outcome` label of `resync_consumer_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Applied, then a newer version turned out to be recorded meanwhile; it was re-sent.
    Repaired,
    SkippedUnchanged,
    Stale,
    Duplicate,
    DeadLettered,
    /// Returned to the queue to be tried again later.
    Requeued,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Repaired => "repaired",
            Outcome::SkippedUnchanged => "skipped_unchanged",
            Outcome::Stale => "stale",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Requeued => "requeued",
        }
    }
}

/// Why applying an event did not finish.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// Our own infrastructure (Postgres, Redis): never the event's fault, never dead-lettered.
    #[error("{0}")]
    Infrastructure(String),
}

fn infra(what: &str) -> impl FnOnce(String) -> ApplyError + '_ {
    move |e| ApplyError::Infrastructure(format!("{what}: {e}"))
}

/// Rounds of read-decide-write per event before giving up under contention.
const MAX_ROUNDS: usize = 5;

pub struct Processor {
    pub(crate) store: AppliedStore,
    pub(crate) locker: Locker,
    pub(crate) sink: Arc<dyn Sink>,
    pub(crate) retry: RetryPolicy,
    pub(crate) limits: DecodeLimits,
    /// Prefix of lock keys (the namespace), so environments sharing a Redis do not collide.
    pub(crate) lock_prefix: String,
}

impl Processor {
    pub fn new(
        store: AppliedStore,
        locker: Locker,
        sink: Arc<dyn Sink>,
        retry: RetryPolicy,
        lock_prefix: String,
    ) -> Self {
        Self { store, locker, sink, retry, limits: DecodeLimits::default(), lock_prefix }
    }

    /// Handles one delivery to the end: it is settled when this returns.
    pub async fn handle(&self, delivery: Delivery) -> Outcome {
        let envelope = match delivery.envelope(&self.limits) {
            Ok(envelope) => envelope,
            Err(err) => {
                warn!(queue = %delivery.queue, error = %err, "invalid envelope; dead-lettering");
                return self.dead_letter(delivery, DeadLetter::invalid_envelope(&err)).await;
            }
        };
        let span = info_span!(
            "event",
            event_id = %envelope.id,
            entity = %format_args!("{}/{}", envelope.entity_type, envelope.entity_id),
            version = envelope.version,
            stream = %envelope.stream,
        );
        async {
            let lag = (chrono::Utc::now() - envelope.occurred_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::gauge!("resync_consumer_lag_seconds", "stream" => envelope.stream.as_str()).set(lag);
            match self.apply(&envelope).await {
                Ok(outcome) => {
                    if let Err(err) = delivery.ack().await {
                        // Redelivered later and then found to be a duplicate: harmless.
                        warn!(error = %err, "ack failed after the event was applied");
                    }
                    debug!(outcome = outcome.label(), "done");
                    outcome
                }
                Err(ApplyError::Sink(SinkError::Rejected { status, body })) => {
                    let detail = format!("HTTP {status}: {body}");
                    warn!(status, "sink rejected the event; dead-lettering");
                    let dead = DeadLetter { reason: DeadLetterReason::SinkRejected { status }, detail };
                    self.dead_letter(delivery, dead).await
                }
                Err(err) => self.retry_later(delivery, err).await,
            }
        }
        .instrument(span)
        .await
    }

    async fn retry_later(&self, delivery: Delivery, err: ApplyError) -> Outcome {
        let from_sink = matches!(err, ApplyError::Sink(_));
        if from_sink && delivery.receive_count >= self.retry.max_receive_count {
            warn!(error = %err, receives = delivery.receive_count, "giving up; dead-lettering");
            let dead = DeadLetter { reason: DeadLetterReason::MaxReceivesExceeded, detail: err.to_string() };
            return self.dead_letter(delivery, dead).await;
        }
        // Later deliveries wait longer, so a struggling third party gets room.
        let delay = self.retry.min_backoff * 2u32.saturating_pow(delivery.receive_count.min(10));
        let delay = delay.min(self.retry.max_backoff);
        warn!(error = %err, receives = delivery.receive_count, retry_in = ?delay, "event not applied; returning it to the queue");
        if let Err(nack_err) = delivery.nack(delay).await {
            warn!(error = %nack_err, "nack failed; the broker redelivers the message anyway");
        }
        Outcome::Requeued
    }

    async fn dead_letter(&self, delivery: Delivery, dead: DeadLetter) -> Outcome {
        let reason = dead.reason.as_attribute();
        match delivery.dead_letter(&dead).await {
            Ok(()) => {
                metrics::counter!("resync_consumer_dead_lettered_total", "reason" => reason).increment(1);
                Outcome::DeadLettered
            }
            Err(err) => {
                // Not acked either: the broker redelivers it and we try again.
                warn!(error = %err, "could not dead-letter; the message will be redelivered");
                Outcome::Requeued
            }
        }
    }

    async fn apply(&self, envelope: &Envelope) -> Result<Outcome, ApplyError> {
        let key = EntityKey {
            sink: self.sink.name(),
            entity_type: &envelope.entity_type,
            entity_id: &envelope.entity_id,
        };
        let lock_key =
            format!("{}resync:lock:{}:{}:{}", self.lock_prefix, key.sink, key.entity_type, key.entity_id);
        let waited = Instant::now();
        let guard = self.locker.acquire(&lock_key).await.map_err(|e| infra("entity lock")(e.to_string()))?;
        metrics::histogram!("resync_consumer_lock_wait_seconds").record(waited.elapsed().as_secs_f64());
        let mine = AppliedState {
            version: envelope.version,
            content_hash: content_hash(&envelope.data, envelope.deleted),
            deleted: envelope.deleted,
            data: envelope.data.clone(),
            event_id: envelope.id,
        };
        let result = self.apply_locked(key, &mine, &guard).await;
        // Released in the background; a lost lock was already handled by the CAS.
        drop(guard);
        result
    }

    async fn apply_locked(
        &self,
        key: EntityKey<'_>,
        mine: &AppliedState,
        guard: &resync_locks::LockGuard,
    ) -> Result<Outcome, ApplyError> {
        for _ in 0..MAX_ROUNDS {
            let current =
                self.store.get(key).await.map_err(|e| infra("reading the applied version")(e.to_string()))?;
            let expected = current.as_ref().map(|c| c.version);
            match decide(
                mine.version,
                &mine.content_hash,
                current.as_ref().map(AppliedState::applied).as_ref(),
            ) {
                Decision::Stale => return Ok(Outcome::Stale),
                Decision::Duplicate => return Ok(Outcome::Duplicate),
                Decision::SkipUnchanged => {
                    if self.record(key, expected, mine).await? == Cas::Recorded {
                        return Ok(Outcome::SkippedUnchanged);
                    }
                }
                Decision::Apply => {
                    // Cheap narrowing of the race; the compare-and-set below is what makes it safe.
                    guard.ensure_held().map_err(|e| infra("entity lock")(e.to_string()))?;
                    self.send(key, mine).await?;
                    match self.record(key, expected, mine).await? {
                        Cas::Recorded => return Ok(Outcome::Applied),
                        Cas::Conflict(Some(newer)) if newer.version > mine.version => {
                            // Our lock was lost mid-call and a newer version was applied
                            // meanwhile; our write may have landed after it. Re-send the newest.
                            warn!(
                                newer = newer.version,
                                "a newer version was applied during our call; re-sending it"
                            );
                            self.send(key, &newer).await?;
                            return Ok(Outcome::Repaired);
                        }
                        Cas::Conflict(Some(same)) if same.version == mine.version => {
                            return Ok(Outcome::Applied);
                        }
                        // An older version was recorded after we read: its write may have
                        // landed after ours. Go round again; the rule re-applies ours.
                        Cas::Conflict(_) => {}
                    }
                }
            }
        }
        Err(ApplyError::Infrastructure(format!("entity still contended after {MAX_ROUNDS} rounds")))
    }

    async fn record(
        &self,
        key: EntityKey<'_>,
        expected: Option<i64>,
        mine: &AppliedState,
    ) -> Result<Cas, ApplyError> {
        self.store
            .compare_and_set(key, expected, mine)
            .await
            .map_err(|e| infra("recording the applied version")(e.to_string()))
    }

    /// Calls the sink, retrying transient failures with exponential backoff and jitter, and
    /// waiting at least as long as the third party's `Retry-After`.
    async fn send(&self, key: EntityKey<'_>, state: &AppliedState) -> Result<(), ApplyError> {
        let write = SinkWrite {
            entity_type: key.entity_type,
            entity_id: key.entity_id,
            version: state.version,
            event_id: state.event_id,
            deleted: state.deleted,
            data: &state.data,
        };
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_backoff)
            .with_max_delay(self.retry.max_backoff)
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempt = 1;
        loop {
            let started = Instant::now();
            let result = self.sink.apply(&write).await;
            metrics::histogram!("resync_consumer_sink_latency_seconds")
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => return Ok(()),
                Err(err) if err.is_transient() && attempt < self.retry.max_attempts => {
                    let backoff = delays.next().unwrap_or(self.retry.max_backoff);
                    let delay = err.retry_after().map_or(backoff, |hint| hint.max(backoff));
                    metrics::counter!("resync_consumer_retries_total").increment(1);
                    debug!(attempt, error = %err, retry_in = ?delay, "sink call failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
}
