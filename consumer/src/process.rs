//! Processing one delivery: decode, lock the entity, apply the version rule, call the sink
//! with retries, record the applied version with a compare-and-set, repair after a lost lock,
//! then settle the delivery (ack, nack for later, or dead-letter with the reason).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::future::join_all;
use resync_bus::{DeadLetter, DeadLetterReason, DecodeLimits, Delivery, Envelope, Filter, Stream, attr};
use resync_locks::{LockGuard, Locker};
use tracing::{Instrument, debug, info_span, warn};

use crate::decision::{Decision, Resend, content_hash, decide};
use crate::sink::{Sink, SinkError, SinkWrite};
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
    /// A `fare verify` probe: acked without calling the sink.
    Probe,
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
            Outcome::Probe => "probe",
        }
    }
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Applied,
        Outcome::Repaired,
        Outcome::SkippedUnchanged,
        Outcome::Stale,
        Outcome::Duplicate,
        Outcome::DeadLettered,
        Outcome::Requeued,
        Outcome::Probe,
    ];
}

/// Counts of what a processor did, for reports (the demo, jobs) beside the Prometheus metrics.
#[derive(Debug, Default)]
pub struct Tally {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    retries: AtomicU64,
}

impl Tally {
    pub fn record(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many events ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome as usize].load(Ordering::Relaxed)
    }

    /// Sink calls that failed transiently and were tried again.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
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
    tally: Arc<Tally>,
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
            tally: Arc::default(),
        }
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
        outcomes
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

    fn lock_key(&self, entity: &EntityId) -> String {
        let (prefix, sink) = (&self.lock_prefix, self.sink.name());
        format!("{prefix}resync:lock:{sink}:{}:{}", entity.entity_type, entity.entity_id)
    }

    /// Locks every free entity of the batch in one round trip; returns the locked groups with
    /// their guards, and the others.
    async fn try_lock_all(
        &self,
        groups: Vec<EntityGroup>,
    ) -> (Vec<(EntityGroup, LockGuard)>, Vec<EntityGroup>) {
        let keys: Vec<String> = groups.iter().map(|g| self.lock_key(&g.entity)).collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let guards = match self.locker.try_acquire_many(&key_refs).await {
            Ok(guards) => guards,
            Err(err) => {
                warn!(error = %err, "batch lock failed; locking per entity");
                return (Vec::new(), groups);
            }
        };
        let (mut locked, mut busy) = (Vec::new(), Vec::new());
        for (group, guard) in groups.into_iter().zip(guards) {
            match guard {
                Some(guard) => locked.push((group, guard)),
                None => busy.push(group),
            }
        }
        (locked, busy)
    }

    /// The batch pipeline over locked entities: one read, concurrent sink calls, one
    /// compare-and-set, then settling and one release.
    async fn run_locked(&self, locked: Vec<(EntityGroup, LockGuard)>) -> Vec<Outcome> {
        if locked.is_empty() {
            return Vec::new();
        }
        let mut phases = PhaseClock::start();
        // One statement reads what is applied and records the intent of the calls about to
        // start (see `sink_intents`).
        let newest: Vec<(&EntityId, i64)> = locked
            .iter()
            .filter_map(|(g, _)| g.events.first().map(|(_, e)| (&g.entity, e.version)))
            .collect();
        let mut current = match self.store.read_and_mark(self.sink.name(), &newest).await {
            Ok(current) => Some(current),
            Err(err) => {
                warn!(error = %err, "batch read of applied versions failed; applying per event");
                None
            }
        };
        phases.mark("read");
        // First round of each entity's newest event: decide, then call the sink, concurrently.
        let decided: Vec<Option<Decided>> = locked
            .iter()
            .map(|(group, _)| {
                let prefetched = current.as_mut().and_then(|c| c.remove(&group.entity));
                decide_first(group, prefetched)
            })
            .collect();
        let firsts = join_all(locked.iter().zip(decided).map(|((group, guard), decided)| async move {
            match decided {
                Some(d) => {
                    let key = group.key(self.sink.name());
                    let span =
                        group.events.first().map(|(_, e)| event_span(e)).unwrap_or_else(tracing::Span::none);
                    let step = self.execute(key, &d.mine, d.decision, guard).instrument(span).await;
                    FirstRound::Prepared { mine: d.mine, expected: d.expected, step }
                }
                _ => FirstRound::Unstarted,
            }
        }))
        .await;
        phases.mark("sink");
        let cas = self.record_batch(&locked, &firsts).await;
        phases.mark("record");
        let finished = join_all(
            locked
                .iter()
                .zip(firsts)
                .zip(cas)
                .map(|(((group, guard), first), cas)| self.finish_group(group, guard, first, cas)),
        )
        .await;
        phases.mark("finish");
        let (groups, guards): (Vec<EntityGroup>, Vec<LockGuard>) = locked.into_iter().unzip();
        let entities = guards.len();
        // Every version is recorded: the locks are released before the deliveries are settled,
        // so other consumers never wait for our broker round trips (an ack on a slow SQS took
        // seconds, and a consumer gives up on a busy lock after `acquire_timeout`). A lock that
        // cannot be released lapses with its lease; a lost lock was already handled by the
        // compare-and-set.
        if let Err(err) = self.locker.release_many(guards).await {
            debug!(error = %err, "releasing entity locks failed; they expire with their lease");
        }
        phases.mark("release");
        phases.report(entities);
        let settling = groups
            .into_iter()
            .zip(finished)
            .flat_map(|(group, results)| group.events.into_iter().zip(results));
        join_all(settling.map(|((delivery, envelope), result)| async move {
            self.settle(delivery, &envelope, result).await
        }))
        .await
    }

    /// An entity another consumer held: wait for its lock (holding no other), then apply its
    /// events one by one.
    async fn run_alone(&self, group: EntityGroup) -> Vec<Outcome> {
        let waited = Instant::now();
        let lock = self.locker.acquire(&self.lock_key(&group.entity)).await;
        metrics::histogram!("resync_consumer_lock_wait_seconds").record(waited.elapsed().as_secs_f64());
        let results = match &lock {
            Ok(guard) => self.finish_group(&group, guard, FirstRound::Unstarted, None).await,
            Err(err) => group
                .events
                .iter()
                .map(|_| Err(ApplyError::Infrastructure(format!("entity lock: {err}"))))
                .collect(),
        };
        // Released before settling, as in `run_locked`.
        if let Ok(guard) = lock {
            let _ = guard.release().await;
        }
        let mut outcomes = Vec::with_capacity(results.len());
        for ((delivery, envelope), result) in group.events.into_iter().zip(results) {
            outcomes.push(self.settle(delivery, &envelope, result).await);
        }
        outcomes
    }

    /// One compare-and-set statement for every first round that needs one.
    async fn record_batch(
        &self,
        locked: &[(EntityGroup, LockGuard)],
        firsts: &[FirstRound],
    ) -> Vec<Option<Cas>> {
        let requests: Vec<(usize, CasRequest<'_>)> = locked
            .iter()
            .zip(firsts)
            .enumerate()
            .filter_map(|(i, ((group, _), first))| match first {
                FirstRound::Prepared { mine, expected, step: Ok(Step::Record(_)) } => {
                    Some((i, CasRequest { entity: &group.entity, expected: *expected, new: mine }))
                }
                _ => None,
            })
            .collect();
        let mut results = vec![None; locked.len()];
        let batch: Vec<CasRequest<'_>> = requests.iter().map(|(_, r)| r.clone()).collect();
        match self.store.compare_and_set_many(self.sink.name(), &batch).await {
            Ok(recorded) => {
                for ((i, _), recorded) in requests.iter().zip(recorded) {
                    // A conflict's current state is read by the group itself (rare).
                    results[*i] = Some(if recorded { Cas::Recorded } else { Cas::Conflict(None) });
                }
            }
            // Each group then records on its own (and reports the error if it persists).
            Err(err) => warn!(error = %err, "batch compare-and-set failed; recording per event"),
        }
        results
    }

    /// Applies a locked entity's events, newest first: concludes the newest one's first round
    /// (if the batch started it), runs any further rounds, then the older events. Returns one
    /// result per event, in order.
    async fn finish_group(
        &self,
        group: &EntityGroup,
        guard: &LockGuard,
        first: FirstRound,
        cas: Option<Cas>,
    ) -> Vec<Result<Outcome, ApplyError>> {
        let key = group.key(self.sink.name());
        let mut results = Vec::with_capacity(group.events.len());
        let mut first = Some((first, cas));
        for (delivery, envelope) in &group.events {
            let result = async {
                match first.take() {
                    Some((FirstRound::Prepared { mine, expected, step }, cas)) => {
                        self.continue_first(key, &mine, expected, step, cas, guard).await
                    }
                    _ => self.apply_locked(key, &applied_state(delivery, envelope), guard).await,
                }
            }
            .instrument(event_span(envelope))
            .await;
            if let Err(ApplyError::Sink(SinkError::Rejected { .. })) = &result {
                // Nothing landed: older events of the entity may be applied again. Cleared
                // under the lock, so no other consumer's intent for this version is in flight.
                if let Err(err) = self.store.clear_intent(key, envelope.version).await {
                    warn!(error = %err, "could not clear the sink intent; older events stay stale");
                }
            }
            results.push(result);
        }
        results
    }

    async fn continue_first(
        &self,
        key: EntityKey<'_>,
        mine: &AppliedState,
        expected: Option<i64>,
        step: Result<Step, ApplyError>,
        cas: Option<Cas>,
        guard: &LockGuard,
    ) -> Result<Outcome, ApplyError> {
        let decision = match step? {
            Step::Done(outcome) => return Ok(outcome),
            Step::Record(decision) => decision,
        };
        let cas = match cas {
            Some(Cas::Conflict(None)) => Cas::Conflict(
                self.store.get(key).await.map_err(|e| infra("reading the applied version")(e.to_string()))?,
            ),
            Some(cas) => cas,
            None => self.record(key, expected, mine).await?,
        };
        match self.conclude(key, mine, decision, cas, guard).await? {
            Some(outcome) => Ok(outcome),
            None => self.apply_locked(key, mine, guard).await,
        }
    }

    /// Acknowledges, requeues or dead-letters a delivery according to how applying it went.
    async fn settle(
        &self,
        delivery: Delivery,
        envelope: &Envelope,
        result: Result<Outcome, ApplyError>,
    ) -> Outcome {
        async {
            let lag = (chrono::Utc::now() - envelope.occurred_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::gauge!("resync_consumer_lag_seconds", "stream" => envelope.stream.as_str()).set(lag);
            match result {
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
                    self.remember_dead_letter(envelope, &dead).await;
                    self.dead_letter(delivery, dead).await
                }
                Err(err) => self.retry_later(delivery, envelope, err).await,
            }
        }
        .instrument(event_span(envelope))
        .await
    }

    /// Records the entity as rejected by this sink; a failure only costs the record.
    async fn remember_dead_letter(&self, envelope: &Envelope, dead: &DeadLetter) {
        let key = EntityKey {
            sink: self.sink.name(),
            entity_type: &envelope.entity_type,
            entity_id: &envelope.entity_id,
        };
        let reason = dead.reason.as_attribute();
        if let Err(err) = self.store.record_dead_letter(key, envelope.version, &reason, &dead.detail).await {
            warn!(error = %err, "could not record the dead-lettered entity; `--only-rejected` will miss it");
        }
    }

    async fn retry_later(&self, delivery: Delivery, envelope: &Envelope, err: ApplyError) -> Outcome {
        let from_sink = matches!(err, ApplyError::Sink(_));
        if from_sink && delivery.receive_count >= self.retry.max_receive_count {
            warn!(error = %err, receives = delivery.receive_count, "giving up; dead-lettering");
            let dead = DeadLetter { reason: DeadLetterReason::MaxReceivesExceeded, detail: err.to_string() };
            self.remember_dead_letter(envelope, &dead).await;
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

    /// Read-decide-write rounds for one event under its entity's lock, until the version rule
    /// settles it.
    async fn apply_locked(
        &self,
        key: EntityKey<'_>,
        mine: &AppliedState,
        guard: &LockGuard,
    ) -> Result<Outcome, ApplyError> {
        for _ in 0..MAX_ROUNDS {
            let current = self
                .store
                .current(key)
                .await
                .map_err(|e| infra("reading the applied version")(e.to_string()))?;
            let expected = current.applied.as_ref().map(|c| c.version);
            let decision = rule(mine, &current);
            if decision == Decision::Apply {
                let entity =
                    EntityId { entity_type: key.entity_type.into(), entity_id: key.entity_id.into() };
                self.store
                    .record_intents(key.sink, &[(&entity, mine.version)])
                    .await
                    .map_err(|e| infra("recording the sink intent")(e.to_string()))?;
            }
            match self.execute(key, mine, decision, guard).await? {
                Step::Done(outcome) => return Ok(outcome),
                Step::Record(decision) => {
                    let cas = self.record(key, expected, mine).await?;
                    if let Some(outcome) = self.conclude(key, mine, decision, cas, guard).await? {
                        return Ok(outcome);
                    }
                }
            }
        }
        Err(ApplyError::Infrastructure(format!("entity still contended after {MAX_ROUNDS} rounds")))
    }

    /// The first half of a round, once decided (and for `Apply`, once the intent is recorded):
    /// the sink call if the rule says so.
    async fn execute(
        &self,
        key: EntityKey<'_>,
        mine: &AppliedState,
        decision: Decision,
        guard: &LockGuard,
    ) -> Result<Step, ApplyError> {
        match decision {
            Decision::Stale => Ok(Step::Done(Outcome::Stale)),
            Decision::Duplicate => Ok(Step::Done(Outcome::Duplicate)),
            Decision::SkipUnchanged => Ok(Step::Record(Decision::SkipUnchanged)),
            Decision::Apply => {
                self.send(key, mine, Some(guard)).await?;
                Ok(Step::Record(Decision::Apply))
            }
        }
    }

    /// The second half of a round: what the compare-and-set result means. `None`: go round
    /// again.
    async fn conclude(
        &self,
        key: EntityKey<'_>,
        mine: &AppliedState,
        decision: Decision,
        cas: Cas,
        guard: &LockGuard,
    ) -> Result<Option<Outcome>, ApplyError> {
        let applied = decision == Decision::Apply;
        match cas {
            Cas::Recorded if applied => Ok(Some(Outcome::Applied)),
            Cas::Recorded => Ok(Some(Outcome::SkippedUnchanged)),
            Cas::Conflict(Some(newer)) if applied && newer.version > mine.version => {
                // Our lock was lost mid-call and a newer version was applied meanwhile; our
                // write may have landed after it. Re-send the newest.
                warn!(
                    newer = newer.version,
                    "a newer version was applied during our call; re-sending the newest"
                );
                self.repair(key, guard).await?;
                Ok(Some(Outcome::Repaired))
            }
            Cas::Conflict(Some(same)) if applied && same.version == mine.version => {
                Ok(Some(Outcome::Applied))
            }
            // An older version was recorded after we read: its write may have landed after
            // ours. Go round again; the rule re-applies ours.
            Cas::Conflict(_) => Ok(None),
        }
    }

    /// Re-sends the newest recorded version after our write may have landed late. Done under
    /// the entity's lock (taken again if ours was lost), so no other consumer's write is in
    /// flight meanwhile and the newest is what the third party keeps. If the lock stays busy,
    /// re-sends anyway: a late write that survives is worse than a redundant one.
    async fn repair(&self, key: EntityKey<'_>, guard: &LockGuard) -> Result<(), ApplyError> {
        let retaken = if guard.is_lost() {
            let wait = self.locker.config().lease * 2;
            match self.locker.acquire_within(guard.key(), wait).await {
                Ok(retaken) => Some(retaken),
                Err(err) => {
                    warn!(error = %err, "entity lock still busy; repairing without it");
                    None
                }
            }
        } else {
            None
        };
        let current =
            self.store.current(key).await.map_err(|e| infra("reading the applied version")(e.to_string()));
        // Under the retaken lock, or ours if it still holds; without either, re-sent anyway.
        let lock = retaken.as_ref().or(Some(guard).filter(|g| !g.is_lost()));
        let result = match current {
            Ok(Current { applied: Some(newest), .. }) => self.send(key, &newest, lock).await,
            Ok(_) => Ok(()),
            Err(err) => Err(err),
        };
        if let Some(retaken) = retaken {
            // Expires with its lease if this fails.
            let _ = retaken.release().await;
        }
        result
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

    /// Before a sink call under `lock`: the lock must still be ours with enough lease left for
    /// the whole call (renewed now if it is short), or the call is not made and the event goes
    /// back to the queue. A consumer that lost its lock (frozen, partitioned from Redis) while
    /// an earlier attempt failed must not re-send an older version over what the new holder
    /// applied meanwhile.
    ///
    /// `confirm` asks Redis even when the local lease looks long enough (before a retry: Redis
    /// may have lost the key, or given it to another, without this process noticing yet).
    async fn ensure_lease(&self, lock: &LockGuard, confirm: bool) -> Result<(), ApplyError> {
        let needed = self.sink.call_timeout().unwrap_or_default() + LEASE_MARGIN;
        if !confirm && lock.remaining().is_some_and(|left| left >= needed) {
            return Ok(());
        }
        lock.renew().await.map_err(|e| infra("entity lock")(e.to_string()))?;
        match lock.remaining() {
            Some(left) if left >= needed => Ok(()),
            left => Err(ApplyError::Infrastructure(format!(
                "entity lock {}: {left:?} of lease left, a call needs {needed:?}",
                lock.key()
            ))),
        }
    }

    /// Calls the sink, retrying transient failures with exponential backoff and jitter, and
    /// waiting at least as long as the third party's `Retry-After`. Every attempt is made only
    /// while `lock` (if any) holds for the whole call.
    async fn send(
        &self,
        key: EntityKey<'_>,
        state: &AppliedState,
        lock: Option<&LockGuard>,
    ) -> Result<(), ApplyError> {
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
            if let Some(lock) = lock {
                self.ensure_lease(lock, attempt > 1).await?;
            }
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
                    self.tally.retries.fetch_add(1, Ordering::Relaxed);
                    debug!(attempt, error = %err, retry_in = ?delay, "sink call failed; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
}
