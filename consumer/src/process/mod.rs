//! Processing one delivery: decode, lock the entity, apply the version rule, call the sink
//! with retries, record the applied version with a compare-and-set, repair after a lost lock,
//! then settle the delivery (ack, nack for later, or dead-letter with the reason).
//!
//! Layout: this module takes a batch of deliveries in ([`Processor::handle_batch`]: decode,
//! drop what the service does not subscribe to, group by entity); `batch` locks and applies
//! the groups together; `entity` is one entity's round under its lock; `settle` acks, requeues
//! or dead-letters; `circuit` holds calls while the third party is down; `outcome` names what
//! happened.

mod batch;
mod circuit;
mod entity;
mod outcome;
mod settle;

pub use outcome::{Outcome, Tally};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use resync_bus::{DeadLetter, DeadLetterReason, DecodeLimits, Delivery, Envelope, Filter, Stream, attr};
use resync_locks::{LockError, LockGuard, Locker};
use resync_throttle::{CircuitState, Gate, SharedCircuit};
use tracing::{Instrument, debug, info_span, warn};

use crate::decision::{Decision, Resend, content_hash, decide};
use crate::sink::{Origin, Sink, SinkError, SinkWrite};
use crate::store::{AppliedState, AppliedStore, Cas, CasRequest, Current, EntityId, EntityKey};

/// How one event is retried and when it is given up.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Sink calls per delivery before the delivery is returned to the queue for later.
    pub max_attempts: u32,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Deliveries of one message before it is dead-lettered as `max-receives-exceeded`.
    pub max_receive_count: u32,
    /// How long an event waits for the sink's open circuit before it goes back to its queue
    /// (spending one delivery): below RabbitMQ's `consumer_timeout`, SQS's 12 hours.
    pub max_hold: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_receive_count: 5,
            max_hold: Duration::from_secs(20 * 60),
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

/// The events of one entity in a batch, newest first.
struct EntityGroup {
    entity: EntityId,
    events: Vec<(Delivery, Envelope)>,
}

impl EntityGroup {
    fn key<'a>(&'a self, sink: &'a str) -> EntityKey<'a> {
        EntityKey { sink, entity_type: &self.entity.entity_type, entity_id: &self.entity.entity_id }
    }
}

/// How far a round got before its compare-and-set.
enum Step {
    Done(Outcome),
    /// Record the version (the decision was `Apply` and the sink call succeeded, or
    /// `SkipUnchanged`).
    Record(Decision),
}

/// The first round of an entity's newest event in a batch.
enum FirstRound {
    /// Not started (the batch read failed, or the entity was busy): the event runs its
    /// rounds alone.
    Unstarted,
    Prepared {
        mine: AppliedState,
        expected: Option<i64>,
        step: Result<Step, ApplyError>,
    },
}

/// The version rule's verdict on an entity's newest event in a batch, from the batch read.
struct Decided {
    mine: AppliedState,
    expected: Option<i64>,
    decision: Decision,
}

fn decide_first(group: &EntityGroup, current: Option<Current>) -> Option<Decided> {
    let (current, (delivery, envelope)) = (current?, group.events.first()?);
    let mine = applied_state(delivery, envelope);
    let decision = rule(&mine, &current);
    Some(Decided { expected: current.applied.as_ref().map(|a| a.version), mine, decision })
}

/// The version rule for `mine` against what is recorded.
fn rule(mine: &AppliedState, current: &Current) -> Decision {
    let applied = current.applied.as_ref().map(AppliedState::applied);
    decide(mine.version, &mine.content_hash, applied.as_ref(), current.started, mine.resend)
}

/// Resync events re-send a version the sink already has (unless asked to skip unchanged
/// content); live events never do.
fn resend_of(delivery: &Delivery, envelope: &Envelope) -> Resend {
    match (envelope.stream, envelope.job_id) {
        (Stream::Resync, Some(_))
            if delivery.attributes.get(attr::SKIP_UNCHANGED).is_some_and(|v| v == "true") =>
        {
            Resend::IfChanged
        }
        (Stream::Resync, Some(_)) => Resend::Always,
        _ => Resend::Never,
    }
}

fn applied_state(delivery: &Delivery, envelope: &Envelope) -> AppliedState {
    AppliedState {
        resend: resend_of(delivery, envelope),
        version: envelope.version,
        content_hash: content_hash(&envelope.data, envelope.deleted),
        deleted: envelope.deleted,
        data: envelope.data.clone(),
        event_id: envelope.id,
        origin: match envelope.stream {
            Stream::Live => Origin::Live,
            Stream::Resync => Origin::Resync { job_id: envelope.job_id },
        },
    }
}

fn event_span(envelope: &Envelope) -> tracing::Span {
    info_span!(
        "event",
        event_id = %envelope.id,
        entity = %format_args!("{}/{}", envelope.entity_type, envelope.entity_id),
        version = envelope.version,
        stream = %envelope.stream,
    )
}

/// How long a batch held its entity locks, phase by phase: other consumers wait for those
/// locks, so a slow phase is worth a warning that names it.
struct PhaseClock {
    started: Instant,
    last: Instant,
    phases: Vec<(&'static str, Duration)>,
}

/// A batch holding its locks longer than this is reported (other consumers give up on a lock
/// after the lock config's `acquire_timeout`, 10 s by default).
const SLOW_LOCK_HOLD: Duration = Duration::from_secs(2);

impl PhaseClock {
    fn start() -> Self {
        let now = Instant::now();
        Self { started: now, last: now, phases: Vec::with_capacity(6) }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.phases.push((phase, now - self.last));
        self.last = now;
    }

    fn report(&self, entities: usize) {
        let held = self.started.elapsed();
        metrics::histogram!("resync_consumer_lock_hold_seconds").record(held.as_secs_f64());
        if held >= SLOW_LOCK_HOLD {
            let phases: Vec<String> =
                self.phases.iter().map(|(name, took)| format!("{name}={:.2}s", took.as_secs_f64())).collect();
            warn!(entities, held = ?held, phases = %phases.join(" "), "a batch held its entity locks long");
        }
    }
}

/// Lease kept beyond a call's timeout for what surrounds it (the shared rate limit's wait, the
/// response read).
pub(crate) const LEASE_MARGIN: Duration = Duration::from_secs(1);

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
    /// The event types the service subscribes to, per stream; `None`: every type.
    subscribed: Option<Vec<(Stream, Filter)>>,
    /// The sink's circuit breaker, shared with every consumer of the sink; `None`: off.
    pub(crate) circuit: Option<SharedCircuit>,
    tally: Arc<Tally>,
    /// What became of resync jobs' events since the last batch wrote it down.
    job_tally: std::sync::Mutex<BTreeMap<(uuid::Uuid, &'static str), i64>>,
}

impl Processor {
    pub fn new(
        store: AppliedStore,
        locker: Locker,
        sink: Arc<dyn Sink>,
        retry: RetryPolicy,
        lock_prefix: String,
    ) -> Self {
        Self {
            store,
            locker,
            sink,
            retry,
            limits: DecodeLimits::default(),
            lock_prefix,
            subscribed: None,
            circuit: None,
            tally: Arc::default(),
            job_tally: std::sync::Mutex::default(),
        }
    }

    /// Holds every call while the sink's shared circuit is open (see [`SharedCircuit`]).
    pub fn with_circuit(mut self, circuit: SharedCircuit) -> Self {
        self.circuit = Some(circuit);
        self
    }

    /// Applies only the event types the service subscribes to on each stream; anything else
    /// that reaches its queues is dead-lettered as `not-subscribed`, never sent.
    pub fn only_subscribed(mut self, subscribed: Vec<(Stream, Filter)>) -> Self {
        self.subscribed = Some(subscribed);
        self
    }

    /// Why the service must not apply `envelope`, if it must not.
    fn unsubscribed(&self, envelope: &Envelope) -> Option<DeadLetter> {
        let subscribed = self.subscribed.as_ref()?;
        let accepted = subscribed
            .iter()
            .any(|(stream, filter)| *stream == envelope.stream && filter.matches(&envelope.event_type));
        if accepted {
            return None;
        }
        let patterns: Vec<String> = subscribed
            .iter()
            .filter(|(stream, _)| *stream == envelope.stream)
            .flat_map(|(_, filter)| filter.patterns.iter().cloned())
            .collect();
        let detail = format!(
            "event type `{}` on the {} stream: the service subscribes to [{}] there",
            envelope.event_type,
            envelope.stream,
            patterns.join(", ")
        );
        Some(DeadLetter { reason: DeadLetterReason::NotSubscribed, detail })
    }

    /// How long an event may wait for a held sink (`sink.circuit.max_hold`).
    pub(crate) fn max_hold(&self) -> Duration {
        self.retry.max_hold
    }

    /// What this processor did so far.
    pub fn tally(&self) -> Arc<Tally> {
        self.tally.clone()
    }

    /// Handles one delivery to the end: it is settled when this returns.
    pub async fn handle(&self, delivery: Delivery) -> Outcome {
        self.handle_batch(vec![delivery]).await.pop().unwrap_or(Outcome::Requeued)
    }

    /// Handles a batch of deliveries to the end: all are settled when this returns. Entities
    /// are locked together, their applied versions read in one query and the new versions
    /// recorded in one compare-and-set statement, so a batch costs a few round trips rather
    /// than a few per event. Outcomes are in no particular order.
    ///
    /// Entities another consumer holds are handled afterwards, one lock at a time: a consumer
    /// never waits for a lock while holding others, so two batches cannot deadlock.
    pub async fn handle_batch(&self, deliveries: Vec<Delivery>) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(deliveries.len());
        let mut groups: BTreeMap<EntityId, Vec<(Delivery, Envelope)>> = BTreeMap::new();
        for delivery in deliveries {
            if delivery.attributes.contains_key(attr::PROBE) {
                outcomes.push(self.ack_probe(delivery).await);
                continue;
            }
            match delivery.envelope(&self.limits) {
                Ok(envelope) if let Some(dead) = self.unsubscribed(&envelope) => {
                    warn!(queue = %delivery.queue, event_type = %envelope.event_type, entity_id = %envelope.entity_id,
                        "event type not subscribed; dead-lettering");
                    outcomes.push(self.dead_letter(delivery, dead).await);
                }
                Ok(envelope) => {
                    let entity = EntityId {
                        entity_type: envelope.entity_type.clone(),
                        entity_id: envelope.entity_id.clone(),
                    };
                    groups.entry(entity).or_default().push((delivery, envelope));
                }
                Err(err) => {
                    warn!(queue = %delivery.queue, error = %err, "invalid envelope; dead-lettering");
                    outcomes.push(self.dead_letter(delivery, DeadLetter::invalid_envelope(&err)).await);
                }
            }
        }
        let groups = groups.into_iter().map(|(entity, mut events)| {
            // Newest first: it decides the entity's fate; older ones are then mostly stale.
            events.sort_by_key(|(_, envelope)| std::cmp::Reverse(envelope.version));
            EntityGroup { entity, events }
        });
        let (locked, busy) = self.try_lock_all(groups.collect()).await;
        outcomes.extend(self.run_locked(locked).await);
        let alone = join_all(busy.into_iter().map(|group| self.run_alone(group))).await;
        outcomes.extend(alone.into_iter().flatten());
        self.write_job_tally().await;
        outcomes
    }

    /// Counts a job's event by what became of it (events returned to the queue come back).
    pub(super) fn count_for_job(&self, envelope: &Envelope, outcome: Outcome) {
        let Some(job) = envelope.job_id.filter(|_| !matches!(outcome, Outcome::Requeued | Outcome::Probe))
        else {
            return;
        };
        // A poisoned lock only means another batch panicked mid-count: the counts stay usable.
        let mut tally = self.job_tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *tally.entry((job, outcome.label())).or_default() += 1;
    }

    /// Writes the jobs' counts down in one statement; kept for the next batch if that fails (the
    /// counts are a report: a failure costs no event).
    async fn write_job_tally(&self) {
        let counts: Vec<(uuid::Uuid, &str, i64)> = {
            let mut tally = self.job_tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::take(&mut *tally).into_iter().map(|((job, outcome), n)| (job, outcome, n)).collect()
        };
        if let Err(err) = self.store.add_job_outcomes(self.sink.name(), &counts).await {
            warn!(error = %err, "could not record what became of resync jobs' events; trying with the next batch");
            let mut tally = self.job_tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (job, outcome, n) in counts {
                *tally.entry((job, outcome)).or_default() += n;
            }
        }
    }

    /// A probe only proves a route; a third party must never see it.
    async fn ack_probe(&self, delivery: Delivery) -> Outcome {
        debug!(queue = %delivery.queue, "fare verify probe; acked without calling the sink");
        match delivery.ack().await {
            Ok(()) => Outcome::Probe,
            Err(err) => {
                warn!(error = %err, "acking a probe failed; it comes back and is acked then");
                Outcome::Requeued
            }
        }
    }
}
