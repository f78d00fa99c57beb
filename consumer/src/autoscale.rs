//! Autoscaling signals on `/metrics`: the backlog of the service's queues, this process's
//! processing rate, the sink's capacity (the shared rate in force) and, from them, how many
//! consumer replicas would drain the backlog in time without exceeding what the sink can take.
//! A KEDA `prometheus` trigger or any HPA can scale on `resync_consumer_recommended_replicas`.

use std::sync::Arc;
use std::time::Duration;

use resync_bus::Transport;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use resync_throttle::SharedCircuit;

use crate::sink::Sink;
use crate::sink::throttled::ThrottledSink;
use crate::{Outcome, Tally};

/// What a recommendation is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Inputs {
    /// Messages waiting (and in flight) over the service's queues.
    pub backlog: u64,
    /// Events per second one replica has shown it can process (its recent peak).
    pub per_replica: f64,
    /// Requests per second the sink takes in total (`None`: unknown, no shared limit).
    pub sink_capacity: Option<f64>,
    /// How soon the backlog should be gone.
    pub drain_target: Duration,
}

/// Replicas that drain the backlog within the target, never more than the sink can use (its
/// capacity over one replica's rate), at least one. Without a measured rate yet: one.
pub fn recommended_replicas(inputs: &Inputs) -> u32 {
    if inputs.per_replica <= 0.0 {
        return 1;
    }
    let wanted = inputs.backlog as f64 / inputs.drain_target.as_secs_f64().max(1.0);
    let mut replicas = (wanted / inputs.per_replica).ceil();
    if let Some(capacity) = inputs.sink_capacity {
        replicas = replicas.min((capacity / inputs.per_replica).ceil());
    }
    replicas.clamp(1.0, f64::from(u32::MAX)) as u32
}

/// Samples the signals every `interval` and publishes them as gauges.
pub struct Autoscaler {
    pub transport: Arc<dyn Transport>,
    pub queues: Vec<String>,
    pub tally: Arc<Tally>,
    pub sink: Arc<ThrottledSink>,
    /// While the sink's circuit is open the backlog grows and nothing is processed: the
    /// recommendation then stays where it was (more replicas would only wait too).
    pub circuit: Option<SharedCircuit>,
    pub interval: Duration,
    pub drain_target: Duration,
}

/// How fast a replica's demonstrated peak rate is forgotten per sample (so a replica that got
/// slower, or a sink that did, lowers it within minutes).
const PEAK_DECAY: f64 = 0.98;

fn processed(tally: &Tally) -> u64 {
    Outcome::ALL
        .iter()
        .filter(|o| !matches!(o, Outcome::Requeued | Outcome::Probe))
        .map(|o| tally.count(*o))
        .sum()
}

impl Autoscaler {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last = processed(&self.tally);
        let mut peak: f64 = 0.0;
        let mut recommended = 1;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            let now = processed(&self.tally);
            let rate = (now - last) as f64 / self.interval.as_secs_f64();
            last = now;
            let backlog = self.backlog().await;
            let sink_capacity = self.sink.current_rate().await;
            let held = self.circuit_open().await || self.sink.held_for().is_some();
            if !held {
                peak = rate.max(peak * PEAK_DECAY);
                let inputs =
                    Inputs { backlog, per_replica: peak, sink_capacity, drain_target: self.drain_target };
                recommended = recommended_replicas(&inputs);
            }
            metrics::gauge!("resync_consumer_processing_rate").set(rate);
            if let Some(capacity) = sink_capacity {
                metrics::gauge!("resync_sink_estimated_capacity").set(capacity);
            }
            metrics::gauge!("resync_consumer_recommended_replicas").set(f64::from(recommended));
            debug!(backlog, rate, peak, ?sink_capacity, recommended, held, "autoscaling signals");
        }
    }

    async fn circuit_open(&self) -> bool {
        let Some(circuit) = &self.circuit else { return false };
        circuit.is_open().await.unwrap_or_else(|_| circuit.state() != resync_throttle::CircuitState::Closed)
    }

    /// Ready plus in-flight messages over the queues; a queue that cannot be read counts 0
    /// (the next sample tries again).
    async fn backlog(&self) -> u64 {
        let mut total = 0;
        for queue in &self.queues {
            match self.transport.queue_depth(queue).await {
                Ok(depth) => {
                    let waiting = depth.ready + depth.in_flight;
                    metrics::gauge!("resync_consumer_backlog", "queue" => queue.clone()).set(waiting as f64);
                    total += waiting;
                }
                Err(err) => debug!(queue, error = %err, "cannot read the queue's depth"),
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(backlog: u64, per_replica: f64, sink_capacity: Option<f64>) -> Inputs {
        Inputs { backlog, per_replica, sink_capacity, drain_target: Duration::from_secs(60) }
    }

    #[test]
    fn enough_replicas_to_drain_the_backlog_in_time() {
        // 120,000 waiting over 60 s is 2,000/s; at 100/s per replica, 20 replicas.
        assert_eq!(recommended_replicas(&inputs(120_000, 100.0, None)), 20);
        assert_eq!(recommended_replicas(&inputs(120_001, 100.0, None)), 21);
    }

    #[test]
    fn never_more_than_the_sink_can_use() {
        // The sink takes 500/s: beyond 5 replicas at 100/s each, more would only wait.
        assert_eq!(recommended_replicas(&inputs(1_000_000, 100.0, Some(500.0))), 5);
    }

    #[test]
    fn at_least_one_and_one_without_a_measured_rate() {
        assert_eq!(recommended_replicas(&inputs(0, 100.0, Some(500.0))), 1);
        assert_eq!(recommended_replicas(&inputs(50_000, 0.0, None)), 1);
    }
}
