//! Connecting to each transport, unique topology per test, and cleanup that runs even when
//! the test body panics.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use resync_bus::{
    Delivery, Destination, Envelope, Filter, MemoryTransport, OutgoingMessage, QueueSpec, RabbitMqConfig,
    RabbitMqTransport, SnsSqsConfig, SnsSqsTransport, Subscription, Transport,
};
use resync_testkit::{Service, service_unreachable, unique_name};

/// Logs from the code under test, shown for failing tests (`RUST_LOG` overrides the level).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

pub(crate) async fn memory() -> Arc<dyn Transport> {
    init_tracing();
    Arc::new(MemoryTransport::new())
}

pub(crate) fn rabbitmq_config(connection_name: &str) -> RabbitMqConfig {
    let mut config = RabbitMqConfig::new(Service::RabbitMq.url());
    config.connection_name = connection_name.to_string();
    config
}

pub(crate) async fn rabbitmq_named(connection_name: &str) -> Arc<dyn Transport> {
    init_tracing();
    match RabbitMqTransport::connect(rabbitmq_config(connection_name)).await {
        Ok(t) => Arc::new(t),
        Err(err) => service_unreachable(Service::RabbitMq, err),
    }
}

pub(crate) async fn rabbitmq() -> Arc<dyn Transport> {
    rabbitmq_named(&unique_name("it")).await
}

pub(crate) async fn sns_sqs() -> Arc<dyn Transport> {
    init_tracing();
    let mut config = SnsSqsConfig::from_env();
    config.endpoint_url = Some(Service::SnsSqs.url());
    match SnsSqsTransport::connect(config).await {
        Ok(t) => Arc::new(t),
        Err(err) => service_unreachable(Service::SnsSqs, err),
    }
}

/// A topic and queues with names no other test uses, deleted when the test ends.
pub(crate) struct Topology {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) topic: String,
    pub(crate) queues: Vec<String>,
}

impl Topology {
    /// A topic and `queues` queues bound to it with `Filter::all()`.
    pub(crate) async fn new(transport: Arc<dyn Transport>, queues: usize) -> Self {
        Self::with_specs(
            transport,
            (0..queues).map(|_| (QueueSpec::new(unique_name("q")), Filter::all())).collect(),
        )
        .await
    }

    pub(crate) async fn with_specs(transport: Arc<dyn Transport>, specs: Vec<(QueueSpec, Filter)>) -> Self {
        let topic = unique_name("t");
        transport.declare_topic(&topic, None).await.expect("declare topic");
        let mut queues = Vec::new();
        for (spec, filter) in specs {
            transport.declare_queue(&spec).await.expect("declare queue");
            transport.bind(&topic, &spec.name, &filter).await.expect("bind");
            queues.push(spec.name);
        }
        Self { transport, topic, queues }
    }

    pub(crate) fn topic(&self) -> Destination {
        Destination::Topic(self.topic.clone())
    }

    pub(crate) async fn subscribe(&self, queue: usize) -> Box<dyn Subscription> {
        self.transport.subscribe(&self.queues[queue], Default::default()).await.expect("subscribe")
    }

    pub(crate) async fn subscribe_dlq(&self, queue: usize) -> Box<dyn Subscription> {
        let dlq = resync_bus::dead_letter_queue_name(&self.queues[queue]);
        self.transport.subscribe(&dlq, Default::default()).await.expect("subscribe to DLQ")
    }

    async fn delete(&self) {
        for queue in &self.queues {
            if let Err(err) = self.transport.delete_queue(queue).await {
                eprintln!("cleanup: could not delete queue {queue}: {err}");
            }
        }
        if let Err(err) = self.transport.delete_topic(&self.topic).await {
            eprintln!("cleanup: could not delete topic {}: {err}", self.topic);
        }
    }
}

/// Runs `body` with a fresh topology and deletes it afterwards, also when `body` panics.
pub(crate) async fn with_topology<F, Fut>(topology: Topology, body: F)
where
    F: FnOnce(Arc<Topology>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let topology = Arc::new(topology);
    let outcome = tokio::spawn(body(topology.clone())).await;
    topology.delete().await;
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
}

pub(crate) fn event(entity_id: &str, version: i64) -> Envelope {
    Envelope::new(
        "listing.updated",
        entity_id,
        version,
        serde_json::json!({"title": format!("listing {entity_id} v{version}")}),
    )
}

pub(crate) fn message(entity_id: &str, version: i64) -> OutgoingMessage {
    OutgoingMessage::from_envelope(&event(entity_id, version))
}

/// Receives until `count` deliveries arrived or `limit` passed (a hang guard, not a timing
/// assertion); returns what arrived.
pub(crate) async fn receive(
    subscription: &mut dyn Subscription,
    count: usize,
    limit: Duration,
) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut received = Vec::new();
    while received.len() < count {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let batch = subscription
            .next_batch(count - received.len(), left.min(Duration::from_secs(2)))
            .await
            .expect("next_batch");
        received.extend(batch);
    }
    received
}

/// Asserts nothing arrives within `window` (the window is what is being asserted: silence).
pub(crate) async fn assert_nothing_arrives(subscription: &mut dyn Subscription, window: Duration) {
    let batch = subscription.next_batch(10, window).await.expect("next_batch");
    assert!(batch.is_empty(), "expected no message, got {batch:?}");
}

pub(crate) fn entity_of(delivery: &Delivery) -> String {
    delivery.envelope(&Default::default()).expect("valid envelope").entity_id
}
