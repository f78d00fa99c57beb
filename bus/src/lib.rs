//! `resync-bus`: the event envelope and the transports that carry it.
//!
//! Owns: the [`Envelope`] (its JSON shape, validation on decode, JSON Schema), and the
//! [`Transport`] abstraction with three implementations — RabbitMQ ([`RabbitMqTransport`]),
//! SNS/SQS ([`SnsSqsTransport`]) and in-memory ([`MemoryTransport`], for unit tests and the
//! embedded demo) — that pass one shared contract test suite. Does not own: what a consumer
//! does with an event (the `consumer` crate), the declared topology of a system of services
//! (`fare`), or where events come from (`producer`, `snapshotter`).
//!
//! ```no_run
//! use std::time::Duration;
//! use resync_bus::{Destination, Envelope, Filter, OutgoingMessage, QueueSpec, Transport};
//! use resync_bus::transport::memory::MemoryTransport;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = MemoryTransport::new();
//! transport.declare_topic("listings-live", None).await?;
//! transport.declare_queue(&QueueSpec::new("search-live")).await?;
//! transport.bind("listings-live", "search-live", &Filter::types(["listing.*"])).await?;
//!
//! let event = Envelope::new("listing.updated", "42", 7, serde_json::json!({"title": "flat"}));
//! let topic = Destination::Topic("listings-live".into());
//! transport.publish(&topic, OutgoingMessage::from_envelope(&event)).await?;
//!
//! let mut subscription = transport.subscribe("search-live", Default::default()).await?;
//! for delivery in subscription.next_batch(10, Duration::from_secs(1)).await? {
//!     let event = delivery.envelope(&Default::default())?;
//!     println!("{} v{}", event.entity_id, event.version);
//!     delivery.ack().await?;
//! }
//! # Ok(()) }
//! ```

pub mod config;
pub mod envelope;
pub mod naming;
pub mod transport;

pub use config::TransportConfig;
pub use envelope::{DecodeLimits, Envelope, EnvelopeError, Routing, Stream};
pub use transport::memory::MemoryTransport;
pub use transport::rabbitmq::{RabbitMqConfig, RabbitMqTransport};
pub use transport::sns_sqs::{SnsSqsConfig, SnsSqsTransport};
pub use transport::{
    Attributes, DeadLetter, DeadLetterReason, Delivery, Destination, FailedEntry, Filter, Inventory,
    OWNER_MARK, ObservedQueue, OutgoingMessage, QueueDepth, QueueSpec, SubscribeOptions, Subscription,
    Transport, TransportError, attr, dead_letter_queue_name,
};

/// The one retry schedule of resync: exponential from `min` to `max`, with jitter (so processes
/// that failed together do not retry together), never giving up by count (callers stop on a
/// deadline or a permanent error).
pub fn backoff(min: std::time::Duration, max: std::time::Duration) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}
