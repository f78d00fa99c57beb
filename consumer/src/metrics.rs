//! The consumer's Prometheus metrics, described once: `describe` gives each its `# HELP` text
//! and puts every counter at 0, so a fresh process shows them all and rates can alert from the
//! first scrape.

use resync_bus::DeadLetterReason;

use crate::Outcome;

/// Describes the consumer's metrics (and the sink throttle's) and registers its counters at 0.
/// Call once, after the metrics recorder is installed.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("resync_consumer_events_total", "Events handled, by outcome.");
    describe_counter!(
        "resync_consumer_retries_total",
        "Sink calls that failed transiently and were tried again."
    );
    describe_counter!(
        "resync_consumer_dead_lettered_total",
        "Events sent to the dead-letter queue, by reason."
    );
    describe_histogram!("resync_consumer_sink_latency_seconds", "Duration of one sink call attempt.");
    describe_histogram!(
        "resync_consumer_lock_wait_seconds",
        "Wait for an entity lock another consumer held."
    );
    describe_histogram!("resync_consumer_lock_hold_seconds", "How long a batch held its entity locks.");
    describe_histogram!("resync_consumer_batch_size", "Events per batch.");
    describe_gauge!(
        "resync_consumer_lag_seconds",
        "Age of the last event handled, per stream; 0 while the stream's queue is idle."
    );
    describe_gauge!("resync_consumer_backlog", "Messages ready and in flight, per queue.");
    describe_gauge!("resync_consumer_processing_rate", "Events per second this process handled lately.");
    describe_gauge!("resync_consumer_recommended_replicas", "Replicas that would drain the backlog in time.");
    describe_gauge!("resync_sink_estimated_capacity", "The shared sink rate in force (requests per second).");
    describe_gauge!("resync_sink_rate_limit", "The shared sink rate limit in force.");
    describe_histogram!("resync_sink_rate_wait_seconds", "Wait for a slot of the shared sink rate.");
    describe_counter!(
        "resync_sink_throttled_total",
        "Overload answers (429/503) reported to the shared rate."
    );
    describe_gauge!("resync_sink_concurrency_limit", "This process's limit on sink calls in flight.");
    describe_gauge!("resync_sink_circuit_state", "The sink's shared circuit: 0 closed, 1 open, 2 half-open.");
    describe_gauge!(
        "resync_sink_circuit_open_seconds",
        "How long the sink's circuit has been open; 0 when closed."
    );
    describe_counter!(
        "resync_sink_circuit_transitions_total",
        "Changes of the sink's circuit this process made, by the state it went to."
    );
    describe_counter!(
        "resync_consumer_held_requeues_total",
        "Events that waited max_hold for a held sink (circuit open, quota spent) and went back to their queue as fresh copies."
    );
    describe_gauge!(
        "resync_sink_quota_remaining",
        "Calls left in the sink's budget for the current window (label window: minute, hour, day, or seconds)."
    );
    describe_counter!(
        "resync_sink_quota_spent_total",
        "Times this process found one of the sink's budgets spent and held, by window."
    );
    describe_counter!(
        "resync_sink_refused_not_newer_total",
        "Writes the third party refused as not newer than what it has ([sink.conditional]); counted applied."
    );
    for outcome in Outcome::ALL {
        metrics::counter!("resync_consumer_events_total", "outcome" => outcome.label()).absolute(0);
    }
    metrics::counter!("resync_consumer_retries_total").absolute(0);
    for reason in [
        DeadLetterReason::InvalidEnvelope,
        DeadLetterReason::NotSubscribed,
        DeadLetterReason::MaxReceivesExceeded,
    ] {
        metrics::counter!("resync_consumer_dead_lettered_total", "reason" => reason.as_attribute())
            .absolute(0);
    }
}
