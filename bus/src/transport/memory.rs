//! In-memory transport for unit tests and the embedded demo. Never a substitute for a broker in
//! integration tests. Semantics follow the brokers where they agree: topics fan out to bound
//! queues by filter, a delivery dropped unsettled returns to its queue, a message received
//! `max_receive_count` times without being settled goes to the dead-letter queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::transport::{
    Attributes, DeadLetterReason, Delivery, Destination, FailedEntry, Filter, Inventory, ObservedQueue,
    OutgoingMessage, QueueDepth, QueueSpec, Result, Settle, SubscribeOptions, Subscription, Transport,
    TransportError, attr, dead_letter_queue_name,
};

#[derive(Debug, Clone)]
struct StoredMessage {
    body: Bytes,
    attributes: Attributes,
    receive_count: u32,
    /// Not deliverable before this instant (nack with a delay).
    not_before: Option<Instant>,
}

#[derive(Debug, Default)]
struct MemQueue {
    ready: VecDeque<StoredMessage>,
    /// Delivered and unsettled, by delivery id, with the subscription holding it.
    in_flight: HashMap<u64, (StoredMessage, u64)>,
    max_receive_count: u32,
    visibility_timeout: Duration,
    owner: Option<String>,
    notify: Arc<Notify>,
}

#[derive(Debug, Default)]
struct State {
    /// Topic -> its bound queues with the union of their patterns.
    topics: HashMap<String, Vec<(String, Filter)>>,
    topic_owners: HashMap<String, Option<String>>,
    queues: HashMap<String, MemQueue>,
    /// Source of delivery and subscription ids.
    next_id: u64,
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Takes an unsettled delivery out of its queue's in-flight set; `None` if it was already
    /// settled or returned (its subscription went away).
    fn settle(&mut self, queue: &str, delivery_id: u64) -> Option<StoredMessage> {
        self.queues.get_mut(queue)?.in_flight.remove(&delivery_id).map(|(m, _)| m)
    }

    /// Returns every delivery a subscription still holds to the ready queue, as a broker does
    /// when a consumer's connection goes away.
    fn return_held(&mut self, queue: &str, subscription_id: u64) {
        let Some(q) = self.queues.get_mut(queue) else { return };
        let held: Vec<u64> =
            q.in_flight.iter().filter(|(_, (_, s))| *s == subscription_id).map(|(id, _)| *id).collect();
        for id in held {
            if let Some((message, _)) = q.in_flight.remove(&id) {
                q.ready.push_front(message);
            }
        }
        q.notify.notify_waiters();
    }
}

/// The in-memory transport. Cloning shares the same broker.
#[derive(Debug, Clone, Default)]
pub struct MemoryTransport {
    state: Arc<Mutex<State>>,
}

impl MemoryTransport {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding this lock leaves plain collections behind, still consistent
    // enough for a test double; recover instead of poisoning every later test step.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn enqueue(state: &mut State, queue: &str, message: StoredMessage) -> bool {
    match state.queues.get_mut(queue) {
        Some(q) => {
            q.ready.push_back(message);
            q.notify.notify_waiters();
            true
        }
        None => false,
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn declare_topic(&self, topic: &str, owner: Option<&str>) -> Result<()> {
        let mut state = self.lock();
        state.topics.entry(topic.to_string()).or_default();
        state.topic_owners.entry(topic.to_string()).or_insert_with(|| owner.map(str::to_string));
        Ok(())
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<()> {
        let mut state = self.lock();
        state.queues.entry(dead_letter_queue_name(&spec.name)).or_insert_with(|| MemQueue {
            max_receive_count: u32::MAX,
            owner: spec.owner.clone(),
            ..Default::default()
        });
        // Like SQS, an existing queue converges to the declared settings.
        let queue = state
            .queues
            .entry(spec.name.clone())
            .or_insert_with(|| MemQueue { owner: spec.owner.clone(), ..Default::default() });
        queue.max_receive_count = spec.max_receive_count;
        queue.visibility_timeout = spec.visibility_timeout;
        Ok(())
    }

    async fn bind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
        let mut state = self.lock();
        if !state.queues.contains_key(queue) {
            return Err(TransportError::NotFound(queue.to_string()));
        }
        let bindings =
            state.topics.get_mut(topic).ok_or_else(|| TransportError::NotFound(topic.to_string()))?;
        match bindings.iter_mut().find(|(q, _)| q == queue) {
            Some((_, bound)) => {
                let new: Vec<String> =
                    filter.patterns.iter().filter(|p| !bound.patterns.contains(p)).cloned().collect();
                bound.patterns.extend(new);
            }
            None => bindings.push((queue.to_string(), filter.clone())),
        }
        Ok(())
    }

    async fn unbind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
        let mut state = self.lock();
        let Some(bindings) = state.topics.get_mut(topic) else { return Ok(()) };
        for (_, bound) in bindings.iter_mut().filter(|(q, _)| q == queue) {
            bound.patterns.retain(|p| !filter.patterns.contains(p));
        }
        bindings.retain(|(_, bound)| !bound.patterns.is_empty());
        Ok(())
    }

    async fn inventory(&self, prefix: &str) -> Result<Inventory> {
        let state = self.lock();
        let mut inventory = Inventory::default();
        for (topic, owner) in state.topic_owners.iter().filter(|(t, _)| t.starts_with(prefix)) {
            inventory.topics.insert(topic.clone(), owner.clone());
        }
        for (name, queue) in state.queues.iter().filter(|(q, _)| q.starts_with(prefix)) {
            if state.queues.contains_key(name.strip_suffix("-dlq").unwrap_or_default()) {
                continue; // a dead-letter queue, listed with its queue
            }
            let observed = ObservedQueue {
                owner: queue.owner.clone(),
                max_receive_count: Some(queue.max_receive_count),
                visibility_timeout: Some(queue.visibility_timeout),
                has_dead_letter_queue: state.queues.contains_key(&dead_letter_queue_name(name)),
            };
            inventory.queues.insert(name.clone(), observed);
        }
        for (topic, bindings) in &state.topics {
            for (queue, filter) in bindings.iter().filter(|(q, _)| inventory.queues.contains_key(q)) {
                let patterns = filter.patterns.iter().cloned().collect();
                inventory.bindings.insert((topic.clone(), queue.clone()), patterns);
            }
        }
        Ok(inventory)
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        let mut state = self.lock();
        state.queues.remove(queue);
        state.queues.remove(&dead_letter_queue_name(queue));
        for bindings in state.topics.values_mut() {
            bindings.retain(|(q, _)| q != queue);
        }
        Ok(())
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        let mut state = self.lock();
        state.topics.remove(topic);
        state.topic_owners.remove(topic);
        Ok(())
    }

    async fn publish_batch(&self, destination: &Destination, messages: Vec<OutgoingMessage>) -> Result<()> {
        let mut state = self.lock();
        let targets_of = |state: &State, message: &OutgoingMessage| -> Result<Vec<String>> {
            match destination {
                Destination::Queue(q) if state.queues.contains_key(q) => Ok(vec![q.clone()]),
                Destination::Queue(q) => Err(TransportError::NotFound(q.clone())),
                Destination::Topic(t) => {
                    let bindings = state.topics.get(t).ok_or_else(|| TransportError::NotFound(t.clone()))?;
                    Ok(bindings
                        .iter()
                        .filter(|(_, f)| f.matches(&message.routing_key))
                        .map(|(q, _)| q.clone())
                        .collect())
                }
            }
        };
        let total = messages.len();
        let mut failed = Vec::new();
        for (index, message) in messages.into_iter().enumerate() {
            if let Err(reason) = message.check_size() {
                failed.push(FailedEntry { index, reason });
                continue;
            }
            for queue in targets_of(&state, &message)? {
                let stored = StoredMessage {
                    body: message.body.clone(),
                    attributes: message.attributes.clone(),
                    receive_count: 0,
                    not_before: None,
                };
                enqueue(&mut state, &queue, stored);
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(TransportError::Partial { failed: failed.len(), total, entries: failed })
        }
    }

    async fn subscribe(&self, queue: &str, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        if !self.lock().queues.contains_key(queue) {
            return Err(TransportError::NotFound(queue.to_string()));
        }
        let id = self.lock().next_id();
        Ok(Box::new(MemorySubscription {
            state: self.state.clone(),
            queue: queue.to_string(),
            prefetch: usize::from(options.prefetch.max(1)),
            id,
        }))
    }

    async fn queue_depth(&self, queue: &str) -> Result<QueueDepth> {
        let state = self.lock();
        let q = state.queues.get(queue).ok_or_else(|| TransportError::NotFound(queue.to_string()))?;
        Ok(QueueDepth { ready: q.ready.len() as u64, in_flight: q.in_flight.len() as u64 })
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

struct MemorySubscription {
    state: Arc<Mutex<State>>,
    queue: String,
    prefetch: usize,
    id: u64,
}

impl MemorySubscription {
    /// Takes up to `max` deliverable messages, dead-lettering those received too often.
    fn take_ready(&self, max: usize) -> Result<(Vec<Delivery>, Arc<Notify>)> {
        let mut state = lock(&self.state);
        let ids: Vec<u64> = (0..max).map(|_| state.next_id()).collect();
        let now = Instant::now();
        let q =
            state.queues.get_mut(&self.queue).ok_or_else(|| TransportError::NotFound(self.queue.clone()))?;
        let notify = q.notify.clone();
        let held = q.in_flight.values().filter(|(_, s)| *s == self.id).count();
        let capacity = max.min(self.prefetch.saturating_sub(held));
        let (mut taken, mut exhausted, mut index) = (Vec::new(), Vec::new(), 0);
        while taken.len() < capacity && index < q.ready.len() {
            if q.ready[index].not_before.is_some_and(|t| t > now) {
                index += 1;
                continue;
            }
            let Some(mut message) = q.ready.remove(index) else { break };
            if message.receive_count >= q.max_receive_count {
                exhausted.push(message);
                continue;
            }
            message.receive_count += 1;
            let id = ids[taken.len()];
            q.in_flight.insert(id, (message.clone(), self.id));
            taken.push((id, message));
        }
        for mut message in exhausted {
            message.attributes.insert(
                attr::DEAD_LETTER_REASON.into(),
                DeadLetterReason::MaxReceivesExceeded.as_attribute(),
            );
            enqueue(&mut state, &dead_letter_queue_name(&self.queue), message);
        }
        let deliveries = taken
            .into_iter()
            .map(|(id, m)| {
                let settle =
                    MemorySettle { state: self.state.clone(), queue: self.queue.clone(), id, settled: false };
                Delivery::new(m.body, m.attributes, m.receive_count, self.queue.clone(), Box::new(settle))
            })
            .collect();
        Ok((deliveries, notify))
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = Instant::now() + wait;
        loop {
            let (batch, notify) = self.take_ready(max)?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            // Wake on a new message, or poll again soon for delayed ones and freed capacity.
            let tick = Instant::now() + Duration::from_millis(50);
            let notified = notify.notified();
            if tokio::time::timeout_at(deadline.min(tick), notified).await.is_err()
                && Instant::now() >= deadline
            {
                return Ok(Vec::new());
            }
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        lock(&self.state).return_held(&self.queue, self.id);
    }
}

struct MemorySettle {
    state: Arc<Mutex<State>>,
    queue: String,
    id: u64,
    settled: bool,
}

impl MemorySettle {
    fn take(&mut self) -> Result<StoredMessage> {
        self.settled = true;
        lock(&self.state).settle(&self.queue, self.id).ok_or(TransportError::DeliveryLost)
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(&mut self) -> Result<()> {
        self.take().map(drop)
    }

    async fn nack(&mut self, delay: Duration) -> Result<()> {
        let message = self.take()?;
        let not_before = (!delay.is_zero()).then(|| Instant::now() + delay);
        enqueue(&mut lock(&self.state), &self.queue, StoredMessage { not_before, ..message });
        Ok(())
    }

    async fn move_to(
        &mut self,
        queue: &str,
        body: &Bytes,
        attributes: Attributes,
        delay: Duration,
    ) -> Result<()> {
        let not_before = (!delay.is_zero()).then(|| Instant::now() + delay);
        let stored = StoredMessage { body: body.clone(), attributes, receive_count: 0, not_before };
        if !enqueue(&mut lock(&self.state), queue, stored) {
            return Err(TransportError::NotFound(queue.to_string()));
        }
        self.take().map(drop)
    }
}

impl Drop for MemorySettle {
    fn drop(&mut self) {
        if !self.settled {
            let _ = self.nack_now();
        }
    }
}

impl MemorySettle {
    fn nack_now(&mut self) -> Result<()> {
        let message = self.take()?;
        enqueue(&mut lock(&self.state), &self.queue, message);
        Ok(())
    }
}
