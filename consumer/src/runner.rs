//! The consumer process: one loop per queue (the service's live and resync queues), a shared
//! bound on events in flight, pause/resume, and graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use resync_bus::{Stream, SubscribeOptions, Subscription, Transport, TransportError};
use resync_migrations::Schema;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::control;
use crate::db::Db;
use crate::process::Processor;

/// How a consumer process runs.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The service whose queues are consumed (pause/resume is per service and stream).
    pub service: String,
    /// The queues to consume, with their stream.
    pub queues: Vec<(Stream, String)>,
    /// Most events processed at once by this process, over all queues.
    pub concurrency: usize,
    /// Most messages held from the broker per queue.
    pub prefetch: u16,
    /// Most events handled as one batch (locks, version reads and compare-and-sets together).
    pub batch_size: usize,
    /// How often pause state is read.
    pub pause_poll: Duration,
    /// How long in-flight events may take to finish after shutdown is requested.
    pub shutdown_grace: Duration,
}

impl ConsumerConfig {
    pub fn new(service: impl Into<String>, queues: Vec<(Stream, String)>) -> Self {
        Self {
            service: service.into(),
            queues,
            concurrency: 32,
            prefetch: 32,
            batch_size: 16,
            pause_poll: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot consume queue `{queue}`: {source}")]
    Queue { queue: String, source: TransportError },
}

/// What a consumer is doing, per queue; `/readyz` is ready when every queue is consuming or
/// deliberately paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    Starting,
    Consuming,
    Paused,
    Stopped,
}

pub struct Consumer {
    transport: Arc<dyn Transport>,
    processor: Arc<Processor>,
    db: Db,
    schema: Schema,
    config: ConsumerConfig,
    states: Vec<watch::Sender<QueueState>>,
}

/// Longest wait for more free processing slots before a batch is taken, when the last poll
/// returned fewer messages than it could take.
const BATCH_LINGER: Duration = Duration::from_millis(2);
/// The same when the last poll filled every slot it had (the queue has a backlog), for slots the
/// queue's own batches in flight give back: a batch's statements and round trips cost about
/// as much for 1 event as for 16. Measured in the scale test (150 processes, each batch
/// waiting ~1 s for the shared rate limit): with BATCH_LINGER alone batches held 3.8 events on
/// average and the run took 1.4–1.6x M/R; with this, 6.6 events and 1.05x.
const BACKLOG_LINGER: Duration = Duration::from_millis(250);
/// Longest wait for messages in one poll, so pause and shutdown are noticed promptly.
const POLL_WAIT: Duration = Duration::from_millis(500);
/// How often a queue loop holding for the sink (circuit open, quota spent) looks again.
const CIRCUIT_POLL: Duration = Duration::from_millis(250);

impl Consumer {
    pub fn new(
        transport: Arc<dyn Transport>,
        processor: Processor,
        db: impl Into<Db>,
        schema: Schema,
        config: ConsumerConfig,
    ) -> Self {
        let states = config.queues.iter().map(|_| watch::channel(QueueState::Starting).0).collect();
        Self { transport, processor: Arc::new(processor), db: db.into(), schema, config, states }
    }

    /// How long in-flight events may take to finish after shutdown is requested.
    pub fn set_shutdown_grace(&mut self, grace: Duration) {
        self.config.shutdown_grace = grace;
    }

    /// What this consumer did so far.
    pub fn tally(&self) -> Arc<crate::Tally> {
        self.processor.tally()
    }

    /// True when every queue is consuming or paused on purpose.
    pub fn ready(&self) -> bool {
        self.states.iter().all(|s| matches!(*s.borrow(), QueueState::Consuming | QueueState::Paused))
    }

    /// Follows the state of the `index`th queue.
    pub fn queue_state(&self, index: usize) -> watch::Receiver<QueueState> {
        self.states[index].subscribe()
    }

    /// Consumes until `shutdown`; then stops taking messages, lets in-flight events finish
    /// (up to the grace period) and settles them.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let permits = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let processing = Arc::new(AtomicUsize::new(0));
        let mut loops = JoinSet::new();
        for (index, (stream, queue)) in self.config.queues.iter().enumerate() {
            let worker = QueueLoop {
                transport: self.transport.clone(),
                processor: self.processor.clone(),
                db: self.db.clone(),
                schema: self.schema.clone(),
                service: self.config.service.clone(),
                stream: *stream,
                queue: queue.clone(),
                prefetch: self.config.prefetch,
                batch_size: self.config.batch_size.max(1),
                pause_poll: self.config.pause_poll,
                grace: self.config.shutdown_grace,
                state: self.states[index].clone(),
                processing: processing.clone(),
            };
            loops.spawn(worker.run(permits.clone(), shutdown.clone()));
        }
        let mut result = Ok(());
        while let Some(joined) = loops.join_next().await {
            match joined {
                Ok(Err(err)) => {
                    error!(error = %err, "a queue loop failed; stopping the consumer");
                    shutdown.cancel();
                    result = Err(err);
                }
                Err(panic) => {
                    error!(error = %panic, "a queue loop panicked; stopping the consumer");
                    shutdown.cancel();
                }
                Ok(Ok(())) => {}
            }
        }
        result
    }
}

struct QueueLoop {
    transport: Arc<dyn Transport>,
    processor: Arc<Processor>,
    db: Db,
    schema: Schema,
    service: String,
    stream: Stream,
    queue: String,
    prefetch: u16,
    batch_size: usize,
    pause_poll: Duration,
    grace: Duration,
    state: watch::Sender<QueueState>,
    /// Events the process's queue loops are handling now. Slots a loop holds only to poll an
    /// empty queue do not count: they must not keep another queue of the process from taking
    /// the one event it may take while the sink is held.
    processing: Arc<AtomicUsize>,
}

impl QueueLoop {
    async fn run(self, permits: Arc<Semaphore>, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let mut in_flight = JoinSet::new();
        let mut subscription: Option<Box<dyn Subscription>> = None;
        let mut paused = false;
        let mut last_pause_check: Option<tokio::time::Instant> = None;
        let mut last_poll = LastPoll::Full;
        let mut holding = false;
        // Processing slots this queue's batches in flight hold (they come back as batches end).
        let held = Arc::new(AtomicUsize::new(0));
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            while in_flight.try_join_next().is_some() {}
            if last_pause_check.is_none_or(|at| at.elapsed() >= self.pause_poll) {
                paused = self.is_paused(paused).await;
                last_pause_check = Some(tokio::time::Instant::now());
            }
            if paused {
                if let Some(open) = subscription.take() {
                    info!(queue = %self.queue, "stream paused: no longer taking messages");
                    // Prefetched, unprocessed messages return to the queue.
                    let _ = open.close().await;
                }
                self.state.send_replace(QueueState::Paused);
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(self.pause_poll) => {}
                }
                continue;
            }
            let batch_size = match self.held_limit(&mut holding).await {
                Some(0) => {
                    if held.load(Ordering::SeqCst) == 0
                        && self.quota_outlasts_max_hold()
                        && let Some(open) = subscription.take()
                    {
                        info!(queue = %self.queue, "sink quota spent for longer than max_hold: \
                            prefetched messages go back to the queue until the window turns");
                        let _ = open.close().await;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(CIRCUIT_POLL) => {}
                    }
                    continue;
                }
                Some(limit) => limit,
                None => self.batch_size,
            };
            let open = match subscription.as_mut() {
                Some(open) => open,
                None => match self
                    .transport
                    .subscribe(&self.queue, SubscribeOptions { prefetch: self.prefetch })
                    .await
                {
                    Ok(opened) => {
                        info!(queue = %self.queue, stream = %self.stream, "consuming");
                        self.state.send_replace(QueueState::Consuming);
                        subscription.insert(opened)
                    }
                    Err(source) => break Err(ConsumerError::Queue { queue: self.queue.clone(), source }),
                },
            };
            let Some(taken) = take_permits(&permits, &shutdown, batch_size, last_poll, &held).await else {
                continue;
            };
            match open.next_batch(taken.len(), POLL_WAIT).await {
                Ok(batch) => {
                    last_poll = LastPoll::of(batch.len(), taken.len());
                    // Unused permits (a short batch) go back at once; the rest with the batch.
                    let (used, unused) = split_permits(taken, batch.len());
                    drop(unused);
                    if batch.is_empty() {
                        if held.load(Ordering::SeqCst) == 0 {
                            // Idle: no event is late, rather than the last one's age for ever.
                            metrics::gauge!("resync_consumer_lag_seconds", "stream" => self.stream.as_str())
                                .set(0.0);
                        }
                        continue;
                    }
                    metrics::histogram!("resync_consumer_batch_size").record(batch.len() as f64);
                    let processor = self.processor.clone();
                    let (held, processing) = (held.clone(), self.processing.clone());
                    held.fetch_add(used.len(), Ordering::SeqCst);
                    processing.fetch_add(used.len(), Ordering::SeqCst);
                    in_flight.spawn(async move {
                        let tally = processor.tally();
                        for outcome in processor.handle_batch(batch).await {
                            metrics::counter!("resync_consumer_events_total", "outcome" => outcome.label())
                                .increment(1);
                            tally.record(outcome);
                        }
                        // Counted back before the slots are, so a loop woken by them sees it.
                        held.fetch_sub(used.len(), Ordering::SeqCst);
                        processing.fetch_sub(used.len(), Ordering::SeqCst);
                        drop(used);
                    });
                }
                Err(source) => break Err(ConsumerError::Queue { queue: self.queue.clone(), source }),
            }
        };
        self.drain(in_flight).await;
        if let Some(open) = subscription {
            let _ = open.close().await;
        }
        self.state.send_replace(QueueState::Stopped);
        result
    }

    /// Shutdown: wait for in-flight events (they ack when done) up to the grace period.
    async fn drain(&self, mut in_flight: JoinSet<()>) {
        if in_flight.is_empty() {
            return;
        }
        info!(queue = %self.queue, in_flight = in_flight.len(), "finishing events in flight");
        let deadline = tokio::time::Instant::now() + self.grace;
        while !in_flight.is_empty() {
            if tokio::time::timeout_at(deadline, in_flight.join_next()).await.is_err() {
                warn!(queue = %self.queue, left = in_flight.len(), "grace period over; unfinished events return to the queue");
                in_flight.abort_all();
                break;
            }
        }
    }

    /// How many messages the loop may take while the sink is held (`None`: not held, no limit).
    /// Zero while this process already holds events (they wait, and probe when it is their
    /// turn), or while the sink's quota is spent (its window turns by itself): messages left in
    /// the queue spend none of their deliveries. One while the circuit is open and the process
    /// holds no event, so that some process has an event to probe with.
    async fn held_limit(&self, holding: &mut bool) -> Option<usize> {
        let open = self.processor.circuit_refreshed_open().await;
        let quota_spent = self.processor.quota_held_for().is_some();
        let held = open || quota_spent;
        if held != *holding {
            *holding = held;
            if held {
                let why = if open { "circuit open" } else { "quota spent" };
                warn!(queue = %self.queue, why, "sink held: taking no new messages until it is free again");
            } else {
                info!(queue = %self.queue, "sink free again: taking messages");
            }
        }
        if !held {
            return None;
        }
        // Events being handled, not slots taken to poll: an idle queue's long poll (the resync
        // queue's, mostly) once kept the live queue from taking its one event for 8 s, and with
        // nobody holding an event nobody probed.
        let in_flight = self.processing.load(Ordering::SeqCst) > 0;
        Some(if in_flight || quota_spent { 0 } else { 1 })
    }

    /// The quota turns later than an event may hold for it: keeping prefetched messages unacked
    /// that long would have the broker take them back anyway, once per RabbitMQ
    /// `consumer_timeout`, spending a delivery each time; closing spends one, once.
    fn quota_outlasts_max_hold(&self) -> bool {
        self.processor.quota_held_for().is_some_and(|left| left > self.processor.max_hold())
    }

    /// Reads the pause flag; on a database error keeps the last known state.
    async fn is_paused(&self, previous: bool) -> bool {
        match control::paused_streams(&self.db, &self.schema, &self.service).await {
            Ok(paused) => paused.contains(&self.stream),
            Err(err) => {
                warn!(error = %err, "cannot read pause state; keeping the last known state");
                previous
            }
        }
    }
}

fn split_permits(
    mut taken: Vec<OwnedSemaphorePermit>,
    used: usize,
) -> (Vec<OwnedSemaphorePermit>, Vec<OwnedSemaphorePermit>) {
    let unused = taken.split_off(used.min(taken.len()));
    (taken, unused)
}

/// How the queue's last poll went, which decides how many processing slots the next one takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LastPoll {
    /// Nothing came: the queue is idle.
    Empty,
    /// Fewer messages than slots taken.
    Short,
    /// As many messages as slots: more are probably waiting.
    Full,
}

impl LastPoll {
    fn of(received: usize, asked: usize) -> Self {
        match received {
            0 => Self::Empty,
            n if n < asked => Self::Short,
            _ => Self::Full,
        }
    }
}

/// Waits for one free processing slot, then takes others (up to a batch): an idle queue waits
/// with one slot only, so it does not hold slots another queue of the process could use
/// during a whole poll; a queue with a backlog waits up to BACKLOG_LINGER for the slots its own
/// batches in flight (`held`) give back, and no longer once none are left to come back.
async fn take_permits(
    permits: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    max_batch: usize,
    last_poll: LastPoll,
    held: &AtomicUsize,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        _ = shutdown.cancelled() => return None,
        permit = permits.clone().acquire_owned() => permit.ok()?,
    };
    let mut taken = vec![first];
    let linger = match last_poll {
        LastPoll::Empty => return Some(taken),
        LastPoll::Short => BATCH_LINGER,
        LastPoll::Full => BACKLOG_LINGER,
    };
    // Under load permits come back a few at a time; waiting briefly for more makes batches
    // (and their shared round trips) large, at the cost of at most `linger` of latency.
    let linger = tokio::time::Instant::now() + linger;
    while taken.len() < max_batch {
        match permits.clone().try_acquire_owned() {
            Ok(permit) => taken.push(permit),
            Err(_) if last_poll == LastPoll::Full && held.load(Ordering::SeqCst) == 0 => break,
            Err(_) => match tokio::time::timeout_at(linger, permits.clone().acquire_owned()).await {
                Ok(Ok(permit)) => taken.push(permit),
                _ => break,
            },
        }
    }
    Some(taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `held` slots of `total` out with this queue's batches, the rest free.
    fn slots(total: usize, held: usize) -> (Arc<Semaphore>, Vec<OwnedSemaphorePermit>, Arc<AtomicUsize>) {
        let permits = Arc::new(Semaphore::new(total));
        let out = (0..held).map(|_| permits.clone().try_acquire_owned().expect("a free slot")).collect();
        (permits, out, Arc::new(AtomicUsize::new(held)))
    }

    #[test]
    fn a_poll_is_full_when_it_got_every_message_it_asked_for() {
        assert_eq!(LastPoll::of(0, 16), LastPoll::Empty);
        assert_eq!(LastPoll::of(3, 16), LastPoll::Short);
        assert_eq!(LastPoll::of(16, 16), LastPoll::Full);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_queue_waits_with_one_slot_only() {
        let (permits, _out, held) = slots(16, 0);
        let taken = take_permits(&permits, &CancellationToken::new(), 16, LastPoll::Empty, &held).await;
        assert_eq!(taken.map(|t| t.len()), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlogged_queue_waits_for_the_slots_its_batches_give_back() {
        let (permits, out, held) = slots(16, 12);
        let giver = held.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            giver.fetch_sub(out.len(), Ordering::SeqCst);
            drop(out);
        });
        let started = tokio::time::Instant::now();
        let taken = take_permits(&permits, &CancellationToken::new(), 16, LastPoll::Full, &held).await;
        assert_eq!(taken.map(|t| t.len()), Some(16), "the 4 free and the 12 given back");
        assert_eq!(started.elapsed(), Duration::from_millis(100), "taken as soon as the batch was full");
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlogged_queue_does_not_wait_for_slots_it_does_not_hold() {
        // One slot is another queue's (an idle one waiting for messages): it may not come back
        // for a whole poll, so the backlogged queue takes the 15 free ones at once.
        let permits = Arc::new(Semaphore::new(16));
        let _other_queue = permits.clone().try_acquire_owned().expect("a free slot");
        let held = AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let taken = take_permits(&permits, &CancellationToken::new(), 16, LastPoll::Full, &held).await;
        assert_eq!(taken.map(|t| t.len()), Some(15));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlogged_queue_waits_for_its_slots_no_longer_than_the_linger() {
        let (permits, _out, held) = slots(16, 12);
        let started = tokio::time::Instant::now();
        let taken = take_permits(&permits, &CancellationToken::new(), 16, LastPoll::Full, &held).await;
        assert_eq!(taken.map(|t| t.len()), Some(4));
        assert_eq!(started.elapsed(), BACKLOG_LINGER);
    }
}
