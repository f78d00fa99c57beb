//! After `apply`, publishing through the broker reaches exactly the subscribed queues, and a
//! second `apply` changes nothing that would disturb the first.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use fare_config::{Catalog, Topology, load_str};
use resync_bus::{Destination, Envelope, OutgoingMessage, Stream, Transport, TransportConfig};
use resync_testkit::{Service, service_unreachable, unique_name};

fn catalog() -> Catalog {
    let services = [
        (
            "listings.toml",
            "name = \"listings\"\npublishes = [\"listing.created\", \"listing.updated\", \"listing.deleted\"]",
        ),
        ("channel-sync.toml", "name = \"channel-sync\"\n[[subscriptions]]\ntypes = [\"listing.*\"]"),
        (
            "search.toml",
            "name = \"search\"\n[[subscriptions]]\ntypes = [\"listing.updated\", \"listing.deleted\"]\nstreams = [\"live\"]",
        ),
    ];
    let services = services.iter().map(|(file, text)| load_str(file, text).expect("valid")).collect();
    Catalog::new(services).expect("valid catalog")
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
    let second = fare_config::apply(transport.as_ref(), &topology).await.expect("apply again");
    assert_eq!(first, second, "a second apply ensures the same topology");

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
