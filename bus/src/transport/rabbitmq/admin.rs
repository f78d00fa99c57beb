//! RabbitMQ topology operations, which only provisioning (`fare`) uses: declaring, binding,
//! listing and deleting exchanges and queues, queue depth, and the management-API client.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::ExchangeKind;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use super::{RabbitMqConfig, RabbitMqTransport, op_error};
use crate::transport::{
    Filter, Inventory, ObservedQueue, QueueDepth, QueueSpec, Result, TransportError, dead_letter_queue_name,
};

impl RabbitMqTransport {
    pub(super) async fn declare_exchange(&self, topic: &str, owner: Option<&str>) -> Result<()> {
        let channel = self.admin_channel().await?;
        let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(topic.into(), ExchangeKind::Topic, options, owned_arguments(owner))
            .await
            .map_err(|e| op_error("exchange.declare", topic, &e))?;
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    pub(super) async fn declare_quorum_queues(&self, spec: &QueueSpec) -> Result<()> {
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

    pub(super) async fn bind_routing_keys(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
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

    pub(super) async fn unbind_routing_keys(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
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

    pub(super) async fn inventory_from_management_api(&self, prefix: &str) -> Result<Inventory> {
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

    pub(super) async fn delete_queue_and_its_dlq(&self, queue: &str) -> Result<()> {
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

    pub(super) async fn delete_exchange(&self, topic: &str) -> Result<()> {
        let channel = self.admin_channel().await?;
        channel
            .exchange_delete(topic.into(), ExchangeDeleteOptions::default())
            .await
            .map_err(|e| op_error("exchange.delete", topic, &e))?;
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    pub(super) async fn count_ready_messages(&self, queue: &str) -> Result<QueueDepth> {
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

/// The AMQP binding key for a type pattern: `*` alone (every type) is `#`.
fn binding_key(pattern: &str) -> &str {
    if pattern == "*" { "#" } else { pattern }
}

/// The declare argument that carries [`crate::OWNER_MARK`]; RabbitMQ stores unknown `x-` arguments
/// and leaves them out of its equivalence checks, so declaring without it later is no conflict.
const OWNER_ARGUMENT: &str = "x-resync-owner";

fn owner_of(arguments: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    arguments.get(OWNER_ARGUMENT).and_then(|v| v.as_str()).map(str::to_string)
}

impl RabbitMqConfig {
    /// The management API's base URL, the credentials to use and the vhost (URL-encoded).
    fn management_endpoint(&self) -> Result<ManagementEndpoint> {
        // The first node's: a cluster's management API shows every node's queues.
        let amqp: lapin::uri::AMQPUri =
            self.nodes().next().unwrap_or_default().parse().map_err(|e| {
                TransportError::Config(format!("RESYNC_AMQP_URL `{}`: {e}", self.redacted_url()))
            })?;
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
