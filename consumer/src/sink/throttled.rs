//! A sink behind the shared rate limit and adaptive concurrency (`resync-throttle`): every
//! call waits for a slot of the sink's rate (shared by all consumers through Redis) and for a
//! free place among this process's calls in flight; overload answers (429/503) lower both.

use std::time::Instant;

use async_trait::async_trait;
use resync_throttle::{AdaptiveConcurrency, Outcome, SharedRateLimiter};
use tracing::warn;

use crate::sink::{Sink, SinkError, SinkWrite};

pub struct ThrottledSink {
    inner: Box<dyn Sink>,
    rate: Option<SharedRateLimiter>,
    /// Adapt the shared rate to overload answers (else it stays at its configured maximum).
    adaptive_rate: bool,
    concurrency: Option<AdaptiveConcurrency>,
}

impl ThrottledSink {
    pub fn new(
        inner: Box<dyn Sink>,
        rate: Option<SharedRateLimiter>,
        adaptive_rate: bool,
        concurrency: Option<AdaptiveConcurrency>,
    ) -> Self {
        Self { inner, rate, adaptive_rate, concurrency }
    }

    /// The shared rate in force, for the autoscaling signals (`None`: no shared limit).
    pub async fn current_rate(&self) -> Option<f64> {
        self.rate.as_ref()?.current_rate().await.ok()
    }

    /// This process's limit on calls in flight (`None`: not adaptive).
    pub fn concurrency_limit(&self) -> Option<usize> {
        self.concurrency.as_ref().map(AdaptiveConcurrency::limit)
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

    async fn apply(&self, write: &SinkWrite<'_>) -> Result<(), SinkError> {
        let permit = match &self.concurrency {
            Some(concurrency) => Some(concurrency.acquire().await),
            None => None,
        };
        if let Some(rate) = &self.rate {
            // Without Redis the shared limit cannot be kept: retry later rather than risk it.
            rate.acquire().await.map_err(|e| SinkError::Transient {
                reason: format!("shared rate limit unavailable: {e}"),
                retry_after: None,
                outage: false,
            })?;
        }
        let started = Instant::now();
        let result = self.inner.apply(write).await;
        let outcome = match &result {
            Ok(()) => Outcome::Success { latency: started.elapsed() },
            Err(err @ SinkError::Overloaded { .. }) => {
                self.report_overload(err).await;
                Outcome::Overloaded
            }
            Err(_) => Outcome::Failed,
        };
        if let Some(permit) = permit {
            permit.done(outcome);
        }
        result
    }
}
