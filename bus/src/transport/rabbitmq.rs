//! RabbitMQ transport (lapin).
//!
//! Topics are durable topic exchanges; the routing key is the event type, so a subscription
//! `listing.*` is the binding key `listing.*`. Queues are durable quorum queues (the delivery
//! count and delivery limit need them) with a dead-letter queue reached through the default
//! exchange. Publishing waits for publisher confirms; consuming uses manual acks with a bounded
//! prefetch. Every connection is named `<connection_name>/<role>` so operators (and the
//! broker-loss tests) can find it with `rabbitmqctl list_connections user_provided_name`.
//!
//! Broker loss: publishers and subscriptions drop the dead connection and reconnect with
//! jittered exponential backoff. Unconfirmed publishes are sent again (at-least-once), and
//! unacked deliveries of a dead channel are redelivered by the broker.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::ExponentialBackoff;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::transport::{
    Attributes, Delivery, Destination, FailedEntry, Filter, Inventory, ObservedQueue, OutgoingMessage,
    QueueDepth, QueueSpec, Result, Settle, SubscribeOptions, Subscription, Transport, TransportError,
    dead_letter_queue_name,
};

/// How to reach RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitMqConfig {
    /// `amqp://user:pass@host:port/vhost` (vhost `/` is `%2f`); `amqps://` for TLS.
    pub url: String,
    /// Prefix of the connection names shown by the broker, e.g. the service name.
    pub connection_name: String,
    /// How long a publish keeps retrying through broker loss before it reports failure.
    pub publish_timeout: Duration,
    /// Longest pause between reconnect attempts.
    pub max_reconnect_backoff: Duration,
    /// The management API (`http://user:pass@host:15672`), read by [`Transport::inventory`];
    /// `None` derives it from `url` (same host and credentials, port 15672).
    pub management_url: Option<String>,
}

impl RabbitMqConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connection_name: "resync".into(),
            publish_timeout: Duration::from_secs(60),
            max_reconnect_backoff: Duration::from_secs(5),
            management_url: None,
        }
    }

    /// The management API's base URL, the credentials to use and the vhost (URL-encoded).
    fn management_endpoint(&self) -> Result<ManagementEndpoint> {
        let amqp: lapin::uri::AMQPUri = self
            .url
            .parse()
            .map_err(|e| TransportError::Config(format!("RESYNC_AMQP_URL `{}`: {e}", self.redacted_url())))?;
        let vhost = if amqp.vhost.is_empty() { "/".to_string() } else { amqp.vhost.clone() };
        let (base, username, password) = match &self.management_url {
            Some(url) => {
                let (base, user, pass) = split_credentials(url);
                let user = user.unwrap_or_else(|| amqp.authority.userinfo.username.clone());
                let pass = pass.unwrap_or_else(|| amqp.authority.userinfo.password.clone());
                (base, user, pass)
            }
            None => (
                format!("http://{}:15672", amqp.authority.host),
                amqp.authority.userinfo.username.clone(),
                amqp.authority.userinfo.password.clone(),
            ),
        };
        Ok(ManagementEndpoint { base, username, password, vhost: vhost.replace('/', "%2F") })
    }

    /// The URL with any password replaced, for logs and errors.
    fn redacted_url(&self) -> String {
        redact_password(&self.url)
    }
}

fn redact_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}://{user}:***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// `http://user:pass@host:port/path` -> (`http://host:port/path`, user, pass).
fn split_credentials(url: &str) -> (String, Option<String>, Option<String>) {
    let trimmed = url.trim_end_matches('/');
    match (trimmed.find("://"), trimmed.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &trimmed[scheme_end + 3..at];
            let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            let base = format!("{}://{}", &trimmed[..scheme_end], &trimmed[at + 1..]);
            (base, Some(user.to_string()), Some(pass.to_string()))
        }
        _ => (trimmed.to_string(), None, None),
    }
}

struct ManagementEndpoint {
    base: String,
    username: String,
    password: String,
    vhost: String,
}

impl ManagementEndpoint {
    /// GETs `/api/<what>/<vhost>` and decodes the JSON list.
    async fn list<T: serde::de::DeserializeOwned>(&self, what: &str) -> Result<Vec<T>> {
        let url = format!("{}/api/{what}/{}", self.base, self.vhost);
        let failed = |detail: String| TransportError::Operation {
            operation: "management API GET",
            resource: url.clone(),
            detail: format!(
                "{detail} (fare reads RabbitMQ through its management plugin: \
                 `rabbitmq-plugins enable rabbitmq_management`, or set RESYNC_AMQP_MANAGEMENT_URL)"
            ),
        };
        let response = reqwest::Client::new()
            .get(&url)
            .basic_auth(&self.username, Some(&self.password))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(failed(format!("HTTP {status}")));
        }
        response.json().await.map_err(|e| failed(format!("unexpected response: {e}")))
    }
}

#[derive(serde::Deserialize)]
struct ManagedExchange {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    arguments: serde_json::Map<String, serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct ManagedQueue {
    name: String,
    #[serde(default)]
    arguments: serde_json::Map<String, serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct ManagedBinding {
    source: String,
    destination: String,
    destination_type: String,
    routing_key: String,
}

fn owner_of(arguments: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    arguments.get(OWNER_ARGUMENT).and_then(|v| v.as_str()).map(str::to_string)
}

/// The declare argument that carries [`crate::OWNER_MARK`]; RabbitMQ stores unknown `x-` arguments
/// and leaves them out of its equivalence checks, so declaring without it later is no conflict.
const OWNER_ARGUMENT: &str = "x-resync-owner";

/// The AMQP binding key for a type pattern: `*` alone (every type) is `#`.
fn binding_key(pattern: &str) -> &str {
    if pattern == "*" { "#" } else { pattern }
}

/// What a lapin error means for the caller.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The named exchange or queue does not exist.
    NotFound,
    /// The broker refused for a reason retrying cannot fix (access, precondition).
    Fatal,
    /// The connection or channel broke; reconnect and retry.
    Transient,
}

fn classify(err: &lapin::Error) -> Failure {
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Failure::NotFound,
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED | AMQPSoftError::PRECONDITIONFAILED) => {
                Failure::Fatal
            }
            _ => Failure::Transient,
        },
        _ => Failure::Transient,
    }
}

fn op_error(operation: &'static str, resource: &str, err: &lapin::Error) -> TransportError {
    match classify(err) {
        Failure::NotFound => TransportError::NotFound(resource.to_string()),
        _ => TransportError::Operation { operation, resource: resource.to_string(), detail: err.to_string() },
    }
}

fn backoff(config: &RabbitMqConfig) -> ExponentialBackoff {
    crate::backoff(Duration::from_millis(100), config.max_reconnect_backoff)
}

/// The AMQP frame size resync asks for unless the URL sets `?frame_max=`.
///
/// lapin keeps a receive and a send buffer of 32 frames per connection, allocated and zeroed
/// up front: at RabbitMQ's default of 128 KiB that is 8 MiB per connection, and a consumer has
/// three (consume, publish, admin), which made up most of a consumer process's memory. Envelopes
/// are a few hundred bytes; a larger one is simply sent in several frames.
const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

async fn connect(config: &RabbitMqConfig, role: &str) -> Result<Connection> {
    let connect_error = |detail: String| TransportError::Connect {
        transport: "rabbitmq",
        endpoint: config.redacted_url(),
        detail,
    };
    let mut uri: lapin::uri::AMQPUri = config.url.parse().map_err(connect_error)?;
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    let name = format!("{}/{role}", config.connection_name);
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    Connection::connect_uri(uri, properties).await.map_err(|e| connect_error(e.to_string()))
}

/// Connects, retrying with backoff until `deadline`.
async fn connect_with_backoff(config: &RabbitMqConfig, role: &str, deadline: Instant) -> Result<Connection> {
    let mut delays = backoff(config);
    loop {
        match connect(config, role).await {
            Ok(connection) => return Ok(connection),
            Err(err) => {
                let delay = delays.next().unwrap_or(config.max_reconnect_backoff);
                if Instant::now() + delay >= deadline {
                    return Err(err);
                }
                warn!(role, error = %err, retry_in = ?delay, "RabbitMQ connection failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The publisher connection and its confirm-mode channel, shared by the transport and by
/// subscriptions (which publish dead letters).
struct Publisher {
    config: RabbitMqConfig,
    channel: Mutex<Option<(Connection, Channel)>>,
}

impl Publisher {
    async fn channel(&self, slot: &mut Option<(Connection, Channel)>, deadline: Instant) -> Result<Channel> {
        if let Some((_, channel)) =
            slot.as_ref().filter(|(c, ch)| c.status().connected() && ch.status().connected())
        {
            return Ok(channel.clone());
        }
        let connection = connect_with_backoff(&self.config, "publisher", deadline).await?;
        let channel =
            connection.create_channel().await.map_err(|e| op_error("channel.open", "publisher", &e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| op_error("confirm.select", "publisher", &e))?;
        *slot = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Publishes with confirms; resends what was not confirmed after a broker loss, until the
    /// publish timeout. Returns entries that failed for good.
    async fn publish(&self, destination: &Destination, messages: Vec<OutgoingMessage>) -> Result<()> {
        self.publish_sized(destination, messages, true).await
    }

    /// `publish`, with or without the size limit every transport keeps for new
    /// messages. A dead letter goes without it: the broker accepted the message once, and an
    /// oversize one must reach the DLQ with its reason, unchanged.
    async fn publish_sized(
        &self,
        destination: &Destination,
        messages: Vec<OutgoingMessage>,
        check_size: bool,
    ) -> Result<()> {
        let total = messages.len();
        let mut failed = Vec::new();
        let mut pending: Vec<(usize, OutgoingMessage)> = Vec::with_capacity(total);
        for (index, message) in messages.into_iter().enumerate() {
            match message.check_size().or_else(|e| if check_size { Err(e) } else { Ok(()) }) {
                Ok(()) => pending.push((index, message)),
                Err(reason) => failed.push(FailedEntry { index, reason }),
            }
        }
        let deadline = Instant::now() + self.config.publish_timeout;
        let mut delays = backoff(&self.config);
        let mut slot = self.channel.lock().await;
        while !pending.is_empty() {
            let channel = self.channel(&mut slot, deadline).await?;
            let round = publish_round(&channel, destination, pending).await;
            failed.extend(round.failed);
            pending = round.retry;
            if let Some(err) = round.error {
                if classify(&err) == Failure::NotFound || topic_missing(slot.as_ref(), destination).await {
                    return Err(TransportError::NotFound(destination_name(destination).to_string()));
                }
                *slot = None;
                let delay = delays.next().unwrap_or(self.config.max_reconnect_backoff);
                if Instant::now() + delay >= deadline {
                    return Err(TransportError::Operation {
                        operation: "basic.publish",
                        resource: destination.to_string(),
                        detail: format!(
                            "{} messages unconfirmed after {:?}: {err}",
                            pending.len(),
                            self.config.publish_timeout
                        ),
                    });
                }
                warn!(%destination, unconfirmed = pending.len(), error = %err, "publish interrupted; resending after reconnect");
                tokio::time::sleep(delay).await;
            }
        }
        failed.sort_by_key(|f| f.index);
        if failed.is_empty() {
            Ok(())
        } else {
            Err(TransportError::Partial { failed: failed.len(), total, entries: failed })
        }
    }

    async fn close(&self) {
        if let Some((connection, _)) = self.channel.lock().await.take() {
            let _ = connection.close(200, ShortString::from("resync shutting down")).await;
        }
    }
}

struct Round {
    failed: Vec<FailedEntry>,
    retry: Vec<(usize, OutgoingMessage)>,
    error: Option<lapin::Error>,
}

fn destination_name(destination: &Destination) -> &str {
    match destination {
        Destination::Topic(t) | Destination::Queue(t) => t,
    }
}

/// Sends every pending message on one channel, then awaits their confirms.
async fn publish_round(
    channel: &Channel,
    destination: &Destination,
    pending: Vec<(usize, OutgoingMessage)>,
) -> Round {
    let (exchange, mandatory) = match destination {
        Destination::Topic(t) => (t.as_str(), false),
        // Mandatory: a message for a missing queue comes back instead of vanishing.
        Destination::Queue(_) => ("", true),
    };
    let mut round = Round { failed: Vec::new(), retry: Vec::new(), error: None };
    let mut confirms = Vec::with_capacity(pending.len());
    let mut unsent = pending.into_iter();
    for (index, message) in unsent.by_ref() {
        let routing_key = match destination {
            Destination::Topic(_) => message.routing_key.as_str(),
            Destination::Queue(q) => q.as_str(),
        };
        let sent = channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions { mandatory, ..Default::default() },
                &message.body,
                properties(&message),
            )
            .await;
        match sent {
            Ok(confirm) => confirms.push((index, message, confirm)),
            Err(err) => {
                round.retry.push((index, message));
                keep_most_telling(&mut round.error, err);
                break;
            }
        }
    }
    round.retry.extend(unsent);
    for (index, message, confirm) in confirms {
        match confirm.await {
            Ok(confirmation) if confirmation.is_ack() => {
                if let Some(returned) = confirmation.take_message() {
                    let reason = format!("unroutable: {}", returned.reply_text);
                    round.failed.push(FailedEntry { index, reason });
                }
            }
            Ok(_) => round.retry.push((index, message)),
            Err(err) => {
                round.retry.push((index, message));
                keep_most_telling(&mut round.error, err);
            }
        }
    }
    round.retry.sort_by_key(|(index, _)| *index);
    round
}

/// Keeps the error that says most of why a round failed. When the broker closes a channel for a
/// missing exchange, the publishes after it fail only with "channel closing" while a confirm
/// may carry the 404: the 404 must win, or a missing topic looks like a broken connection and
/// is retried until the publish timeout.
fn keep_most_telling(kept: &mut Option<lapin::Error>, err: lapin::Error) {
    let rank = |e: &lapin::Error| match classify(e) {
        Failure::NotFound => 2,
        Failure::Fatal => 1,
        Failure::Transient => 0,
    };
    if kept.as_ref().is_none_or(|k| rank(&err) > rank(k)) {
        *kept = Some(err);
    }
}

/// After a failed round to a topic: whether its exchange is missing, asked on a fresh channel of
/// the same connection (a passive declare). The failed round's errors may only say that the
/// channel closed, not why; a broken connection answers `false` and the round is retried.
async fn topic_missing(slot: Option<&(Connection, Channel)>, destination: &Destination) -> bool {
    let (Some((connection, _)), Destination::Topic(topic)) = (slot, destination) else { return false };
    let Ok(channel) = connection.create_channel().await else { return false };
    let options = ExchangeDeclareOptions { passive: true, ..Default::default() };
    let declared = channel
        .exchange_declare(topic.as_str().into(), ExchangeKind::Topic, options, FieldTable::default())
        .await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "done".into()).await;
            false
        }
        Err(err) => classify(&err) == Failure::NotFound,
    }
}

fn properties(message: &OutgoingMessage) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (key, value) in &message.attributes {
        headers
            .insert(ShortString::from(key.as_str()), AMQPValue::LongString(LongString::from(value.as_str())));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(message.id.as_str()))
        .with_headers(headers)
}

fn attributes_of(properties: &BasicProperties) -> Attributes {
    let mut attributes = Attributes::new();
    let Some(headers) = properties.headers() else { return attributes };
    for (key, value) in headers {
        let text = match value {
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            AMQPValue::ShortString(s) => s.as_str().to_string(),
            other => match integer_of(other) {
                Some(n) => n.to_string(),
                None => continue,
            },
        };
        attributes.insert(key.as_str().to_string(), text);
    }
    attributes
}

fn integer_of(value: &AMQPValue) -> Option<i64> {
    Some(match value {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        _ => return None,
    })
}

/// The RabbitMQ transport.
pub struct RabbitMqTransport {
    config: RabbitMqConfig,
    publisher: Arc<Publisher>,
    admin: Mutex<Option<Connection>>,
}

impl RabbitMqTransport {
    /// Connects the admin connection once, so a wrong URL fails here rather than later.
    pub async fn connect(config: RabbitMqConfig) -> Result<Self> {
        let admin = connect(&config, "admin").await?;
        info!(url = %config.redacted_url(), "connected to RabbitMQ");
        Ok(Self {
            publisher: Arc::new(Publisher { config: config.clone(), channel: Mutex::new(None) }),
            config,
            admin: Mutex::new(Some(admin)),
        })
    }

    /// A fresh channel for one topology operation: a failed declare closes its channel, so
    /// channels are not reused between operations.
    async fn admin_channel(&self) -> Result<Channel> {
        let mut admin = self.admin.lock().await;
        if !admin.as_ref().is_some_and(|c| c.status().connected()) {
            let deadline = Instant::now() + self.config.publish_timeout;
            *admin = Some(connect_with_backoff(&self.config, "admin", deadline).await?);
        }
        let connection =
            admin.as_ref().ok_or_else(|| TransportError::Config("admin connection missing".into()))?;
        connection.create_channel().await.map_err(|e| op_error("channel.open", "admin", &e))
    }
}

fn owned_arguments(owner: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    if let Some(owner) = owner {
        args.insert(OWNER_ARGUMENT.into(), AMQPValue::LongString(owner.into()));
    }
    args
}

fn quorum_queue_arguments(spec: &QueueSpec) -> FieldTable {
    let mut args = owned_arguments(spec.owner.as_deref());
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dead_letter_queue_name(&spec.name).as_str().into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(spec.max_receive_count)));
    args
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions { durable: true, ..Default::default() }
}

#[async_trait]
impl Transport for RabbitMqTransport {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    async fn declare_topic(&self, topic: &str, owner: Option<&str>) -> Result<()> {
        let channel = self.admin_channel().await?;
        let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(topic.into(), ExchangeKind::Topic, options, owned_arguments(owner))
            .await
            .map_err(|e| op_error("exchange.declare", topic, &e))?;
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<()> {
        let channel = self.admin_channel().await?;
        let dlq = dead_letter_queue_name(&spec.name);
        let mut dlq_args = owned_arguments(spec.owner.as_deref());
        dlq_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        channel
            .queue_declare(dlq.as_str().into(), durable(), dlq_args)
            .await
            .map_err(|e| op_error("queue.declare", &dlq, &e))?;
        channel
            .queue_declare(spec.name.as_str().into(), durable(), quorum_queue_arguments(spec))
            .await
            .map_err(|e| op_error("queue.declare", &spec.name, &e))?;
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    async fn bind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
        let channel = self.admin_channel().await?;
        for pattern in &filter.patterns {
            let key = binding_key(pattern);
            channel
                .queue_bind(
                    queue.into(),
                    topic.into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| op_error("queue.bind", &format!("{queue} <- {topic} ({key})"), &e))?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    async fn unbind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
        let channel = self.admin_channel().await?;
        for pattern in &filter.patterns {
            let key = binding_key(pattern);
            channel
                .queue_unbind(queue.into(), topic.into(), key.into(), FieldTable::default())
                .await
                .map_err(|e| op_error("queue.unbind", &format!("{queue} <- {topic} ({key})"), &e))?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    async fn inventory(&self, prefix: &str) -> Result<Inventory> {
        let api = self.config.management_endpoint()?;
        let exchanges: Vec<ManagedExchange> = api.list("exchanges").await?;
        let queues: Vec<ManagedQueue> = api.list("queues").await?;
        let bindings: Vec<ManagedBinding> = api.list("bindings").await?;
        let mut inventory = Inventory::default();
        for exchange in exchanges.into_iter().filter(|e| e.kind == "topic" && e.name.starts_with(prefix)) {
            if !exchange.name.is_empty() && !exchange.name.starts_with("amq.") {
                inventory.topics.insert(exchange.name.clone(), owner_of(&exchange.arguments));
            }
        }
        let names: BTreeSet<&str> = queues.iter().map(|q| q.name.as_str()).collect();
        for queue in queues.iter().filter(|q| q.name.starts_with(prefix)) {
            if queue.name.strip_suffix("-dlq").is_some_and(|base| names.contains(base)) {
                continue; // a dead-letter queue, listed with its queue
            }
            let observed = ObservedQueue {
                owner: owner_of(&queue.arguments),
                max_receive_count: queue
                    .arguments
                    .get("x-delivery-limit")
                    .and_then(|v| v.as_u64())
                    .and_then(|v| u32::try_from(v).ok()),
                visibility_timeout: None,
                has_dead_letter_queue: names.contains(dead_letter_queue_name(&queue.name).as_str()),
            };
            inventory.queues.insert(queue.name.clone(), observed);
        }
        for binding in bindings {
            if binding.destination_type != "queue"
                || binding.source.is_empty()
                || !inventory.queues.contains_key(&binding.destination)
            {
                continue;
            }
            let pattern = if binding.routing_key == "#" { "*".to_string() } else { binding.routing_key };
            inventory.bindings.entry((binding.source, binding.destination)).or_default().insert(pattern);
        }
        Ok(inventory)
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        for name in [queue.to_string(), dead_letter_queue_name(queue)] {
            let channel = self.admin_channel().await?;
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| op_error("queue.delete", &name, &e))?;
            let _ = channel.close(200, "done".into()).await;
        }
        Ok(())
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        let channel = self.admin_channel().await?;
        channel
            .exchange_delete(topic.into(), ExchangeDeleteOptions::default())
            .await
            .map_err(|e| op_error("exchange.delete", topic, &e))?;
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    async fn publish_batch(&self, destination: &Destination, messages: Vec<OutgoingMessage>) -> Result<()> {
        self.publisher.publish(destination, messages).await
    }

    async fn subscribe(&self, queue: &str, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        let mut subscription = RabbitSubscription {
            config: self.config.clone(),
            publisher: self.publisher.clone(),
            queue: queue.to_string(),
            prefetch: options.prefetch.max(1),
            live: None,
            delays: backoff(&self.config),
        };
        // Open now so a missing queue or bad credentials fail here, not on the first poll.
        subscription.live = Some(subscription.open().await?);
        Ok(Box::new(subscription))
    }

    async fn queue_depth(&self, queue: &str) -> Result<QueueDepth> {
        let channel = self.admin_channel().await?;
        let options = QueueDeclareOptions { passive: true, ..Default::default() };
        let declared = channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
            .map_err(|e| op_error("queue.declare(passive)", queue, &e))?;
        let _ = channel.close(200, "done".into()).await;
        // AMQP reports only ready messages; unacked ones are visible in the management API.
        Ok(QueueDepth { ready: u64::from(declared.message_count()), in_flight: 0 })
    }

    async fn close(&self) -> Result<()> {
        self.publisher.close().await;
        if let Some(admin) = self.admin.lock().await.take() {
            let _ = admin.close(200, "resync shutting down".into()).await;
        }
        Ok(())
    }
}

struct LiveConsumer {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
}

struct RabbitSubscription {
    config: RabbitMqConfig,
    publisher: Arc<Publisher>,
    queue: String,
    prefetch: u16,
    live: Option<LiveConsumer>,
    delays: ExponentialBackoff,
}

impl RabbitSubscription {
    async fn open(&self) -> Result<LiveConsumer> {
        let role = format!("consumer/{}", self.queue);
        let connection = connect(&self.config, &role).await?;
        let channel =
            connection.create_channel().await.map_err(|e| op_error("channel.open", &self.queue, &e))?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| op_error("basic.qos", &self.queue, &e))?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| op_error("basic.consume", &self.queue, &e))?;
        debug!(queue = %self.queue, "consuming");
        Ok(LiveConsumer { connection, channel, consumer })
    }

    /// Makes sure a consumer is running; on a transient failure waits one backoff step (but
    /// not past `deadline`) and returns `Ok(false)`.
    async fn ensure_open(&mut self, deadline: Instant) -> Result<bool> {
        if self.live.is_some() {
            return Ok(true);
        }
        match self.open().await {
            Ok(live) => {
                info!(queue = %self.queue, "RabbitMQ consumer (re)connected");
                self.live = Some(live);
                self.delays = backoff(&self.config);
                Ok(true)
            }
            Err(err @ (TransportError::NotFound(_) | TransportError::Config(_))) => Err(err),
            Err(err) => {
                let delay = self.delays.next().unwrap_or(self.config.max_reconnect_backoff);
                warn!(queue = %self.queue, error = %err, retry_in = ?delay, "RabbitMQ consumer cannot connect; retrying");
                tokio::time::sleep_until(deadline.min(Instant::now() + delay)).await;
                Ok(false)
            }
        }
    }

    fn delivery(&self, d: lapin::message::Delivery) -> Delivery {
        let attributes = attributes_of(&d.properties);
        // Quorum queues count earlier failed deliveries in `x-delivery-count`.
        let receive_count = match d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(crate::transport::DELIVERY_COUNT_HEADER))
        {
            Some(count) => integer_of(count).map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX - 1) + 1),
            None if d.redelivered => 2,
            None => 1,
        };
        let settle = AmqpSettle { acker: Some(d.acker), publisher: self.publisher.clone() };
        Delivery::new(Bytes::from(d.data), attributes, receive_count, self.queue.clone(), Box::new(settle))
    }
}

#[async_trait]
impl Subscription for RabbitSubscription {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = Instant::now() + wait;
        loop {
            if !self.ensure_open(deadline).await? {
                if Instant::now() >= deadline {
                    return Ok(Vec::new());
                }
                continue;
            }
            let Some(live) = self.live.as_mut() else { continue };
            let first = match tokio::time::timeout_at(deadline, live.consumer.next()).await {
                Err(_) => return Ok(Vec::new()),
                Ok(Some(Ok(delivery))) => delivery,
                Ok(Some(Err(err))) => {
                    warn!(queue = %self.queue, error = %err, "RabbitMQ consumer lost its connection; reconnecting");
                    self.live = None;
                    continue;
                }
                Ok(None) => {
                    warn!(queue = %self.queue, "RabbitMQ cancelled the consumer (queue deleted?); reopening");
                    self.live = None;
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < max {
                match live.consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => batch.push(delivery),
                    _ => break,
                }
            }
            return Ok(batch.into_iter().map(|d| self.delivery(d)).collect());
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        if let Some(live) = self.live.take() {
            let tag = live.consumer.tag();
            let _ = live.channel.basic_cancel(tag, BasicCancelOptions::default()).await;
            // Closing the channel returns prefetched, unacked messages to the queue.
            let _ = live.channel.close(200, "subscription closed".into()).await;
            let _ = live.connection.close(200, "subscription closed".into()).await;
        }
        Ok(())
    }
}

struct AmqpSettle {
    /// `Some` until settled; a drop with `Some` requeues.
    acker: Option<lapin::Acker>,
    publisher: Arc<Publisher>,
}

fn settled(result: lapin::Result<bool>) -> Result<()> {
    match result {
        Ok(true) => Ok(()),
        // false: the channel is gone; the broker redelivers the message.
        Ok(false) | Err(_) => Err(TransportError::DeliveryLost),
    }
}

#[async_trait]
impl Settle for AmqpSettle {
    async fn ack(&mut self) -> Result<()> {
        let Some(acker) = self.acker.take() else { return Ok(()) };
        settled(acker.ack(BasicAckOptions::default()).await)
    }

    async fn nack(&mut self, _delay: Duration) -> Result<()> {
        let Some(acker) = self.acker.take() else { return Ok(()) };
        settled(acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await)
    }

    async fn move_to(
        &mut self,
        queue: &str,
        body: &Bytes,
        attributes: Attributes,
        _delay: Duration,
    ) -> Result<()> {
        // RabbitMQ has no per-message delay (a nack redelivers at once too).
        let message = OutgoingMessage {
            body: body.clone(),
            attributes,
            routing_key: queue.to_string(),
            id: String::new(),
        };
        self.publisher.publish_sized(&Destination::Queue(queue.to_string()), vec![message], false).await?;
        self.ack().await
    }
}

impl Drop for AmqpSettle {
    fn drop(&mut self) {
        let Some(acker) = self.acker.take() else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(redact_password("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(redact_password("amqp://host:5672"), "amqp://host:5672");
    }
}
