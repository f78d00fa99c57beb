//! The JSON the simulator answers with, as Rust types shared by the server and [`Client`].
//!
//! [`Client`]: crate::Client

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Config;

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// `PUT /entities/{entity_type}/{entity_id}`.
    Upsert,
    /// `DELETE /entities/{entity_type}/{entity_id}` (a tombstone).
    Delete,
}

/// The current state of one entity (`GET /entities/..`, and the values of `GET /state`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityState {
    /// The version of the last applied write (`None` if it carried no version header): the
    /// last write wins here, as in a real third-party API, stale or not.
    pub version: Option<i64>,
    /// The body of the last upsert; `null` after a delete.
    pub data: Value,
    /// Whether the last applied write was a delete.
    pub deleted: bool,
}

/// The answer to an applied write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteAck {
    pub entity_type: String,
    pub entity_id: String,
    pub version: Option<i64>,
}

/// One applied write (`GET /log`), in apply order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// 1, 2, 3, ... in apply order.
    pub seq: u64,
    pub entity_type: String,
    pub entity_id: String,
    /// `X-Resync-Entity-Version`, when the write carried it.
    pub version: Option<i64>,
    pub op: Op,
    /// When it was applied.
    pub at: DateTime<Utc>,
    /// `X-Resync-Event-Id`, when the write carried it.
    pub event_id: Option<String>,
    /// `X-Resync-Stream` (`live` or `resync`), when the write carried it.
    #[serde(default)]
    pub stream: Option<String>,
    /// `X-Resync-Job-Id`, when the write carried it.
    #[serde(default)]
    pub job_id: Option<String>,
}

/// A write of `version_written` applied after a write of the newer
/// `newer_version_already_written` to the same entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleOverwrite {
    pub entity_type: String,
    pub entity_id: String,
    pub version_written: i64,
    pub newer_version_already_written: i64,
    /// The stale write's place in the log.
    pub seq: u64,
}

/// `GET /check`: the proof (or disproof) that no older version overwrote a newer one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Applied writes.
    pub writes: u64,
    /// Entities ever written (tombstones included).
    pub entities: u64,
    /// Every stale overwrite, in apply order.
    pub stale_overwrites: Vec<StaleOverwrite>,
    /// Writes whose version equals the newest already written (not stale).
    pub duplicate_writes: u64,
    /// Writes without `X-Resync-Entity-Version` (they cannot be judged).
    pub unversioned_writes: u64,
    /// No stale overwrite.
    pub ok: bool,
}

/// `GET /admin/stats`. `requests` and `by_status` count writes (`PUT`/`DELETE /entities/..`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Writes received.
    pub requests: u64,
    /// Writes applied (including those then answered 504).
    pub applied: u64,
    /// Answers to writes by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Milliseconds since the server started.
    pub uptime_ms: u64,
    /// Milliseconds left of the outage under way, if any.
    pub outage_remaining_ms: Option<u64>,
    /// The fault configuration in force.
    pub config: Config,
}

impl Stats {
    /// Answers with this status so far.
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
}
