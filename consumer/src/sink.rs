//! Sinks: where events are applied. A [`Sink`] is a third-party API behind a trait; the built-in
//! [`http::HttpSink`] covers REST APIs configured in the service config.

pub mod http;
pub mod throttled;

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

/// One write to a sink: the entity's full state at `version`, or its deletion.
#[derive(Debug, Clone, Copy)]
pub struct SinkWrite<'a> {
    pub entity_type: &'a str,
    pub entity_id: &'a str,
    pub version: i64,
    pub event_id: Uuid,
    pub deleted: bool,
    pub data: &'a serde_json::Value,
    pub origin: Origin,
}

/// Where a write comes from, told to the third party (the HTTP sink's `X-Resync-Stream` and
/// `X-Resync-Job-Id`) so it can suppress side effects such as e-mails during a resync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Origin {
    /// A live change, or a repair re-sending the newest recorded state.
    #[default]
    Live,
    /// An event of a resync job.
    Resync { job_id: Option<Uuid> },
}

impl Origin {
    pub fn stream(self) -> &'static str {
        match self {
            Origin::Live => "live",
            Origin::Resync { .. } => "resync",
        }
    }

    pub fn job_id(self) -> Option<Uuid> {
        match self {
            Origin::Live => None,
            Origin::Resync { job_id } => job_id,
        }
    }
}

/// Why a write failed, as far as retrying is concerned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying: 429, 5xx, a timeout, a connection error. `retry_after` is the third
    /// party's own hint, honoured over the backoff when longer.
    /// `outage`: the third party was called and looks down (connection error, timeout, 5xx,
    /// 408, 425); false when the call never reached it (our own shared rate limit's Redis
    /// was unavailable).
    #[error("transient sink failure: {reason}")]
    Transient { reason: String, retry_after: Option<Duration>, outage: bool },
    /// The third party says it is overloaded (429, 503): retried like `Transient`, and a signal
    /// to send less (the shared rate and the adaptive concurrency go down).
    #[error("sink overloaded: {reason}")]
    Overloaded { status: u16, reason: String, retry_after: Option<Duration> },
    /// The third party refused the write for good (a 4xx other than 408/425/429); the event
    /// goes to the dead-letter queue with this status and body.
    #[error("sink rejected the write with status {status}: {body}")]
    Rejected { status: u16, body: String },
    /// The call was not made: a shared limit holds the sink (a spent quota) for `resumes_in`.
    /// The event waits, spending none of its attempts, or goes back to its queue for later.
    #[error("sink held: {reason}")]
    Held { reason: String, resumes_in: Duration },
}

impl SinkError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Transient { .. } | SinkError::Overloaded { .. } | SinkError::Held { .. })
    }

    /// The third party looks down rather than busy: no connection, no answer in time, or a
    /// 5xx (503 included). These count towards opening the sink's circuit; a 429 does not
    /// (the rate limit's business), nor does our own infrastructure failing.
    pub fn is_outage(&self) -> bool {
        match self {
            SinkError::Transient { outage, .. } => *outage,
            SinkError::Overloaded { status, .. } => *status >= 500,
            SinkError::Rejected { .. } | SinkError::Held { .. } => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SinkError::Transient { retry_after, .. } | SinkError::Overloaded { retry_after, .. } => {
                *retry_after
            }
            SinkError::Held { resumes_in, .. } => Some(*resumes_in),
            SinkError::Rejected { .. } => None,
        }
    }
}

/// A third-party system. Implement this for custom integrations; writes must be idempotent
/// for the same version (they are retried, and re-sent after a lost lock).
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// A stable name: the applied-version store and the lock keys are per sink name.
    fn name(&self) -> &str;

    async fn apply(&self, write: &SinkWrite<'_>) -> Result<(), SinkError>;

    /// The longest one call may take (its timeout), if bounded: a consumer starts a call only
    /// while its entity lock has at least this much lease left.
    fn call_timeout(&self) -> Option<std::time::Duration> {
        None
    }

    /// How long from now a shared limit refuses every call to this sink (a spent quota), as
    /// this process last heard: consumers take no new messages meanwhile.
    fn held_for(&self) -> Option<std::time::Duration> {
        None
    }
}
