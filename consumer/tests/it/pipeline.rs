//! The per-event pipeline and the consumer loop, end to end against real services.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use resync_bus::{Destination, OutgoingMessage, Routing, Stream, Transport, attr, dead_letter_queue_name};
use resync_consumer::{Outcome, QueueState, control};

use crate::support::{World, history, newest_states, rabbitmq, run_until, sns_sqs, with_world};

/// Connects a fresh transport (each consumer gets its own, as separate processes would).
type Connect = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn Transport>> + Send>>;

async fn duplicates_and_shuffled_order_case(
    transport: Arc<dyn Transport>,
    make: Connect,
    entities: usize,
    versions: i64,
) {
    let world = World::new(transport).await;
    with_world(world, move |w| async move {
        let mut events = history(entities, versions);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let duplicates: Vec<_> = events.choose_multiple(&mut rng, events.len() / 10).cloned().collect();
        events.extend(duplicates);
        events.shuffle(&mut rng);
        w.publish(&events).await;

        let mut consumers = Vec::new();
        for _ in 0..4 {
            consumers.push(w.consumer(make().await, Duration::from_secs(5)).await);
        }
        let expected = newest_states(entities, versions);
        w.run_until_applied(consumers, &expected, Duration::from_secs(240)).await;
        assert_eq!(w.sink.state(), expected, "the third party ends with the newest state of every entity");
        assert_eq!(w.sink.stale_overwrites(), vec![], "no older version was ever written after a newer one");
        let calls = w.sink.calls.load(Ordering::SeqCst) as usize;
        assert!(
            calls <= entities * versions as usize,
            "duplicates and stale events cost no call ({calls} calls)"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_duplicates_and_shuffled_order_end_in_the_newest_state() {
    duplicates_and_shuffled_order_case(rabbitmq().await, || Box::pin(rabbitmq()), 200, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sns_sqs_duplicates_and_shuffled_order_end_in_the_newest_state() {
    duplicates_and_shuffled_order_case(sns_sqs().await, || Box::pin(sns_sqs()), 30, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_rejected_events_are_dead_lettered_with_reasons_and_the_rest_flows() {
    let world = World::new(rabbitmq().await).await;
    with_world(world, |w| async move {
        w.sink.faults.reject.lock().unwrap().push("bad".into());
        let routing = Routing {
            event_type: "listing.updated".into(),
            entity_type: "listing".into(),
            stream: Stream::Live,
        };
        let poison = OutgoingMessage::with_routing(Bytes::from_static(b"{\"id\": 1}"), &routing, "p".into());
        w.transport.publish(&Destination::Queue(w.queue.clone()), poison).await.expect("publish poison");
        let mut events = history(5, 2);
        events.push(resync_bus::Envelope::new(
            "listing.updated",
            "bad",
            1,
            serde_json::json!({"title": "x".repeat(300)}),
        ));
        w.publish(&events).await;

        let consumer = w.consumer(rabbitmq().await, Duration::from_secs(5)).await;
        let dlq = dead_letter_queue_name(&w.queue);
        let (transport, sink) = (w.transport.clone(), w.sink.clone());
        run_until(vec![consumer], Duration::from_secs(60), || {
            let (transport, dlq, sink) = (transport.clone(), dlq.clone(), sink.clone());
            async move {
                sink.state().len() == 5
                    && transport.queue_depth(&dlq).await.map(|d| d.ready == 2).unwrap_or(false)
            }
        })
        .await;
        let mut dead = w.transport.subscribe(&dlq, Default::default()).await.expect("subscribe to DLQ");
        let mut reasons = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while reasons.len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "dead letters missing: {reasons:?}");
            for d in dead.next_batch(10, Duration::from_secs(1)).await.expect("dlq") {
                reasons.insert(
                    d.attributes[attr::DEAD_LETTER_REASON].clone(),
                    d.attributes[attr::DEAD_LETTER_DETAIL].clone(),
                );
                d.ack().await.expect("ack");
            }
        }
        assert!(
            reasons["invalid-envelope"].contains("field `id`"),
            "the decode error names the field: {reasons:?}"
        );
        assert!(
            reasons["sink-rejected-422"].contains("title too long"),
            "the sink's status and body travel with it: {reasons:?}"
        );
        assert_eq!(w.sink.state().len(), 5, "the valid events were applied");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_until_applied() {
    let world = World::new(rabbitmq().await).await;
    with_world(world, |w| async move {
        w.sink.faults.transient_first.store(3, Ordering::SeqCst);
        w.publish(&history(1, 1)).await;
        let consumer = w.consumer(rabbitmq().await, Duration::from_secs(5)).await;
        let sink = w.sink.clone();
        run_until(vec![consumer], Duration::from_secs(60), || {
            let sink = sink.clone();
            async move { sink.state().len() == 1 }
        })
        .await;
        assert_eq!(w.sink.calls.load(Ordering::SeqCst), 4, "three failures, then success");
    })
    .await;
}

/// A sink that keeps failing past every retry budget: each delivery spends its attempts, goes
/// back to the queue with a delay, and after the queue's receive count the consumer
/// dead-letters it as `max-receives-exceeded` with the last error, records the entity for
/// `--only-rejected`, and the other entities flow meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_exhausts_its_retries_is_requeued_then_dead_lettered_as_max_receives_exceeded() {
    let world = World::new(rabbitmq().await).await;
    with_world(world, |w| async move {
        // Only the first entity's calls fail: `transient_first` counts every call, so keep the
        // others out of the way by publishing the failing one alone first.
        w.sink.faults.transient_first.store(u32::MAX, Ordering::SeqCst);
        w.publish(&[resync_bus::Envelope::new("listing.updated", "down", 1, serde_json::json!({}))]).await;
        let consumer = w.consumer(rabbitmq().await, Duration::from_secs(5)).await;
        let dlq = dead_letter_queue_name(&w.queue);
        let transport = w.transport.clone();
        run_until(vec![consumer], Duration::from_secs(120), || {
            let (transport, dlq) = (transport.clone(), dlq.clone());
            async move { transport.queue_depth(&dlq).await.map(|d| d.ready == 1).unwrap_or(false) }
        })
        .await;
        // 3 receives (the queue's max) of 6 attempts each (the policy's default), no more.
        assert_eq!(w.sink.calls.load(Ordering::SeqCst), 3 * 6, "every attempt of every receive, then none");
        let mut dead = w.transport.subscribe(&dlq, Default::default()).await.expect("subscribe to DLQ");
        let letter =
            dead.next_batch(1, Duration::from_secs(5)).await.expect("dlq").pop().expect("a dead letter");
        assert_eq!(letter.attributes[attr::DEAD_LETTER_REASON], "max-receives-exceeded");
        assert!(
            letter.attributes[attr::DEAD_LETTER_DETAIL].contains("injected 503"),
            "{:?}",
            letter.attributes
        );
        letter.ack().await.expect("ack");
        let recorded: String = sqlx::query_scalar(
            w.schema.sql("SELECT reason FROM {schema}.dead_lettered_entities WHERE entity_id = 'down'"),
        )
        .fetch_one(&w.pool)
        .await
        .expect("the entity is recorded for --only-rejected");
        assert_eq!(recorded, "max-receives-exceeded");

        // The sink is back: the rest flows.
        w.sink.faults.transient_first.store(0, Ordering::SeqCst);
        w.publish(&history(3, 1)).await;
        let consumer = w.consumer(rabbitmq().await, Duration::from_secs(5)).await;
        let sink = w.sink.clone();
        run_until(vec![consumer], Duration::from_secs(60), || {
            let sink = sink.clone();
            async move { sink.state().len() == 3 }
        })
        .await;
        assert!(!w.sink.state().contains_key("down"), "a dead letter is never applied on its own");
    })
    .await;
}

/// v1 and v2 of one entity: a slow consumer's call for v1 is held at the sink while its lock
/// is lost (expired in a pause, or Redis failed over); a fast consumer applies v2; then v1's
/// call ends, landing late or (with `fail_held`) timing out. Returns the slow consumer's
/// outcome and the versions the sink received, in order.
async fn v1_held_while_its_lock_is_lost_and_v2_applied(w: &World, fail_held: bool) -> (Outcome, Vec<i64>) {
    w.publish(&history(1, 2)).await;
    let mut subscription = w.transport.subscribe(&w.queue, Default::default()).await.expect("subscribe");
    let mut deliveries = Vec::new();
    while deliveries.len() < 2 {
        deliveries.extend(subscription.next_batch(2, Duration::from_secs(5)).await.expect("next_batch"));
    }
    deliveries.sort_by_key(|d| d.envelope(&Default::default()).expect("envelope").version);
    let v2 = deliveries.pop().expect("v2");
    let v1 = deliveries.pop().expect("v1");

    *w.sink.faults.hold_version.lock().unwrap() = Some(1);
    w.sink.faults.fail_held.store(fail_held, Ordering::SeqCst);
    let slow = Arc::new(w.processor(Duration::from_secs(5)).await);
    let held = tokio::spawn({
        let slow = slow.clone();
        async move { slow.handle(v1).await }
    });
    w.sink.faults.entered.notified().await;
    let mut redis = redis_connection().await;
    let pattern = format!("{}:resync:lock:*", w.namespace);
    let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut redis).await.expect("KEYS");
    let keys: Vec<String> = keys.into_iter().filter(|k| !k.ends_with(":fence")).collect();
    assert_eq!(keys.len(), 1, "the slow consumer holds the entity lock: {keys:?}");
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await.expect("DEL");

    let fast = w.processor(Duration::from_secs(5)).await;
    assert_eq!(fast.handle(v2).await, Outcome::Applied);
    w.sink.faults.release.notify_one();
    let outcome = held.await.expect("slow consumer");
    let versions = w.sink.writes.lock().unwrap().iter().map(|w| w.version).collect();
    (outcome, versions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_that_lost_its_lock_to_a_newer_version_is_repaired() {
    let world = World::new(rabbitmq().await).await;
    with_world(world, |w| async move {
        let (outcome, versions) = v1_held_while_its_lock_is_lost_and_v2_applied(&w, false).await;
        assert_eq!(outcome, Outcome::Repaired);
        assert_eq!(versions, vec![2, 1, 2], "the late v1 was followed by a re-send of v2");
        assert_eq!(w.sink.unrepaired_stale_writes(), vec![], "no stale write survives");
    })
    .await;
}

/// A consumer whose call timed out after its lock was taken over (Redis lost the key, or the
/// process froze past its lease) must not retry: the new holder applied a newer version
/// meanwhile, and a retry would write the older one over it (seen end to end: 12 stale writes
/// within 0.2 s of a SIGCONT). The event goes back to the queue instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_that_lost_its_lock_does_not_retry_its_call() {
    let world = World::new(rabbitmq().await).await;
    with_world(world, |w| async move {
        let (outcome, versions) = v1_held_while_its_lock_is_lost_and_v2_applied(&w, true).await;
        assert_eq!(outcome, Outcome::Requeued, "back to the queue, not retried");
        assert_eq!(versions, vec![2], "v1 was never written over v2");
    })
    .await;
}

async fn redis_connection() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(resync_testkit::Service::Redis.url()).expect("redis url");
    client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| resync_testkit::service_unreachable(resync_testkit::Service::Redis, e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_taking_messages_and_resume_applies_the_backlog() {
    let world = World::new(rabbitmq().await).await;
    with_world(world, |w| async move {
        let consumer = Arc::new(w.consumer(rabbitmq().await, Duration::from_secs(5)).await);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let running = tokio::spawn({
            let (consumer, shutdown) = (consumer.clone(), shutdown.clone());
            async move { consumer.run(shutdown).await }
        });
        let mut state = consumer.queue_state(0);
        wait_for(&mut state, QueueState::Consuming).await;

        control::pause(&w.pool, &w.schema, "svc", Stream::Live, Some("test")).await.expect("pause");
        wait_for(&mut state, QueueState::Paused).await;
        w.publish(&history(20, 1)).await;
        // Silence is what is asserted here: for a second, nothing is taken.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(w.sink.calls.load(Ordering::SeqCst), 0, "a paused consumer takes nothing");
        assert_eq!(
            w.transport.queue_depth(&w.queue).await.expect("depth").ready,
            20,
            "messages accumulate in the queue"
        );

        assert!(control::resume(&w.pool, &w.schema, "svc", Stream::Live).await.expect("resume"));
        wait_for(&mut state, QueueState::Consuming).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while w.sink.state().len() < 20 {
            assert!(tokio::time::Instant::now() < deadline, "backlog not applied after resume");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        running.await.expect("consumer").expect("consumer ran");
    })
    .await;
}

async fn wait_for(state: &mut tokio::sync::watch::Receiver<QueueState>, wanted: QueueState) {
    tokio::time::timeout(Duration::from_secs(30), state.wait_for(|s| *s == wanted))
        .await
        .unwrap_or_else(|_| panic!("queue never reached {wanted:?}"))
        .expect("state channel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_events_in_flight_and_loses_nothing() {
    let world = World::new(rabbitmq().await).await;
    with_world(world, |w| async move {
        *w.sink.faults.latency.lock().unwrap() = Duration::from_millis(300);
        w.publish(&history(50, 1)).await;
        let consumer = w.consumer(rabbitmq().await, Duration::from_secs(5)).await;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let running = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { consumer.run(shutdown).await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while w.sink.calls.load(Ordering::SeqCst) < 5 {
            assert!(tokio::time::Instant::now() < deadline, "consumer never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        running.await.expect("consumer").expect("clean stop");
        let applied = w.sink.state().len();
        let calls = w.sink.calls.load(Ordering::SeqCst) as usize;
        assert_eq!(applied, calls, "every call that started finished and was recorded");
        // The messages the consumer held unacknowledged go back to the queue as its channel
        // closes; a quorum queue counts them as ready a moment later, so the count is awaited.
        let (transport, queue) = (w.transport.clone(), w.queue.clone());
        resync_testkit::poll_some(Duration::from_secs(10), "applied or still queued: nothing lost", || {
            let (transport, queue) = (transport.clone(), queue.clone());
            async move {
                let left = transport.queue_depth(&queue).await.expect("depth").ready as usize;
                (applied + left == 50).then_some(())
            }
        })
        .await;

        let consumer = w.consumer(rabbitmq().await, Duration::from_secs(5)).await;
        let sink = w.sink.clone();
        run_until(vec![consumer], Duration::from_secs(60), || {
            let sink = sink.clone();
            async move { sink.state().len() == 50 }
        })
        .await;
    })
    .await;
}

/// A consumer that dies after its sink call and before recording it leaves only its intent:
/// an older event redelivered meanwhile must not be sent over what may have landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_between_call_and_record_older_events_are_stale_until_the_newest_is_reapplied() {
    let world = World::new(rabbitmq().await).await;
    with_world(world, |w| async move {
        let events = history(1, 3);
        w.publish(&events[..1]).await;
        let consumer = w.consumer(rabbitmq().await, Duration::from_secs(5)).await;
        let sink = w.sink.clone();
        run_until(vec![consumer], Duration::from_secs(60), || {
            let sink = sink.clone();
            async move { sink.state().get("0") == Some(&(1, false)) }
        })
        .await;
        // Version 3 (a tombstone) was being sent when its consumer died, unrecorded.
        let store = resync_consumer::AppliedStore::new(w.pool.clone(), w.schema.clone());
        let entity =
            resync_consumer::store::EntityId { entity_type: "listing".into(), entity_id: "0".into() };
        store.record_intents("recording", &[(&entity, 3)]).await.expect("intent");

        // Version 2 comes first (v3's redelivery is later): it must not reach the sink.
        w.publish(&events[1..2]).await;
        w.publish(&events[2..]).await;
        let consumer = w.consumer(rabbitmq().await, Duration::from_secs(5)).await;
        let tally = consumer.tally();
        let sink = w.sink.clone();
        run_until(vec![consumer], Duration::from_secs(60), || {
            let (sink, tally) = (sink.clone(), tally.clone());
            async move { sink.state().get("0") == Some(&(3, true)) && tally.count(Outcome::Stale) == 1 }
        })
        .await;
        let versions: Vec<i64> = w.sink.writes.lock().unwrap().iter().map(|w| w.version).collect();
        assert_eq!(versions, [1, 3], "version 2 was never sent over the possibly-landed version 3");
    })
    .await;
}

/// Takes the next delivery of the world's queue.
async fn next_delivery(subscription: &mut Box<dyn resync_bus::Subscription>) -> resync_bus::Delivery {
    loop {
        let mut batch = subscription.next_batch(1, Duration::from_secs(5)).await.expect("next_batch");
        if let Some(delivery) = batch.pop() {
            return delivery;
        }
    }
}

/// A resync event whose content equals what the record holds at an older version must still
/// be sent: the record may say "unchanged" while the third party holds the older version (a
/// live update that changed nothing is recorded without a call). Here the resync's v2 comes
/// before the unchanged live v2, as when live events are still queued behind a job's; the
/// demo once ended with the third party a version behind for good this way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_sends_a_newer_version_even_when_its_content_is_unchanged() {
    let world = World::new(rabbitmq().await).await;
    with_world(world, |w| async move {
        let data = serde_json::json!({"title": "flat", "price": 100});
        let v1 = resync_bus::Envelope::new("listing.updated", "7", 1, data.clone());
        let v2 = resync_bus::Envelope::new("listing.updated", "7", 2, data.clone());
        let mut resync_v2 = resync_bus::Envelope::new("listing.updated", "7", 2, data);
        resync_v2.stream = Stream::Resync;
        resync_v2.job_id = Some(uuid::Uuid::now_v7());
        let processor = w.processor(Duration::from_secs(5)).await;
        let mut subscription = w.transport.subscribe(&w.queue, Default::default()).await.expect("subscribe");
        let expected = [(v1, Outcome::Applied), (resync_v2, Outcome::Applied), (v2, Outcome::Duplicate)];
        for (event, outcome) in expected {
            w.publish(std::slice::from_ref(&event)).await;
            let delivery = next_delivery(&mut subscription).await;
            assert_eq!(processor.handle(delivery).await, outcome, "{:?} v{}", event.stream, event.version);
        }
        let versions: Vec<i64> = w.sink.writes.lock().unwrap().iter().map(|w| w.version).collect();
        assert_eq!(versions, [1, 2], "the resync brought the third party to v2");
    })
    .await;
}

/// A body over the envelope's 256 KiB limit, published by another client, reaches the
/// dead-letter queue unchanged as `invalid-envelope` with its size (the consumer's own publish
/// limit once refused it, and the broker then moved it with no reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_is_dead_lettered_with_its_size() {
    let world = World::new(rabbitmq().await).await;
    with_world(world, |w| async move {
        let body = vec![b'x'; 300 * 1024];
        let url = resync_testkit::Service::RabbitMq.url();
        let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .expect("raw AMQP connection");
        let channel = connection.create_channel().await.expect("channel");
        let options = lapin::options::BasicPublishOptions::default();
        let properties = lapin::BasicProperties::default();
        let routing_key = lapin::types::ShortString::from(w.queue.as_str());
        let confirm = channel
            .basic_publish("".into(), routing_key, options, &body, properties)
            .await
            .expect("publish 300 KiB");
        confirm.await.expect("published");
        let _ = connection.close(0, "done".into()).await;

        let processor = w.processor(Duration::from_secs(5)).await;
        let mut subscription = w.transport.subscribe(&w.queue, Default::default()).await.expect("subscribe");
        assert_eq!(processor.handle(next_delivery(&mut subscription).await).await, Outcome::DeadLettered);
        let mut dead =
            w.transport.subscribe(&dead_letter_queue_name(&w.queue), Default::default()).await.expect("dlq");
        let letter = next_delivery(&mut dead).await;
        assert_eq!(letter.attributes[attr::DEAD_LETTER_REASON], "invalid-envelope");
        let detail = &letter.attributes[attr::DEAD_LETTER_DETAIL];
        assert!(detail.contains(&body.len().to_string()), "the detail gives the size: {detail}");
        assert_eq!(letter.body.len(), body.len(), "the body is kept whole");
        letter.ack().await.expect("ack");
    })
    .await;
}
