//! # fare-config: subscriptions declared in service config
//!
//! Each service ships one config file (TOML or YAML) saying which events it publishes, which it
//! subscribes to on which streams, and (for `resync consume`) its sink. This crate owns that
//! format and its validation ([`config`]), the topology a set of services implies
//! ([`Topology`]), the difference between it and what a broker holds ([`Plan`]), making the
//! broker match ([`apply`], [`prune`]) and proving the routes with probe events ([`verify_routes`]).
//! It does not own the transports themselves nor how each broker is read and written
//! (`resync-bus`), nor running consumers (`resync-consumer`).

pub mod config;
pub mod topology;
pub mod verify;

pub use config::{
    Catalog, CircuitSpec, ConditionalSpec, ConfigError, ConsumerSpec, QuotaSpec, RateLimitSpec,
    ResponseClasses, ServiceConfig, SinkSpec, SourceData, SourceSpec, SubscriptionSpec, check_namespace,
    filter_problem, load_dir, load_str,
};
pub use topology::{ApplyError, Binding, Change, Plan, Topology, apply, delete, owner_mark, plan, prune};
pub use verify::{Probe, RouteVerification, verify_routes};
