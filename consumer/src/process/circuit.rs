//! The sink's shared circuit and quota as one event's calls meet them: hold while the third
//! party is down or its quota is spent (the entity lock renews itself meanwhile), be the
//! fleet's probe when it is this call's turn, and report how each call went. Failures while
//! the circuit is open are the outage's, and refusals of a spent quota the window's, not the
//! event's: they spend none of its attempts.

use super::*;

impl Processor {
    /// Waits while the sink's circuit is open; returns whether this call is the fleet's probe.
    /// `holding_since` accumulates over the event's calls: one that waited `max_hold` in all
    /// goes back to its queue. Without Redis the circuit cannot be read: the call is made.
    pub(super) async fn pass_circuit(&self, holding_since: &mut Option<Instant>) -> Result<bool, ApplyError> {
        let Some(circuit) = &self.circuit else { return Ok(false) };
        loop {
            match circuit.gate().await {
                Ok(Gate::Pass) => return Ok(false),
                Ok(Gate::Probe) => return Ok(true),
                Ok(Gate::Hold(wait)) => {
                    let since = *holding_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.retry.max_hold {
                        let reason = format!(
                            "the sink's circuit stayed open for {:?} (sink.circuit.max_hold); the event goes back to its queue",
                            self.retry.max_hold
                        );
                        return Err(SinkError::Held { reason, resumes_in: wait }.into());
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(err) => {
                    debug!(error = %err, "cannot read the sink's circuit; calling anyway");
                    return Ok(false);
                }
            }
        }
    }

    /// Tells the circuit how a call went. True when the circuit is not closed afterwards: the
    /// failure belongs to the outage, and the event waits for the circuit instead of retrying.
    pub(super) async fn report_to_circuit(&self, result: &Result<(), SinkError>, probe: bool) -> bool {
        let Some(circuit) = &self.circuit else { return false };
        let reported = match result {
            Err(err) if err.is_outage() => circuit.failed(probe, err.retry_after()).await,
            // The call never reached the third party (our own rate limit's Redis was down, or the
            // quota is spent): nothing to tell. An unmade probe is given to another after its lease.
            Err(SinkError::Transient { outage: false, .. } | SinkError::Held { .. }) => {
                return self.circuit_open();
            }
            // Any answer, a refusal or a 429 included, shows the third party is up.
            _ => circuit.succeeded(probe).await,
        };
        match reported {
            Ok(state) => state != CircuitState::Closed,
            Err(err) => {
                debug!(error = %err, "cannot report to the sink's circuit");
                false
            }
        }
    }

    /// A spent quota refused the call: wait for its window to turn when that comes within the
    /// event's `max_hold` (counted over all its holds), else go back to the queue at once:
    /// waiting longer would only keep the broker's copy in flight.
    pub(super) async fn hold_for_quota(
        &self,
        holding_since: &mut Option<Instant>,
        reason: String,
        resumes_in: Duration,
    ) -> Result<(), ApplyError> {
        let since = *holding_since.get_or_insert_with(Instant::now);
        if resumes_in > self.retry.max_hold.saturating_sub(since.elapsed()) {
            return Err(SinkError::Held { reason, resumes_in }.into());
        }
        debug!(?resumes_in, "sink quota spent; waiting for its window to turn");
        // Spread over a moment, so the fleet does not call in one burst when the window turns.
        let spread = Duration::from_millis(rand::random_range(0..250));
        tokio::time::sleep(resumes_in + spread).await;
        Ok(())
    }

    /// While the circuit is open, nobody gets anywhere with the sink: waiting for an entity's
    /// lock longer than usual costs nothing, while giving up would spend one of the event's
    /// deliveries on the outage.
    pub(super) async fn acquire_through_outage(&self, key: &str) -> Result<LockGuard, LockError> {
        let started = Instant::now();
        loop {
            match self.locker.acquire(key).await {
                Err(LockError::Timeout { .. })
                    if self.sink_held() && started.elapsed() < self.retry.max_hold =>
                {
                    debug!(key, "entity lock busy while the sink's circuit is open; waiting on");
                }
                other => return other,
            }
        }
    }

    /// Whether the sink's circuit is open, read from Redis at most once per its refresh
    /// interval (a process whose own calls do not fail learns of an opening this way).
    pub(crate) async fn circuit_refreshed_open(&self) -> bool {
        let Some(circuit) = &self.circuit else { return false };
        match circuit.is_open().await {
            Ok(open) => open,
            Err(err) => {
                debug!(error = %err, "cannot read the sink's circuit; keeping the last known state");
                self.circuit_open()
            }
        }
    }

    /// The sink's circuit is open or its quota spent, as this process last heard.
    pub(crate) fn sink_held(&self) -> bool {
        self.circuit_open() || self.sink.held_for().is_some()
    }

    /// How long this process last heard the sink's quota is spent for.
    pub(crate) fn quota_held_for(&self) -> Option<Duration> {
        self.sink.held_for()
    }

    /// This process's view of the sink's circuit: not closed.
    pub(crate) fn circuit_open(&self) -> bool {
        self.circuit.as_ref().is_some_and(|c| c.state() != CircuitState::Closed)
    }
}
