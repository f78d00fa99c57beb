//! The transport contract: one set of cases, run against every transport. A case takes a
//! connected transport; the macro at the bottom instantiates all cases per transport, so the
//! test output lists `contract::<transport>::<case>`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use resync_bus::{
    DeadLetter, Destination, Filter, OutgoingMessage, QueueSpec, Routing, Stream, Transport, TransportError,
    attr,
};
use resync_testkit::unique_name;

use crate::support::{Topology, assert_nothing_arrives, entity_of, event, message, receive, with_topology};

/// Long enough for any broker here to deliver; only reached when something is broken.
const DELIVERY_LIMIT: Duration = Duration::from_secs(20);
/// How long "nothing more arrives" is watched.
const QUIET: Duration = Duration::from_millis(1500);

pub(crate) async fn publish_subscribe_round_trip(transport: Arc<dyn Transport>) {
    let topology = Topology::new(transport, 1).await;
    with_topology(topology, |t| async move {
        let sent = event("42", 7);
        t.transport.publish(&t.topic(), OutgoingMessage::from_envelope(&sent)).await.expect("publish");
        let mut sub = t.subscribe(0).await;
        let mut got = receive(sub.as_mut(), 1, DELIVERY_LIMIT).await;
        assert_eq!(got.len(), 1);
        let delivery = got.remove(0);
        assert_eq!(delivery.envelope(&Default::default()).expect("decodes"), sent);
        assert_eq!(delivery.attributes[attr::TYPE], "listing.updated");
        assert_eq!(delivery.attributes[attr::ENTITY_TYPE], "listing");
        assert_eq!(delivery.stream(), Some(Stream::Live));
        assert_eq!(delivery.receive_count, 1);
        delivery.ack().await.expect("ack");
        assert_nothing_arrives(sub.as_mut(), QUIET).await;
    })
    .await;
}

pub(crate) async fn fan_out_to_two_queues(transport: Arc<dyn Transport>) {
    let topology = Topology::new(transport, 2).await;
    with_topology(topology, |t| async move {
        t.transport.publish(&t.topic(), message("1", 1)).await.expect("publish");
        for queue in 0..2 {
            let mut sub = t.subscribe(queue).await;
            let got = receive(sub.as_mut(), 1, DELIVERY_LIMIT).await;
            assert_eq!(got.len(), 1, "queue {queue} gets its own copy");
            assert_eq!(entity_of(&got[0]), "1");
            for d in got {
                d.ack().await.expect("ack");
            }
            assert_nothing_arrives(sub.as_mut(), QUIET).await;
        }
    })
    .await;
}

pub(crate) async fn filters_route_only_subscribed_types(transport: Arc<dyn Transport>) {
    let specs = vec![
        (QueueSpec::new(unique_name("q")), Filter::types(["listing.*"])),
        (QueueSpec::new(unique_name("q")), Filter::types(["user.updated"])),
    ];
    let topology = Topology::with_specs(transport, specs).await;
    with_topology(topology, |t| async move {
        let batch = vec![
            OutgoingMessage::from_envelope(&resync_bus::Envelope::new(
                "listing.created",
                "1",
                1,
                serde_json::json!({}),
            )),
            OutgoingMessage::from_envelope(&resync_bus::Envelope::new(
                "user.updated",
                "2",
                1,
                serde_json::json!({}),
            )),
            OutgoingMessage::from_envelope(&resync_bus::Envelope::new(
                "user.deleted",
                "3",
                1,
                serde_json::json!({}),
            )),
        ];
        t.transport.publish_batch(&t.topic(), batch).await.expect("publish");
        for (queue, expected) in [(0, "listing.created"), (1, "user.updated")] {
            let mut sub = t.subscribe(queue).await;
            let got = receive(sub.as_mut(), 1, DELIVERY_LIMIT).await;
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].attributes[attr::TYPE], expected);
            for d in got {
                d.ack().await.expect("ack");
            }
            assert_nothing_arrives(sub.as_mut(), QUIET).await;
        }
    })
    .await;
}

pub(crate) async fn two_consumers_share_one_queue(transport: Arc<dyn Transport>) {
    let topology = Topology::new(transport, 1).await;
    with_topology(topology, |t| async move {
        let mut a = t.subscribe(0).await;
        let mut b = t.subscribe(0).await;
        let batch: Vec<_> = (0..20).map(|i| message(&i.to_string(), 1)).collect();
        t.transport.publish_batch(&t.topic(), batch).await.expect("publish");
        let (mut seen_a, mut seen_b) = (BTreeSet::new(), BTreeSet::new());
        let deadline = tokio::time::Instant::now() + DELIVERY_LIMIT;
        while seen_a.len() + seen_b.len() < 20 && tokio::time::Instant::now() < deadline {
            for (sub, seen) in [(&mut a, &mut seen_a), (&mut b, &mut seen_b)] {
                for d in sub.next_batch(3, Duration::from_millis(300)).await.expect("next_batch") {
                    assert!(seen.insert(entity_of(&d)), "same consumer got a message twice");
                    d.ack().await.expect("ack");
                }
            }
        }
        assert!(
            !seen_a.is_empty() && !seen_b.is_empty(),
            "both consumers get work: a={seen_a:?} b={seen_b:?}"
        );
        assert!(seen_a.is_disjoint(&seen_b), "no message goes to both: {:?}", seen_a.intersection(&seen_b));
        assert_eq!(seen_a.len() + seen_b.len(), 20, "every message is delivered");
    })
    .await;
}

pub(crate) async fn ack_removes_and_nack_redelivers(transport: Arc<dyn Transport>) {
    let topology = Topology::new(transport, 1).await;
    with_topology(topology, |t| async move {
        t.transport.publish(&t.topic(), message("9", 1)).await.expect("publish");
        let mut sub = t.subscribe(0).await;
        let first = receive(sub.as_mut(), 1, DELIVERY_LIMIT).await.remove(0);
        assert_eq!(first.receive_count, 1);
        first.nack(Duration::ZERO).await.expect("nack");
        let again = receive(sub.as_mut(), 1, DELIVERY_LIMIT).await.remove(0);
        assert_eq!(entity_of(&again), "9");
        assert_eq!(again.receive_count, 2, "redelivery is counted");
        again.ack().await.expect("ack");
        assert_nothing_arrives(sub.as_mut(), QUIET).await;
    })
    .await;
}

pub(crate) async fn a_fresh_copy_keeps_the_message_and_starts_its_delivery_count_again(
    transport: Arc<dyn Transport>,
) {
    let mut spec = QueueSpec::new(unique_name("q"));
    spec.max_receive_count = 2;
    let topology = Topology::with_specs(transport, vec![(spec, Filter::all())]).await;
    with_topology(topology, |t| async move {
        t.transport.publish(&t.topic(), message("held", 1)).await.expect("publish");
        let mut sub = t.subscribe(0).await;
        let first = receive(sub.as_mut(), 1, DELIVERY_LIMIT).await.remove(0);
        first.nack(Duration::ZERO).await.expect("nack");
        let second = receive(sub.as_mut(), 1, DELIVERY_LIMIT).await.remove(0);
        assert_eq!(second.receive_count, 2);
        let (body, event_type) = (second.body.clone(), second.attributes.get(attr::TYPE).cloned());
        // At the queue's limit of 2: a plain return now would dead-letter it.
        second.requeue_fresh(Duration::ZERO).await.expect("requeue a fresh copy");
        let fresh = receive(sub.as_mut(), 1, DELIVERY_LIMIT).await.remove(0);
        assert_eq!(fresh.receive_count, 1, "the copy's deliveries are counted from 1 again");
        assert_eq!((&fresh.body, fresh.attributes.get(attr::TYPE)), (&body, event_type.as_ref()));
        fresh.ack().await.expect("ack");
        assert_nothing_arrives(sub.as_mut(), QUIET).await;
        let mut dlq = t.subscribe_dlq(0).await;
        assert_nothing_arrives(dlq.as_mut(), QUIET).await;
    })
    .await;
}

pub(crate) async fn consumer_that_dies_unacked_loses_nothing(transport: Arc<dyn Transport>) {
    let mut spec = QueueSpec::new(unique_name("q"));
    spec.visibility_timeout = Duration::from_secs(2);
    let topology = Topology::with_specs(transport, vec![(spec, Filter::all())]).await;
    with_topology(topology, |t| async move {
        t.transport.publish(&t.topic(), message("7", 1)).await.expect("publish");
        let mut doomed = t.subscribe(0).await;
        let held = receive(doomed.as_mut(), 1, DELIVERY_LIMIT).await.remove(0);
        // The process dies: no destructor of the delivery runs, its connection goes away.
        std::mem::forget(held);
        doomed.close().await.expect("close");
        let mut survivor = t.subscribe(0).await;
        let got = receive(survivor.as_mut(), 1, DELIVERY_LIMIT).await;
        assert_eq!(got.len(), 1, "the unacked message is redelivered");
        assert_eq!(entity_of(&got[0]), "7");
        assert!(got[0].receive_count >= 2);
        for d in got {
            d.ack().await.expect("ack");
        }
    })
    .await;
}

pub(crate) async fn held_message_stays_invisible_while_handler_runs(transport: Arc<dyn Transport>) {
    let mut spec = QueueSpec::new(unique_name("q"));
    spec.visibility_timeout = Duration::from_secs(2);
    let topology = Topology::with_specs(transport, vec![(spec, Filter::all())]).await;
    with_topology(topology, |t| async move {
        t.transport.publish(&t.topic(), message("5", 1)).await.expect("publish");
        let mut worker = t.subscribe(0).await;
        let held = receive(worker.as_mut(), 1, DELIVERY_LIMIT).await.remove(0);
        // While the handler works for 2.5x the visibility timeout, nobody else gets it.
        let mut other = t.subscribe(0).await;
        assert_nothing_arrives(other.as_mut(), Duration::from_secs(5)).await;
        held.ack().await.expect("ack after a long handler");
        assert_nothing_arrives(other.as_mut(), QUIET).await;
    })
    .await;
}

pub(crate) async fn batch_publish_reports_failed_entries_and_sends_the_rest(transport: Arc<dyn Transport>) {
    let topology = Topology::new(transport, 1).await;
    with_topology(topology, |t| async move {
        let oversized =
            OutgoingMessage { body: Bytes::from(vec![b'x'; 300 * 1024]), ..message("too-big", 1) };
        let queue = Destination::Queue(t.queues[0].clone());
        for (destination, prefix) in [(t.topic(), "topic"), (queue, "queue")] {
            let mut batch: Vec<_> = (0..12).map(|i| message(&format!("{prefix}-{i}"), 1)).collect();
            batch[3] = oversized.clone();
            match t.transport.publish_batch(&destination, batch).await {
                Err(TransportError::Partial { failed, total, entries }) => {
                    assert_eq!((failed, total), (1, 12));
                    assert_eq!(entries[0].index, 3);
                    assert!(entries[0].reason.contains("limit"), "{}", entries[0].reason);
                }
                other => panic!("expected a partial failure, got {other:?}"),
            }
        }
        let mut sub = t.subscribe(0).await;
        let got = receive(sub.as_mut(), 22, DELIVERY_LIMIT).await;
        let ids: BTreeSet<String> = got.iter().map(entity_of).collect();
        assert_eq!(ids.len(), 22, "the 22 valid entries arrive, each once");
        assert!(!ids.iter().any(|id| id.ends_with("-3")));
        for d in got {
            d.ack().await.expect("ack");
        }
        assert_nothing_arrives(sub.as_mut(), QUIET).await;
    })
    .await;
}

pub(crate) async fn poison_message_goes_to_dead_letter_queue_with_reason(transport: Arc<dyn Transport>) {
    let topology = Topology::new(transport, 1).await;
    with_topology(topology, |t| async move {
        let routing = Routing {
            event_type: "listing.updated".into(),
            entity_type: "listing".into(),
            stream: Stream::Live,
        };
        let poison =
            OutgoingMessage::with_routing(Bytes::from_static(b"{not json"), &routing, "poison-1".into());
        t.transport.publish_batch(&t.topic(), vec![poison, message("ok", 1)]).await.expect("publish");
        let mut sub = t.subscribe(0).await;
        let mut good = Vec::new();
        for delivery in receive(sub.as_mut(), 2, DELIVERY_LIMIT).await {
            match delivery.envelope(&Default::default()) {
                Ok(envelope) => {
                    good.push(envelope.entity_id);
                    delivery.ack().await.expect("ack");
                }
                Err(err) => {
                    delivery.dead_letter(&DeadLetter::invalid_envelope(&err)).await.expect("dead-letter")
                }
            }
        }
        assert_eq!(good, vec!["ok".to_string()], "the rest flows");
        assert_nothing_arrives(sub.as_mut(), QUIET).await;
        let mut dlq = t.subscribe_dlq(0).await;
        let dead = receive(dlq.as_mut(), 1, DELIVERY_LIMIT).await;
        assert_eq!(dead.len(), 1);
        assert_eq!(&dead[0].body[..], b"{not json", "the body is kept as it was");
        assert_eq!(dead[0].attributes[attr::DEAD_LETTER_REASON], "invalid-envelope");
        assert!(dead[0].attributes[attr::DEAD_LETTER_DETAIL].contains("not valid JSON"));
        assert_eq!(dead[0].attributes[attr::SOURCE_QUEUE], t.queues[0]);
        assert_eq!(dead[0].attributes[attr::TYPE], "listing.updated", "routing attributes travel along");
        for d in dead {
            d.ack().await.expect("ack");
        }
    })
    .await;
}

pub(crate) async fn message_received_too_often_goes_to_dead_letter_queue(transport: Arc<dyn Transport>) {
    let mut spec = QueueSpec::new(unique_name("q"));
    spec.max_receive_count = 2;
    let topology = Topology::with_specs(transport, vec![(spec, Filter::all())]).await;
    with_topology(topology, |t| async move {
        t.transport.publish(&t.topic(), message("flaky", 1)).await.expect("publish");
        let mut sub = t.subscribe(0).await;
        let mut dlq = t.subscribe_dlq(0).await;
        let mut receives = 0;
        let dead = loop {
            for d in sub.next_batch(1, Duration::from_millis(500)).await.expect("next_batch") {
                receives += 1;
                d.nack(Duration::ZERO).await.expect("nack");
            }
            let dead = dlq.next_batch(1, Duration::from_millis(200)).await.expect("next_batch");
            if !dead.is_empty() {
                break dead;
            }
            assert!(receives <= 10, "still not dead-lettered after {receives} receives");
        };
        assert_eq!(entity_of(&dead[0]), "flaky");
        assert!((2..=3).contains(&receives), "delivered {receives} times before dead-lettering");
        for d in dead {
            d.ack().await.expect("ack");
        }
        assert_nothing_arrives(sub.as_mut(), QUIET).await;
    })
    .await;
}

pub(crate) async fn clean_shutdown_returns_what_was_not_acked(transport: Arc<dyn Transport>) {
    let topology = Topology::new(transport, 1).await;
    with_topology(topology, |t| async move {
        let batch: Vec<_> = (0..3).map(|i| message(&i.to_string(), 1)).collect();
        t.transport.publish_batch(&t.topic(), batch).await.expect("publish");
        let mut sub = t.subscribe(0).await;
        let first = receive(sub.as_mut(), 1, DELIVERY_LIMIT).await.remove(0);
        let acked = entity_of(&first);
        first.ack().await.expect("ack");
        sub.close().await.expect("close subscription");
        t.transport.close().await.expect("close transport");
        let mut next = t.subscribe(0).await;
        let rest = receive(next.as_mut(), 2, DELIVERY_LIMIT).await;
        let ids: BTreeSet<String> = rest.iter().map(entity_of).collect();
        assert_eq!(ids.len(), 2, "the two unacked messages are still there");
        assert!(!ids.contains(&acked), "the acked one is gone");
        for d in rest {
            d.ack().await.expect("ack");
        }
    })
    .await;
}

pub(crate) async fn subscribing_to_a_missing_queue_is_an_error(transport: Arc<dyn Transport>) {
    let missing = unique_name("missing");
    match transport.subscribe(&missing, Default::default()).await {
        Err(TransportError::NotFound(name)) => assert_eq!(name, missing),
        Err(other) => panic!("expected NotFound, got {other}"),
        Ok(_) => panic!("subscribing to a missing queue succeeded"),
    }
}

/// A batch big enough that the broker closes the channel mid-batch (RabbitMQ answers a missing
/// exchange by closing the channel, and the publishes after that fail only with "channel
/// closing"): still `NotFound`, at once, not a broken connection retried until the timeout.
pub(crate) async fn publishing_to_a_missing_topic_is_not_found(transport: Arc<dyn Transport>) {
    let missing = unique_name("missing-topic");
    let messages: Vec<OutgoingMessage> = (0..500).map(|i| message(&format!("e{i}"), 1)).collect();
    match transport.publish_batch(&Destination::Topic(missing.clone()), messages).await {
        Err(TransportError::NotFound(name)) => assert_eq!(name, missing),
        Err(other) => panic!("expected NotFound, got {other}"),
        Ok(()) => panic!("publishing to a missing topic succeeded"),
    }
}

macro_rules! contract_suite {
    ($transport:ident) => {
        mod $transport {
            use crate::support;

            contract_suite!(@cases $transport:
                publish_subscribe_round_trip,
                fan_out_to_two_queues,
                filters_route_only_subscribed_types,
                two_consumers_share_one_queue,
                ack_removes_and_nack_redelivers,
                a_fresh_copy_keeps_the_message_and_starts_its_delivery_count_again,
                consumer_that_dies_unacked_loses_nothing,
                held_message_stays_invisible_while_handler_runs,
                batch_publish_reports_failed_entries_and_sends_the_rest,
                poison_message_goes_to_dead_letter_queue_with_reason,
                message_received_too_often_goes_to_dead_letter_queue,
                clean_shutdown_returns_what_was_not_acked,
                subscribing_to_a_missing_queue_is_an_error,
                publishing_to_a_missing_topic_is_not_found,
            );
        }
    };
    (@cases $transport:ident: $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                super::$case(support::$transport().await).await;
            }
        )+
    };
}

contract_suite!(memory);
contract_suite!(rabbitmq);
contract_suite!(sns_sqs);
