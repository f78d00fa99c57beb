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

mod admin;
mod publish;
mod subscribe;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::ExponentialBackoff;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::LongString;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::transport::{
    Destination, Filter, Inventory, OutgoingMessage, QueueDepth, QueueSpec, Result, SubscribeOptions,
    Subscription, Transport, TransportError,
};

use publish::Publisher;

/// How to reach RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitMqConfig {
    /// `amqp://user:pass@host:port/vhost` (vhost `/` is `%2f`); `amqps://` for TLS. For a
    /// cluster, several URLs separated by commas: every connection goes to the first node that
    /// accepts it, and a lost connection is made again the same way, so work moves to a
    /// surviving node (list the nodes in another order in some processes to spread them).
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

    /// The URL(s) with any password replaced, for logs and errors.
    fn redacted_url(&self) -> String {
        self.nodes().map(resync_redact::redact_password).collect::<Vec<_>>().join(",")
    }

    /// The node URLs, in the order connections try them.
    fn nodes(&self) -> impl Iterator<Item = &str> {
        self.url.split(',').map(str::trim).filter(|url| !url.is_empty())
    }
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

/// A connection to the first node that accepts one; the error names every node's failure.
async fn connect(config: &RabbitMqConfig, role: &str) -> Result<Connection> {
    let mut failures = Vec::new();
    for node in config.nodes() {
        match connect_node(config, node, role).await {
            Ok(connection) => return Ok(connection),
            Err(detail) => failures.push(format!("{}: {detail}", resync_redact::redact_password(node))),
        }
    }
    if failures.is_empty() {
        failures.push("no URL given".to_string());
    }
    Err(TransportError::Connect {
        transport: "rabbitmq",
        endpoint: config.redacted_url(),
        detail: failures.join("; "),
    })
}

async fn connect_node(
    config: &RabbitMqConfig,
    url: &str,
    role: &str,
) -> std::result::Result<Connection, String> {
    let mut uri: lapin::uri::AMQPUri = url.parse()?;
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    let name = format!("{}/{role}", config.connection_name);
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    Connection::connect_uri(uri, properties).await.map_err(|e| e.to_string())
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

// The bodies live in `admin`, `publish` and `subscribe`, named for what this backend does.
#[async_trait]
impl Transport for RabbitMqTransport {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    async fn declare_topic(&self, topic: &str, owner: Option<&str>) -> Result<()> {
        self.declare_exchange(topic, owner).await
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<()> {
        self.declare_quorum_queues(spec).await
    }

    async fn bind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
        self.bind_routing_keys(topic, queue, filter).await
    }

    async fn unbind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
        self.unbind_routing_keys(topic, queue, filter).await
    }

    async fn inventory(&self, prefix: &str) -> Result<Inventory> {
        self.inventory_from_management_api(prefix).await
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        self.delete_queue_and_its_dlq(queue).await
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        self.delete_exchange(topic).await
    }

    async fn publish_batch(&self, destination: &Destination, messages: Vec<OutgoingMessage>) -> Result<()> {
        self.publisher.publish(destination, messages).await
    }

    async fn subscribe(&self, queue: &str, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        self.start_consumer(queue, options).await
    }

    async fn queue_depth(&self, queue: &str) -> Result<QueueDepth> {
        self.count_ready_messages(queue).await
    }

    async fn close(&self) -> Result<()> {
        self.publisher.close().await;
        if let Some(admin) = self.admin.lock().await.take() {
            let _ = admin.close(200, "resync shutting down".into()).await;
        }
        Ok(())
    }
}
