//! The HTTP service: routes, the write path (latency, fault verdict, apply, answer), stats,
//! and the ways to run it ([`serve`] on a listener, [`start`] in the background).
//!
//! Two short mutex sections per write (the fault verdict, then the apply); every sleep
//! (latency, an applied-then-timeout hold) happens outside them and ends early on shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::serve::ListenerExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, FaultsPatch};
use crate::faults::{Faults, Verdict};
use crate::model::{Op, Stats, WriteAck};
use crate::store::{Store, Write};
use crate::{Client, Error};

/// Header carrying the entity version being written.
pub const VERSION_HEADER: &str = "x-resync-entity-version";
/// Header carrying the event id of the write.
pub const EVENT_ID_HEADER: &str = "x-resync-event-id";
/// `live` or `resync`, recorded in the write log.
pub(crate) const STREAM_HEADER: &str = "x-resync-stream";
/// A resync job's id, recorded in the write log.
pub(crate) const JOB_ID_HEADER: &str = "x-resync-job-id";
/// `GET /log` answers at most this many entries when no `limit` is given.
pub const DEFAULT_LOG_LIMIT: usize = 10_000;
/// `GET /log` never answers more than this many entries.
pub const MAX_LOG_LIMIT: usize = 100_000;

/// Serves the simulator on `listener` until `shutdown` completes, then finishes in-flight
/// requests (cutting their sleeps short) and returns.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.validate()?;
    let stopping = CancellationToken::new();
    let app = router(Arc::new(Sim::new(config, stopping.clone())));
    // Small answers on keep-alive connections: do not let Nagle hold them back.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopping.cancel();
        })
        .await?;
    Ok(())
}

/// Starts the simulator on `127.0.0.1` with a free port, in the background.
pub async fn start(config: Config) -> Result<Running, Error> {
    start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
}

/// Starts the simulator on `addr` in the background.
pub async fn start_on(addr: SocketAddr, config: Config) -> Result<Running, Error> {
    config.validate()?;
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    // A dropped sender also stops the server, so dropping `Running` shuts it down.
    let task = tokio::spawn(serve(listener, config, async move {
        let _ = stopped.await;
    }));
    tracing::info!(%addr, "apisim started");
    Ok(Running { addr, stop: Some(stop), task: Some(task) })
}

/// A simulator running in the background; dropping it shuts it down.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), Error>>>,
}

impl Running {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for this simulator.
    pub fn client(&self) -> Result<Client, Error> {
        Client::new(self.url())
    }

    /// Stops accepting, lets in-flight requests finish (their sleeps cut short) and waits.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|e| Error::Task(e.to_string()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/entities/{entity_type}/{entity_id}", put(put_entity).delete(delete_entity).get(get_entity))
        .route("/state", get(state))
        .route("/log", get(log))
        .route("/check", get(check))
        .route("/admin/stats", get(stats))
        .route("/admin/faults", put(set_faults).get(get_faults))
        .route("/admin/reset", post(reset))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(sim)
}

struct Sim {
    store: Mutex<Store>,
    faults: Mutex<Faults>,
    holds: Mutex<Holds>,
    counters: Counters,
    started: Instant,
    stopping: CancellationToken,
}

/// Writes held until released (`FaultsPatch::hold_next_write_of`).
#[derive(Default)]
struct Holds {
    /// The entity id whose next write is held.
    next_of: Option<String>,
    /// Cancelled by `release_held`: every write held so far is applied.
    release: CancellationToken,
}

/// Lock-free counters; `by_status` is indexed by the status code.
struct Counters {
    requests: AtomicU64,
    applied: AtomicU64,
    by_status: Box<[AtomicU64]>,
}

impl Counters {
    fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            by_status: (0..600).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn status(&self, status: StatusCode) {
        if let Some(counter) = self.by_status.get(usize::from(status.as_u16())) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn reset(&self) {
        for counter in [&self.requests, &self.applied].into_iter().chain(self.by_status.iter()) {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// The state is valid after any panic (each update is a single assignment or push), so a
/// poisoned lock is used as is rather than taking the server down.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sim {
    fn new(config: Config, stopping: CancellationToken) -> Self {
        let now = Instant::now();
        Self {
            store: Mutex::new(Store::default()),
            faults: Mutex::new(Faults::new(config, now)),
            holds: Mutex::new(Holds::default()),
            counters: Counters::new(),
            started: now,
            stopping,
        }
    }

    /// Sleeps, or returns early when the server stops.
    async fn pause(&self, duration: Duration) {
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            () = self.stopping.cancelled() => {}
        }
    }

    /// Counts the answer to a write and builds it.
    fn answer(&self, status: StatusCode, body: Value) -> Response {
        self.counters.status(status);
        (status, Json(body)).into_response()
    }

    async fn write(
        self: &Arc<Self>,
        entity_type: String,
        entity_id: String,
        op: Op,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let latency = lock(&self.faults).latency();
        if let Some(latency) = latency {
            self.pause(latency).await;
        }
        let version = match parse_version(headers) {
            Ok(version) => version,
            Err(problem) => return self.answer(StatusCode::BAD_REQUEST, json!({ "error": problem })),
        };
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(Box::from);
        let (event_id, stream, job_id) =
            (header(EVENT_ID_HEADER), header(STREAM_HEADER), header(JOB_ID_HEADER));
        let data = match op {
            Op::Delete => Value::Null,
            Op::Upsert => match serde_json::from_slice(&body) {
                Ok(data) => data,
                Err(e) => {
                    let error = format!("the body is not JSON: {e}");
                    return self.answer(StatusCode::BAD_REQUEST, json!({ "error": error }));
                }
            },
        };

        let verdict = lock(&self.faults).decide(Instant::now());
        let then_timeout = match verdict {
            Verdict::Apply { then_timeout } => then_timeout,
            Verdict::Outage { remaining } => {
                let mut response = self.answer(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": "outage" }));
                retry_after(response.headers_mut(), remaining);
                return response;
            }
            Verdict::RateLimited { wait } => {
                let mut response =
                    self.answer(StatusCode::TOO_MANY_REQUESTS, json!({ "error": "rate limit exceeded" }));
                retry_after(response.headers_mut(), wait);
                return response;
            }
            Verdict::Error { status } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return self.answer(status, json!({ "error": "simulated server error" }));
            }
            Verdict::Reject { status } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
                return self
                    .answer(status, json!({ "error": "simulated rejection: the API refuses this entity" }));
            }
        };

        let write = Write { entity_type, entity_id, version, event_id, op, data, stream, job_id };
        match self.take_hold(&write.entity_id) {
            // Applied by a task of its own, so a client that gives up does not cancel it.
            Some(release) => {
                let sim = Arc::clone(self);
                let held = tokio::spawn(async move {
                    tokio::select! {
                        () = release.cancelled() => {}
                        () = sim.stopping.cancelled() => {}
                    }
                    sim.apply(write, then_timeout).await
                });
                held.await.unwrap_or_else(|e| {
                    self.answer(StatusCode::INTERNAL_SERVER_ERROR, json!({ "error": e.to_string() }))
                })
            }
            None => self.apply(write, then_timeout).await,
        }
    }

    /// The release of the writes held so far, if `entity_id`'s next write is to be held.
    fn take_hold(&self, entity_id: &str) -> Option<CancellationToken> {
        let mut holds = lock(&self.holds);
        if holds.next_of.as_deref() != Some(entity_id) {
            return None;
        }
        holds.next_of = None;
        Some(holds.release.clone())
    }

    /// Applies a write that passed every fault, and answers it.
    async fn apply(&self, write: Write, then_timeout: Option<Duration>) -> Response {
        let ack = WriteAck {
            entity_type: write.entity_type.clone(),
            entity_id: write.entity_id.clone(),
            version: write.version,
        };
        let op = write.op;
        let conditional = lock(&self.faults).config().conditional_writes;
        let applied = if conditional {
            match lock(&self.store).apply_if_newer(write, chrono::Utc::now()) {
                Some(applied) => applied,
                None => {
                    let error = "precondition failed: the entity has this version or a newer one";
                    return self.answer(StatusCode::PRECONDITION_FAILED, json!({ "error": error }));
                }
            }
        } else {
            lock(&self.store).apply(write, chrono::Utc::now())
        };
        self.counters.applied.fetch_add(1, Ordering::Relaxed);

        if let Some(hold) = then_timeout {
            // Counted now: the client has usually given up (and hung up) before the answer.
            let response = self.answer(StatusCode::GATEWAY_TIMEOUT, json!({ "error": "upstream timeout" }));
            self.pause(hold).await;
            return response;
        }
        let status = if applied.created && op == Op::Upsert { StatusCode::CREATED } else { StatusCode::OK };
        self.counters.status(status);
        (status, Json(ack)).into_response()
    }

    fn stats(&self) -> Stats {
        let now = Instant::now();
        let (config, outage) = {
            let faults = lock(&self.faults);
            (faults.config().clone(), faults.outage_remaining(now))
        };
        let by_status: BTreeMap<u16, u64> = self
            .counters
            .by_status
            .iter()
            .zip(0u16..)
            .filter_map(|(count, status)| {
                Some((status, count.load(Ordering::Relaxed))).filter(|(_, n)| *n > 0)
            })
            .collect();
        Stats {
            requests: self.counters.requests.load(Ordering::Relaxed),
            applied: self.counters.applied.load(Ordering::Relaxed),
            by_status,
            uptime_ms: millis(now - self.started),
            outage_remaining_ms: outage.map(millis),
            config,
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `Retry-After` in whole seconds (rounded up, at least 1) and the precise `Retry-After-Ms`.
fn retry_after(headers: &mut HeaderMap, wait: Duration) {
    let ms = wait.as_nanos().div_ceil(1_000_000).max(1);
    let seconds = ms.div_ceil(1000);
    headers.insert("retry-after", HeaderValue::from(u64::try_from(seconds).unwrap_or(u64::MAX)));
    headers.insert("retry-after-ms", HeaderValue::from(u64::try_from(ms).unwrap_or(u64::MAX)));
}

/// An absent header is an unversioned write; a malformed one is a 400.
fn parse_version(headers: &HeaderMap) -> Result<Option<i64>, String> {
    let Some(value) = headers.get(VERSION_HEADER) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| format!("{VERSION_HEADER} is not text"))?;
    text.trim().parse().map(Some).map_err(|_| format!("{VERSION_HEADER} `{text}` is not an integer"))
}

async fn put_entity(
    State(sim): State<Arc<Sim>>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sim.write(entity_type, entity_id, Op::Upsert, &headers, body).await
}

async fn delete_entity(
    State(sim): State<Arc<Sim>>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sim.write(entity_type, entity_id, Op::Delete, &headers, body).await
}

async fn get_entity(
    State(sim): State<Arc<Sim>>,
    Path((entity_type, entity_id)): Path<(String, String)>,
) -> Response {
    match lock(&sim.store).get(&entity_type, &entity_id) {
        Some(state) => Json(state).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({ "error": "no such entity" }))).into_response(),
    }
}

async fn state(State(sim): State<Arc<Sim>>) -> Response {
    let state = lock(&sim.store).state();
    Json(state).into_response()
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

async fn log(State(sim): State<Arc<Sim>>, Query(query): Query<LogQuery>) -> Response {
    let limit = query.limit.unwrap_or(DEFAULT_LOG_LIMIT).min(MAX_LOG_LIMIT);
    let entries = lock(&sim.store).log(query.since, limit);
    Json(entries).into_response()
}

async fn check(State(sim): State<Arc<Sim>>) -> Response {
    let report = lock(&sim.store).check();
    Json(report).into_response()
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    Json(sim.stats()).into_response()
}

async fn get_faults(State(sim): State<Arc<Sim>>) -> Response {
    let config = lock(&sim.faults).config().clone();
    Json(config).into_response()
}

async fn set_faults(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    let patch: FaultsPatch = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({ "error": e.to_string() }))).into_response(),
    };
    let result = lock(&sim.faults).patch(&patch, Instant::now());
    if result.is_ok() {
        let mut holds = lock(&sim.holds);
        if patch.release_held == Some(true) {
            holds.release.cancel();
            holds.release = CancellationToken::new();
        }
        if let Some(entity_id) = &patch.hold_next_write_of {
            holds.next_of = Some(entity_id.clone());
        }
    }
    match result {
        Ok(config) => {
            tracing::info!(?config, "faults changed");
            Json(config).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({ "error": e.to_string() }))).into_response(),
    }
}

async fn reset(State(sim): State<Arc<Sim>>) -> Response {
    *lock(&sim.store) = Store::default();
    lock(&sim.faults).reset(Instant::now());
    // Writes already held stay held until released (or the server stops).
    lock(&sim.holds).next_of = None;
    sim.counters.reset();
    tracing::info!("reset");
    Json(json!({})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up() {
        let mut headers = HeaderMap::new();
        retry_after(&mut headers, Duration::from_micros(1_500));
        assert_eq!(
            (&headers["retry-after"], &headers["retry-after-ms"]),
            (&HeaderValue::from(1), &HeaderValue::from(2))
        );
        retry_after(&mut headers, Duration::from_millis(2_001));
        assert_eq!(
            (&headers["retry-after"], &headers["retry-after-ms"]),
            (&HeaderValue::from(3), &HeaderValue::from(2001))
        );
        retry_after(&mut headers, Duration::ZERO);
        assert_eq!(headers["retry-after-ms"], HeaderValue::from(1));
    }

    #[test]
    fn versions_parse_or_explain() {
        let mut headers = HeaderMap::new();
        assert_eq!(parse_version(&headers), Ok(None));
        headers.insert(VERSION_HEADER, HeaderValue::from_static("42"));
        assert_eq!(parse_version(&headers), Ok(Some(42)));
        headers.insert(VERSION_HEADER, HeaderValue::from_static("v2"));
        assert_eq!(
            parse_version(&headers),
            Err("x-resync-entity-version `v2` is not an integer".to_string())
        );
    }
}
