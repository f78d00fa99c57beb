//! The fault engine: turns the [`Config`] into a verdict per write (outage, rate limit, error,
//! rejection, apply). Pure over an explicit `now`, so it is unit-tested without sleeping;
//! the server holds it behind one mutex for the few microseconds a decision takes.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Error;
use crate::config::{Config, FaultsPatch, Latency};

/// What happens to one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// 503 with `Retry-After` for the rest of the outage.
    Outage { remaining: Duration },
    /// 429; a token is available after `wait`.
    RateLimited { wait: Duration },
    /// 500 or 503, not applied.
    Error { status: u16 },
    /// `reject_status`, not applied.
    Reject { status: u16 },
    /// Apply; with `Some(hold)`, then answer 504 after `hold`.
    Apply { then_timeout: Option<Duration> },
}

pub(crate) struct Faults {
    config: Config,
    bucket: Option<TokenBucket>,
    outage_until: Option<Instant>,
    rng: StdRng,
    /// Scheduled outages are relative to this.
    started: Instant,
}

impl Faults {
    /// `config` must be valid.
    pub(crate) fn new(config: Config, now: Instant) -> Self {
        let bucket = bucket_for(&config, now);
        let rng = rng_for(config.seed);
        Self { config, bucket, outage_until: None, rng, started: now }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Back to no faults; scheduled outages stay relative to the original start.
    pub(crate) fn reset(&mut self, now: Instant) {
        let started = self.started;
        *self = Self::new(Config::default(), now);
        self.started = started;
    }

    /// Merges the patch; on an invalid result nothing changes.
    pub(crate) fn patch(&mut self, patch: &FaultsPatch, now: Instant) -> Result<Config, Error> {
        let next = self.config.patched(patch);
        next.validate()?;
        match (&mut self.bucket, next.rate_limit_per_sec, next.effective_burst()) {
            (Some(bucket), Some(rate), Some(burst)) => bucket.reconfigure(rate, burst, now),
            _ => self.bucket = bucket_for(&next, now),
        }
        if let Some(seed) = patch.seed {
            self.rng = rng_for(seed);
        }
        if let Some(outage) = patch.outage {
            self.outage_until = Some(now + Duration::from_millis(outage.for_ms));
        }
        self.config = next;
        Ok(self.config.clone())
    }

    /// The latency to add before handling a write, if any.
    pub(crate) fn latency(&mut self) -> Option<Duration> {
        let ms = match self.config.latency? {
            Latency::Fixed { fixed_ms } => fixed_ms,
            Latency::LogNormal { p50_ms, p99_ms } => lognormal_ms(&mut self.rng, p50_ms, p99_ms),
        };
        // Capped so a wild draw (or a huge setting) cannot overflow a Duration.
        (ms > 0.0).then(|| Duration::from_secs_f64(ms.min(MAX_LATENCY_MS) / 1000.0))
    }

    /// The rest of the current outage (runtime or scheduled), if one is under way.
    pub(crate) fn outage_remaining(&self, now: Instant) -> Option<Duration> {
        let runtime = self.outage_until.filter(|until| *until > now).map(|until| until - now);
        let since_start = now.saturating_duration_since(self.started);
        let scheduled = self
            .config
            .outages
            .iter()
            .filter(|o| {
                Duration::from_millis(o.start_ms) <= since_start
                    && since_start < Duration::from_millis(o.end_ms)
            })
            .map(|o| Duration::from_millis(o.end_ms) - since_start)
            .max();
        runtime.max(scheduled)
    }

    pub(crate) fn decide(&mut self, now: Instant) -> Verdict {
        if let Some(remaining) = self.outage_remaining(now) {
            return Verdict::Outage { remaining };
        }
        if let Some(bucket) = &mut self.bucket
            && let Err(wait) = bucket.try_take(now)
        {
            return Verdict::RateLimited { wait };
        }
        if self.chance(self.config.error_rate) {
            let status = if self.rng.random_bool(0.5) { 500 } else { 503 };
            return Verdict::Error { status };
        }
        if self.chance(self.config.reject_rate) {
            return Verdict::Reject { status: self.config.reject_status };
        }
        let then_timeout = self
            .chance(self.config.applied_then_timeout_rate)
            .then(|| Duration::from_millis(self.config.applied_then_timeout_delay_ms));
        Verdict::Apply { then_timeout }
    }

    /// Draws only for a fault that is on, so a seeded run's draws do not depend on faults
    /// that are off.
    fn chance(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.rng.random_bool(rate.min(1.0))
    }
}

const MAX_LATENCY_MS: f64 = 600_000.0;

fn bucket_for(config: &Config, now: Instant) -> Option<TokenBucket> {
    Some(TokenBucket::new(config.rate_limit_per_sec?, config.effective_burst()?, now))
}

fn rng_for(seed: Option<u64>) -> StdRng {
    match seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    }
}

/// z such that P(N(0,1) < z) = 0.99.
const Z_99: f64 = 2.326_347_874_040_841;

/// A draw from the lognormal whose median is `p50` and 99th percentile `p99`.
fn lognormal_ms(rng: &mut StdRng, p50: f64, p99: f64) -> f64 {
    let mu = p50.ln();
    let sigma = (p99 / p50).ln() / Z_99;
    (mu + sigma * standard_normal(rng)).exp()
}

/// Box–Muller; `u1` is in (0, 1] so its logarithm is finite.
fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A token bucket: `burst` tokens at most, refilled at `rate` per second, one per write.
/// In any window of length T it admits at most `burst + rate * T` writes.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Starts full.
    pub(crate) fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self { rate, burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Takes a token, or says how long until one is available.
    pub(crate) fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// New rate and burst from now on; tokens earned so far at the old rate are kept, up to
    /// the new burst.
    pub(crate) fn reconfigure(&mut self, rate: f64, burst: f64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.burst = burst;
        self.tokens = self.tokens.min(burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Outage, OutageNow};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Float arithmetic makes waits off by a few nanoseconds.
    fn wait_is(result: Result<(), Duration>, expected: Duration) {
        let wait = result.expect_err("expected a wait");
        assert!(wait.abs_diff(expected) < Duration::from_micros(1), "{wait:?} != {expected:?}");
    }

    #[test]
    fn bucket_admits_the_burst_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(50.0, 50.0, t0);
        assert_eq!((0..200).filter(|_| bucket.try_take(t0).is_ok()).count(), 50);
        wait_is(bucket.try_take(t0), ms(20));
        // 10 ms later half a token has come back: wait 10 ms for the rest.
        wait_is(bucket.try_take(t0 + ms(10)), ms(10));
        assert!(bucket.try_take(t0 + ms(20)).is_ok());
        // One second refills 50, not more than the burst.
        let later = t0 + ms(5000);
        assert_eq!((0..200).filter(|_| bucket.try_take(later).is_ok()).count(), 50);
    }

    #[test]
    fn bucket_bound_holds_over_any_window() {
        // Admissions in [t0, t0 + 1 s] never exceed burst + rate.
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(50.0, 50.0, t0);
        let admitted = (0..=1000).filter(|i| bucket.try_take(t0 + ms(*i)).is_ok()).count();
        assert!((99..=100).contains(&admitted), "{admitted}");
    }

    #[test]
    fn rate_changes_at_runtime_keep_earned_tokens_up_to_the_new_burst() {
        let t0 = Instant::now();
        let mut faults = Faults::new(Config { rate_limit_per_sec: Some(2000.0), ..Config::default() }, t0);
        let patch = |rate| FaultsPatch { rate_limit_per_sec: Some(Some(rate)), ..FaultsPatch::default() };
        faults.patch(&patch(500.0), t0).unwrap();
        let admitted = (0..3000).filter(|_| matches!(faults.decide(t0), Verdict::Apply { .. })).count();
        assert_eq!(admitted, 500);
        match faults.decide(t0) {
            Verdict::RateLimited { wait } => wait_is(Err(wait), ms(2)),
            other => panic!("expected a 429, got {other:?}"),
        }
        faults.patch(&patch(2000.0), t0).unwrap();
        assert_eq!(faults.decide(t0 + ms(1)), Verdict::Apply { then_timeout: None });
        let off = FaultsPatch { rate_limit_per_sec: Some(None), ..FaultsPatch::default() };
        faults.patch(&off, t0).unwrap();
        assert!((0..10_000).all(|_| matches!(faults.decide(t0), Verdict::Apply { .. })));
    }

    #[test]
    fn outages_runtime_and_scheduled() {
        let t0 = Instant::now();
        let config = Config { outages: vec![Outage { start_ms: 100, end_ms: 200 }], ..Config::default() };
        let mut faults = Faults::new(config, t0);
        assert_eq!(faults.decide(t0 + ms(99)), Verdict::Apply { then_timeout: None });
        assert_eq!(faults.decide(t0 + ms(150)), Verdict::Outage { remaining: ms(50) });
        assert_eq!(faults.decide(t0 + ms(200)), Verdict::Apply { then_timeout: None });
        let now = t0 + ms(1000);
        let patch = FaultsPatch { outage: Some(OutageNow { for_ms: 300 }), ..FaultsPatch::default() };
        faults.patch(&patch, now).unwrap();
        assert_eq!(faults.decide(now + ms(100)), Verdict::Outage { remaining: ms(200) });
        assert_eq!(faults.decide(now + ms(300)), Verdict::Apply { then_timeout: None });
    }

    #[test]
    fn seeded_faults_are_deterministic_and_near_their_rates() {
        let config = Config { error_rate: 0.2, reject_rate: 0.1, seed: Some(7), ..Config::default() };
        let run = || {
            let t0 = Instant::now();
            let mut faults = Faults::new(config.clone(), t0);
            (0..10_000).map(|_| faults.decide(t0)).collect::<Vec<_>>()
        };
        let verdicts = run();
        assert_eq!(verdicts, run());
        let errors = verdicts.iter().filter(|v| matches!(v, Verdict::Error { .. })).count();
        let rejects = verdicts.iter().filter(|v| matches!(v, Verdict::Reject { status: 422 })).count();
        assert!((1800..2200).contains(&errors), "{errors}");
        // Rejections are drawn from the 80 % that did not fail.
        assert!((650..950).contains(&rejects), "{rejects}");
        assert!(verdicts.contains(&Verdict::Error { status: 500 }));
        assert!(verdicts.contains(&Verdict::Error { status: 503 }));
    }

    #[test]
    fn lognormal_latency_matches_its_percentiles() {
        let config = Config {
            latency: Some(Latency::LogNormal { p50_ms: 20.0, p99_ms: 200.0 }),
            seed: Some(1),
            ..Config::default()
        };
        let mut faults = Faults::new(config, Instant::now());
        let mut draws: Vec<f64> =
            (0..20_000).filter_map(|_| faults.latency()).map(|d| d.as_secs_f64() * 1000.0).collect();
        draws.sort_by(f64::total_cmp);
        let p50 = draws[draws.len() / 2];
        let p99 = draws[draws.len() * 99 / 100];
        assert!((18.0..22.0).contains(&p50), "{p50}");
        assert!((170.0..235.0).contains(&p99), "{p99}");
    }
}
