//! # resync-apisim: a stand-in for a third-party API
//!
//! An HTTP service that plays the CRM or channel manager resync keeps in sync, for tests, the
//! demo and benchmarks. It stores whatever it is sent, last write wins (as a real API would),
//! and records every applied write in a log so a checker can **prove** that no older version
//! of an entity was ever written after a newer one (`GET /check`). Faults are injected on
//! demand: latency, rate limiting (429 with `Retry-After` and `Retry-After-Ms`), random
//! 500/503, non-retryable rejections, outages, and writes that are applied but answered with a
//! late 504.
//!
//! This crate owns the simulator (server, fault engine, write log, check), its `apisim`
//! binary and a small typed [`Client`]. It does not own the sink that writes to it (that is
//! `resync-consumer`'s HTTP sink) nor any notion of what is *expected*: it reports what
//! happened, checkers decide whether that was right.
//!
//! ## HTTP API
//!
//! | route | what |
//! |---|---|
//! | `PUT /entities/{entity_type}/{entity_id}` | upsert the JSON body; 201 on create, else 200 |
//! | `DELETE /entities/{entity_type}/{entity_id}` | tombstone; 200, also when absent |
//! | `GET /entities/{entity_type}/{entity_id}` | `{version, data, deleted}` or 404 |
//! | `GET /state` | every entity, keyed `"<entity_type>/<entity_id>"` |
//! | `GET /log?since=&limit=` | applied writes in apply order ([`LogEntry`]) |
//! | `GET /check` | stale overwrites, duplicates, unversioned writes ([`CheckReport`]) |
//! | `GET /admin/stats` | counters and the config in force ([`Stats`]) |
//! | `GET`, `PUT /admin/faults` | the [`Config`]; `PUT` merges a [`FaultsPatch`] |
//! | `POST /admin/reset` | clears state, log, stats and faults |
//! | `GET /healthz` | 200 |
//!
//! Writes carry `X-Resync-Entity-Version` and `X-Resync-Event-Id`; faults apply to writes only.
//!
//! ## Example
//!
//! ```no_run
//! use resync_apisim::{Config, FaultsPatch};
//!
//! # async fn demo() -> Result<(), resync_apisim::Error> {
//! let sim = resync_apisim::start(Config { rate_limit_per_sec: Some(500.0), ..Config::default() }).await?;
//! // Point a resync HTTP sink at `{url}/entities/{entity_type}/{entity_id}`.
//! println!("sink url: {}/entities/{{entity_type}}/{{entity_id}}", sim.url());
//! let client = sim.client()?;
//! client.set_faults(&FaultsPatch { error_rate: Some(0.1), ..FaultsPatch::default() }).await?;
//! // ... run consumers ...
//! let report = client.check().await?;
//! assert!(report.ok, "stale overwrites: {:?}", report.stale_overwrites);
//! sim.shutdown().await?;
//! # Ok(())
//! # }
//! ```

mod client;
mod config;
mod faults;
mod model;
mod server;
mod store;

pub use client::Client;
pub use config::{Config, FaultsPatch, Latency, Outage, OutageNow};
pub use model::{CheckReport, EntityState, LogEntry, Op, StaleOverwrite, Stats, WriteAck};
pub use server::{
    DEFAULT_LOG_LIMIT, EVENT_ID_HEADER, MAX_LOG_LIMIT, Running, VERSION_HEADER, serve, start, start_on,
};

/// Everything that can go wrong starting, running or calling the simulator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range; `field` names it.
    #[error("config.{field}: {problem}")]
    InvalidConfig { field: &'static str, problem: String },
    /// Binding or serving failed.
    #[error("apisim server: {0}")]
    Io(#[from] std::io::Error),
    /// The server task panicked or was cancelled.
    #[error("apisim server task: {0}")]
    Task(String),
    /// A request to the simulator failed (connect, timeout, decode).
    #[error("calling apisim: {0}")]
    Http(#[from] reqwest::Error),
    /// The simulator answered with a non-success status.
    #[error("apisim answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    /// The base URL is not usable.
    #[error("apisim url: {0}")]
    Url(String),
}
