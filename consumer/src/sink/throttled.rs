//! A sink behind the shared rate limit and adaptive concurrency (`resync-throttle`): every
//! call waits for a slot of the sink's rate (shared by all consumers through Redis) and for a
//! free place among this process's calls in flight; overload answers (429/503) lower both.
//! With a quota, every call also takes a unit of each budget (per minute, hour, day) and a place
//! among the fleet's calls in flight; a spent budget refuses the call as [`SinkError::Held`].

use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::Rng;
use resync_throttle::{
    AdaptiveConcurrency, CallOutcome, QuotaGate, QuotaTicket, SharedQuota, SharedRateLimiter,
};
use tracing::{debug, warn};

use crate::sink::{Sink, SinkError, SinkWrite};

pub struct ThrottledSink {
    inner: Box<dyn Sink>,
    rate: Option<SharedRateLimiter>,
    /// Adapt the shared rate to overload answers (else it stays at its configured maximum).
    adaptive_rate: bool,
    concurrency: Option<AdaptiveConcurrency>,
    quota: Option<SharedQuota>,
}

/// The longest pause between two asks for a place among the fleet's calls in flight.
const MAX_IN_FLIGHT_POLL: Duration = Duration::from_millis(200);

impl ThrottledSink {
    pub fn new(
        inner: Box<dyn Sink>,
        rate: Option<SharedRateLimiter>,
        adaptive_rate: bool,
        concurrency: Option<AdaptiveConcurrency>,
    ) -> Self {
        Self { inner, rate, adaptive_rate, concurrency, quota: None }
    }

    /// Also keeps the sink's budgets and its fleet-wide limit on calls in flight.
    pub fn with_quota(mut self, quota: SharedQuota) -> Self {
        self.quota = Some(quota);
        self
    }

    /// The shared rate in force, for the autoscaling signals (`None`: no shared limit).
    pub async fn current_rate(&self) -> Option<f64> {
        self.rate.as_ref()?.current_rate().await.ok()
    }

    /// This process's limit on calls in flight (`None`: not adaptive).
    pub fn concurrency_limit(&self) -> Option<usize> {
        self.concurrency.as_ref().map(AdaptiveConcurrency::limit)
    }

    /// A unit of every budget and a place in flight, waiting for the place; a spent budget
    /// refuses the call. Without Redis the budgets cannot be kept: retry later.
    async fn take_quota(&self, quota: &SharedQuota) -> Result<QuotaTicket, SinkError> {
        let mut pause = Duration::from_millis(5);
        loop {
            let gate = quota.take().await.map_err(|e| SinkError::Transient {
                reason: format!("sink quota unavailable: {e}"),
                retry_after: None,
                outage: false,
            })?;
            match gate {
                QuotaGate::Granted(ticket) => return Ok(ticket),
                QuotaGate::Spent { window, resets_in } => {
                    let reason =
                        format!("the sink's quota per {window:?} is spent; it turns in {resets_in:?}");
                    return Err(SinkError::Held { reason, resumes_in: resets_in });
                }
                QuotaGate::Busy => {
                    // Random, so waiters across the fleet do not ask in step.
                    let wait = rand::rng().random_range(Duration::ZERO..=pause);
                    tokio::time::sleep(wait).await;
                    pause = (pause * 2).min(MAX_IN_FLIGHT_POLL);
                }
            }
        }
    }

    async fn release_quota(&self, ticket: Option<QuotaTicket>) {
        let (Some(quota), Some(ticket)) = (&self.quota, ticket) else { return };
        if let Err(err) = quota.release(ticket).await {
            // The place comes back when its lease ends.
            debug!(error = %err, "could not give back a place among the sink's calls in flight");
        }
    }

    /// Tells the shared limiter the third party is overloaded. A Redis failure here only costs
    /// the adaptation, so it is logged, not returned.
    async fn report_overload(&self, err: &SinkError) {
        let Some(rate) = self.rate.as_ref().filter(|_| self.adaptive_rate) else { return };
        if let Err(redis) = rate.throttled(err.retry_after()).await {
            warn!(error = %redis, "could not lower the shared sink rate");
        }
    }
}

#[async_trait]
impl Sink for ThrottledSink {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn call_timeout(&self) -> Option<std::time::Duration> {
        self.inner.call_timeout()
    }

    fn held_for(&self) -> Option<Duration> {
        self.quota.as_ref()?.spent_for()
    }

    async fn apply(&self, write: &SinkWrite<'_>) -> Result<(), SinkError> {
        let permit = match &self.concurrency {
            Some(concurrency) => Some(concurrency.acquire().await),
            None => None,
        };
        let ticket = match &self.quota {
            Some(quota) => Some(self.take_quota(quota).await?),
            None => None,
        };
        if let Some(rate) = &self.rate {
            // Without Redis the shared limit cannot be kept: retry later rather than risk it.
            if let Err(e) = rate.acquire().await {
                self.release_quota(ticket).await;
                let reason = format!("shared rate limit unavailable: {e}");
                return Err(SinkError::Transient { reason, retry_after: None, outage: false });
            }
        }
        let started = Instant::now();
        let result = self.inner.apply(write).await;
        self.release_quota(ticket).await;
        let outcome = match &result {
            Ok(()) => CallOutcome::Success { latency: started.elapsed() },
            Err(err @ SinkError::Overloaded { .. }) => {
                self.report_overload(err).await;
                CallOutcome::Overloaded
            }
            Err(_) => CallOutcome::Failed,
        };
        if let Some(permit) = permit {
            permit.done(outcome);
        }
        result
    }
}
