//! The consumer process: one loop per queue (the service's live and resync queues), a shared
//! bound on events in flight, pause/resume, and graceful shutdown.

use std::sync::Arc;
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

/// Longest wait for more free processing slots before a batch is taken.
const BATCH_LINGER: Duration = Duration::from_millis(2);
/// Longest wait for messages in one poll, so pause and shutdown are noticed promptly.
const POLL_WAIT: Duration = Duration::from_millis(500);

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
}

impl QueueLoop {
    async fn run(self, permits: Arc<Semaphore>, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let mut in_flight = JoinSet::new();
        let mut subscription: Option<Box<dyn Subscription>> = None;
        let mut paused = false;
        let mut last_pause_check: Option<tokio::time::Instant> = None;
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
            let Some(taken) = take_permits(&permits, &shutdown, self.batch_size).await else { continue };
            match open.next_batch(taken.len(), POLL_WAIT).await {
                Ok(batch) => {
                    // Unused permits (a short batch) go back at once; the rest with the batch.
                    let (used, unused) = split_permits(taken, batch.len());
                    drop(unused);
                    if batch.is_empty() {
                        continue;
                    }
                    let processor = self.processor.clone();
                    in_flight.spawn(async move {
                        let tally = processor.tally();
                        for outcome in processor.handle_batch(batch).await {
                            metrics::counter!("resync_consumer_events_total", "outcome" => outcome.label())
                                .increment(1);
                            tally.record(outcome);
                        }
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

/// Waits for one free processing slot, then takes any others free now (up to a batch).
async fn take_permits(
    permits: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    max_batch: usize,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        _ = shutdown.cancelled() => return None,
        permit = permits.clone().acquire_owned() => permit.ok()?,
    };
    let mut taken = vec![first];
    // Under load permits come back a few at a time; waiting briefly for more makes batches
    // (and their shared round trips) large, at the cost of at most BATCH_LINGER of latency.
    let linger = tokio::time::Instant::now() + BATCH_LINGER;
    while taken.len() < max_batch {
        match permits.clone().try_acquire_owned() {
            Ok(permit) => taken.push(permit),
            Err(_) => match tokio::time::timeout_at(linger, permits.clone().acquire_owned()).await {
                Ok(Ok(permit)) => taken.push(permit),
                _ => break,
            },
        }
    }
    Some(taken)
}
