//! `resync-consumer`: apply events from a service's queues to a third-party system, correctly.
//!
//! Owns: the per-event pipeline ([`Processor`]: decode, entity lock, the version rule, sink call
//! with retries, compare-and-set of the applied version, repair after a lost lock, ack /
//! requeue / dead-letter), the [`Sink`] trait and the built-in [`HttpSink`], the applied-version
//! store and what other parts read of it ([`records`]), pause/resume ([`control`]) and the consumer loop ([`Consumer`]). Does not own: the
//! transports (`bus`), locks (`locks`), topology (`fare`) or the schema (`migrations`).
//!
//! The version rule (see [`decision`]): an event is sent only if its version is newer than the
//! version recorded as applied for (sink, entity), and only if its content differs; the new
//! version is recorded with a compare-and-set after the call succeeds. Duplicates, redeliveries,
//! reordering and stale resync events are therefore acknowledged without a call, and a write
//! that raced a newer one (a lost lock) is repaired by re-sending the newest state.

pub mod autoscale;
pub mod control;
pub mod db;
pub mod decision;
pub mod metrics;
mod process;
pub mod records;
mod runner;
pub mod service;
pub mod sink;
pub mod store;

pub use db::{Db, Pooling};
pub use process::{Outcome, Processor, RetryPolicy, Tally};
pub use runner::{Consumer, ConsumerConfig, ConsumerError, QueueState};
pub use sink::http::HttpSink;
pub use sink::{Origin, Sink, SinkError, SinkWrite};
pub use store::AppliedStore;
