//! The relay's Prometheus metrics, described once: `describe` gives each its `# HELP` text and
//! puts every counter at 0, so a fresh process shows them all.

/// Describes the relay's metrics and registers its counters at 0. Call once, after the
/// metrics recorder is installed.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!("resync_relay_published_total", "Events published to the broker.");
    describe_counter!("resync_relay_errors_total", "Publish or database errors the relay retried.");
    describe_counter!("resync_replayed_total", "Events republished by replay.");
    describe_counter!(
        "resync_relay_parked_total",
        "Events set aside because their entity type has no topic (see `resync outbox parked`)."
    );
    describe_gauge!(
        "resync_relay_pending_events",
        "Events committed but not yet published; 0 when the outbox is empty."
    );
    describe_gauge!("resync_relay_lag_seconds", "Age of the oldest event being published; 0 when idle.");
    describe_gauge!("resync_relay_leader", "1 while this relay is the leader.");
    metrics::counter!("resync_relay_published_total").absolute(0);
    metrics::counter!("resync_relay_errors_total").absolute(0);
    metrics::counter!("resync_relay_parked_total").absolute(0);
}
