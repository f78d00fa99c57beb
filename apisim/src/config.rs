//! What the simulator is told to do: the fault configuration, the patch that changes it at
//! runtime (`PUT /admin/faults`), and their validation.

use serde::{Deserialize, Deserializer, Serialize};

use crate::Error;

/// Faults and limits of the simulated API. `Config::default()` is a well-behaved API.
///
/// Faults apply to writes (`PUT`/`DELETE /entities/..`) only; reads and the admin endpoints
/// always answer. Per write, in this order: latency, outage (503), rate limit (429),
/// `error_rate` (500/503), `reject_rate` (4xx), then the write is applied, and with
/// `applied_then_timeout_rate` answered 504 late although it was applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Global token-bucket rate limit, writes per second. Over it: 429 with `Retry-After`
    /// (whole seconds, rounded up) and `Retry-After-Ms` (precise) until a token is available.
    pub rate_limit_per_sec: Option<f64>,
    /// Bucket size; default one second's worth of `rate_limit_per_sec` (at least 1).
    pub rate_limit_burst: Option<f64>,
    /// Share (0..=1) of writes answered 500 or 503, at random, without applying.
    pub error_rate: f64,
    /// Delay added before handling each write.
    pub latency: Option<Latency>,
    /// Share (0..=1) of writes that are applied, then answered 504 after
    /// `applied_then_timeout_delay_ms`: the client times out although the write happened.
    pub applied_then_timeout_rate: f64,
    /// How long an applied-then-timeout response is held (default 10 000 ms).
    pub applied_then_timeout_delay_ms: u64,
    /// Share (0..=1) of writes rejected with `reject_status` and `{"error": ..}`, not applied.
    pub reject_rate: f64,
    /// The non-retryable status of rejections (400..=499, default 422).
    pub reject_status: u16,
    /// Scheduled outages, relative to server start: every write gets 503 inside them.
    pub outages: Vec<Outage>,
    /// Enforce versions, as an API with conditional writes does: a write whose
    /// `X-Resync-Entity-Version` is not newer than the newest the entity has had is refused
    /// with 412 and not applied (checked and applied under one lock).
    pub conditional_writes: bool,
    /// Seed of the RNG behind every random fault; `None` seeds from the OS.
    pub seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            rate_limit_per_sec: None,
            rate_limit_burst: None,
            error_rate: 0.0,
            latency: None,
            applied_then_timeout_rate: 0.0,
            applied_then_timeout_delay_ms: 10_000,
            reject_rate: 0.0,
            reject_status: 422,
            outages: Vec::new(),
            conditional_writes: false,
            seed: None,
        }
    }
}

/// Added latency: `{"fixed_ms": 5}` or `{"p50_ms": 20, "p99_ms": 200}` (a lognormal fitted
/// to those two percentiles).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Latency {
    /// The same delay for every write.
    Fixed {
        /// Milliseconds.
        fixed_ms: f64,
    },
    /// Lognormal with this median and 99th percentile.
    LogNormal {
        /// Median, milliseconds.
        p50_ms: f64,
        /// 99th percentile, milliseconds.
        p99_ms: f64,
    },
}

/// A window `[start_ms, end_ms)` relative to server start during which writes get 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// Start, milliseconds after server start.
    pub start_ms: u64,
    /// End (exclusive), milliseconds after server start.
    pub end_ms: u64,
}

/// An outage that starts when the patch is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutageNow {
    /// How long it lasts, milliseconds.
    pub for_ms: u64,
}

/// The body of `PUT /admin/faults`: absent fields keep their value; for the optional settings
/// (`rate_limit_per_sec`, `rate_limit_burst`, `latency`, `seed`) an explicit `null` turns
/// them off. `outage` starts an outage now; it is an action, not a setting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsPatch {
    /// `Some(None)` removes the rate limit.
    #[serde(deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_sec: Option<Option<f64>>,
    /// `Some(None)` returns to the default burst.
    #[serde(deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub rate_limit_burst: Option<Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// `Some(None)` removes the added latency.
    #[serde(deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub latency: Option<Option<Latency>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_then_timeout_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_then_timeout_delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reject_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reject_status: Option<u16>,
    /// Replaces the scheduled outages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outages: Option<Vec<Outage>>,
    /// Starts an outage now, for `for_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outage: Option<OutageNow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditional_writes: Option<bool>,
    /// Holds the next write of this entity id (once it passed every other fault) until
    /// `release_held`, then applies it whether or not its client is still waiting: a request
    /// stuck in a proxy and applied after the client gave up. An action, not a setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_next_write_of: Option<String>,
    /// Applies the held writes now. An action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_held: Option<bool>,
    /// `Some(Some(seed))` reseeds the RNG; `Some(None)` reseeds it from the OS.
    #[serde(deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub seed: Option<Option<u64>>,
}

/// Tells an explicit `null` (`Some(None)`) from an absent field (`None`, via `default`).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl Config {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(rate) = self.rate_limit_per_sec {
            positive("rate_limit_per_sec", rate)?;
        }
        if let Some(burst) = self.rate_limit_burst
            && !(burst.is_finite() && burst >= 1.0)
        {
            return Err(invalid("rate_limit_burst", format!("{burst} is not a number >= 1")));
        }
        share("error_rate", self.error_rate)?;
        share("applied_then_timeout_rate", self.applied_then_timeout_rate)?;
        share("reject_rate", self.reject_rate)?;
        match self.latency {
            Some(Latency::Fixed { fixed_ms }) if !(fixed_ms.is_finite() && fixed_ms >= 0.0) => {
                return Err(invalid("latency.fixed_ms", format!("{fixed_ms} is not a number >= 0")));
            }
            Some(Latency::LogNormal { p50_ms, p99_ms }) => {
                positive("latency.p50_ms", p50_ms)?;
                positive("latency.p99_ms", p99_ms)?;
                if p99_ms < p50_ms {
                    return Err(invalid("latency.p99_ms", format!("{p99_ms} is below p50_ms {p50_ms}")));
                }
            }
            _ => {}
        }
        if !(400..=499).contains(&self.reject_status) {
            return Err(invalid("reject_status", format!("{} is not a 4xx status", self.reject_status)));
        }
        if let Some(outage) = self.outages.iter().find(|o| o.end_ms < o.start_ms) {
            return Err(invalid(
                "outages",
                format!("end_ms {} before start_ms {}", outage.end_ms, outage.start_ms),
            ));
        }
        Ok(())
    }

    /// The bucket size in force: `rate_limit_burst`, or one second's worth (at least 1).
    pub fn effective_burst(&self) -> Option<f64> {
        self.rate_limit_per_sec.map(|rate| self.rate_limit_burst.unwrap_or(rate).max(1.0))
    }

    /// This config with the patch's settings merged in (`outage`, an action, is not a setting).
    pub fn patched(&self, patch: &FaultsPatch) -> Config {
        let mut next = self.clone();
        if let Some(v) = patch.rate_limit_per_sec {
            next.rate_limit_per_sec = v;
        }
        if let Some(v) = patch.rate_limit_burst {
            next.rate_limit_burst = v;
        }
        if let Some(v) = patch.error_rate {
            next.error_rate = v;
        }
        if let Some(v) = patch.latency {
            next.latency = v;
        }
        if let Some(v) = patch.applied_then_timeout_rate {
            next.applied_then_timeout_rate = v;
        }
        if let Some(v) = patch.applied_then_timeout_delay_ms {
            next.applied_then_timeout_delay_ms = v;
        }
        if let Some(v) = patch.reject_rate {
            next.reject_rate = v;
        }
        if let Some(v) = patch.conditional_writes {
            next.conditional_writes = v;
        }
        if let Some(v) = patch.reject_status {
            next.reject_status = v;
        }
        if let Some(v) = &patch.outages {
            next.outages = v.clone();
        }
        if let Some(v) = patch.seed {
            next.seed = v;
        }
        next
    }
}

fn invalid(field: &'static str, problem: String) -> Error {
    Error::InvalidConfig { field, problem }
}

fn positive(field: &'static str, value: f64) -> Result<(), Error> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} is not a number > 0")))
    }
}

fn share(field: &'static str, value: f64) -> Result<(), Error> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} is not between 0 and 1")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_merge_and_null_clears() {
        let base = Config { rate_limit_per_sec: Some(2000.0), error_rate: 0.1, ..Config::default() };
        let patch: FaultsPatch = serde_json::from_str(r#"{"rate_limit_per_sec": 500}"#).unwrap();
        let next = base.patched(&patch);
        assert_eq!(next.rate_limit_per_sec, Some(500.0));
        assert_eq!(next.error_rate, 0.1);
        let patch: FaultsPatch = serde_json::from_str(r#"{"rate_limit_per_sec": null}"#).unwrap();
        assert_eq!(next.patched(&patch).rate_limit_per_sec, None);
        // What the client sends is what the server reads.
        let patch = FaultsPatch { rate_limit_per_sec: Some(None), ..FaultsPatch::default() };
        let text = serde_json::to_string(&patch).unwrap();
        assert_eq!(text, r#"{"rate_limit_per_sec":null}"#);
        assert_eq!(serde_json::from_str::<FaultsPatch>(&text).unwrap(), patch);
    }

    #[test]
    fn latency_has_two_shapes_and_typos_fail() {
        let fixed: Latency = serde_json::from_str(r#"{"fixed_ms": 5}"#).unwrap();
        assert_eq!(fixed, Latency::Fixed { fixed_ms: 5.0 });
        let lognormal: Latency = serde_json::from_str(r#"{"p50_ms": 5, "p99_ms": 50}"#).unwrap();
        assert_eq!(lognormal, Latency::LogNormal { p50_ms: 5.0, p99_ms: 50.0 });
        assert!(serde_json::from_str::<Latency>(r#"{"p50": 5}"#).is_err());
        assert!(serde_json::from_str::<FaultsPatch>(r#"{"error_rte": 1}"#).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |c: Config| match c.validate() {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected an invalid config, got {other:?}"),
        };
        assert_eq!(bad(Config { error_rate: 1.5, ..Config::default() }), "error_rate");
        assert_eq!(bad(Config { rate_limit_per_sec: Some(0.0), ..Config::default() }), "rate_limit_per_sec");
        assert_eq!(bad(Config { reject_status: 503, ..Config::default() }), "reject_status");
        assert_eq!(
            bad(Config {
                latency: Some(Latency::LogNormal { p50_ms: 10.0, p99_ms: 5.0 }),
                ..Config::default()
            }),
            "latency.p99_ms"
        );
        assert!(Config::default().validate().is_ok());
        assert_eq!(
            Config { rate_limit_per_sec: Some(0.5), ..Config::default() }.effective_burst(),
            Some(1.0)
        );
    }
}
