//! [`AdaptiveConcurrency`]: how many calls to one sink this process keeps in flight, found by
//! AIMD on the sink's answers (no Redis: each process adapts to what it sees).
//!
//! The limit grows by one for every limit's worth of successes while it is fully used, and is
//! multiplied by `decrease_factor` when the sink says it is overloaded or its latency rises
//! well above the best seen. A decrease counts once per round of requests: permits taken
//! before a decrease report the same overload and cannot cut the limit again.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use crate::ThrottleError;

/// Weight of a new sample in the recent-latency average: smooths out a lone slow call, yet
/// follows a real rise within a few calls.
const RECENT_WEIGHT: f64 = 0.25;

/// How far the baseline moves toward a slower sample. The baseline is the minimum latency
/// seen, slowly forgetting: a third party that became slower for good is accepted as its new
/// normal after some hundred calls instead of pinning the limit at `min` forever.
const BASELINE_FORGET: f64 = 0.01;

/// Bounds and reactions of one [`AdaptiveConcurrency`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrencyConfig {
    /// The `sink` label of the `resync_sink_concurrency_limit` gauge.
    pub sink: String,
    /// The limit before any outcome was seen; within `min..=max`.
    pub initial: usize,
    /// The limit never drops below this.
    pub min: usize,
    /// The limit never grows above this.
    pub max: usize,
    /// The limit is multiplied by this on overload; in (0, 1).
    pub decrease_factor: f64,
    /// Recent latency above `latency_tolerance ×` the baseline counts as overload; > 1.
    pub latency_tolerance: f64,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        Self {
            sink: "default".into(),
            initial: 4,
            min: 1,
            max: 64,
            decrease_factor: 0.7,
            latency_tolerance: 2.0,
        }
    }
}

impl ConcurrencyConfig {
    /// Checks every field; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), ThrottleError> {
        let invalid = |field: &'static str, reason: String| {
            Err(ThrottleError::InvalidConfig { config: "ConcurrencyConfig", field, reason })
        };
        if self.min == 0 {
            return invalid("min", "must be at least 1, or nothing could ever be sent".into());
        }
        if self.max < self.min {
            return invalid("max", format!("must be at least min ({}) (got {})", self.min, self.max));
        }
        if !(self.min..=self.max).contains(&self.initial) {
            return invalid(
                "initial",
                format!("must be within min..=max ({}..={}) (got {})", self.min, self.max, self.initial),
            );
        }
        if !(self.decrease_factor > 0.0 && self.decrease_factor < 1.0) {
            return invalid(
                "decrease_factor",
                format!("must be strictly between 0 and 1 (got {})", self.decrease_factor),
            );
        }
        if !(self.latency_tolerance.is_finite() && self.latency_tolerance > 1.0) {
            return invalid(
                "latency_tolerance",
                format!("must be a number > 1 (got {})", self.latency_tolerance),
            );
        }
        Ok(())
    }
}

/// How a call made under a [`ConcurrencyPermit`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The sink accepted the call after `latency`.
    Success { latency: Duration },
    /// The sink said it is overloaded (HTTP 429 or 503).
    Overloaded,
    /// Any other failure; says nothing about load, so the limit stays.
    Failed,
}

/// Limits the calls in flight to one sink from this process, adapting the limit to the
/// sink's answers. Cheap to clone; clones share the limit.
#[derive(Clone)]
pub struct AdaptiveConcurrency {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AdaptiveConcurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("AdaptiveConcurrency")
            .field("limit", &state.limit)
            .field("in_flight", &state.in_flight)
            .finish_non_exhaustive()
    }
}

struct Shared {
    config: ConcurrencyConfig,
    state: Mutex<State>,
    /// Woken once per slot that opens. A `Notify` rather than a `Semaphore` because the
    /// number of slots shrinks while permits are out, which a semaphore cannot take back.
    slot_opened: Notify,
}

struct State {
    /// Fractional, so repeated decreases compound exactly; `floor` is the usable limit.
    limit: f64,
    in_flight: usize,
    /// Good outcomes since the last change, toward the next +1.
    successes: usize,
    /// Bumped by every decrease; permits remember the epoch they were taken in.
    epoch: u64,
    /// Bumped whenever an acquisition takes the last free slot; a permit that sees it move
    /// while it is out was part of a round that used the whole limit.
    saturations: u64,
    baseline: Option<Duration>,
    recent: Option<Duration>,
}

/// A slot for one call. Report how it went with [`done`](Self::done); dropping the permit
/// without it just frees the slot.
#[must_use = "the slot is freed as soon as the permit is dropped"]
pub struct ConcurrencyPermit {
    shared: Arc<Shared>,
    epoch: u64,
    /// `saturations` before this permit was taken. Only a success during full use shows the
    /// limit can grow; calls trickling in one at a time say nothing about a larger limit.
    saturation_mark: u64,
    outcome: Option<CallOutcome>,
}

impl std::fmt::Debug for ConcurrencyPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyPermit").field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

impl AdaptiveConcurrency {
    pub fn new(config: ConcurrencyConfig) -> Result<Self, ThrottleError> {
        config.validate()?;
        let state = State {
            limit: config.initial as f64,
            in_flight: 0,
            successes: 0,
            epoch: 0,
            saturations: 0,
            baseline: None,
            recent: None,
        };
        let shared = Shared { config, state: Mutex::new(state), slot_opened: Notify::new() };
        shared.publish(shared.config.initial);
        Ok(Self { shared: Arc::new(shared) })
    }

    /// Waits for a free slot.
    pub async fn acquire(&self) -> ConcurrencyPermit {
        loop {
            // Registered before looking, so a slot freed between the look and the wait still
            // wakes this task; a wake-up this task no longer needs passes to the next waiter.
            let opened = self.shared.slot_opened.notified();
            let mut opened = std::pin::pin!(opened);
            opened.as_mut().enable();
            if let Some(permit) = self.try_acquire() {
                return permit;
            }
            opened.await;
        }
    }

    /// A slot if one is free now.
    pub fn try_acquire(&self) -> Option<ConcurrencyPermit> {
        let mut state = self.shared.lock();
        let limit = state.usable();
        if state.in_flight >= limit {
            return None;
        }
        let saturation_mark = state.saturations;
        state.in_flight += 1;
        if state.in_flight == limit {
            state.saturations += 1;
        }
        let permit = ConcurrencyPermit {
            shared: Arc::clone(&self.shared),
            epoch: state.epoch,
            saturation_mark,
            outcome: None,
        };
        Some(permit)
    }

    /// The current limit on calls in flight.
    pub fn limit(&self) -> usize {
        self.shared.lock().usable()
    }

    /// Calls in flight now (may exceed [`limit`](Self::limit) right after a decrease).
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }
}

impl ConcurrencyPermit {
    /// Reports how the call went and frees the slot.
    pub fn done(mut self, outcome: CallOutcome) {
        self.outcome = Some(outcome);
    }
}

impl Drop for ConcurrencyPermit {
    fn drop(&mut self) {
        self.shared.release(self.epoch, self.saturation_mark, self.outcome.take());
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held, and the state stays consistent between
        // statements, so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, epoch: u64, saturation_mark: u64, outcome: Option<CallOutcome>) {
        let (before, after, in_flight) = {
            let mut state = self.lock();
            state.in_flight -= 1;
            let before = state.usable();
            match outcome {
                Some(CallOutcome::Success { latency }) => {
                    if state.latency_too_high(latency, self.config.latency_tolerance) {
                        state.decrease(epoch, &self.config);
                    } else if state.saturations > saturation_mark {
                        state.count_success(&self.config);
                    }
                }
                Some(CallOutcome::Overloaded) => state.decrease(epoch, &self.config),
                Some(CallOutcome::Failed) | None => {}
            }
            (before, state.usable(), state.in_flight)
        };
        if after != before {
            self.publish(after);
        }
        // One wake-up per slot now free (this one, and one more if the limit grew), for as
        // many as a waiter can use.
        for _ in 0..after.saturating_sub(in_flight).min(1 + after.saturating_sub(before)) {
            self.slot_opened.notify_one();
        }
    }

    fn publish(&self, limit: usize) {
        metrics::gauge!("resync_sink_concurrency_limit", "sink" => self.config.sink.clone())
            .set(limit as f64);
    }
}

impl State {
    /// The whole number of calls allowed; `limit` never drops below `min >= 1`.
    fn usable(&self) -> usize {
        self.limit.floor() as usize
    }

    /// Folds `latency` into the baseline and the recent average; true when the recent
    /// average has risen past `tolerance ×` the baseline.
    fn latency_too_high(&mut self, latency: Duration, tolerance: f64) -> bool {
        let sample = latency.as_secs_f64();
        let baseline = match self.baseline {
            Some(old) if latency >= old => old.as_secs_f64() + (sample - old.as_secs_f64()) * BASELINE_FORGET,
            _ => sample,
        };
        let recent = match self.recent {
            Some(old) => old.as_secs_f64() + (sample - old.as_secs_f64()) * RECENT_WEIGHT,
            None => sample,
        };
        self.baseline = Some(Duration::from_secs_f64(baseline));
        self.recent = Some(Duration::from_secs_f64(recent));
        recent > baseline * tolerance
    }

    /// Additive increase: +1 once `limit` successes were seen at full use.
    fn count_success(&mut self, config: &ConcurrencyConfig) {
        self.successes += 1;
        if self.successes >= self.usable() {
            self.successes = 0;
            self.limit = (self.limit + 1.0).min(config.max as f64);
        }
    }

    /// Multiplicative decrease, once per epoch: permits taken before the last decrease
    /// were sent under the old limit and report the same overload.
    fn decrease(&mut self, permit_epoch: u64, config: &ConcurrencyConfig) {
        if permit_epoch != self.epoch {
            return;
        }
        self.epoch += 1;
        self.successes = 0;
        self.limit = (self.limit * config.decrease_factor).max(config.min as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: CallOutcome = CallOutcome::Success { latency: Duration::from_millis(10) };

    fn limiter(initial: usize, min: usize, max: usize) -> AdaptiveConcurrency {
        let config = ConcurrencyConfig { initial, min, max, ..ConcurrencyConfig::default() };
        AdaptiveConcurrency::new(config).expect("valid config")
    }

    /// Takes every slot, then completes them all with `outcome`.
    fn full_round(limiter: &AdaptiveConcurrency, outcome: CallOutcome) {
        let permits: Vec<_> = std::iter::from_fn(|| limiter.try_acquire()).collect();
        assert_eq!(permits.len(), limiter.limit(), "a full round takes every slot");
        for permit in permits {
            permit.done(outcome);
        }
    }

    #[test]
    fn a_limits_worth_of_successes_at_full_use_adds_one() {
        let limiter = limiter(4, 1, 64);
        full_round(&limiter, FAST);
        assert_eq!(limiter.limit(), 5);
        full_round(&limiter, FAST);
        assert_eq!(limiter.limit(), 6);
    }

    #[test]
    fn successes_below_the_limit_do_not_grow_it() {
        // Four calls one after another never show that more than one at a time works.
        let limiter = limiter(4, 1, 64);
        for _ in 0..20 {
            limiter.try_acquire().expect("a free slot").done(FAST);
        }
        assert_eq!(limiter.limit(), 4);
    }

    #[test]
    fn overload_cuts_by_the_factor_once_per_round() {
        let limiter = limiter(20, 1, 64);
        let permits: Vec<_> = (0..5).map(|_| limiter.try_acquire().expect("slot")).collect();
        for permit in permits {
            permit.done(CallOutcome::Overloaded);
        }
        assert_eq!(limiter.limit(), 14, "five reports from one round cut once: 20 × 0.7");
        limiter.try_acquire().expect("slot").done(CallOutcome::Overloaded);
        assert_eq!(limiter.limit(), 9, "a permit taken after the cut cuts again: 14 × 0.7 = 9.8");
    }

    #[test]
    fn failures_change_nothing() {
        let limiter = limiter(4, 1, 64);
        full_round(&limiter, CallOutcome::Failed);
        assert_eq!(limiter.limit(), 4);
    }

    #[test]
    fn rising_latency_cuts_the_limit() {
        let limiter = limiter(10, 1, 64);
        for _ in 0..10 {
            limiter.try_acquire().expect("slot").done(FAST);
        }
        assert_eq!(limiter.limit(), 10);
        let slow = CallOutcome::Success { latency: Duration::from_millis(60) };
        for _ in 0..4 {
            limiter.try_acquire().expect("slot").done(slow);
        }
        assert!(limiter.limit() < 10, "latency 6× the baseline must cut, limit is {}", limiter.limit());
    }

    #[test]
    fn a_lone_slow_call_is_tolerated() {
        let limiter = limiter(10, 1, 64);
        for _ in 0..10 {
            limiter.try_acquire().expect("slot").done(FAST);
        }
        let slow = CallOutcome::Success { latency: Duration::from_millis(30) };
        limiter.try_acquire().expect("slot").done(slow);
        assert_eq!(limiter.limit(), 10);
    }

    #[test]
    fn limit_stays_within_bounds() {
        let limiter = limiter(3, 2, 5);
        for _ in 0..10 {
            limiter.try_acquire().expect("slot").done(CallOutcome::Overloaded);
        }
        assert_eq!(limiter.limit(), 2, "floor is min");
        for _ in 0..20 {
            full_round(&limiter, FAST);
        }
        assert_eq!(limiter.limit(), 5, "ceiling is max");
    }

    #[test]
    fn dropping_a_permit_frees_its_slot_without_a_verdict() {
        let limiter = limiter(1, 1, 4);
        let permit = limiter.try_acquire().expect("slot");
        assert!(limiter.try_acquire().is_none());
        drop(permit);
        assert_eq!(limiter.in_flight(), 0);
        assert_eq!(limiter.limit(), 1);
        assert!(limiter.try_acquire().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn permits_bound_calls_in_flight() {
        let limiter = limiter(3, 1, 3);
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (limiter, in_flight, peak) = (limiter.clone(), in_flight.clone(), peak.clone());
                tokio::spawn(async move {
                    let permit = limiter.acquire().await;
                    let now = in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    permit.done(CallOutcome::Failed);
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 3);
        assert_eq!(limiter.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_a_slot_opens() {
        let limiter = limiter(1, 1, 4);
        let held = limiter.try_acquire().expect("slot");
        let waiter = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire().await.done(FAST) }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the only slot is taken");
        held.done(FAST);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("task");
    }

    #[tokio::test]
    async fn a_cut_while_full_admits_no_one_until_below_the_new_limit() {
        let limiter = limiter(4, 1, 4);
        let mut permits: Vec<_> = std::iter::from_fn(|| limiter.try_acquire()).collect();
        permits.pop().expect("four permits").done(CallOutcome::Overloaded);
        assert_eq!(limiter.limit(), 2, "4 × 0.7 = 2.8");
        assert_eq!(limiter.in_flight(), 3);
        assert!(limiter.try_acquire().is_none());
        permits.pop().expect("permit").done(FAST);
        assert!(limiter.try_acquire().is_none(), "2 in flight, limit 2");
        permits.pop().expect("permit").done(FAST);
        assert!(limiter.try_acquire().is_some());
    }

    #[test]
    fn config_errors_name_the_field() {
        let base = ConcurrencyConfig::default;
        let cases = [
            (ConcurrencyConfig { min: 0, initial: 1, ..base() }, "min"),
            (ConcurrencyConfig { min: 8, max: 4, initial: 4, ..base() }, "max"),
            (ConcurrencyConfig { initial: 100, ..base() }, "initial"),
            (ConcurrencyConfig { decrease_factor: 1.5, ..base() }, "decrease_factor"),
            (ConcurrencyConfig { latency_tolerance: 1.0, ..base() }, "latency_tolerance"),
        ];
        for (config, expected) in cases {
            match AdaptiveConcurrency::new(config) {
                Err(ThrottleError::InvalidConfig { config: "ConcurrencyConfig", field, .. }) => {
                    assert_eq!(field, expected)
                }
                other => panic!("expected InvalidConfig for {expected}, got {other:?}"),
            }
        }
        ConcurrencyConfig::default().validate().expect("defaults validate");
    }
}
