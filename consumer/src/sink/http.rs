//! The built-in HTTP sink: one request per write, configured by the service config's `[sink]`
//! (`fare_config::SinkSpec`, the one sink config type).
//!
//! Upserts send the entity's `data` as the JSON body with the configured method (PUT by
//! default); tombstones send DELETE (configurable). The URL template may use `{entity_type}`
//! and `{entity_id}` (percent-encoded). Every request carries `X-Resync-Entity-Version`,
//! `X-Resync-Event-Id`, `Idempotency-Key` (the event id), `X-Resync-Stream` (`live` or
//! `resync`) and, for a resync job's events, `X-Resync-Job-Id`, plus configured headers whose
//! values may reference env vars as `${NAME}` so secrets never sit in config files.

use std::time::Duration;

use async_trait::async_trait;
use fare_config::{ResponseClasses, SinkSpec};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};

use super::{Sink, SinkError, SinkWrite};

#[derive(Debug, thiserror::Error)]
pub enum HttpSinkConfigError {
    #[error("sink.{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> HttpSinkConfigError {
    HttpSinkConfigError::Invalid { key: key.into(), problem: problem.into() }
}

pub struct HttpSink {
    name: String,
    client: reqwest::Client,
    url: String,
    method: Method,
    delete_method: Method,
    headers: HeaderMap,
    timeout: Duration,
    /// The version precondition header, and the statuses meaning "already this or newer".
    conditional: Option<(HeaderName, Vec<StatusCode>)>,
    responses: ResponseClasses,
}

/// Most bytes of an error response kept for the dead-letter detail.
const MAX_ERROR_BODY: usize = 1024;

impl HttpSink {
    /// Validates the config, resolves `${VAR}` headers from the environment, builds the client.
    pub fn new(config: &SinkSpec, default_name: &str) -> Result<Self, HttpSinkConfigError> {
        let method = parse_method("method", &config.method)?;
        let delete_method = parse_method("delete_method", &config.delete_method)?;
        let sample = expand_url(&config.url, "listing", "1");
        reqwest::Url::parse(&sample)
            .map_err(|e| invalid("url", format!("`{}` is not a URL: {e}", config.url)))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let key = format!("headers.{name}");
            let value = expand_env(value).map_err(|problem| invalid(&key, problem))?;
            let name = HeaderName::try_from(name.as_str()).map_err(|e| invalid(&key, e.to_string()))?;
            let mut value = HeaderValue::try_from(value).map_err(|e| invalid(&key, e.to_string()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let conditional = match &config.conditional {
            Some(spec) => {
                let name = HeaderName::try_from(spec.header.as_str())
                    .map_err(|e| invalid("conditional.header", e.to_string()))?;
                let statuses = spec
                    .stale_statuses
                    .iter()
                    .map(|s| {
                        StatusCode::from_u16(*s)
                            .map_err(|e| invalid("conditional.stale_statuses", e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some((name, statuses))
            }
            None => None,
        };
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| invalid("timeout", e.to_string()))?;
        Ok(Self {
            name: config.name.clone().unwrap_or_else(|| default_name.to_string()),
            client,
            url: config.url.clone(),
            method,
            delete_method,
            headers,
            timeout: config.timeout,
            conditional,
            responses: config.responses.clone(),
        })
    }
}

fn parse_method(key: &str, text: &str) -> Result<Method, HttpSinkConfigError> {
    match text.to_ascii_uppercase().as_str() {
        m @ ("PUT" | "POST" | "PATCH" | "DELETE") => {
            Method::from_bytes(m.as_bytes()).map_err(|e| invalid(key, e.to_string()))
        }
        other => Err(invalid(key, format!("`{other}`: expected PUT, POST, PATCH or DELETE"))),
    }
}

/// Replaces `${NAME}` with the env var NAME; a missing var is an error naming it.
fn expand_env(value: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unclosed `${{` in `{value}`"))?;
        let name = &after[..end];
        let resolved = std::env::var(name).map_err(|_| format!("env var `{name}` is not set"))?;
        out.push_str(&resolved);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn expand_url(template: &str, entity_type: &str, entity_id: &str) -> String {
    template.replace("{entity_type}", &encode(entity_type)).replace("{entity_id}", &encode(entity_id))
}

/// `Retry-After` in seconds or as an HTTP date is coarse; the precise `Retry-After-Ms` some
/// APIs (and apisim) send wins when present.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    let value = text(RETRY_AFTER.as_str())?;
    if let Ok(seconds) = value.parse::<f64>() {
        return Some(Duration::from_secs_f64(seconds.max(0.0)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()
}

/// What a non-2xx answer means: 429 and 503 are overload (retried, and the shared rate goes
/// down), other 5xx and the configured 4xx are retried, configured 5xx and other 4xx
/// dead-letter the event at once.
fn classify(status: StatusCode, headers: &HeaderMap, body: String, classes: &ResponseClasses) -> SinkError {
    let code = status.as_u16();
    let reason = format!("HTTP {status}");
    if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
        && !classes.dead_letter.contains(&code)
    {
        return SinkError::Overloaded { status: code, reason, retry_after: retry_after(headers) };
    }
    let retried = if status.is_server_error() {
        !classes.dead_letter.contains(&code)
    } else {
        classes.retry.contains(&code)
    };
    if retried {
        SinkError::Transient { reason, retry_after: retry_after(headers), outage: true }
    } else {
        SinkError::Rejected { status: code, body }
    }
}

#[async_trait]
impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn call_timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }

    async fn apply(&self, write: &SinkWrite<'_>) -> Result<(), SinkError> {
        let url = expand_url(&self.url, write.entity_type, write.entity_id);
        let method = if write.deleted { self.delete_method.clone() } else { self.method.clone() };
        let mut request = self
            .client
            .request(method.clone(), &url)
            .headers(self.headers.clone())
            .header("x-resync-entity-version", write.version)
            .header("x-resync-event-id", write.event_id.to_string())
            .header("idempotency-key", write.event_id.to_string())
            .header("x-resync-stream", write.origin.stream());
        if let Some(job_id) = write.origin.job_id() {
            request = request.header("x-resync-job-id", job_id.to_string());
        }
        if let Some((header, _)) = &self.conditional {
            request = request.header(header.clone(), write.version);
        }
        if method != Method::DELETE {
            request = request.json(write.data);
        }
        let response = request.send().await.map_err(|e| SinkError::Transient {
            reason: if e.is_timeout() {
                format!("timed out calling {url}")
            } else {
                format!("calling {url}: {e}")
            },
            retry_after: None,
            outage: true,
        })?;
        let status = response.status();
        // A DELETE of something already gone is done.
        let gone = method == Method::DELETE && self.responses.delete_gone.contains(&status.as_u16());
        if status.is_success() || gone {
            return Ok(());
        }
        if self.conditional.as_ref().is_some_and(|(_, stale)| stale.contains(&status)) {
            // The third party has this version or a newer one: nothing of ours can land over
            // it. Recorded as applied; a newer one recorded meanwhile is re-sent (and refused
            // the same way if the third party has it).
            metrics::counter!("resync_sink_refused_not_newer_total", "sink" => self.name.clone())
                .increment(1);
            tracing::debug!(%status, version = write.version, "the third party already has this version or a newer one");
            return Ok(());
        }
        let headers = response.headers().clone();
        let mut body = response.text().await.unwrap_or_default();
        if body.len() > MAX_ERROR_BODY {
            let mut cut = MAX_ERROR_BODY;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
        }
        Err(classify(status, &headers, body, &self.responses))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn urls_expand_and_encode_ids() {
        assert_eq!(
            expand_url("http://x/{entity_type}/{entity_id}", "listing", "a b/c"),
            "http://x/listing/a%20b%2Fc"
        );
    }

    #[test]
    fn env_references_in_headers_resolve_or_name_the_missing_var() {
        assert_eq!(
            expand_env("Bearer ${PATH}").unwrap(),
            format!("Bearer {}", std::env::var("PATH").unwrap())
        );
        assert_eq!(
            expand_env("${RESYNC_SURELY_NOT_SET_123}").unwrap_err(),
            "env var `RESYNC_SURELY_NOT_SET_123` is not set"
        );
    }

    #[test]
    fn statuses_map_to_retry_or_dead_letter() {
        let defaults = ResponseClasses::default();
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &headers, String::new(), &defaults),
            SinkError::Overloaded {
                status: 429,
                reason: "HTTP 429 Too Many Requests".into(),
                retry_after: Some(Duration::from_secs(2))
            }
        );
        let bad_gateway = classify(StatusCode::BAD_GATEWAY, &HeaderMap::new(), String::new(), &defaults);
        assert!(matches!(bad_gateway, SinkError::Transient { .. }) && bad_gateway.is_outage());
        assert!(
            classify(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new(), String::new(), &defaults)
                .is_outage()
        );
        assert!(
            !classify(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), String::new(), &defaults).is_outage()
        );
        headers.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(250)));
        assert!(
            classify(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new(), String::new(), &defaults)
                .is_transient()
        );
        assert_eq!(
            classify(StatusCode::UNPROCESSABLE_ENTITY, &HeaderMap::new(), "bad".into(), &defaults),
            SinkError::Rejected { status: 422, body: "bad".into() }
        );
        assert!(
            classify(StatusCode::REQUEST_TIMEOUT, &HeaderMap::new(), String::new(), &defaults).is_transient()
        );
        let custom =
            ResponseClasses { retry: vec![409], dead_letter: vec![501], ..ResponseClasses::default() };
        assert!(classify(StatusCode::CONFLICT, &HeaderMap::new(), String::new(), &custom).is_transient());
        assert!(
            !classify(StatusCode::NOT_IMPLEMENTED, &HeaderMap::new(), String::new(), &custom).is_transient()
        );
        assert!(
            !classify(StatusCode::REQUEST_TIMEOUT, &HeaderMap::new(), String::new(), &custom).is_transient()
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut config = SinkSpec {
            name: None,
            url: "http://x/{entity_id}".into(),
            method: "GET".into(),
            delete_method: "DELETE".into(),
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            rate_limit: None,
            circuit: fare_config::CircuitSpec::default(),
            conditional: None,
            responses: ResponseClasses::default(),
        };
        assert!(HttpSink::new(&config, "s").err().unwrap().to_string().starts_with("sink.method"));
        config.method = "put".into();
        config.headers.insert("authorization".into(), "Bearer ${RESYNC_SURELY_NOT_SET_123}".into());
        assert!(
            HttpSink::new(&config, "s").err().unwrap().to_string().starts_with("sink.headers.authorization")
        );
    }
}
