//! # fare-config: subscriptions declared in service config
//!
//! Each service ships one config file saying which events it publishes, which it subscribes to
//! on which streams, and (for `resync consume`) its sink. This crate owns that format and its
//! validation ([`config`]), the topology a set of services implies ([`Topology`]) and applying
//! it to a broker through a [`resync_bus::Transport`] ([`apply`]). It does not own the
//! transports themselves (`resync-bus`) nor running consumers (`resync-consumer`).
//!
//! Still to come (see the issue): `plan` as a diff against what the broker holds, ownership
//! marks, `prune` and `verify`.

pub mod config;
pub mod topology;

pub use config::{
    Catalog, ConfigError, ConsumerSpec, ServiceConfig, SinkSpec, Subscription, load_dir, load_str,
};
pub use topology::{Binding, Ensured, Topology, apply, delete};
