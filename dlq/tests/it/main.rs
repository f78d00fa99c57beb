//! `resync dlq` operations against the real brokers: dead letters of three reasons are listed
//! with the right counts, nothing is lost by looking, redrive moves exactly the selected ones
//! back to their queue, purge deletes only old selected ones.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use resync_bus::{
    DeadLetter, DeadLetterReason, Delivery, Destination, Envelope, OutgoingMessage, QueueSpec, Routing,
    Stream, Subscription, Transport, TransportConfig, attr,
};
use resync_dlq::{MOVED_BY_BROKER, REDRIVES, Selection};
use resync_testkit::{Service, service_unreachable, unique_name};
use tokio::time::Instant;

async fn connect(kind: &str) -> Arc<dyn Transport> {
    let service = if kind == "rabbitmq" { Service::RabbitMq } else { Service::SnsSqs };
    match TransportConfig::named(kind).expect("transport").connect().await {
        Ok(transport) => transport,
        Err(err) => service_unreachable(service, err),
    }
}

fn event(entity_id: &str, version: i64) -> OutgoingMessage {
    OutgoingMessage::from_envelope(&Envelope::new(
        "listing.updated",
        entity_id,
        version,
        serde_json::json!({}),
    ))
}

fn poison() -> OutgoingMessage {
    let routing =
        Routing { event_type: "listing.updated".into(), entity_type: "listing".into(), stream: Stream::Live };
    OutgoingMessage::with_routing(Bytes::from_static(b"{not json"), &routing, "poison".into())
}

/// Receives exactly `n` deliveries from `queue` (waiting up to 30 s). Close the subscription
/// once they are settled.
async fn receive(
    transport: &Arc<dyn Transport>,
    queue: &str,
    n: usize,
) -> (Box<dyn Subscription>, Vec<Delivery>) {
    let mut subscription = transport.subscribe(queue, Default::default()).await.expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        got.extend(
            subscription.next_batch(n - got.len(), Duration::from_millis(500)).await.expect("receive"),
        );
    }
    assert_eq!(got.len(), n, "expected {n} messages in {queue}");
    (subscription, got)
}

async fn depth(transport: &Arc<dyn Transport>, queue: &str) -> u64 {
    let depth = transport.queue_depth(queue).await.expect("depth");
    depth.ready + depth.in_flight
}

/// Nacks the one message in `queue` until the broker moves it to the DLQ by itself.
async fn exhaust_receives(transport: &Arc<dyn Transport>, queue: &str, dlq: &str, before: u64) {
    let mut subscription = transport.subscribe(queue, Default::default()).await.expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(60);
    while depth(transport, dlq).await == before {
        assert!(Instant::now() < deadline, "the broker never dead-lettered the message");
        for delivery in subscription.next_batch(1, Duration::from_millis(300)).await.expect("receive") {
            delivery.nack(Duration::ZERO).await.expect("nack");
        }
    }
    subscription.close().await.expect("close");
}

/// Events the sink refuses in [`dead_letters_of_three_reasons`].
const REJECTED: u64 = 14;

/// Three reasons in the DLQ: an invalid envelope (1), a sink refusal ([`REJECTED`]), too many
/// receives (1).
async fn dead_letters_of_three_reasons(transport: &Arc<dyn Transport>, queue: &str) {
    let direct = Destination::Queue(queue.to_string());
    let dlq = resync_bus::dead_letter_queue_name(queue);
    let mut batch = vec![poison()];
    batch.extend((1..=REJECTED).map(|i| event(&i.to_string(), 3)));
    transport.publish_batch(&direct, batch).await.expect("publish");
    let (subscription, deliveries) = receive(transport, queue, 1 + REJECTED as usize).await;
    for delivery in deliveries {
        let dead = match delivery.envelope(&Default::default()) {
            Err(err) => DeadLetter::invalid_envelope(&err),
            Ok(_) => DeadLetter {
                reason: DeadLetterReason::SinkRejected { status: 422 },
                detail: "HTTP 422: {\"error\": \"title too long\"}".into(),
            },
        };
        delivery.dead_letter(&dead).await.expect("dead-letter");
    }
    subscription.close().await.expect("close");
    transport.publish(&direct, event("flaky", 1)).await.expect("publish");
    exhaust_receives(transport, queue, &dlq, 1 + REJECTED).await;
}

async fn listing_counts_reasons_and_loses_nothing_then_redrive_and_purge_select(kind: &str) {
    let transport = connect(kind).await;
    let mut spec = QueueSpec::new(unique_name("dlq"));
    spec.max_receive_count = 2;
    transport.declare_queue(&spec).await.expect("declare");
    let (queue, dlq) = (spec.name.clone(), resync_bus::dead_letter_queue_name(&spec.name));
    dead_letters_of_three_reasons(&transport, &queue).await;

    let listed = resync_dlq::inspect(transport.as_ref(), &queue).await.expect("inspect");
    let counts: Vec<_> =
        resync_dlq::summarize(&listed.records).into_iter().map(|s| (s.reason, s.count)).collect();
    assert_eq!(
        counts,
        [
            ("sink-rejected-422".into(), REJECTED),
            ("invalid-envelope".into(), 1),
            (MOVED_BY_BROKER.as_attribute(), 1)
        ],
        "{listed:#?}"
    );
    let rejected = listed.records.iter().find(|r| r.reason == "sink-rejected-422").expect("a rejection");
    assert_eq!(rejected.entity_type.as_deref(), Some("listing"));
    assert!(rejected.detail.as_deref().is_some_and(|d| d.contains("title too long")));
    assert!(rejected.dead_lettered_at.is_some());
    assert_eq!(listed.kept, REJECTED + 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while depth(&transport, &dlq).await != REJECTED + 2 {
        assert!(Instant::now() < deadline, "listing puts every dead letter back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let selection = Selection { reason: Some("sink-rejected".into()), entity_type: None };
    let redriven =
        resync_dlq::redrive(transport.as_ref(), &queue, &selection, Some(50.0)).await.expect("redrive");
    assert_eq!((redriven.moved, redriven.kept), (REJECTED, 2));
    let (subscription, back) = receive(&transport, &queue, REJECTED as usize).await;
    for delivery in back {
        assert_eq!(delivery.attributes.get(REDRIVES).map(String::as_str), Some("1"));
        assert!(!delivery.attributes.contains_key(attr::DEAD_LETTER_REASON), "judged afresh");
        let entity = delivery.envelope(&Default::default()).expect("still a valid envelope").entity_id;
        assert!(entity.parse::<u64>().is_ok_and(|i| (1..=REJECTED).contains(&i)), "{entity}");
        delivery.ack().await.expect("ack");
    }
    subscription.close().await.expect("close");

    let invalid = Selection { reason: Some("invalid-envelope".into()), entity_type: None };
    let purged =
        resync_dlq::purge(transport.as_ref(), &queue, &invalid, Duration::ZERO).await.expect("purge");
    assert_eq!((purged.deleted, purged.kept), (1, 1), "only the selected dead letter goes");
    let left = resync_dlq::inspect(transport.as_ref(), &queue).await.expect("inspect");
    assert_eq!(
        left.records.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>(),
        [MOVED_BY_BROKER.as_attribute().as_str()]
    );

    transport.delete_queue(&queue).await.expect("cleanup");
}

#[tokio::test]
async fn rabbitmq_listing_counts_reasons_and_loses_nothing_then_redrive_and_purge_select() {
    listing_counts_reasons_and_loses_nothing_then_redrive_and_purge_select("rabbitmq").await;
}

#[tokio::test]
async fn sns_sqs_listing_counts_reasons_and_loses_nothing_then_redrive_and_purge_select() {
    listing_counts_reasons_and_loses_nothing_then_redrive_and_purge_select("sns-sqs").await;
}

/// A redrive takes what the DLQ holds when it runs, never what it dead-letters itself: here a
/// consumer refuses every redriven event again at once, and the redrive still sends each
/// letter back exactly once and ends (it once sent one letter back 85,382 times in 10 minutes).
#[tokio::test]
async fn a_redrive_sends_each_letter_back_once_even_when_the_consumer_refuses_it_again() {
    const LETTERS: usize = 5;
    let transport = connect("rabbitmq").await;
    let spec = QueueSpec::new(unique_name("dlq-again"));
    transport.declare_queue(&spec).await.expect("declare");
    let queue = spec.name.clone();
    let refused = || DeadLetter {
        reason: DeadLetterReason::SinkRejected { status: 404 },
        detail: "HTTP 404: not found".into(),
    };
    let direct = Destination::Queue(queue.clone());
    let events = (1..=LETTERS).map(|i| event(&i.to_string(), 1)).collect();
    transport.publish_batch(&direct, events).await.expect("publish");
    let (subscription, deliveries) = receive(&transport, &queue, LETTERS).await;
    for delivery in deliveries {
        delivery.dead_letter(&refused()).await.expect("dead-letter");
    }
    subscription.close().await.expect("close");

    // The consumer: refuses everything sent back, at once, until it has refused each letter.
    let refuser = tokio::spawn({
        let (transport, queue) = (transport.clone(), queue.clone());
        async move {
            let mut subscription = transport.subscribe(&queue, Default::default()).await.expect("subscribe");
            let mut refusals = 0;
            while refusals < LETTERS {
                for delivery in
                    subscription.next_batch(10, Duration::from_millis(200)).await.expect("receive")
                {
                    delivery.dead_letter(&refused()).await.expect("dead-letter again");
                    refusals += 1;
                }
            }
            subscription.close().await.expect("close");
        }
    });
    let selection = Selection { reason: None, entity_type: None };
    // A hang guard, not a timing claim: without the fix this never returns.
    let redrive = resync_dlq::redrive(transport.as_ref(), &queue, &selection, None);
    let redriven = tokio::time::timeout(Duration::from_secs(120), redrive).await.expect("the redrive ended");
    let redriven = redriven.expect("redrive");
    assert_eq!(redriven.moved, LETTERS as u64, "each letter sent back once: {redriven:#?}");
    tokio::time::timeout(Duration::from_secs(60), refuser)
        .await
        .expect("each letter refused")
        .expect("refuser");
    let left = resync_dlq::inspect(transport.as_ref(), &queue).await.expect("inspect");
    assert_eq!(left.records.len(), LETTERS, "every refused letter is back in the DLQ");
    assert!(left.records.iter().all(|r| r.redrives == 1), "{left:#?}");
    assert!(queue_is_empty(&transport, &queue).await, "nothing refused was sent back a second time");
    transport.delete_queue(&queue).await.expect("cleanup");
}

async fn queue_is_empty(transport: &Arc<dyn Transport>, queue: &str) -> bool {
    transport.queue_depth(queue).await.is_ok_and(|d| d.ready == 0 && d.in_flight == 0)
}

/// A dead letter as the consumer writes it, of `entity_type`, dead-lettered `age` ago.
fn dead_letter(entity_type: &str, entity_id: &str, age: chrono::TimeDelta) -> OutgoingMessage {
    let event = Envelope::new(&format!("{entity_type}.updated"), entity_id, 1, serde_json::json!({}));
    let mut message = OutgoingMessage::from_envelope(&event);
    let at = (chrono::Utc::now() - age).to_rfc3339();
    for (name, value) in [
        (attr::DEAD_LETTER_REASON, "sink-rejected-422"),
        (attr::DEAD_LETTER_DETAIL, "refused"),
        (attr::DEAD_LETTERED_AT, at.as_str()),
    ] {
        message.attributes.insert(name.into(), value.into());
    }
    message
}

/// Selection by entity type and purge by age: only what both select goes, the rest stays.
#[tokio::test]
async fn purge_by_age_and_redrive_by_entity_type_touch_only_what_they_select() {
    let transport = connect("rabbitmq").await;
    let spec = QueueSpec::new(unique_name("dlq"));
    transport.declare_queue(&spec).await.expect("declare");
    let (queue, dlq) = (spec.name.clone(), resync_bus::dead_letter_queue_name(&spec.name));
    let two_days = chrono::TimeDelta::days(2);
    let letters = vec![
        dead_letter("listing", "old", two_days),
        dead_letter("listing", "new", chrono::TimeDelta::zero()),
        dead_letter("widget", "old", two_days),
    ];
    transport.publish_batch(&Destination::Queue(dlq.clone()), letters).await.expect("publish dead letters");

    let listings = Selection { reason: None, entity_type: Some("listing".into()) };
    let day = Duration::from_secs(24 * 3600);
    let purged = resync_dlq::purge(transport.as_ref(), &queue, &listings, day).await.expect("purge");
    assert_eq!((purged.deleted, purged.kept), (1, 2), "only the listing older than a day goes");

    let widgets = Selection { reason: None, entity_type: Some("widget".into()) };
    let redriven = resync_dlq::redrive(transport.as_ref(), &queue, &widgets, None).await.expect("redrive");
    assert_eq!((redriven.moved, redriven.kept), (1, 1), "only the widget goes back");
    let (subscription, back) = receive(&transport, &queue, 1).await;
    for delivery in back {
        let event = delivery.envelope(&Default::default()).expect("a valid envelope");
        assert_eq!((event.entity_type.as_str(), event.entity_id.as_str()), ("widget", "old"));
        delivery.ack().await.expect("ack");
    }
    subscription.close().await.expect("close");
    let left = resync_dlq::inspect(transport.as_ref(), &queue).await.expect("inspect");
    let left: Vec<_> = left.records.iter().map(|r| (r.entity_type.clone(), r.entity_id.clone())).collect();
    assert_eq!(left, [(Some("listing".to_string()), Some("new".to_string()))]);
    transport.delete_queue(&queue).await.expect("cleanup");
}
