//! # resync-dlq: what went to a dead-letter queue, why, and sending it back
//!
//! Owns reading a service queue's dead-letter queue without losing anything, summarising it by
//! reason, moving dead letters back to their queue at a bounded rate (`redrive`), and deleting
//! old ones (`purge`), on any [`Transport`]. Every message a sweep receives is kept (put back
//! when the sweep ends), moved (published to the queue, confirmed, then acked) or deleted
//! (acked): a sweep killed at any point loses nothing, and at worst leaves a moved message in
//! both queues, which the version rule makes harmless.
//!
//! Does not own why messages are dead-lettered (the consumer decides, the broker enforces the
//! receive limit) nor the attributes that say so ([`resync_bus::attr`]).

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use chrono::{DateTime, Utc};
use resync_bus::transport::{
    Delivery, Destination, OutgoingMessage, SubscribeOptions, Transport, TransportError,
};
use resync_bus::{DeadLetterReason, DecodeLimits, attr, dead_letter_queue_name};
use serde::Serialize;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The reason of a message the broker moved by itself after too many receives (it carries no
/// reason of ours: the consumer died or was stopped each time before it could give up).
pub const MOVED_BY_BROKER: DeadLetterReason = DeadLetterReason::MaxReceivesExceeded;

/// Most messages one sweep keeps held at once (RabbitMQ's prefetch is a 16-bit number).
pub const MAX_SWEEP: u64 = 50_000;

/// Errors of a DLQ operation.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("dead-letter queue `{queue}`: {source}")]
    Transport {
        queue: String,
        #[source]
        source: TransportError,
    },
}

type Result<T> = std::result::Result<T, DlqError>;

fn on(queue: &str) -> impl FnOnce(TransportError) -> DlqError + '_ {
    move |source| DlqError::Transport { queue: queue.to_string(), source }
}

/// One dead letter, as far as its attributes and body tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterRecord {
    pub reason: String,
    pub detail: Option<String>,
    pub attempts: Option<u32>,
    pub dead_lettered_at: Option<DateTime<Utc>>,
    pub event_type: Option<String>,
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    pub version: Option<i64>,
    pub event_id: Option<String>,
    /// Times this dead letter was already sent back by `redrive`.
    pub redrives: u32,
}

/// Longest detail kept in a record (the attribute itself is at most 1 KiB).
const MAX_DETAIL: usize = 300;

impl DeadLetterRecord {
    pub fn of(delivery: &Delivery) -> Self {
        let attributes = &delivery.attributes;
        let envelope = delivery.envelope(&DecodeLimits::default()).ok();
        let reason = attributes
            .get(attr::DEAD_LETTER_REASON)
            .cloned()
            .unwrap_or_else(|| MOVED_BY_BROKER.as_attribute());
        let detail = attributes.get(attr::DEAD_LETTER_DETAIL).map(|d| truncate(d, MAX_DETAIL));
        Self {
            reason,
            detail,
            attempts: attributes.get(attr::ATTEMPTS).and_then(|a| a.parse().ok()),
            dead_lettered_at: attributes
                .get(attr::DEAD_LETTERED_AT)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc)),
            event_type: envelope
                .as_ref()
                .map(|e| e.event_type.clone())
                .or_else(|| attributes.get(attr::TYPE).cloned()),
            entity_type: envelope
                .as_ref()
                .map(|e| e.entity_type.clone())
                .or_else(|| attributes.get(attr::ENTITY_TYPE).cloned()),
            entity_id: envelope.as_ref().map(|e| e.entity_id.clone()),
            version: envelope.as_ref().map(|e| e.version),
            event_id: envelope.as_ref().map(|e| e.id.to_string()),
            redrives: attributes.get(REDRIVES).and_then(|r| r.parse().ok()).unwrap_or(0),
        }
    }
}

/// Counts redrives on the message, so a dead letter that keeps coming back shows it.
pub const REDRIVES: &str = "resync-redrives";

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

/// Dead letters of one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReasonSummary {
    pub reason: String,
    pub count: u64,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
}

/// Counts per reason, most frequent first.
pub fn summarize(records: &[DeadLetterRecord]) -> Vec<ReasonSummary> {
    let mut by_reason: BTreeMap<&str, ReasonSummary> = BTreeMap::new();
    for record in records {
        let summary = by_reason.entry(&record.reason).or_insert_with(|| ReasonSummary {
            reason: record.reason.clone(),
            count: 0,
            oldest: None,
            newest: None,
        });
        summary.count += 1;
        if let Some(at) = record.dead_lettered_at {
            summary.oldest = Some(summary.oldest.map_or(at, |o| o.min(at)));
            summary.newest = Some(summary.newest.map_or(at, |n| n.max(at)));
        }
    }
    let mut summaries: Vec<_> = by_reason.into_values().collect();
    summaries.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
    summaries
}

/// Which dead letters an operation concerns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// A reason or its start: `sink-rejected` selects `sink-rejected-422`.
    pub reason: Option<String>,
    pub entity_type: Option<String>,
}

impl Selection {
    pub fn matches(&self, record: &DeadLetterRecord) -> bool {
        self.reason.as_ref().is_none_or(|r| record.reason.starts_with(r.as_str()))
            && self.entity_type.as_ref().is_none_or(|t| record.entity_type.as_ref() == Some(t))
    }

    /// Whether `redrive` sends `record` back: selected, and not an invalid envelope unless
    /// that reason was asked for (it would only be dead-lettered again). The dry run counts
    /// with the same rule.
    pub fn redrives(&self, record: &DeadLetterRecord) -> bool {
        let invalid = record.reason.parse() == Ok(DeadLetterReason::InvalidEnvelope);
        let invalid_unasked = invalid && self.reason.is_none();
        self.matches(record) && !invalid_unasked
    }
}

/// What a sweep does with one dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Keep,
    Move,
    Delete,
}

/// What a sweep saw and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Every dead letter received, in the order received.
    pub records: Vec<DeadLetterRecord>,
    pub moved: u64,
    pub deleted: u64,
    pub kept: u64,
    /// The sweep stopped holding more: more dead letters than it had room for (see
    /// [`MAX_SWEEP`]); run it again for the rest.
    pub truncated: bool,
}

/// Reads every dead letter of `queue` (the service queue; its DLQ is read) and puts them all
/// back.
pub async fn inspect(transport: &dyn Transport, queue: &str) -> Result<SweepReport> {
    sweep(transport, queue, None, |_, _| Action::Keep).await
}

/// Moves the selected dead letters back to `queue`, at most `rate` per second. Invalid
/// envelopes are moved only when selected by reason (`invalid-envelope`): they would only be
/// dead-lettered again.
pub async fn redrive(
    transport: &dyn Transport,
    queue: &str,
    selection: &Selection,
    rate: Option<f64>,
) -> Result<SweepReport> {
    // What this run sent back and the consumer dead-lettered again comes back as a new dead
    // letter: it is kept, so a redrive takes what the DLQ held and never loops on its own
    // output (one refused letter was once sent back 85,382 times in 10 minutes).
    let mut sent_back = HashSet::new();
    let report = sweep(transport, queue, rate, |record, delivery| {
        // The body identifies a letter whatever the consumer added to its attributes.
        let mut hasher = std::hash::DefaultHasher::new();
        delivery.body.hash(&mut hasher);
        if !selection.redrives(record) || !sent_back.insert(hasher.finish()) {
            return Action::Keep;
        }
        Action::Move
    })
    .await?;
    info!(queue, moved = report.moved, kept = report.kept, "redrive done");
    Ok(report)
}

/// Deletes the selected dead letters dead-lettered longer than `older_than` ago. Dead letters
/// with no time (moved by the broker) are kept.
pub async fn purge(
    transport: &dyn Transport,
    queue: &str,
    selection: &Selection,
    older_than: Duration,
) -> Result<SweepReport> {
    let cutoff = Utc::now() - chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
    sweep(transport, queue, None, |record, _| match record.dead_lettered_at {
        Some(at) if at < cutoff && selection.matches(record) => Action::Delete,
        _ => Action::Keep,
    })
    .await
}

/// Paces moves to at most `rate` per second.
struct Pacer {
    interval: Duration,
    next: Instant,
}

impl Pacer {
    fn new(rate: Option<f64>) -> Option<Self> {
        let rate = rate.filter(|r| *r > 0.0)?;
        Some(Self { interval: Duration::from_secs_f64(1.0 / rate), next: Instant::now() })
    }

    async fn wait(&mut self) {
        tokio::time::sleep_until(self.next).await;
        self.next = self.next.max(Instant::now() - self.interval) + self.interval;
    }
}

/// Receives every dead letter the DLQ yields until it yields nothing more (or [`MAX_SWEEP`]),
/// decides each one's fate, and puts back everything kept. Kept messages stay held (unacked)
/// until the end so each is seen once. Not bounded by the depth read at the start: counts lag
/// behind requeues (RabbitMQ) and are approximate (SQS).
async fn sweep(
    transport: &dyn Transport,
    queue: &str,
    rate: Option<f64>,
    mut decide: impl FnMut(&DeadLetterRecord, &Delivery) -> Action,
) -> Result<SweepReport> {
    let dlq = dead_letter_queue_name(queue);
    let depth = transport.queue_depth(&dlq).await.map_err(on(&dlq))?;
    if depth.in_flight > 0 {
        warn!(
            queue = %dlq,
            in_flight = depth.in_flight,
            "dead letters are held by another reader (or one that was killed); they are not seen \
             now and return after the queue's visibility timeout"
        );
    }
    // Room for every message the sweep may hold, with slack for what arrives meanwhile.
    let room = (depth.ready + depth.in_flight).saturating_mul(2).saturating_add(100).min(MAX_SWEEP);
    let prefetch = u16::try_from(room).unwrap_or(u16::MAX);
    let mut subscription =
        transport.subscribe(&dlq, SubscribeOptions { prefetch }).await.map_err(on(&dlq))?;
    let mut report = SweepReport::default();
    let mut pacer = Pacer::new(rate);
    let mut held = Vec::new();
    let mut empty_polls = 0;
    while empty_polls < 2 {
        if held.len() as u64 >= room {
            report.truncated = true;
            break;
        }
        let batch = subscription.next_batch(100, Duration::from_secs(1)).await.map_err(on(&dlq))?;
        if batch.is_empty() {
            empty_polls += 1;
            continue;
        }
        empty_polls = 0;
        for delivery in batch {
            let record = DeadLetterRecord::of(&delivery);
            match decide(&record, &delivery) {
                Action::Keep => held.push(delivery),
                Action::Delete => {
                    delivery.ack().await.map_err(on(&dlq))?;
                    report.deleted += 1;
                }
                Action::Move => {
                    if let Some(pacer) = pacer.as_mut() {
                        pacer.wait().await;
                    }
                    move_back(transport, queue, delivery, record.redrives).await?;
                    report.moved += 1;
                }
            }
            report.records.push(record);
        }
    }
    report.kept = held.len() as u64;
    for delivery in held {
        delivery.nack(Duration::ZERO).await.map_err(on(&dlq))?;
    }
    subscription.close().await.map_err(on(&dlq))?;
    debug!(queue = %dlq, seen = report.records.len(), "sweep done");
    Ok(report)
}

/// Publishes the dead letter to its queue without the dead-letter attributes (a consumer judges
/// it afresh), confirmed, then acks it in the DLQ.
async fn move_back(transport: &dyn Transport, queue: &str, delivery: Delivery, redrives: u32) -> Result<()> {
    let mut attributes = delivery.attributes.clone();
    for name in [
        attr::DEAD_LETTER_REASON,
        attr::DEAD_LETTER_DETAIL,
        attr::ATTEMPTS,
        attr::SOURCE_QUEUE,
        attr::DEAD_LETTERED_AT,
    ] {
        attributes.remove(name);
    }
    // Broker bookkeeping (RabbitMQ's x-death, x-first-death-*, x-delivery-count) stays behind.
    attributes.retain(|name, _| !name.starts_with("x-"));
    attributes.insert(REDRIVES.into(), (redrives + 1).to_string());
    let message = OutgoingMessage {
        body: delivery.body.clone(),
        routing_key: attributes.get(attr::TYPE).cloned().unwrap_or_default(),
        attributes,
        id: String::new(),
    };
    transport.publish(&Destination::Queue(queue.to_string()), message).await.map_err(on(queue))?;
    let dlq = dead_letter_queue_name(queue);
    delivery.ack().await.map_err(on(&dlq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reason: &str, at: Option<&str>) -> DeadLetterRecord {
        DeadLetterRecord {
            reason: reason.into(),
            detail: None,
            attempts: None,
            dead_lettered_at: at.map(|t| DateTime::parse_from_rfc3339(t).expect("time").with_timezone(&Utc)),
            event_type: Some("listing.updated".into()),
            entity_type: Some("listing".into()),
            entity_id: Some("1".into()),
            version: Some(1),
            event_id: None,
            redrives: 0,
        }
    }

    #[test]
    fn summaries_count_per_reason_with_oldest_and_newest() {
        let records = [
            record("sink-rejected-422", Some("2026-01-02T00:00:00Z")),
            record("sink-rejected-422", Some("2026-01-01T00:00:00Z")),
            record(&MOVED_BY_BROKER.as_attribute(), None),
        ];
        let summaries = summarize(&records);
        assert_eq!(summaries.len(), 2);
        assert_eq!((summaries[0].reason.as_str(), summaries[0].count), ("sink-rejected-422", 2));
        assert_eq!(summaries[0].oldest, records[1].dead_lettered_at);
        assert_eq!(summaries[0].newest, records[0].dead_lettered_at);
        assert_eq!((summaries[1].count, summaries[1].oldest), (1, None));
    }

    #[test]
    fn selections_match_reason_prefixes_and_entity_types() {
        let rejected = record("sink-rejected-422", None);
        assert!(Selection::default().matches(&rejected));
        assert!(Selection { reason: Some("sink-rejected".into()), entity_type: None }.matches(&rejected));
        assert!(!Selection { reason: Some("invalid-envelope".into()), entity_type: None }.matches(&rejected));
        assert!(!Selection { reason: None, entity_type: Some("user".into()) }.matches(&rejected));
    }

    #[test]
    fn long_details_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("ééé", 3), "é…");
        assert_eq!(truncate("short", 10), "short");
    }
}
