//! What happened to each event ([`Outcome`]) and the counts a processor keeps of them ([`Tally`]).

use std::sync::atomic::{AtomicU64, Ordering};

/// What happened to an event; also the `outcome` label of `resync_consumer_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Applied, then a newer version turned out to be recorded meanwhile; it was re-sent.
    Repaired,
    SkippedUnchanged,
    Stale,
    Duplicate,
    DeadLettered,
    /// Returned to the queue to be tried again later.
    Requeued,
    /// A `fare verify` probe: acked without calling the sink.
    Probe,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Repaired => "repaired",
            Outcome::SkippedUnchanged => "skipped_unchanged",
            Outcome::Stale => "stale",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Requeued => "requeued",
            Outcome::Probe => "probe",
        }
    }
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Applied,
        Outcome::Repaired,
        Outcome::SkippedUnchanged,
        Outcome::Stale,
        Outcome::Duplicate,
        Outcome::DeadLettered,
        Outcome::Requeued,
        Outcome::Probe,
    ];
}

/// Counts of what a processor did, for reports (the demo, jobs) beside the Prometheus metrics.
#[derive(Debug, Default)]
pub struct Tally {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    retries: AtomicU64,
}

impl Tally {
    pub fn record(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many events ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome as usize].load(Ordering::Relaxed)
    }

    /// Sink calls that failed transiently and were tried again.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    pub(crate) fn record_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
}
