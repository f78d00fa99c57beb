//! The transport abstraction: publish envelopes to topics or queues, consume them from queues
//! in batches, and settle each delivery (ack, nack, dead-letter).
//!
//! Vocabulary shared by all implementations:
//! - a **topic** is where producers publish (an SNS topic, a RabbitMQ topic exchange);
//! - a **queue** is where one service consumes (an SQS queue, a RabbitMQ queue); it is bound to
//!   topics with a [`Filter`] on the event type, and has a dead-letter queue named
//!   [`dead_letter_queue_name`];
//! - a [`Delivery`] is one received message; it must be acked after the work succeeded. One
//!   that is dropped unsettled returns to its queue (at once on RabbitMQ and in memory, when
//!   the visibility timeout expires on SQS), so a crash never loses a message.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::envelope::{DecodeLimits, Envelope, EnvelopeError, Routing, Stream};

/// Message attributes (SNS/SQS) or headers (AMQP) carried beside the body.
pub type Attributes = BTreeMap<String, String>;

/// Attribute names resync sets. They are valid SQS message attribute names and AMQP header
/// names alike, so a message keeps them when it moves between transports or to a DLQ.
pub mod attr {
    pub const TYPE: &str = "type";
    pub const ENTITY_TYPE: &str = "entity_type";
    pub const STREAM: &str = "stream";
    pub const DEAD_LETTER_REASON: &str = "resync-dead-letter-reason";
    pub const DEAD_LETTER_DETAIL: &str = "resync-dead-letter-detail";
    pub const ATTEMPTS: &str = "resync-attempts";
    pub const SOURCE_QUEUE: &str = "resync-source-queue";
    pub const DEAD_LETTERED_AT: &str = "resync-dead-lettered-at";
    /// On a resync event: skip the sink call when the sink has this version with the same
    /// content (`resync job start --skip-unchanged`).
    pub const SKIP_UNCHANGED: &str = "resync-skip-unchanged";
    /// Marks a `fare verify` probe; consumers ack probes without handling them.
    pub const PROBE: &str = "resync-probe";
}

/// The largest message any transport accepts (the SNS/SQS limit), checked before sending so an
/// oversized entry fails alone instead of failing its whole batch.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Longest dead-letter detail kept with a message: SQS limits all attributes together to the
/// message size, and an error body rarely needs more to be understood.
pub const MAX_DEAD_LETTER_DETAIL: usize = 1024;

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue_name(queue: &str) -> String {
    format!("{queue}-dlq")
}

/// Errors from any transport, with the resource and operation they concern.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {transport} at {endpoint}: {detail}")]
    Connect { transport: &'static str, endpoint: String, detail: String },
    #[error("{operation} on `{resource}` failed: {detail}")]
    Operation { operation: &'static str, resource: String, detail: String },
    #[error("`{0}` does not exist (declare it first, e.g. with `fare apply`)")]
    NotFound(String),
    #[error("{failed} of {total} messages were not published: {}", summarize(.entries))]
    Partial { failed: usize, total: usize, entries: Vec<FailedEntry> },
    #[error("the connection was lost before this delivery was settled; the broker redelivers it")]
    DeliveryLost,
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A batch entry that could not be published, by its index in the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedEntry {
    pub index: usize,
    pub reason: String,
}

fn summarize(entries: &[FailedEntry]) -> String {
    let shown: Vec<String> = entries.iter().take(3).map(|e| format!("#{}: {}", e.index, e.reason)).collect();
    let more = entries.len().saturating_sub(shown.len());
    if more > 0 { format!("{} (and {more} more)", shown.join("; ")) } else { shown.join("; ") }
}

pub type Result<T, E = TransportError> = std::result::Result<T, E>;

/// Where a message goes: a topic (all bound queues whose filter matches) or one queue directly
/// (replays to one service, resync straight to target queues, DLQ redrive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Topic(String),
    Queue(String),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Topic(t) => write!(f, "topic `{t}`"),
            Destination::Queue(q) => write!(f, "queue `{q}`"),
        }
    }
}

/// A message ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    pub body: Bytes,
    /// Routing metadata plus any extra attributes (all copied to attributes/headers).
    pub attributes: Attributes,
    /// The AMQP routing key; the event type for envelopes.
    pub routing_key: String,
    /// Deduplication id where the broker supports one (the envelope id).
    pub id: String,
}

impl OutgoingMessage {
    /// The message for an envelope, with its routing metadata as attributes.
    pub fn from_envelope(envelope: &Envelope) -> Self {
        Self::with_routing(Bytes::from(envelope.to_bytes()), &envelope.routing(), envelope.id.to_string())
    }

    /// A message with an arbitrary body (a replay of stored bytes, or a test's poison message).
    pub fn with_routing(body: Bytes, routing: &Routing, id: String) -> Self {
        let attributes = Attributes::from([
            (attr::TYPE.to_string(), routing.event_type.clone()),
            (attr::ENTITY_TYPE.to_string(), routing.entity_type.clone()),
            (attr::STREAM.to_string(), routing.stream.as_str().to_string()),
        ]);
        Self { body, attributes, routing_key: routing.event_type.clone(), id }
    }

    /// Checks what every transport checks before sending.
    pub(crate) fn check_size(&self) -> std::result::Result<(), String> {
        if self.body.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "message is {} bytes, more than the {MAX_MESSAGE_BYTES}-byte limit",
                self.body.len()
            ));
        }
        Ok(())
    }
}

/// Which event types a queue receives from a topic: exact types (`listing.updated`), all verbs
/// of an entity (`listing.*`), or everything (`*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub patterns: Vec<String>,
}

impl Filter {
    pub fn all() -> Self {
        Self { patterns: vec!["*".into()] }
    }

    pub fn types<I: IntoIterator<Item = S>, S: Into<String>>(patterns: I) -> Self {
        Self { patterns: patterns.into_iter().map(Into::into).collect() }
    }

    pub fn matches(&self, event_type: &str) -> bool {
        self.patterns.iter().any(|p| pattern_matches(p, event_type))
    }
}

fn pattern_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix(".*") {
        _ if pattern == "*" => true,
        Some(entity) => event_type.split_once('.').is_some_and(|(e, _)| e == entity),
        None => pattern == event_type,
    }
}

/// A queue and its dead-letter queue, as the transport creates them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    /// The ownership mark the queue is created with (see [`OWNER_MARK`]); `None` for queues
    /// declared outside fare (tests, ad-hoc tools), which `fare prune` never touches.
    pub owner: Option<String>,
    /// Deliveries before the broker moves a message to the DLQ by itself.
    pub max_receive_count: u32,
    /// How long a received message stays invisible to other consumers (SQS); the subscription
    /// keeps extending it while the delivery is held. Ignored by RabbitMQ and in memory, where
    /// a held delivery stays with its consumer until settled or the consumer goes away.
    pub visibility_timeout: Duration,
}

impl QueueSpec {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            owner: None,
            max_receive_count: 5,
            visibility_timeout: Duration::from_secs(30),
        }
    }
}

/// The name of the ownership mark resources are created with: the AMQP declare argument
/// `x-resync-owner` on RabbitMQ, the tag `resync-owner` on SNS topics and SQS queues. Its value
/// says who created the resource (fare writes `fare:<namespace>`); what carries no mark was not
/// created by fare and is never deleted by it.
pub const OWNER_MARK: &str = "resync-owner";

/// What the broker holds: topics, queues and the routes between them, with the settings and
/// ownership marks that can be read back. Dead-letter queues are not listed on their own; a
/// queue records whether its dead-letter queue exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Topic name -> its ownership mark.
    pub topics: BTreeMap<String, Option<String>>,
    pub queues: BTreeMap<String, ObservedQueue>,
    /// (topic, queue) -> the type patterns routed (`*` for everything).
    pub bindings: BTreeMap<(String, String), BTreeSet<String>>,
}

/// A queue as the broker reports it. Settings the broker does not have (a visibility timeout
/// on RabbitMQ) are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedQueue {
    pub owner: Option<String>,
    pub max_receive_count: Option<u32>,
    pub visibility_timeout: Option<Duration>,
    pub has_dead_letter_queue: bool,
}

/// How many messages a queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueDepth {
    /// Ready to be delivered.
    pub ready: u64,
    /// Delivered and not yet settled.
    pub in_flight: u64,
}

/// Why a message was dead-lettered; travels with it as [`attr::DEAD_LETTER_REASON`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The body is not a valid envelope.
    InvalidEnvelope,
    /// The sink refused the event with a non-retryable status.
    SinkRejected { status: u16 },
    /// The message was received more often than the queue allows.
    MaxReceivesExceeded,
    /// The service does not subscribe to the event's type on its stream (published to its
    /// queue by hand, or replayed to it): never sent to its sink.
    NotSubscribed,
}

impl DeadLetterReason {
    pub fn as_attribute(&self) -> String {
        match self {
            DeadLetterReason::InvalidEnvelope => "invalid-envelope".into(),
            DeadLetterReason::SinkRejected { status } => format!("sink-rejected-{status}"),
            DeadLetterReason::MaxReceivesExceeded => "max-receives-exceeded".into(),
            DeadLetterReason::NotSubscribed => "not-subscribed".into(),
        }
    }
}

impl std::str::FromStr for DeadLetterReason {
    type Err = String;

    /// Reads back what [`DeadLetterReason::as_attribute`] wrote.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "invalid-envelope" => Ok(DeadLetterReason::InvalidEnvelope),
            "max-receives-exceeded" => Ok(DeadLetterReason::MaxReceivesExceeded),
            "not-subscribed" => Ok(DeadLetterReason::NotSubscribed),
            other => other
                .strip_prefix("sink-rejected-")
                .and_then(|status| status.parse().ok())
                .map(|status| DeadLetterReason::SinkRejected { status })
                .ok_or_else(|| format!("`{other}` is not a dead-letter reason resync writes")),
        }
    }
}

/// What a consumer says about a message it gives up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: DeadLetterReason,
    /// Human-readable detail: the decode error, the sink's status and body, the last error.
    pub detail: String,
}

impl DeadLetter {
    pub fn invalid_envelope(err: &EnvelopeError) -> Self {
        Self { reason: DeadLetterReason::InvalidEnvelope, detail: err.to_string() }
    }

    /// The attributes the dead-lettered copy carries: the original ones plus reason, detail,
    /// attempts, source queue and time.
    pub(crate) fn attributes(&self, original: &Attributes, attempts: u32, queue: &str) -> Attributes {
        let mut attributes = original.clone();
        let mut detail = self.detail.clone();
        if detail.len() > MAX_DEAD_LETTER_DETAIL {
            let mut cut = MAX_DEAD_LETTER_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push('…');
        }
        attributes.insert(attr::DEAD_LETTER_REASON.into(), self.reason.as_attribute());
        attributes.insert(attr::DEAD_LETTER_DETAIL.into(), detail);
        attributes.insert(attr::ATTEMPTS.into(), attempts.to_string());
        attributes.insert(attr::SOURCE_QUEUE.into(), queue.to_string());
        attributes.insert(attr::DEAD_LETTERED_AT.into(), chrono::Utc::now().to_rfc3339());
        attributes
    }
}

/// One transport: RabbitMQ, SNS/SQS or in-memory. Object safe; share it as `Arc<dyn Transport>`.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// `rabbitmq`, `sns-sqs` or `memory`, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Creates the topic if it does not exist, marked with `owner` (see [`OWNER_MARK`]).
    /// Idempotent; an existing topic keeps the mark it has.
    async fn declare_topic(&self, topic: &str, owner: Option<&str>) -> Result<()>;

    /// Creates the queue and its dead-letter queue if they do not exist. Idempotent.
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<()>;

    /// Routes messages published to `topic` whose type matches `filter` into `queue`, in
    /// addition to what is routed already. Idempotent.
    async fn bind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()>;

    /// Stops routing the patterns of `filter` from `topic` into `queue`; other patterns stay.
    /// Unrouted patterns are not an error.
    async fn unbind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()>;

    /// The topics and queues whose names start with `prefix`, and the bindings into those
    /// queues. Reads the broker's admin API (RabbitMQ management plugin, SNS/SQS list calls).
    async fn inventory(&self, prefix: &str) -> Result<Inventory>;

    /// Deletes the queue and its dead-letter queue; a missing queue is not an error.
    async fn delete_queue(&self, queue: &str) -> Result<()>;

    /// Deletes the topic (and its bindings); a missing topic is not an error.
    async fn delete_topic(&self, topic: &str) -> Result<()>;

    /// Publishes a batch and returns once the broker has taken responsibility for every message
    /// (publisher confirms on RabbitMQ, a successful batch entry on SNS/SQS). Entries that fail
    /// for a transient reason are retried; entries that still fail are reported in
    /// [`TransportError::Partial`] by index, and the others are published.
    async fn publish_batch(&self, destination: &Destination, messages: Vec<OutgoingMessage>) -> Result<()>;

    /// Publishes one message; see [`Transport::publish_batch`].
    async fn publish(&self, destination: &Destination, message: OutgoingMessage) -> Result<()> {
        self.publish_batch(destination, vec![message]).await
    }

    /// Starts consuming `queue`. At most `options.prefetch` messages are held unsettled.
    async fn subscribe(&self, queue: &str, options: SubscribeOptions) -> Result<Box<dyn Subscription>>;

    /// Current depth of a queue (also used for DLQs and autoscaling signals).
    async fn queue_depth(&self, queue: &str) -> Result<QueueDepth>;

    /// Closes connections cleanly. Publishing after this reconnects.
    async fn close(&self) -> Result<()>;
}

/// How to consume a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Most messages held unsettled by this subscription at once.
    pub prefetch: u16,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self { prefetch: 32 }
    }
}

/// A running consumer of one queue.
#[async_trait]
pub trait Subscription: Send {
    /// Waits up to `wait` for a first message, then returns it with any others already
    /// available, at most `max`. Returns an empty batch when nothing arrived in time. Broker
    /// connection loss is handled inside (reconnect with backoff); an error means the queue
    /// cannot be consumed at all (it does not exist, access refused).
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>>;

    /// Stops consuming. Messages prefetched but not handed out return to the queue; deliveries
    /// still held by the caller can be settled until they are dropped.
    async fn close(self: Box<Self>) -> Result<()>;
}

/// How a transport settles one delivery. Implemented per transport.
#[async_trait]
pub(crate) trait Settle: Send + Sync {
    async fn ack(&mut self) -> Result<()>;
    async fn nack(&mut self, delay: Duration) -> Result<()>;
    /// Publishes `body` with `attributes` to `queue` (the message's own queue, or its DLQ), to be
    /// delivered after `delay` where the broker supports it, then removes this message. Publish
    /// first, remove second: a crash in between leaves a duplicate, never a loss.
    async fn move_to(
        &mut self,
        queue: &str,
        body: &Bytes,
        attributes: Attributes,
        delay: Duration,
    ) -> Result<()>;
}

/// The header in which RabbitMQ quorum queues count a message's earlier deliveries.
pub(crate) const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// One received message. Settle it with [`Delivery::ack`], [`Delivery::nack`],
/// [`Delivery::requeue_fresh`] or [`Delivery::dead_letter`]; dropping it unsettled returns it to
/// the queue.
pub struct Delivery {
    pub body: Bytes,
    pub attributes: Attributes,
    /// 1 on first delivery. Exact on SQS and RabbitMQ quorum queues and in memory.
    pub receive_count: u32,
    pub queue: String,
    settle: Box<dyn Settle>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("receive_count", &self.receive_count)
            .field("attributes", &self.attributes)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Delivery {
    pub(crate) fn new(
        body: Bytes,
        attributes: Attributes,
        receive_count: u32,
        queue: String,
        settle: Box<dyn Settle>,
    ) -> Self {
        Self { body, attributes, receive_count, queue, settle }
    }

    /// Decodes and validates the body.
    pub fn envelope(&self, limits: &DecodeLimits) -> Result<Envelope, EnvelopeError> {
        Envelope::decode(&self.body, limits)
    }

    /// The stream from the routing attributes, without decoding the body.
    pub fn stream(&self) -> Option<Stream> {
        self.attributes.get(attr::STREAM).and_then(|s| s.parse().ok())
    }

    /// The work succeeded: remove the message from the queue.
    pub async fn ack(mut self) -> Result<()> {
        self.settle.ack().await
    }

    /// The work failed transiently: return the message to the queue, to be redelivered after
    /// `delay` where the broker supports it (SQS, memory; RabbitMQ redelivers at once).
    pub async fn nack(mut self, delay: Duration) -> Result<()> {
        self.settle.nack(delay).await
    }

    /// Give up on the message: publish it to the queue's DLQ with the reason, then remove it.
    pub async fn dead_letter(mut self, dead_letter: &DeadLetter) -> Result<()> {
        let attributes = dead_letter.attributes(&self.attributes, self.receive_count, &self.queue);
        let dlq = dead_letter_queue_name(&self.queue);
        self.settle.move_to(&dlq, &self.body, attributes, Duration::ZERO).await
    }

    /// Return the message to its queue as a fresh copy whose delivery count starts again, then
    /// remove this one: for a message that was never given a fair try (its sink was held), so
    /// that waiting spends none of the deliveries the queue allows before dead-lettering.
    /// Redelivered after `delay` where the broker supports it (SQS up to 15 min, memory).
    pub async fn requeue_fresh(mut self, delay: Duration) -> Result<()> {
        let mut attributes = std::mem::take(&mut self.attributes);
        // The broker's count of earlier deliveries (RabbitMQ quorum queues) stays behind.
        attributes.remove(DELIVERY_COUNT_HEADER);
        let queue = self.queue.clone();
        self.settle.move_to(&queue, &self.body, attributes, delay).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_exact_entity_wildcard_and_all() {
        let f = Filter::types(["listing.*", "user.deleted"]);
        assert!(f.matches("listing.updated"));
        assert!(f.matches("user.deleted"));
        assert!(!f.matches("user.updated"));
        assert!(!f.matches("listings.updated"));
        assert!(Filter::all().matches("anything.at_all"));
    }

    #[test]
    fn dead_letter_detail_is_truncated_on_a_char_boundary() {
        let dl =
            DeadLetter { reason: DeadLetterReason::SinkRejected { status: 422 }, detail: "é".repeat(2000) };
        let attrs = dl.attributes(&Attributes::new(), 3, "q");
        assert_eq!(attrs[attr::DEAD_LETTER_REASON], "sink-rejected-422");
        for reason in [
            DeadLetterReason::InvalidEnvelope,
            DeadLetterReason::SinkRejected { status: 422 },
            DeadLetterReason::MaxReceivesExceeded,
            DeadLetterReason::NotSubscribed,
        ] {
            assert_eq!(reason.as_attribute().parse::<DeadLetterReason>(), Ok(reason));
        }
        assert!("sink-rejected-".parse::<DeadLetterReason>().is_err());
        assert_eq!(attrs[attr::ATTEMPTS], "3");
        assert!(attrs[attr::DEAD_LETTER_DETAIL].len() <= MAX_DEAD_LETTER_DETAIL + '…'.len_utf8());
    }
}

pub mod memory;
pub mod rabbitmq;
pub mod sns_sqs;
