//! `fare plan`, `apply`, `prune` and `verify` against the real brokers: after `apply`,
//! publishing reaches exactly the subscribed queues and a second `apply` changes nothing; an
//! edited subscription plans as exactly that change; `prune` deletes a removed service's queues
//! and nothing it did not create; `verify` finds a broken route.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use fare_config::{Catalog, Change, Topology, load_str};
use resync_bus::{Destination, Envelope, OutgoingMessage, Stream, Transport, TransportConfig};
use resync_testkit::{Service, service_unreachable, unique_name};

const LISTINGS: &str =
    "name = \"listings\"\npublishes = [\"listing.created\", \"listing.updated\", \"listing.deleted\"]";
const CHANNEL_SYNC: &str = "name = \"channel-sync\"\n[[subscriptions]]\ntypes = [\"listing.*\"]";
const SEARCH: &str = "name = \"search\"\n[[subscriptions]]\ntypes = [\"listing.updated\", \"listing.deleted\"]\nstreams = [\"live\"]";

fn catalog_of(services: &[&str]) -> Catalog {
    let services = services
        .iter()
        .enumerate()
        .map(|(i, text)| load_str(format!("{i}.toml"), text).expect("valid"))
        .collect();
    Catalog::new(services).expect("valid catalog")
}

fn catalog() -> Catalog {
    catalog_of(&[LISTINGS, CHANNEL_SYNC, SEARCH])
}

async fn connect(kind: &str) -> Arc<dyn Transport> {
    let service = if kind == "rabbitmq" { Service::RabbitMq } else { Service::SnsSqs };
    match TransportConfig::named(kind).expect("transport").connect().await {
        Ok(transport) => transport,
        Err(err) => service_unreachable(service, err),
    }
}

/// Event types that arrive in `queue` within a short wait (all acked).
async fn received(transport: &Arc<dyn Transport>, queue: &str, expected: usize) -> BTreeSet<String> {
    let mut subscription = transport.subscribe(queue, Default::default()).await.expect("subscribe");
    let mut types = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // Wait for what should come, then a little longer for what should not.
    let mut quiet_polls = 0;
    while tokio::time::Instant::now() < deadline && (types.len() < expected || quiet_polls < 2) {
        let batch = subscription.next_batch(10, Duration::from_millis(500)).await.expect("receive");
        if batch.is_empty() && types.len() >= expected {
            quiet_polls += 1;
        }
        for delivery in batch {
            types.insert(delivery.envelope(&Default::default()).expect("envelope").event_type);
            delivery.ack().await.expect("ack");
        }
    }
    let _ = subscription.close().await;
    types
}

async fn apply_routes_each_type_to_exactly_its_subscribers(kind: &str) {
    let transport = connect(kind).await;
    let namespace = unique_name("fare");
    let topology = Topology::desired(&catalog(), Some(&namespace));

    let first = fare_config::apply(transport.as_ref(), &topology).await.expect("apply");
    assert_eq!(first.len(), 2 + 3 + 3, "two topics, three queues, three routes: {first:#?}");
    let second = fare_config::apply(transport.as_ref(), &topology).await.expect("apply again");
    assert_eq!(second, [], "a second apply changes nothing");
    let plan = fare_config::plan(transport.as_ref(), &topology).await.expect("plan");
    assert!(plan.is_empty() && plan.not_owned.is_empty(), "the broker matches the config: {plan:#?}");

    let live = Destination::Topic(resync_bus::naming::topic_name(Some(&namespace), "listing", Stream::Live));
    let resync =
        Destination::Topic(resync_bus::naming::topic_name(Some(&namespace), "listing", Stream::Resync));
    for event_type in ["listing.created", "listing.updated"] {
        let event = Envelope::new(event_type, "1", 1, serde_json::json!({}));
        transport.publish(&live, OutgoingMessage::from_envelope(&event)).await.expect("publish live");
    }
    let mut resync_event = Envelope::new("listing.updated", "1", 1, serde_json::json!({}));
    resync_event.stream = Stream::Resync;
    resync_event.job_id = Some(uuid::Uuid::now_v7());
    transport.publish(&resync, OutgoingMessage::from_envelope(&resync_event)).await.expect("publish resync");

    let queue = |service: &str, stream| resync_bus::naming::queue_name(Some(&namespace), service, stream);
    let types = |list: &[&str]| list.iter().map(|t| t.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        received(&transport, &queue("channel-sync", Stream::Live), 2).await,
        types(&["listing.created", "listing.updated"]),
        "`listing.*` receives every listing type"
    );
    assert_eq!(
        received(&transport, &queue("search", Stream::Live), 1).await,
        types(&["listing.updated"]),
        "a filtered subscription receives only its types"
    );
    assert_eq!(
        received(&transport, &queue("channel-sync", Stream::Resync), 1).await,
        types(&["listing.updated"]),
        "the resync stream reaches only resync queues"
    );

    fare_config::delete(transport.as_ref(), &topology).await.expect("cleanup");
}

#[tokio::test]
async fn rabbitmq_apply_routes_each_type_to_exactly_its_subscribers() {
    apply_routes_each_type_to_exactly_its_subscribers("rabbitmq").await;
}

#[tokio::test]
async fn sns_sqs_apply_routes_each_type_to_exactly_its_subscribers() {
    apply_routes_each_type_to_exactly_its_subscribers("sns-sqs").await;
}

async fn editing_one_subscription_plans_exactly_that_change(kind: &str) {
    let transport = connect(kind).await;
    let namespace = unique_name("fare");
    let before = Topology::desired(&catalog(), Some(&namespace));
    fare_config::apply(transport.as_ref(), &before).await.expect("apply");

    let edited = SEARCH.replace("\"listing.deleted\"", "\"listing.created\"");
    let after = Topology::desired(&catalog_of(&[LISTINGS, CHANNEL_SYNC, &edited]), Some(&namespace));
    let plan = fare_config::plan(transport.as_ref(), &after).await.expect("plan");

    let topic = resync_bus::naming::topic_name(Some(&namespace), "listing", Stream::Live);
    let queue = resync_bus::naming::queue_name(Some(&namespace), "search", Stream::Live);
    let route =
        |patterns: &[&str]| (topic.clone(), queue.clone(), patterns.iter().map(|p| p.to_string()).collect());
    let (t, q, created) = route(&["listing.created"]);
    let (_, _, deleted) = route(&["listing.deleted"]);
    assert_eq!(
        plan.changes,
        [
            Change::Bind { topic: t.clone(), queue: q.clone(), patterns: created },
            Change::Unbind { topic: t, queue: q, patterns: deleted },
        ],
        "exactly the edited route changes"
    );
    assert_eq!(plan.prune, []);

    let applied = fare_config::apply(transport.as_ref(), &after).await.expect("apply the edit");
    assert_eq!(applied, plan.changes);
    assert!(fare_config::plan(transport.as_ref(), &after).await.expect("plan").is_empty());
    for event_type in ["listing.deleted", "listing.created"] {
        let event = Envelope::new(event_type, "1", 1, serde_json::json!({}));
        transport
            .publish(&Destination::Topic(topic.clone()), OutgoingMessage::from_envelope(&event))
            .await
            .expect("publish");
    }
    assert_eq!(
        received(&transport, &queue, 1).await,
        BTreeSet::from(["listing.created".to_string()]),
        "the edited subscription gets the new type and no longer the old one"
    );

    fare_config::delete(transport.as_ref(), &after).await.expect("cleanup");
}

#[tokio::test]
async fn rabbitmq_editing_one_subscription_plans_exactly_that_change() {
    editing_one_subscription_plans_exactly_that_change("rabbitmq").await;
}

#[tokio::test]
async fn sns_sqs_editing_one_subscription_plans_exactly_that_change() {
    editing_one_subscription_plans_exactly_that_change("sns-sqs").await;
}

async fn prune_removes_a_deleted_services_queues_and_nothing_else(kind: &str) {
    let transport = connect(kind).await;
    let namespace = unique_name("fare");
    let full = Topology::desired(&catalog(), Some(&namespace));
    fare_config::apply(transport.as_ref(), &full).await.expect("apply");
    // Beside it: a queue in the namespace fare did not create, and the same services applied
    // in a namespace whose names start with this one's prefix.
    let manual = resync_bus::QueueSpec::new(format!("{namespace}-manual-live"));
    transport.declare_queue(&manual).await.expect("declare an unowned queue");
    let neighbour = Topology::desired(&catalog(), Some(&format!("{namespace}-b")));
    fare_config::apply(transport.as_ref(), &neighbour).await.expect("apply the neighbour namespace");

    let without_search = Topology::desired(&catalog_of(&[LISTINGS, CHANNEL_SYNC]), Some(&namespace));
    let search = resync_bus::naming::queue_name(Some(&namespace), "search", Stream::Live);
    let plan = fare_config::plan(transport.as_ref(), &without_search).await.expect("plan");
    assert_eq!(plan.prune, [Change::DeleteQueue { queue: search.clone() }], "{plan:#?}");
    assert_eq!(plan.changes, [], "apply never deletes");

    let deleted = fare_config::prune(transport.as_ref(), &without_search).await.expect("prune");
    assert_eq!(deleted, plan.prune);

    let left = transport.inventory(&format!("{namespace}-")).await.expect("inventory");
    assert!(!left.queues.contains_key(&search), "the removed service's queue is gone");
    let dlq = resync_bus::dead_letter_queue_name(&search);
    assert!(
        transport.inventory(&dlq).await.expect("inventory").queues.is_empty(),
        "and its dead-letter queue"
    );
    for queue in without_search.queues.keys().chain(neighbour.queues.keys()).chain([&manual.name]) {
        assert!(left.queues.contains_key(queue), "{queue} is untouched");
    }
    assert!(fare_config::plan(transport.as_ref(), &without_search).await.expect("plan").is_empty());

    fare_config::delete(transport.as_ref(), &full).await.expect("cleanup");
    fare_config::delete(transport.as_ref(), &neighbour).await.expect("cleanup");
    transport.delete_queue(&manual.name).await.expect("cleanup");
}

#[tokio::test]
async fn rabbitmq_prune_removes_a_deleted_services_queues_and_nothing_else() {
    prune_removes_a_deleted_services_queues_and_nothing_else("rabbitmq").await;
}

#[tokio::test]
async fn sns_sqs_prune_removes_a_deleted_services_queues_and_nothing_else() {
    prune_removes_a_deleted_services_queues_and_nothing_else("sns-sqs").await;
}

async fn verify_confirms_routes_and_finds_a_broken_one(kind: &str) {
    let transport = connect(kind).await;
    let namespace = unique_name("fare");
    let topology = Topology::desired(&catalog(), Some(&namespace));
    fare_config::apply(transport.as_ref(), &topology).await.expect("apply");

    let verified = fare_config::verify_routes(transport.as_ref(), &topology, Duration::from_secs(20))
        .await
        .expect("verify");
    assert!(verified.ok(), "every route delivers as declared: {verified:#?}");
    assert_eq!(
        verified.probes.len(),
        4,
        "listing.* and listing.updated/deleted on live, listing.* on resync"
    );

    let topic = resync_bus::naming::topic_name(Some(&namespace), "listing", Stream::Live);
    let search = resync_bus::naming::queue_name(Some(&namespace), "search", Stream::Live);
    let routed_away = resync_bus::Filter::types(["listing.deleted"]);
    transport.unbind(&topic, &search, &routed_away).await.expect("break a route behind fare's back");

    let broken = fare_config::verify_routes(transport.as_ref(), &topology, Duration::from_secs(5))
        .await
        .expect("verify");
    let failed: Vec<_> = broken.probes.iter().filter(|p| !p.ok()).collect();
    assert_eq!(failed.len(), 1, "{broken:#?}");
    assert_eq!((failed[0].event_type.as_str(), failed[0].missing()), ("listing.deleted", vec![&search]));
    for queue in topology.queues.keys() {
        let depth = transport.queue_depth(queue).await.expect("depth");
        assert_eq!(depth.ready + depth.in_flight, 0, "no probe is left behind in {queue}");
    }

    fare_config::delete(transport.as_ref(), &topology).await.expect("cleanup");
}

#[tokio::test]
async fn rabbitmq_verify_confirms_routes_and_finds_a_broken_one() {
    verify_confirms_routes_and_finds_a_broken_one("rabbitmq").await;
}

#[tokio::test]
async fn sns_sqs_verify_confirms_routes_and_finds_a_broken_one() {
    verify_confirms_routes_and_finds_a_broken_one("sns-sqs").await;
}
