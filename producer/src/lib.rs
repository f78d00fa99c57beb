//! `resync-producer`: record domain events in the application's own transaction and get them
//! to the broker, in order, at least once.
//!
//! Owns: [`emit`] (the Rust side of the transactional outbox; plain SQL callers use the
//! `resync.emit(...)` function the migrations install), the [`Relay`] that publishes committed
//! events in order with publisher confirms and leader election among several relays, and the
//! event log operations [`replay`], [`prune`] and [`extent`], and the version counter
//! ([`versions`]) that `resync.emit` keeps and resync jobs read. Does not own: the schema (the `migrations`
//! crate), broker topology (`fare`), or consuming (the `consumer` crate).
//!
//! Ordering: `emit` bumps the entity's version under a row lock and then takes the next global
//! sequence number, so for one entity a higher version always has a higher sequence number and
//! commits later. The relay reads committed, unpublished events in sequence order; a newer
//! version is never visible before an older one, so per-entity order is publish order.

mod emit;
mod log;
pub mod metrics;
mod relay;
pub mod versions;

pub use emit::{EmitError, EmittedEvent, NewEvent, emit};
pub use log::{
    LogError, LogExtent, LoggedEvent, Parked, ReplayRequest, ReplayTarget, Replayed, drop_parked,
    entity_events, extent, parked, prune, release_parked, replay,
};
pub use relay::{Relay, RelayConfig, RelayError, RelayStatus};
pub use resync_migrations::Schema;

/// The topic live events of an entity type are published to.
pub fn live_topic(namespace: Option<&str>, entity_type: &str) -> String {
    resync_bus::naming::topic_name(namespace, entity_type, resync_bus::Stream::Live)
}
