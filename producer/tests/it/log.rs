//! The event log after publishing: replay and prune.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use resync_bus::{Filter, Transport};
use resync_producer::{NewEvent, RelayStatus, ReplayRequest, ReplayTarget, Replayed, emit, prune, replay};

use crate::support::{World, eventually, rabbitmq, with_world};

async fn emit_n(w: &World, n: usize) -> Vec<i64> {
    let mut tx = w.pool.begin().await.expect("begin");
    let mut seqs = Vec::new();
    for i in 0..n {
        let event = NewEvent::new("listing.updated", (i % 10).to_string(), serde_json::json!({"i": i}));
        seqs.push(emit(&mut tx, &w.schema, &event).await.expect("emit").seq);
    }
    tx.commit().await.expect("commit");
    seqs
}

async fn drain(w: &World, queue: usize, quiet: Duration) -> Vec<resync_bus::Envelope> {
    let mut subscription = w.subscribe(queue).await;
    let mut out = Vec::new();
    loop {
        let batch = subscription.next_batch(100, quiet).await.expect("next_batch");
        if batch.is_empty() {
            return out;
        }
        for d in batch {
            out.push(d.envelope(&Default::default()).expect("envelope"));
            d.ack().await.expect("ack");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_republishes_a_range_to_all_subscribers_or_to_one_queue() {
    let world = World::new(rabbitmq().await, 2, 4).await;
    with_world(world, |w| async move {
        let relay = w.start_relay(&w.database_url, w.transport.clone());
        relay.wait_for(RelayStatus::Leader).await;
        let seqs = emit_n(&w, 50).await;
        eventually("all published", Duration::from_secs(30), || async { w.pending().await == 0 }).await;
        relay.stop().await;
        let first = drain(&w, 0, Duration::from_millis(1000)).await;
        assert_eq!(drain(&w, 1, Duration::from_millis(1000)).await.len(), 50);
        assert_eq!(first.len(), 50);

        let transport: Arc<dyn Transport> = w.transport.clone();
        let range = ReplayRequest {
            from: seqs[10],
            to: Some(seqs[19]),
            entity_type: Some("listing".into()),
            target: ReplayTarget::AllSubscribers { namespace: Some(w.namespace.clone()) },
        };
        assert_eq!(replay(&w.pool, &w.schema, &transport, &range).await.expect("replay").sent, 10);
        let again = drain(&w, 0, Duration::from_millis(1000)).await;
        let expected: Vec<_> = first[10..20].iter().map(|e| e.id).collect();
        assert_eq!(
            again.iter().map(|e| e.id).collect::<Vec<_>>(),
            expected,
            "same events, same order, same ids"
        );
        assert_eq!(drain(&w, 1, Duration::from_millis(1000)).await.len(), 10, "every subscriber gets them");

        let to_queue = |types: &[&str]| ReplayTarget::Queue {
            queue: w.queues[1].clone(),
            subscribed: Filter::types(types.iter().copied()),
        };
        let to_one =
            ReplayRequest { from: seqs[0], to: Some(seqs[4]), target: to_queue(&["listing.*"]), ..range };
        let replayed = replay(&w.pool, &w.schema, &transport, &to_one).await.expect("replay");
        assert_eq!(replayed, Replayed { sent: 5, not_subscribed: 0 });
        assert!(drain(&w, 0, Duration::from_millis(1000)).await.is_empty(), "the other service gets nothing");
        assert_eq!(drain(&w, 1, Duration::from_millis(1000)).await.len(), 5);

        // A service that does not subscribe to listings is sent none of them.
        let unsubscribed =
            ReplayRequest { target: to_queue(&["user.*", "listing.deleted"]), ..to_one.clone() };
        let replayed = replay(&w.pool, &w.schema, &transport, &unsubscribed).await.expect("replay");
        assert_eq!(replayed, Replayed { sent: 0, not_subscribed: 5 });
        assert!(
            drain(&w, 1, Duration::from_millis(1000)).await.is_empty(),
            "nothing it does not subscribe to"
        );

        let other_type = ReplayRequest { entity_type: Some("user".into()), ..to_one };
        assert_eq!(replay(&w.pool, &w.schema, &transport, &other_type).await.expect("replay").sent, 0);
    })
    .await;
}

#[tokio::test]
async fn prune_deletes_old_published_events_and_never_pending_ones() {
    let world = World::new(rabbitmq().await, 1, 4).await;
    with_world(world, |w| async move {
        let published = emit_n(&w, 20).await;
        // Pretend the relay published the first 20 and that they are a week old.
        sqlx::query(w.schema.sql("DELETE FROM {schema}.outbox_pending"))
            .execute(&w.pool)
            .await
            .expect("mark published");
        let pending = emit_n(&w, 5).await;
        sqlx::query(w.schema.sql("UPDATE {schema}.outbox SET occurred_at = now() - interval '7 days'"))
            .execute(&w.pool)
            .await
            .expect("age events");
        let deleted = prune(&w.pool, &w.schema, Duration::from_secs(24 * 3600)).await.expect("prune");
        assert_eq!(deleted, 20);
        let left: Vec<i64> = sqlx::query_scalar(w.schema.sql("SELECT seq FROM {schema}.outbox ORDER BY seq"))
            .fetch_all(&w.pool)
            .await
            .expect("remaining");
        assert_eq!(left, pending, "unpublished events stay, however old");
        assert!(left.iter().collect::<HashSet<_>>().is_disjoint(&published.iter().collect()));
        assert_eq!(prune(&w.pool, &w.schema, Duration::from_secs(24 * 3600)).await.expect("prune"), 0);
    })
    .await;
}

/// Receives until `n` events arrived (a hang guard of 30 s), acking them.
async fn receive_n(w: &World, n: usize) -> Vec<resync_bus::Envelope> {
    let mut subscription = w.subscribe(0).await;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        assert!(tokio::time::Instant::now() < deadline, "{} of {n} events arrived", out.len());
        for d in subscription.next_batch(100, Duration::from_millis(500)).await.expect("next_batch") {
            out.push(d.envelope(&Default::default()).expect("envelope"));
            d.ack().await.expect("ack");
        }
    }
    let _ = subscription.close().await;
    out
}

/// An event whose entity type has no topic no longer stops the relay: it and every later event
/// of its type are parked (so they stay in order), events of other types flow on, and once a
/// topic exists `release` publishes the parked ones in their order (it once retried for ever
/// with every later event stuck behind it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_an_entity_type_without_a_topic_are_parked_and_the_rest_flows() {
    let world = World::new(rabbitmq().await, 1, 4).await;
    with_world(world, |w| async move {
        let relay = w.start_relay(&w.database_url, w.transport.clone());
        relay.wait_for(RelayStatus::Leader).await;
        let mut tx = w.pool.begin().await.expect("begin");
        for i in 0..10 {
            for event_type in ["widget.updated", "listing.updated"] {
                let event = NewEvent::new(event_type, (i % 3).to_string(), serde_json::json!({"i": i}));
                emit(&mut tx, &w.schema, &event).await.expect("emit");
            }
        }
        tx.commit().await.expect("commit");

        let listings = receive_n(&w, 10).await;
        assert!(listings.iter().all(|e| e.entity_type == "listing"), "only listings are routable yet");
        eventually("nothing pending", Duration::from_secs(30), || async { w.pending().await == 0 }).await;
        let parked = resync_producer::parked(&w.pool, &w.schema).await.expect("parked");
        assert_eq!(parked.len(), 1, "{parked:?}");
        assert_eq!((parked[0].entity_type.as_str(), parked[0].events), ("widget", 10));
        assert!(parked[0].reason.contains("no topic"), "{parked:?}");

        let topic = resync_producer::live_topic(Some(&w.namespace), "widget");
        w.transport.declare_topic(&topic, None).await.expect("widget topic");
        w.transport.bind(&topic, &w.queues[0], &Filter::all()).await.expect("bind");
        let released = resync_producer::release_parked(&w.pool, &w.schema, "widget").await.expect("release");
        assert_eq!(released, 10);
        let widgets = receive_n(&w, 10).await;
        let versions: Vec<(String, i64)> = widgets.iter().map(|e| (e.entity_id.clone(), e.version)).collect();
        let mut in_order = versions.clone();
        in_order.sort_by_key(|(id, version)| (id.clone(), *version));
        let per_entity = |v: &[(String, i64)], id: &str| {
            v.iter().filter(|(e, _)| e == id).map(|(_, n)| *n).collect::<Vec<_>>()
        };
        for id in ["0", "1", "2"] {
            assert_eq!(per_entity(&versions, id), per_entity(&in_order, id), "widget {id} in version order");
        }
        assert!(resync_producer::parked(&w.pool, &w.schema).await.expect("parked").is_empty());
        relay.stop().await;
        let _ = w.transport.delete_topic(&topic).await;
    })
    .await;
}
