//! The service config format: one TOML file per service, read from a directory, validated as a
//! whole (every error names the file, the key and what is expected).
//!
//! ```toml
//! name = "channel-sync"
//! publishes = []                        # event types this service emits
//!
//! [[subscriptions]]
//! types = ["listing.*"]                 # `entity.verb` or `entity.*`
//! streams = ["live", "resync"]          # default: both
//! max_receive_count = 5                 # deliveries before the dead-letter queue
//! visibility_timeout = "30s"            # SQS; renewed while an event is being handled
//!
//! [sink]                                # used by `resync consume`
//! url = "https://api.example.com/listings/{entity_id}"
//! headers = { Authorization = "Bearer ${CHANNEL_API_TOKEN}" }
//!
//! [consumer]
//! concurrency = 32
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use resync_bus::Stream;
use resync_bus::transport::QueueSpec;
use schemars::JsonSchema;
use serde::Deserialize;

/// A config problem, located.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: `{key}`: {problem}", file.display())]
    Invalid { file: PathBuf, key: String, problem: String },
    #[error("{}: {detail}", file.display())]
    Parse { file: PathBuf, detail: String },
    #[error("{}: {detail}", dir.display())]
    Directory { dir: PathBuf, detail: String },
    #[error("namespace `{namespace}` (--namespace / RESYNC_NAMESPACE): {problem}")]
    Namespace { namespace: String, problem: String },
}

/// Longest namespace; see [`MAX_SERVICE_NAME`].
pub const MAX_NAMESPACE: usize = 20;

/// Checks a namespace against the naming rules every queue and topic name must meet on SQS,
/// SNS and AMQP: lowercase letters, digits and `-`, starting with a letter, at most
/// [`MAX_NAMESPACE`] characters.
pub fn check_namespace(namespace: &str) -> Result<(), ConfigError> {
    let problem = if namespace.len() > MAX_NAMESPACE {
        Some(format!(
            "{} characters, at most {MAX_NAMESPACE} fit SQS's 80-character queue names",
            namespace.len()
        ))
    } else if !namespace.starts_with(|c: char| c.is_ascii_lowercase())
        || !namespace.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        Some("expected lowercase letters, digits and `-`, starting with a letter".to_string())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ConfigError::Namespace { namespace: namespace.to_string(), problem }),
        None => Ok(()),
    }
}

fn invalid(file: &Path, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { file: file.to_path_buf(), key: key.into(), problem: problem.into() }
}

/// Every service of a system, as declared in a directory of config files.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    /// Sorted by name.
    pub services: Vec<ServiceConfig>,
}

impl Catalog {
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Checks what only the whole system can tell: unique names, and subscriptions to types
    /// someone publishes.
    pub fn new(mut services: Vec<ServiceConfig>) -> Result<Self, ConfigError> {
        services.sort_by(|a, b| a.name.cmp(&b.name));
        for pair in services.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(invalid(
                    &pair[1].source_file,
                    "name",
                    format!(
                        "service `{}` is also declared in {}; each service has one config file",
                        pair[1].name,
                        pair[0].source_file.display()
                    ),
                ));
            }
        }
        let published: BTreeSet<&str> =
            services.iter().flat_map(|s| s.publishes.iter().map(String::as_str)).collect();
        for service in &services {
            for (i, subscription) in service.subscriptions.iter().enumerate() {
                for (j, pattern) in subscription.types.iter().enumerate() {
                    let matched = published.iter().any(|t| resync_bus::Filter::types([pattern]).matches(t));
                    if !matched {
                        return Err(invalid(
                            &service.source_file,
                            format!("subscriptions[{i}].types[{j}]"),
                            format!(
                                "no service publishes an event matching `{pattern}` (add it to some service's `publishes`)"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(Self { services })
    }

    /// Entity types someone publishes: each has a topic per stream.
    pub fn published_entities(&self) -> BTreeSet<String> {
        self.services
            .iter()
            .flat_map(|s| s.publishes.iter())
            .filter_map(|t| t.split_once('.').map(|(entity, _)| entity.to_string()))
            .collect()
    }
}

/// One service, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub publishes: Vec<String>,
    pub subscriptions: Vec<SubscriptionSpec>,
    pub sink: Option<SinkSpec>,
    pub consumer: ConsumerSpec,
    /// Where `resync job start` reads this service's entities for a full resync.
    pub sources: Vec<SourceSpec>,
    pub source_file: PathBuf,
}

impl ServiceConfig {
    /// The name applied versions and dead-lettered entities are recorded under: the sink's
    /// `name`, or the service's.
    pub fn sink_name(&self) -> String {
        self.sink.as_ref().and_then(|s| s.name.clone()).unwrap_or_else(|| self.name.clone())
    }

    /// The (stream, queue) pairs this service consumes, one queue per stream.
    pub fn queues(&self, namespace: Option<&str>) -> Vec<(Stream, QueueSpec)> {
        let mut queues: BTreeMap<&'static str, (Stream, QueueSpec)> = BTreeMap::new();
        for subscription in &self.subscriptions {
            for stream in &subscription.streams {
                queues.entry(stream.as_str()).or_insert_with(|| {
                    let mut spec =
                        QueueSpec::new(resync_bus::naming::queue_name(namespace, &self.name, *stream));
                    spec.owner = Some(crate::topology::owner_mark(namespace));
                    spec.max_receive_count = subscription.max_receive_count;
                    spec.visibility_timeout = subscription.visibility_timeout;
                    (*stream, spec)
                });
            }
        }
        queues.into_values().collect()
    }

    /// The event types this service receives on `stream` (an empty filter: none).
    pub fn subscribed(&self, stream: Stream) -> resync_bus::Filter {
        resync_bus::Filter::types(
            self.subscriptions
                .iter()
                .filter(|s| s.streams.contains(&stream))
                .flat_map(|s| s.types.iter().cloned()),
        )
    }
}

/// Event types a service receives on some streams, with the settings of their queue.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionSpec {
    pub types: Vec<String>,
    pub streams: Vec<Stream>,
    pub max_receive_count: u32,
    pub visibility_timeout: Duration,
}

/// The built-in HTTP sink, as `resync consume` builds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkSpec {
    pub name: Option<String>,
    pub url: String,
    pub method: String,
    pub delete_method: String,
    /// Values may reference env vars as `${VAR}`; resolved by the consumer at startup.
    pub headers: BTreeMap<String, String>,
    pub timeout: Duration,
    /// A rate shared by every consumer of this sink (through Redis).
    pub rate_limit: Option<RateLimitSpec>,
    /// When to stop calling a third party that is down, and how to find out it is back.
    pub circuit: CircuitSpec,
    /// The third party enforces versions (`None`: it does not).
    pub conditional: Option<ConditionalSpec>,
    /// What the third party's answers mean, beyond 2xx (applied) and the defaults.
    pub responses: ResponseClasses,
}

/// What non-2xx answers mean. Not listed: 429 and 5xx are retried, other 4xx dead-letter the
/// event at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseClasses {
    /// Answers to a tombstone (DELETE) meaning the entity is already gone: applied.
    pub delete_gone: Vec<u16>,
    /// 4xx answers retried like a 5xx (e.g. 409 from an API that locks records briefly).
    pub retry: Vec<u16>,
    /// 5xx answers that dead-letter at once (e.g. 501 Not Implemented).
    pub dead_letter: Vec<u16>,
}

impl Default for ResponseClasses {
    fn default() -> Self {
        Self { delete_gone: vec![404, 410], retry: vec![408, 425], dead_letter: Vec::new() }
    }
}

/// Conditional writes: the third party applies a write only if its version is newer than what
/// it has, so a late write of an older version can never land.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionalSpec {
    /// The request header carrying the version as the precondition.
    pub header: String,
    /// Statuses that mean "I have this version or a newer one": the write counts as applied.
    pub stale_statuses: Vec<u16>,
}

/// The sink's circuit breaker, shared by every consumer of the sink through Redis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitSpec {
    /// Off: every event retries on its own (and is dead-lettered after its deliveries).
    pub enabled: bool,
    /// Outage failures in a row (connection errors, timeouts, 5xx), over every consumer, that
    /// open the circuit.
    pub failure_threshold: u32,
    /// The wait before the first probe once open; it doubles after each failed probe...
    pub min_probe_interval: Duration,
    /// ...up to this.
    pub max_probe_interval: Duration,
    /// How long an event already taken waits for an open circuit before it goes back to its
    /// queue (which spends one of its deliveries).
    pub max_hold: Duration,
}

impl Default for CircuitSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_threshold: 10,
            min_probe_interval: Duration::from_secs(1),
            max_probe_interval: Duration::from_secs(60),
            max_hold: Duration::from_secs(20 * 60),
        }
    }
}

/// The third party's rate limit and quotas, shared by all consumers of a sink, however many run.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitSpec {
    /// Requests per second in total: the most the sink ever sees (`None`: no per-second pacing).
    pub per_second: Option<f64>,
    /// Requests that may go at once above the steady rate.
    pub burst: u32,
    /// Cut the shared rate on 429/503 and climb back while calls succeed, so a lower or
    /// changing real limit is found without configuration.
    pub adaptive: bool,
    /// The floor of an adaptive rate.
    pub min_per_second: f64,
    /// Budgets over fixed windows aligned to UTC (`per_minute`, `per_hour`, `per_day`, and
    /// `[[sink.rate_limit.quota]]` for other lengths), shortest window first.
    pub quotas: Vec<QuotaSpec>,
    /// Calls in flight to the sink across every consumer process.
    pub max_in_flight: Option<u32>,
}

/// At most `limit` calls in each window of length `window` (windows start at multiples of
/// `window` since the Unix epoch, so days turn at 00:00 UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSpec {
    pub limit: u64,
    pub window: Duration,
}

/// How `resync consume` runs for this service (flags override).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub concurrency: usize,
    pub prefetch: u16,
    pub batch_size: usize,
    /// Sink calls in flight adapt between 1 and `concurrency` (AIMD on 429/503 and latency).
    pub adaptive_concurrency: bool,
}

impl Default for ConsumerSpec {
    fn default() -> Self {
        Self { concurrency: 32, prefetch: 32, batch_size: 16, adaptive_concurrency: false }
    }
}

/// The table an entity type is resynced from. Identifiers are checked against the database
/// catalog and quoted when a job starts; `filter` is an SQL boolean expression written by the
/// service's owners (it runs in a read-only transaction and may not contain `;`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    pub entity: String,
    /// `table` or `schema.table`.
    pub table: String,
    /// The key: one column (`id_column`), or several (`id_columns`, e.g. `tenant_id, id`) whose
    /// text values, joined by `:`, form the entity id.
    pub key_columns: Vec<String>,
    /// A column the application keeps equal to the version `resync.emit` assigned, checked
    /// against it; `None` (the default): a job reads resync's own per-entity counter.
    pub version_column: Option<String>,
    /// A jsonb column holding the event data, or the columns that form it.
    pub data: SourceData,
    /// A boolean column: true rows are resent as `<entity>.deleted` tombstones.
    pub deleted_column: Option<String>,
    pub filter: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceData {
    Column(String),
    Columns(Vec<String>),
}

// ---- the file format ---------------------------------------------------------------------

/// One service's config file (`<service>.toml`, or `.yaml`, in the config directory).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "resync service config")]
struct ServiceFile {
    /// The service: lowercase letters, digits and `-`, starting with a letter, at most 40
    /// characters; part of its queue names.
    name: String,
    /// Event types this service emits, `entity.verb`; each entity gets a topic per stream.
    #[serde(default)]
    publishes: Vec<String>,
    /// What this service receives.
    #[serde(default)]
    subscriptions: Vec<SubscriptionFile>,
    /// Where `resync consume` applies this service's events.
    sink: Option<SinkFile>,
    /// How `resync consume` runs for this service.
    #[serde(default)]
    consumer: ConsumerFile,
    /// The tables `resync job start` resends entities from (one per entity type published).
    #[serde(default)]
    sources: Vec<SourceFile>,
}

/// Where a full resync reads an entity type.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    /// The entity type, e.g. `listing`; the service must publish `<entity>.updated`.
    entity: String,
    /// `table` or `schema.table`.
    table: String,
    /// The entity id column (any type; sent as text). Default `id`.
    id_column: Option<String>,
    /// Instead of `id_column`: a composite key, e.g. `["tenant_id", "id"]`. The entity id is
    /// the columns' text values joined by `:` (`7:42`), so values must not contain `:`; rows
    /// are read in the key's order (tenant, then id).
    id_columns: Option<Vec<String>>,
    /// Optional. By default a job sends the version `resync.emit` last assigned to the entity
    /// (resync's own counter, read in the job's snapshot), so live and resync events always
    /// agree. Name a column only if the table keeps a copy of that version (it is checked
    /// against resync's, and a job that finds them different refuses to start) or if the
    /// service publishes its own events with this column as their version (no counter yet).
    version_column: Option<String>,
    /// A jsonb column holding the event data ...
    data_column: Option<String>,
    /// ... or the columns that form it (`{"column": value, ...}`). Exactly one of the two.
    data_columns: Option<Vec<String>>,
    /// A boolean column: rows where it is true are resent as `<entity>.deleted` tombstones.
    deleted_column: Option<String>,
    /// An SQL boolean expression over the table's columns limiting which rows are resent.
    filter: Option<String>,
}

/// Event types received on some streams, and the settings of the queue they arrive in.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SubscriptionFile {
    /// `entity.verb` or `entity.*`; each must match a type some service publishes.
    types: Vec<String>,
    /// `live` and/or `resync` (default both).
    streams: Option<Vec<String>>,
    /// Deliveries before a message goes to the dead-letter queue (default 5, 1 to 1000).
    max_receive_count: Option<u32>,
    /// SQS visibility timeout, e.g. `30s` (default), at most `12h`.
    visibility_timeout: Option<String>,
    /// Not supported (resync orders by entity version); only `false` is accepted.
    fifo: Option<bool>,
}

/// The built-in HTTP sink.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SinkFile {
    /// Name applied versions are tracked under (default: the service name).
    name: Option<String>,
    /// `http(s)://...` with `{entity_type}` and `{entity_id}` placeholders.
    url: String,
    /// Upserts: PUT (default), POST or PATCH.
    method: Option<String>,
    /// Tombstones: DELETE (default), PUT, POST or PATCH.
    delete_method: Option<String>,
    /// Extra headers; `${VAR}` is read from the environment (credentials must be).
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Per-request timeout, e.g. `10s` (default).
    timeout: Option<String>,
    /// The third party's rate limit, shared by every consumer of this sink through Redis.
    rate_limit: Option<RateLimitFile>,
    /// When to stop calling a third party that is down (on by default).
    circuit: Option<CircuitFile>,
    /// The third party enforces versions: a write not newer than what it has is refused.
    conditional: Option<ConditionalFile>,
    /// What the third party's answers mean beyond 2xx (applied), 429/5xx (retried) and other
    /// 4xx (dead-lettered at once).
    responses: Option<ResponsesFile>,
}

/// `[sink.responses]`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ResponsesFile {
    /// Answers to a DELETE meaning "already gone", counted as applied (default [404, 410]).
    delete_gone: Option<Vec<u16>>,
    /// 4xx answers to retry rather than dead-letter (default [408, 425]).
    retry: Option<Vec<u16>>,
    /// 5xx answers to dead-letter at once rather than retry (default none).
    dead_letter: Option<Vec<u16>>,
}

/// `[sink.conditional]`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ConditionalFile {
    /// The header carrying the version as the precondition (default
    /// `X-Resync-Entity-Version`, sent on every request anyway).
    header: Option<String>,
    /// Statuses meaning "I already have this version or a newer one" (default [409, 412]).
    stale_statuses: Option<Vec<u16>>,
}

/// `[sink.circuit]`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CircuitFile {
    /// Hold every consumer of the sink while the third party is down (default true).
    enabled: Option<bool>,
    /// Outage failures in a row, over every consumer, that open the circuit (default 10).
    failure_threshold: Option<u32>,
    /// The wait before the first probe, e.g. `1s` (default); doubles after each failed probe.
    min_probe_interval: Option<String>,
    /// The longest wait between probes, e.g. `60s` (default).
    max_probe_interval: Option<String>,
    /// How long an event already taken waits for the circuit before it goes back to its
    /// queue, spending one delivery, e.g. `20m` (default; RabbitMQ's `consumer_timeout` is
    /// 30 minutes by default, SQS allows up to 12 hours).
    max_hold: Option<String>,
}

/// `[sink.rate_limit]`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    /// Requests per second in total over all consumers (the most the third party sees).
    per_second: Option<f64>,
    /// Requests that may go at once above the steady rate (default 1).
    burst: Option<u32>,
    /// Cut the shared rate on 429/503 and climb back while calls succeed (default true).
    adaptive: Option<bool>,
    /// The lowest an adaptive rate goes (default 1% of `per_second`).
    min_per_second: Option<f64>,
    /// Calls per minute in total (minutes start at :00 UTC); a spent budget holds every
    /// consumer until the minute turns.
    per_minute: Option<u64>,
    /// Calls per hour in total (hours start at :00 UTC).
    per_hour: Option<u64>,
    /// Calls per day in total (days start at 00:00 UTC).
    per_day: Option<u64>,
    /// Budgets over other windows, e.g. `{ limit = 900, window = "15m" }`.
    #[serde(default)]
    quota: Vec<QuotaFile>,
    /// Calls in flight to the sink at once, over every consumer process.
    max_in_flight: Option<u32>,
}

/// `[[sink.rate_limit.quota]]`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct QuotaFile {
    /// Calls per window in total.
    limit: u64,
    /// The window's length, whole seconds from `1s` to `31d` (e.g. `15m`); windows start at
    /// multiples of it since 1970-01-01 00:00 UTC.
    window: String,
}

/// `resync consume` settings (flags override).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ConsumerFile {
    /// Events in flight per process (default 32).
    concurrency: Option<usize>,
    /// Messages held from the broker per queue (default 32).
    prefetch: Option<u16>,
    /// Events locked, read and recorded together (default 16).
    batch_size: Option<usize>,
    /// Sink calls in flight adapt between 1 and `concurrency`: more while calls succeed, fewer
    /// on 429/503 or rising latency (default false: always `concurrency`).
    adaptive_concurrency: Option<bool>,
}

/// The JSON Schema of a service config file, as checked in at `docs/fare-config.schema.json`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(ServiceFile);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// Longest service name: `<ns>-<service>-resync-dlq` must fit SQS's 80 characters with a
/// namespace of up to 20.
const MAX_SERVICE_NAME: usize = 40;
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

/// Reads every `*.toml`, `*.yaml` and `*.yml` file of `dir` (not recursive) into a validated
/// catalog.
pub fn load_dir(dir: &Path) -> Result<Catalog, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ConfigError::Directory {
        dir: dir.to_path_buf(),
        detail: format!("cannot read the service config directory: {e}"),
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "toml" || ext == "yaml" || ext == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ConfigError::Directory {
            dir: dir.to_path_buf(),
            detail: "no service config files (*.toml, *.yaml, *.yml) found".into(),
        });
    }
    let services = files
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Parse {
                file: file.clone(),
                detail: format!("cannot read: {e}"),
            })?;
            parse_service(file, &text)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Catalog::new(services)
}

/// Parses and validates one service file's text; `file` is only used in errors.
pub fn load_str(file: impl AsRef<Path>, text: &str) -> Result<ServiceConfig, ConfigError> {
    parse_service(file.as_ref(), text)
}

fn parse_service(file: &Path, text: &str) -> Result<ServiceConfig, ConfigError> {
    let is_yaml = file.extension().is_some_and(|ext| ext == "yaml" || ext == "yml");
    let parsed = if is_yaml {
        serde_norway::from_str::<ServiceFile>(text).map_err(|e| e.to_string())
    } else {
        toml::from_str::<ServiceFile>(text).map_err(|e| e.to_string())
    };
    let raw = parsed.map_err(|detail| ConfigError::Parse {
        file: file.to_path_buf(),
        detail: detail.trim().to_string(),
    })?;
    validate_service(file, raw)
}

fn validate_service(file: &Path, raw: ServiceFile) -> Result<ServiceConfig, ConfigError> {
    check_name(file, "name", &raw.name)?;
    for (i, event_type) in raw.publishes.iter().enumerate() {
        check_event_type(file, &format!("publishes[{i}]"), event_type, false)?;
    }
    let mut subscriptions = Vec::new();
    for (i, sub) in raw.subscriptions.into_iter().enumerate() {
        subscriptions.push(validate_subscription(file, i, sub)?);
    }
    check_queue_settings_agree(file, &subscriptions)?;
    let sink = raw.sink.map(|s| validate_sink(file, s)).transpose()?;
    let consumer = validate_consumer(file, raw.consumer)?;
    let sources = raw
        .sources
        .into_iter()
        .enumerate()
        .map(|(i, source)| validate_source(file, i, source, &raw.publishes))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ServiceConfig {
        name: raw.name,
        publishes: raw.publishes,
        subscriptions,
        sink,
        consumer,
        sources,
        source_file: file.to_path_buf(),
    })
}

/// An SQL identifier fare accepts from config: letters, digits and `_`, not starting with a
/// digit, at most 63 bytes (Postgres's limit). Quoted wherever it is used.
fn check_identifier(file: &Path, key: &str, text: &str) -> Result<(), ConfigError> {
    let valid = !text.is_empty()
        && text.len() <= 63
        && text.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        return Ok(());
    }
    Err(invalid(file, key, format!("`{text}`: expected an SQL identifier (letters, digits and `_`)")))
}

fn validate_source(
    file: &Path,
    i: usize,
    raw: SourceFile,
    publishes: &[String],
) -> Result<SourceSpec, ConfigError> {
    let key = |field: &str| format!("sources[{i}].{field}");
    let updated = format!("{}.updated", raw.entity);
    if !publishes.contains(&updated) {
        return Err(invalid(
            file,
            key("entity"),
            format!(
                "`{}`: a resync sends `{updated}` events, so the service must publish `{updated}`",
                raw.entity
            ),
        ));
    }
    let mut parts = raw.table.splitn(2, '.');
    for part in parts.by_ref() {
        check_identifier(file, &key("table"), part)?;
    }
    let key_columns = match (raw.id_column, raw.id_columns) {
        (None, None) => vec!["id".to_string()],
        (Some(column), None) => {
            check_identifier(file, &key("id_column"), &column)?;
            vec![column]
        }
        (None, Some(columns)) if !columns.is_empty() => {
            for (j, column) in columns.iter().enumerate() {
                check_identifier(file, &key(&format!("id_columns[{j}]")), column)?;
            }
            columns
        }
        _ => {
            return Err(invalid(
                file,
                key("id_columns"),
                "expected one of `id_column` (one key column) and `id_columns` (a non-empty list), not both",
            ));
        }
    };
    if let Some(column) = &raw.version_column {
        check_identifier(file, &key("version_column"), column)?;
    }
    let data = match (raw.data_column, raw.data_columns) {
        (Some(column), None) => {
            check_identifier(file, &key("data_column"), &column)?;
            SourceData::Column(column)
        }
        (None, Some(columns)) if !columns.is_empty() => {
            for (j, column) in columns.iter().enumerate() {
                check_identifier(file, &key(&format!("data_columns[{j}]")), column)?;
            }
            SourceData::Columns(columns)
        }
        _ => {
            return Err(invalid(
                file,
                key("data_column"),
                "expected exactly one of `data_column` and `data_columns`",
            ));
        }
    };
    if let Some(column) = &raw.deleted_column {
        check_identifier(file, &key("deleted_column"), column)?;
    }
    if let Some(problem) = raw.filter.as_deref().and_then(filter_problem) {
        return Err(invalid(file, key("filter"), format!("expected one SQL boolean expression: {problem}")));
    }
    Ok(SourceSpec {
        entity: raw.entity,
        table: raw.table,
        key_columns,
        version_column: raw.version_column,
        data,
        deleted_column: raw.deleted_column,
        filter: raw.filter,
    })
}

/// Lowercase letters, digits and `-`, starting with a letter: valid in SQS queue names, SNS
/// topic names and AMQP names alike, and unambiguous once joined with `-`.
fn check_name(file: &Path, key: &str, name: &str) -> Result<(), ConfigError> {
    let valid = name.len() <= MAX_SERVICE_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(invalid(
            file,
            key,
            format!(
                "`{name}` is not a valid name: expected lowercase letters, digits and `-`, starting with a \
                 letter, at most {MAX_SERVICE_NAME} characters (it becomes part of queue names)"
            ),
        ))
    }
}

/// `entity.verb`, or `entity.*` where wildcards are allowed; the entity names a topic.
fn check_event_type(file: &Path, key: &str, text: &str, wildcard: bool) -> Result<(), ConfigError> {
    let word = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_lowercase())
            && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let valid = match text.split_once('.') {
        Some((entity, verb)) => {
            word(entity) && entity.len() <= 40 && (word(verb) || (wildcard && verb == "*"))
        }
        None => false,
    };
    if valid {
        return Ok(());
    }
    let expected = if wildcard { "`entity.verb` or `entity.*`" } else { "`entity.verb`" };
    Err(invalid(
        file,
        key,
        format!("`{text}` is not an event type: expected {expected}, lowercase letters, digits and `_`"),
    ))
}

fn validate_subscription(
    file: &Path,
    i: usize,
    raw: SubscriptionFile,
) -> Result<SubscriptionSpec, ConfigError> {
    let key = |k: &str| format!("subscriptions[{i}].{k}");
    if raw.types.is_empty() {
        return Err(invalid(file, key("types"), "expected at least one event type"));
    }
    for (j, t) in raw.types.iter().enumerate() {
        check_event_type(file, &key(&format!("types[{j}]")), t, true)?;
    }
    let streams = match raw.streams {
        None => vec![Stream::Live, Stream::Resync],
        Some(names) if names.is_empty() => {
            return Err(invalid(file, key("streams"), "expected at least one of `live`, `resync`"));
        }
        Some(names) => {
            let mut streams = Vec::new();
            for (j, name) in names.iter().enumerate() {
                let stream: Stream = name.parse().map_err(|_| {
                    invalid(
                        file,
                        key(&format!("streams[{j}]")),
                        format!("`{name}`: expected `live` or `resync`"),
                    )
                })?;
                if streams.contains(&stream) {
                    return Err(invalid(file, key("streams"), format!("`{name}` is listed twice")));
                }
                streams.push(stream);
            }
            streams
        }
    };
    let max_receive_count = raw.max_receive_count.unwrap_or(5);
    if !(1..=1000).contains(&max_receive_count) {
        return Err(invalid(
            file,
            key("max_receive_count"),
            format!("{max_receive_count}: expected 1 to 1000"),
        ));
    }
    let visibility_timeout = match raw.visibility_timeout {
        None => Duration::from_secs(30),
        Some(text) => {
            parse_duration(file, &key("visibility_timeout"), &text, Duration::from_secs(1), MAX_VISIBILITY)?
        }
    };
    if raw.fifo == Some(true) {
        return Err(invalid(
            file,
            key("fifo"),
            "FIFO queues are not supported: resync orders events by entity version, not by queue \
             order, so standard queues are correct and scale further (remove the key or set it to false)",
        ));
    }
    Ok(SubscriptionSpec { types: raw.types, streams, max_receive_count, visibility_timeout })
}

/// One queue per (service, stream): every subscription feeding it must ask for the same
/// queue settings.
fn check_queue_settings_agree(file: &Path, subscriptions: &[SubscriptionSpec]) -> Result<(), ConfigError> {
    let mut first: BTreeMap<&'static str, (usize, u32, Duration)> = BTreeMap::new();
    for (i, sub) in subscriptions.iter().enumerate() {
        for stream in &sub.streams {
            let settings = (i, sub.max_receive_count, sub.visibility_timeout);
            match first.get(stream.as_str()) {
                None => {
                    first.insert(stream.as_str(), settings);
                }
                Some(&(j, count, visibility)) if (count, visibility) != (settings.1, settings.2) => {
                    return Err(invalid(
                        file,
                        format!("subscriptions[{i}]"),
                        format!(
                            "max_receive_count/visibility_timeout differ from subscriptions[{j}], which feeds \
                             the same `{stream}` queue; one queue has one setting"
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

fn validate_sink(file: &Path, raw: SinkFile) -> Result<SinkSpec, ConfigError> {
    if !(raw.url.starts_with("http://") || raw.url.starts_with("https://")) {
        return Err(invalid(file, "sink.url", format!("`{}`: expected an http:// or https:// URL", raw.url)));
    }
    let method = raw.method.unwrap_or_else(|| "PUT".into()).to_ascii_uppercase();
    if !["PUT", "POST", "PATCH"].contains(&method.as_str()) {
        return Err(invalid(file, "sink.method", format!("`{method}`: expected PUT, POST or PATCH")));
    }
    let delete_method = raw.delete_method.unwrap_or_else(|| "DELETE".into()).to_ascii_uppercase();
    if !["DELETE", "PUT", "POST", "PATCH"].contains(&delete_method.as_str()) {
        return Err(invalid(
            file,
            "sink.delete_method",
            format!("`{delete_method}`: expected DELETE, PUT, POST or PATCH"),
        ));
    }
    for (name, value) in &raw.headers {
        let secret_like =
            ["authorization", "x-api-key", "api-key", "cookie"].contains(&name.to_ascii_lowercase().as_str());
        if secret_like && !value.contains("${") {
            return Err(invalid(
                file,
                format!("sink.headers.{name}"),
                "credentials must come from the environment: write the value as `${VAR}` (e.g. \
                 `Bearer ${API_TOKEN}`), never the secret itself",
            ));
        }
    }
    let timeout = match raw.timeout {
        None => Duration::from_secs(10),
        Some(text) => {
            parse_duration(file, "sink.timeout", &text, Duration::from_millis(1), Duration::from_secs(300))?
        }
    };
    let rate_limit = raw.rate_limit.map(|r| validate_rate_limit(file, r)).transpose()?;
    let circuit = raw.circuit.map(|c| validate_circuit(file, c)).transpose()?.unwrap_or_default();
    let conditional = raw.conditional.map(|c| validate_conditional(file, c)).transpose()?;
    let responses = raw.responses.map(|r| validate_responses(file, r)).transpose()?.unwrap_or_default();
    Ok(SinkSpec {
        name: raw.name,
        url: raw.url,
        method,
        delete_method,
        headers: raw.headers,
        timeout,
        rate_limit,
        circuit,
        conditional,
        responses,
    })
}

fn validate_responses(file: &Path, raw: ResponsesFile) -> Result<ResponseClasses, ConfigError> {
    let defaults = ResponseClasses::default();
    let within = |key: &str, statuses: Vec<u16>, range: std::ops::RangeInclusive<u16>| match statuses
        .iter()
        .find(|s| !range.contains(*s))
    {
        Some(bad) => Err(invalid(
            file,
            format!("sink.responses.{key}"),
            format!("{bad}: expected statuses in {}..={}", range.start(), range.end()),
        )),
        None => Ok(statuses),
    };
    Ok(ResponseClasses {
        delete_gone: within("delete_gone", raw.delete_gone.unwrap_or(defaults.delete_gone), 400..=499)?,
        // 429 is always retried (and slows the shared rate).
        retry: within("retry", raw.retry.unwrap_or(defaults.retry), 400..=499)?,
        dead_letter: within("dead_letter", raw.dead_letter.unwrap_or(defaults.dead_letter), 500..=599)?,
    })
}

fn validate_conditional(file: &Path, raw: ConditionalFile) -> Result<ConditionalSpec, ConfigError> {
    let header = raw.header.unwrap_or_else(|| "X-Resync-Entity-Version".into());
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if header.is_empty() || !header.chars().all(token) {
        return Err(invalid(
            file,
            "sink.conditional.header",
            format!("`{header}`: expected an HTTP header name"),
        ));
    }
    let stale_statuses = raw.stale_statuses.unwrap_or_else(|| vec![409, 412]);
    if let Some(bad) = stale_statuses.iter().find(|s| !(400..=499).contains(*s)) {
        return Err(invalid(
            file,
            "sink.conditional.stale_statuses",
            format!("{bad}: expected 4xx statuses"),
        ));
    }
    Ok(ConditionalSpec { header, stale_statuses })
}

fn validate_circuit(file: &Path, raw: CircuitFile) -> Result<CircuitSpec, ConfigError> {
    let defaults = CircuitSpec::default();
    let duration = |key: &str, text: Option<String>, default: Duration, max: Duration| match text {
        None => Ok(default),
        Some(text) => {
            parse_duration(file, &format!("sink.circuit.{key}"), &text, Duration::from_millis(1), max)
        }
    };
    let day = Duration::from_secs(24 * 3600);
    let spec = CircuitSpec {
        enabled: raw.enabled.unwrap_or(defaults.enabled),
        failure_threshold: raw.failure_threshold.unwrap_or(defaults.failure_threshold),
        min_probe_interval: duration(
            "min_probe_interval",
            raw.min_probe_interval,
            defaults.min_probe_interval,
            day,
        )?,
        max_probe_interval: duration(
            "max_probe_interval",
            raw.max_probe_interval,
            defaults.max_probe_interval,
            day,
        )?,
        max_hold: duration("max_hold", raw.max_hold, defaults.max_hold, Duration::from_secs(12 * 3600))?,
    };
    if spec.failure_threshold == 0 {
        return Err(invalid(file, "sink.circuit.failure_threshold", "0: expected at least 1"));
    }
    if spec.max_probe_interval < spec.min_probe_interval {
        return Err(invalid(
            file,
            "sink.circuit.max_probe_interval",
            format!(
                "{:?}: expected at least min_probe_interval ({:?})",
                spec.max_probe_interval, spec.min_probe_interval
            ),
        ));
    }
    Ok(spec)
}

fn validate_rate_limit(file: &Path, raw: RateLimitFile) -> Result<RateLimitSpec, ConfigError> {
    if let Some(per_second) = raw.per_second
        && !(per_second.is_finite() && per_second > 0.0)
    {
        let problem = format!("{per_second}: expected requests per second > 0");
        return Err(invalid(file, "sink.rate_limit.per_second", problem));
    }
    let reference = raw.per_second.unwrap_or(1.0);
    let min_per_second = raw.min_per_second.unwrap_or((reference / 100.0).max(0.1).min(reference));
    if !(min_per_second > 0.0 && min_per_second <= reference) {
        let problem = format!("{min_per_second}: expected > 0 and at most per_second ({reference})");
        return Err(invalid(file, "sink.rate_limit.min_per_second", problem));
    }
    let burst = raw.burst.unwrap_or(1);
    if burst == 0 {
        return Err(invalid(file, "sink.rate_limit.burst", "0: expected at least 1"));
    }
    let quotas = validate_quotas(file, &raw)?;
    if raw.max_in_flight == Some(0) {
        return Err(invalid(file, "sink.rate_limit.max_in_flight", "0: expected at least 1"));
    }
    if raw.per_second.is_none() && quotas.is_empty() && raw.max_in_flight.is_none() {
        return Err(invalid(
            file,
            "sink.rate_limit",
            "empty: expected per_second, per_minute, per_hour, per_day, [[sink.rate_limit.quota]] or max_in_flight",
        ));
    }
    Ok(RateLimitSpec {
        per_second: raw.per_second,
        burst,
        adaptive: raw.adaptive.unwrap_or(true),
        min_per_second,
        quotas,
        max_in_flight: raw.max_in_flight,
    })
}

/// The budgets of `[sink.rate_limit]`, shortest window first; one per window length.
fn validate_quotas(file: &Path, raw: &RateLimitFile) -> Result<Vec<QuotaSpec>, ConfigError> {
    let named = [
        ("per_minute", raw.per_minute, 60),
        ("per_hour", raw.per_hour, 3600),
        ("per_day", raw.per_day, 86_400),
    ];
    let mut quotas = Vec::new();
    for (key, limit, secs) in named {
        match limit {
            Some(0) => return Err(invalid(file, format!("sink.rate_limit.{key}"), "0: expected at least 1")),
            Some(limit) => quotas.push(QuotaSpec { limit, window: Duration::from_secs(secs) }),
            None => {}
        }
    }
    for (index, quota) in raw.quota.iter().enumerate() {
        let key = format!("sink.rate_limit.quota[{index}]");
        let window = parse_duration(
            file,
            &format!("{key}.window"),
            &quota.window,
            Duration::from_secs(1),
            Duration::from_secs(31 * 86_400),
        )?;
        if window.subsec_nanos() != 0 {
            return Err(invalid(
                file,
                format!("{key}.window"),
                format!("{:?}: expected whole seconds", quota.window),
            ));
        }
        if quota.limit == 0 {
            return Err(invalid(file, format!("{key}.limit"), "0: expected at least 1"));
        }
        if quotas.iter().any(|q: &QuotaSpec| q.window == window) {
            let problem = format!("{:?}: another budget already counts over this window", quota.window);
            return Err(invalid(file, format!("{key}.window"), problem));
        }
        quotas.push(QuotaSpec { limit: quota.limit, window });
    }
    quotas.sort_by_key(|q| q.window);
    Ok(quotas)
}

fn validate_consumer(file: &Path, raw: ConsumerFile) -> Result<ConsumerSpec, ConfigError> {
    let defaults = ConsumerSpec::default();
    let spec = ConsumerSpec {
        concurrency: raw.concurrency.unwrap_or(defaults.concurrency),
        prefetch: raw.prefetch.unwrap_or(defaults.prefetch),
        batch_size: raw.batch_size.unwrap_or(defaults.batch_size),
        adaptive_concurrency: raw.adaptive_concurrency.unwrap_or(defaults.adaptive_concurrency),
    };
    if !(1..=4096).contains(&spec.concurrency) {
        return Err(invalid(
            file,
            "consumer.concurrency",
            format!("{}: expected 1 to 4096", spec.concurrency),
        ));
    }
    if spec.prefetch == 0 {
        return Err(invalid(file, "consumer.prefetch", "0: expected 1 to 65535"));
    }
    if !(1..=1000).contains(&spec.batch_size) {
        return Err(invalid(file, "consumer.batch_size", format!("{}: expected 1 to 1000", spec.batch_size)));
    }
    Ok(spec)
}

fn parse_duration(
    file: &Path,
    key: &str,
    text: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let value = humantime::parse_duration(text)
        .map_err(|e| invalid(file, key, format!("`{text}`: expected a duration like `30s` or `5m` ({e})")))?;
    if value < min || value > max {
        return Err(invalid(
            file,
            key,
            format!(
                "`{text}`: expected between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(value)
}

/// Why `filter` is not one self-contained SQL expression, if it is not. A job puts it inside
/// parentheses in its queries; a filter that closes them (`1=1) OR (true`), ends the statement,
/// or comments the rest out would change the query's structure. Parentheses must balance
/// outside string literals and quoted identifiers; `;`, comments and dollar quoting are refused.
pub fn filter_problem(filter: &str) -> Option<String> {
    if filter.trim().is_empty() {
        return Some("it is empty".into());
    }
    let mut depth = 0i32;
    let mut chars = filter.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                // A quoted literal or identifier; a doubled quote inside is an escaped one.
                loop {
                    match chars.next() {
                        Some(q) if q == c && chars.peek() == Some(&c) => {
                            chars.next();
                        }
                        Some(q) if q == c => break,
                        Some(_) => {}
                        None => return Some(format!("an unclosed {c}")),
                    }
                }
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Some("a `)` closes a parenthesis it did not open".into());
                }
            }
            ';' => return Some("`;` ends the statement".into()),
            '$' => return Some("dollar quoting (`$`) is not accepted".into()),
            '-' if chars.peek() == Some(&'-') => return Some("`--` comments are not accepted".into()),
            '/' if chars.peek() == Some(&'*') => return Some("`/*` comments are not accepted".into()),
            _ => {}
        }
    }
    (depth != 0).then(|| format!("{depth} parenthesis(es) left open"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_must_be_one_self_contained_expression() {
        for ok in ["price > 10", "(a OR b) AND c", "title = 'it''s (ok'", "\"we)ird\" = 1", "f(x, (y))"] {
            assert_eq!(filter_problem(ok), None, "{ok}");
        }
        for bad in
            ["1=1) OR (true", "(a", "a)", "true; delete", "a -- b", "a /* b */", "$$x$$", "'open", "  "]
        {
            assert!(filter_problem(bad).is_some(), "{bad} accepted");
        }
    }

    const CHANNEL_SYNC: &str = r#"
name = "channel-sync"

[[subscriptions]]
types = ["listing.*"]
visibility_timeout = "45s"

[sink]
url = "http://127.0.0.1:8088/entities/listing/{entity_id}"
headers = { Authorization = "Bearer ${CHANNEL_TOKEN}" }
"#;

    const LISTINGS: &str = r#"
name = "listings"
publishes = ["listing.created", "listing.updated", "listing.deleted"]
"#;

    fn error(text: &str) -> String {
        load_str("svc.toml", text).expect_err("invalid").to_string()
    }

    #[test]
    fn a_valid_service_gets_defaults_and_one_queue_per_stream() {
        let service = load_str("channel-sync.toml", CHANNEL_SYNC).expect("valid");
        let queues = service.queues(Some("dev"));
        let names: Vec<&str> = queues.iter().map(|(_, q)| q.name.as_str()).collect();
        assert_eq!(names, ["dev-channel-sync-live", "dev-channel-sync-resync"]);
        assert_eq!(queues[0].1.max_receive_count, 5);
        assert_eq!(queues[0].1.visibility_timeout, Duration::from_secs(45));
        let sink = service.sink.expect("sink");
        assert_eq!((sink.method.as_str(), sink.delete_method.as_str()), ("PUT", "DELETE"));
        assert_eq!(service.consumer, ConsumerSpec::default());
    }

    #[test]
    fn the_circuit_is_on_by_default_and_its_bad_settings_name_their_key() {
        let sink = load_str("c.toml", CHANNEL_SYNC).expect("valid").sink.expect("sink");
        assert_eq!(sink.circuit, CircuitSpec::default());
        let with = |table: &str| format!("{CHANNEL_SYNC}[sink.circuit]\n{table}\n");
        let sink = load_str(
            "c.toml",
            &with("failure_threshold = 3\nmax_probe_interval = \"5s\"\nmax_hold = \"2h\""),
        )
        .expect("valid")
        .sink
        .expect("sink");
        assert_eq!(sink.circuit.failure_threshold, 3);
        assert_eq!(sink.circuit.max_probe_interval, Duration::from_secs(5));
        assert_eq!(sink.circuit.max_hold, Duration::from_secs(7200));
        assert_eq!(sink.conditional, None);
        let conditional = load_str("c.toml", &format!("{CHANNEL_SYNC}[sink.conditional]\n"))
            .expect("valid")
            .sink
            .and_then(|s| s.conditional)
            .expect("conditional writes");
        assert_eq!(
            (conditional.header.as_str(), conditional.stale_statuses),
            ("X-Resync-Entity-Version", vec![409, 412])
        );
        let err = error(&format!("{CHANNEL_SYNC}[sink.conditional]\nstale_statuses = [200]\n"));
        assert!(err.contains("sink.conditional.stale_statuses"), "{err}");
        let err = error(&format!("{CHANNEL_SYNC}[sink.responses]\ndead_letter = [422]\n"));
        assert!(err.contains("sink.responses.dead_letter") && err.contains("500..=599"), "{err}");
        for (table, key) in [
            ("failure_threshold = 0", "sink.circuit.failure_threshold"),
            ("min_probe_interval = \"10s\"\nmax_probe_interval = \"1s\"", "sink.circuit.max_probe_interval"),
            ("max_hold = \"13h\"", "sink.circuit.max_hold"),
            ("probe_every = \"1s\"", "unknown field `probe_every`"),
        ] {
            let err = error(&with(table));
            assert!(err.contains(key), "{table}: {err}");
        }
    }

    #[test]
    fn quotas_are_read_shortest_window_first_and_their_bad_settings_name_their_key() {
        let with = |table: &str| format!("{CHANNEL_SYNC}[sink.rate_limit]\n{table}\n");
        let limit = load_str(
            "q.toml",
            &with("per_day = 1000\nper_minute = 60\nmax_in_flight = 8\n[[sink.rate_limit.quota]]\nlimit = 900\nwindow = \"15m\""),
        )
        .expect("valid")
        .sink
        .and_then(|s| s.rate_limit)
        .expect("rate limit");
        assert_eq!(limit.per_second, None, "budgets alone pace nothing per second");
        let quotas: Vec<(u64, u64)> = limit.quotas.iter().map(|q| (q.limit, q.window.as_secs())).collect();
        assert_eq!(quotas, [(60, 60), (900, 900), (1000, 86_400)]);
        assert_eq!(limit.max_in_flight, Some(8));
        for (table, key) in [
            ("", "`sink.rate_limit`: empty"),
            ("per_day = 0", "sink.rate_limit.per_day"),
            ("max_in_flight = 0", "sink.rate_limit.max_in_flight"),
            ("[[sink.rate_limit.quota]]\nlimit = 1\nwindow = \"1500ms\"", "sink.rate_limit.quota[0].window"),
            ("[[sink.rate_limit.quota]]\nlimit = 1\nwindow = \"40d\"", "sink.rate_limit.quota[0].window"),
            ("[[sink.rate_limit.quota]]\nlimit = 0\nwindow = \"1m\"", "sink.rate_limit.quota[0].limit"),
            (
                "per_minute = 5\n[[sink.rate_limit.quota]]\nlimit = 9\nwindow = \"60s\"",
                "sink.rate_limit.quota[0].window",
            ),
        ] {
            let err = error(&with(table));
            assert!(err.contains(key), "{table}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = error("name = \"a\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\ntyps = 1\n");
        assert!(err.starts_with("svc.toml:") && err.contains("unknown field `typs`"), "{err}");
    }

    #[test]
    fn yaml_files_read_like_toml_and_reject_unknown_keys_too() {
        let toml = load_str(
            "s.toml",
            "name = \"a\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\nmax_receive_count = 7",
        )
        .expect("toml");
        let yaml = load_str(
            "s.yaml",
            "name: a\nsubscriptions:\n  - types: [\"listing.*\"]\n    max_receive_count: 7\n",
        )
        .expect("yaml");
        assert_eq!((yaml.name, yaml.subscriptions), (toml.name, toml.subscriptions));

        let err = load_str("s.yml", "name: a\nsubscriptions:\n  - typs: [\"listing.*\"]\n")
            .expect_err("unknown key");
        let err = err.to_string();
        assert!(err.starts_with("s.yml:") && err.contains("unknown field `typs`"), "{err}");
    }

    #[test]
    fn sources_name_checked_identifiers_and_need_the_published_type() {
        let service = load_str(
            "l.toml",
            "name = \"listings\"\npublishes = [\"listing.updated\"]\n[[sources]]\nentity = \"listing\"\n\
             table = \"app.listings\"\ndata_columns = [\"title\", \"price\"]\ndeleted_column = \"deleted\"",
        )
        .expect("valid");
        let source = &service.sources[0];
        assert_eq!(
            (source.key_columns.as_slice(), source.version_column.as_deref()),
            (&["id".to_string()][..], None)
        );
        assert_eq!(source.data, SourceData::Columns(vec!["title".into(), "price".into()]));

        let cases = [
            ("table = \"listings; drop table x\"\ndata_column = \"d\"", "`sources[0].table`"),
            ("table = \"l\"\ndata_column = \"d\"\nid_column = \"id)\"", "`sources[0].id_column`"),
            (
                "table = \"l\"\ndata_column = \"d\"\nid_columns = [\"t\", \"id;\"]",
                "`sources[0].id_columns[1]`",
            ),
            (
                "table = \"l\"\ndata_column = \"d\"\nid_column = \"id\"\nid_columns = [\"t\"]",
                "`sources[0].id_columns`",
            ),
            ("table = \"l\"", "`sources[0].data_column`"),
            ("table = \"l\"\ndata_column = \"d\"\nfilter = \"true; delete\"", "`sources[0].filter`"),
            ("table = \"l\"\ndata_column = \"d\"\nfilter = \"1=1) OR (true\"", "`sources[0].filter`"),
        ];
        for (fields, key) in cases {
            let text = format!(
                "name = \"listings\"\npublishes = [\"listing.updated\"]\n[[sources]]\nentity = \"listing\"\n{fields}"
            );
            let err = load_str("l.toml", &text).expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        }
        let unpublished =
            "name = \"a\"\n[[sources]]\nentity = \"listing\"\ntable = \"l\"\ndata_column = \"d\"";
        let err = load_str("a.toml", unpublished).expect_err("unpublished").to_string();
        assert!(err.contains("`sources[0].entity`") && err.contains("listing.updated"), "{err}");
    }

    #[test]
    fn namespaces_must_fit_queue_naming_rules() {
        assert!(check_namespace("prod-eu1").is_ok());
        for bad in ["Prod", "1prod", "pr_od", "a-namespace-far-too-long"] {
            let err = check_namespace(bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("`{bad}`")) && err.contains("RESYNC_NAMESPACE"), "{err}");
        }
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let cases = [
            ("name = \"Bad_Name\"", "`name`"),
            ("name = \"a\"\npublishes = [\"listing\"]", "`publishes[0]`"),
            (
                "name = \"a\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\nstreams = [\"later\"]",
                "`subscriptions[0].streams[0]`",
            ),
            (
                "name = \"a\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\nmax_receive_count = 0",
                "`subscriptions[0].max_receive_count`",
            ),
            (
                "name = \"a\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\nvisibility_timeout = \"soon\"",
                "`subscriptions[0].visibility_timeout`",
            ),
            (
                "name = \"a\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\nfifo = true",
                "`subscriptions[0].fifo`",
            ),
            ("name = \"a\"\n[sink]\nurl = \"ftp://x\"", "`sink.url`"),
            (
                "name = \"a\"\n[sink]\nurl = \"http://x\"\nheaders = { Authorization = \"Bearer s3cret\" }",
                "`sink.headers.Authorization`",
            ),
            ("name = \"a\"\n[consumer]\nconcurrency = 0", "`consumer.concurrency`"),
        ];
        for (text, key) in cases {
            let err = error(text);
            assert!(err.starts_with("svc.toml: ") && err.contains(key), "expected {key} in: {err}");
        }
    }

    #[test]
    fn subscriptions_feeding_one_queue_must_agree_on_its_settings() {
        let err = error(
            "name = \"a\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\n\
             [[subscriptions]]\ntypes = [\"order.*\"]\nstreams = [\"live\"]\nmax_receive_count = 9",
        );
        assert!(err.contains("`subscriptions[1]`") && err.contains("subscriptions[0]"), "{err}");
    }

    #[test]
    fn the_catalog_rejects_duplicate_services_and_subscriptions_nobody_publishes() {
        let listings = load_str("listings.toml", LISTINGS).expect("valid");
        let sync = load_str("channel-sync.toml", CHANNEL_SYNC).expect("valid");
        let twice = load_str("other.toml", LISTINGS).expect("valid");
        let err = Catalog::new(vec![listings.clone(), twice]).expect_err("duplicate").to_string();
        assert!(err.contains("other.toml") && err.contains("listings.toml"), "{err}");

        let err = Catalog::new(vec![sync.clone()]).expect_err("nobody publishes").to_string();
        assert!(err.contains("channel-sync.toml: `subscriptions[0].types[0]`"), "{err}");

        let catalog = Catalog::new(vec![sync, listings]).expect("valid system");
        assert_eq!(catalog.services[0].name, "channel-sync");
        assert_eq!(catalog.published_entities().into_iter().collect::<Vec<_>>(), ["listing"]);
    }
}
