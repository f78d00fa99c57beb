//! SNS/SQS transport (aws-sdk-sns, aws-sdk-sqs).
//!
//! Topics are SNS topics; queues are SQS queues subscribed with raw message delivery and a
//! filter policy on the `type` message attribute, each with a dead-letter queue and a redrive
//! policy. Routing metadata travels as message attributes. Received messages stay invisible
//! while held: the subscription extends their visibility in the background until they are
//! settled or dropped, so a slow handler never causes a second delivery and a crashed consumer
//! loses nothing (its messages reappear after the visibility timeout).
//!
//! The endpoint can be overridden (`AWS_ENDPOINT_URL`) for the moto emulator; credentials come
//! from the AWS credential chain, or are dummies when the endpoint is a local emulator and no
//! credentials are configured.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sns::types::{MessageAttributeValue as SnsAttribute, PublishBatchRequestEntry, Tag};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, MessageAttributeValue as SqsAttribute,
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use backon::ExponentialBackoff;
use bytes::Bytes;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::transport::{
    Attributes, Delivery, Destination, FailedEntry, Filter, Inventory, MAX_MESSAGE_BYTES, OWNER_MARK,
    ObservedQueue, OutgoingMessage, QueueDepth, QueueSpec, Result, Settle, SubscribeOptions, Subscription,
    Transport, TransportError, dead_letter_queue_name,
};

/// Most entries in one SendMessageBatch / PublishBatch / ChangeMessageVisibilityBatch call.
const MAX_BATCH_ENTRIES: usize = 10;
/// Most message attributes SNS and SQS carry per message.
const MAX_ATTRIBUTES: usize = 10;
/// Longest long poll SQS allows.
const MAX_WAIT_SECONDS: u64 = 20;

/// How to reach SNS and SQS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnsSqsConfig {
    /// Endpoint override, e.g. `http://127.0.0.1:4566` for moto; `None` for AWS itself.
    pub endpoint_url: Option<String>,
    pub region: String,
    /// How long a publish keeps retrying transient failures before it reports them.
    pub publish_timeout: Duration,
}

impl SnsSqsConfig {
    /// From `AWS_ENDPOINT_URL` and `AWS_REGION` (default `us-east-1`).
    pub fn from_env() -> Self {
        Self {
            endpoint_url: std::env::var("AWS_ENDPOINT_URL").ok().filter(|s| !s.is_empty()),
            region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
            publish_timeout: Duration::from_secs(60),
        }
    }

    fn is_local_emulator(&self) -> bool {
        self.endpoint_url
            .as_deref()
            .is_some_and(|u| u.contains("://127.") || u.contains("://localhost") || u.contains("://[::1]"))
    }
}

type SdkResult<T, E> = std::result::Result<T, SdkError<E>>;

fn detail<E: std::error::Error + 'static>(err: &SdkError<E>) -> String {
    DisplayErrorContext(err).to_string()
}

/// Transient: the request may succeed if sent again (no response, throttling, 5xx).
fn is_transient<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    match err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(service) => {
            service.raw().status().is_server_error()
                || err.code().is_some_and(|c| c.contains("Throttl") || c.contains("RequestThrottled"))
        }
        _ => false,
    }
}

fn is_missing_queue<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    err.code().is_some_and(|c| c.contains("NonExistentQueue") || c.contains("QueueDoesNotExist"))
}

fn op_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
    operation: &'static str,
    resource: &str,
    err: &SdkError<E>,
) -> TransportError {
    if is_missing_queue(err) || err.code() == Some("NotFound") {
        return TransportError::NotFound(resource.to_string());
    }
    TransportError::Operation { operation, resource: resource.to_string(), detail: detail(err) }
}

fn retry_delays() -> ExponentialBackoff {
    crate::backoff(Duration::from_millis(100), Duration::from_secs(5))
}

/// The SNS/SQS transport.
pub struct SnsSqsTransport {
    config: SnsSqsConfig,
    sns: aws_sdk_sns::Client,
    sqs: aws_sdk_sqs::Client,
    /// Name -> URL / ARN, filled on first use; both are stable for a resource's life.
    queue_urls: Mutex<HashMap<String, String>>,
    topic_arns: Mutex<HashMap<String, String>>,
}

impl SnsSqsTransport {
    /// Builds the clients and checks that the endpoint answers.
    pub async fn connect(config: SnsSqsConfig) -> Result<Self> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()));
        if let Some(endpoint) = &config.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        if config.is_local_emulator() && std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            info!("local SNS/SQS emulator and no AWS credentials configured: using dummy credentials");
            loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "test",
                "test",
                None,
                None,
                "resync-local-emulator",
            ));
        }
        let shared = loader.load().await;
        let transport = Self {
            sns: aws_sdk_sns::Client::new(&shared),
            sqs: aws_sdk_sqs::Client::new(&shared),
            queue_urls: Mutex::default(),
            topic_arns: Mutex::default(),
            config,
        };
        transport.sqs.list_queues().max_results(1).send().await.map_err(|e| TransportError::Connect {
            transport: "sns-sqs",
            endpoint: transport
                .config
                .endpoint_url
                .clone()
                .unwrap_or_else(|| format!("AWS {}", transport.config.region)),
            detail: detail(&e),
        })?;
        Ok(transport)
    }

    pub fn sqs_client(&self) -> &aws_sdk_sqs::Client {
        &self.sqs
    }

    pub fn sns_client(&self) -> &aws_sdk_sns::Client {
        &self.sns
    }

    pub async fn queue_url(&self, queue: &str) -> Result<String> {
        if let Some(url) = cached(&self.queue_urls, queue) {
            return Ok(url);
        }
        let out = self
            .sqs
            .get_queue_url()
            .queue_name(queue)
            .send()
            .await
            .map_err(|e| op_error("GetQueueUrl", queue, &e))?;
        let url = out.queue_url().ok_or_else(|| TransportError::NotFound(queue.to_string()))?.to_string();
        remember(&self.queue_urls, queue, &url);
        Ok(url)
    }

    /// One attribute of a queue; `None` if the queue has none of that name (e.g. no policy).
    async fn queue_attribute(&self, queue_url: &str, name: QueueAttributeName) -> Result<Option<String>> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(name.clone())
            .send()
            .await
            .map_err(|e| op_error("GetQueueAttributes", queue_url, &e))?;
        Ok(out.attributes().and_then(|a| a.get(&name)).cloned())
    }

    async fn set_queue_policy(&self, queue_url: &str, policy: String) -> Result<()> {
        self.sqs
            .set_queue_attributes()
            .queue_url(queue_url)
            .attributes(QueueAttributeName::Policy, policy)
            .send()
            .await
            .map_err(|e| op_error("SetQueueAttributes", queue_url, &e))?;
        Ok(())
    }

    async fn queue_arn(&self, queue_url: &str) -> Result<String> {
        self.queue_attribute(queue_url, QueueAttributeName::QueueArn)
            .await?
            .ok_or_else(|| TransportError::NotFound(queue_url.to_string()))
    }

    pub async fn topic_arn(&self, topic: &str) -> Result<String> {
        if let Some(arn) = cached(&self.topic_arns, topic) {
            return Ok(arn);
        }
        let topics = self.topics_with_prefix(topic).await?;
        let (_, arn) = topics
            .into_iter()
            .find(|(name, _)| name == topic)
            .ok_or_else(|| TransportError::NotFound(topic.to_string()))?;
        remember(&self.topic_arns, topic, &arn);
        Ok(arn)
    }

    /// The SQS subscriptions of a topic: (subscription ARN, queue ARN).
    async fn sqs_subscriptions(&self, topic_arn: &str) -> Result<Vec<(String, String)>> {
        let mut found = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .sns
                .list_subscriptions_by_topic()
                .topic_arn(topic_arn)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| op_error("ListSubscriptionsByTopic", topic_arn, &e))?;
            for sub in out.subscriptions() {
                if let (Some("sqs"), Some(arn), Some(endpoint)) =
                    (sub.protocol(), sub.subscription_arn(), sub.endpoint())
                {
                    // A subscription still being confirmed has no ARN yet.
                    if arn.starts_with("arn:") {
                        found.push((arn.to_string(), endpoint.to_string()));
                    }
                }
            }
            match out.next_token() {
                Some(next) => token = Some(next.to_string()),
                None => return Ok(found),
            }
        }
    }

    /// The subscription routing `topic_arn` into the queue `queue_arn`, if any.
    async fn subscription(&self, topic_arn: &str, queue_arn: &str) -> Result<Option<String>> {
        let subscriptions = self.sqs_subscriptions(topic_arn).await?;
        Ok(subscriptions.into_iter().find(|(_, endpoint)| endpoint == queue_arn).map(|(arn, _)| arn))
    }

    /// The type patterns a subscription's filter policy lets through (`*` without a policy).
    async fn subscription_patterns(&self, subscription_arn: &str) -> Result<BTreeSet<String>> {
        let out = self
            .sns
            .get_subscription_attributes()
            .subscription_arn(subscription_arn)
            .send()
            .await
            .map_err(|e| op_error("GetSubscriptionAttributes", subscription_arn, &e))?;
        let policy = out.attributes().and_then(|a| a.get("FilterPolicy")).filter(|p| !p.is_empty());
        Ok(match policy {
            Some(policy) => patterns_of_filter_policy(policy),
            None => BTreeSet::from(["*".to_string()]),
        })
    }

    async fn set_subscription_filter(
        &self,
        subscription_arn: &str,
        patterns: &BTreeSet<String>,
        resource: &str,
    ) -> Result<()> {
        // A policy cannot say "everything"; SNS takes an empty policy as "no filter".
        let policy = filter_policy(patterns).unwrap_or_default();
        for (name, value) in
            [("FilterPolicyScope", "MessageAttributes".to_string()), ("FilterPolicy", policy)]
        {
            self.sns
                .set_subscription_attributes()
                .subscription_arn(subscription_arn)
                .attribute_name(name)
                .attribute_value(value)
                .send()
                .await
                .map_err(|e| op_error("SetSubscriptionAttributes", resource, &e))?;
        }
        Ok(())
    }

    /// Takes back what [`Self::allow_topic`] granted.
    async fn disallow_topic(&self, queue_url: &str, topic_arn: &str) -> Result<()> {
        match self.queue_attribute(queue_url, QueueAttributeName::Policy).await? {
            Some(existing) => self.set_queue_policy(queue_url, policy_without(&existing, topic_arn)).await,
            None => Ok(()),
        }
    }

    async fn queue_urls_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let mut urls = Vec::new();
        let mut token = None;
        loop {
            let mut list = self.sqs.list_queues().max_results(1000).set_next_token(token);
            if !prefix.is_empty() {
                list = list.queue_name_prefix(prefix);
            }
            let out = list.send().await.map_err(|e| op_error("ListQueues", prefix, &e))?;
            urls.extend(out.queue_urls().iter().cloned());
            match out.next_token() {
                Some(next) => token = Some(next.to_string()),
                None => return Ok(urls),
            }
        }
    }

    /// A queue's ARN and what fare compares of it.
    async fn observe_queue(&self, url: &str, has_dead_letter_queue: bool) -> Result<(String, ObservedQueue)> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .attribute_names(QueueAttributeName::VisibilityTimeout)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| op_error("GetQueueAttributes", url, &e))?;
        let attributes = out.attributes().cloned().unwrap_or_default();
        let tags = self
            .sqs
            .list_queue_tags()
            .queue_url(url)
            .send()
            .await
            .map_err(|e| op_error("ListQueueTags", url, &e))?;
        let max_receive_count = attributes
            .get(&QueueAttributeName::RedrivePolicy)
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
            .and_then(|p| match p.get("maxReceiveCount")? {
                serde_json::Value::Number(n) => n.as_u64(),
                serde_json::Value::String(s) => s.parse().ok(),
                _ => None,
            })
            .and_then(|n| u32::try_from(n).ok());
        let observed = ObservedQueue {
            owner: tags.tags().and_then(|t| t.get(OWNER_MARK)).cloned(),
            max_receive_count,
            visibility_timeout: attributes
                .get(&QueueAttributeName::VisibilityTimeout)
                .and_then(|v| v.parse().ok())
                .map(Duration::from_secs),
            has_dead_letter_queue,
        };
        let arn = attributes.get(&QueueAttributeName::QueueArn).cloned().unwrap_or_default();
        Ok((arn, observed))
    }

    /// (name, ARN) of every topic whose name starts with `prefix`.
    async fn topics_with_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let mut topics = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .sns
                .list_topics()
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| op_error("ListTopics", prefix, &e))?;
            for arn in out.topics().iter().filter_map(|t| t.topic_arn()) {
                let name = arn.rsplit(':').next().unwrap_or_default();
                if name.starts_with(prefix) {
                    topics.push((name.to_string(), arn.to_string()));
                }
            }
            match out.next_token() {
                Some(next) => token = Some(next.to_string()),
                None => return Ok(topics),
            }
        }
    }

    async fn create_queue(
        &self,
        name: &str,
        attributes: HashMap<QueueAttributeName, String>,
        owner: Option<&str>,
    ) -> Result<String> {
        let mut create = self.sqs.create_queue().queue_name(name).set_attributes(Some(attributes.clone()));
        if let Some(owner) = owner {
            // Tags apply only when the queue is created: an existing queue keeps its own.
            create = create.tags(OWNER_MARK, owner);
        }
        let created = create.send().await;
        let url = match created {
            Ok(out) => out.queue_url().unwrap_or_default().to_string(),
            // Exists with other attributes: converge by setting ours.
            Err(err)
                if err
                    .code()
                    .is_some_and(|c| c.contains("QueueAlreadyExists") || c.contains("QueueNameExists")) =>
            {
                let url = self.queue_url(name).await?;
                self.sqs
                    .set_queue_attributes()
                    .queue_url(&url)
                    .set_attributes(Some(attributes))
                    .send()
                    .await
                    .map_err(|e| op_error("SetQueueAttributes", name, &e))?;
                url
            }
            Err(err) => return Err(op_error("CreateQueue", name, &err)),
        };
        remember(&self.queue_urls, name, &url);
        Ok(url)
    }

    /// Lets `topic_arn` send to the queue; keeps statements for other topics.
    async fn allow_topic(&self, queue_url: &str, queue_arn: &str, topic_arn: &str) -> Result<()> {
        let existing = self.queue_attribute(queue_url, QueueAttributeName::Policy).await?;
        self.set_queue_policy(queue_url, policy_allowing(existing.as_deref(), queue_arn, topic_arn)).await
    }

    async fn send_chunk(&self, destination: &Destination, chunk: &[(usize, OutgoingMessage)]) -> ChunkResult {
        match destination {
            Destination::Queue(queue) => {
                let url = match self.queue_url(queue).await {
                    Ok(url) => url,
                    Err(err) => return ChunkResult::Error(err, false),
                };
                let entries: Vec<_> = chunk.iter().filter_map(|(i, m)| sqs_entry(*i, m)).collect();
                let sent =
                    self.sqs.send_message_batch().queue_url(url).set_entries(Some(entries)).send().await;
                match sent {
                    Ok(out) => ChunkResult::Entries(
                        out.failed()
                            .iter()
                            .map(|f| {
                                (f.id().to_string(), f.sender_fault(), failure_text(f.code(), f.message()))
                            })
                            .collect(),
                    ),
                    Err(err) => {
                        ChunkResult::Error(op_error("SendMessageBatch", queue, &err), is_transient(&err))
                    }
                }
            }
            Destination::Topic(topic) => {
                let arn = match self.topic_arn(topic).await {
                    Ok(arn) => arn,
                    Err(err) => return ChunkResult::Error(err, false),
                };
                let entries: Vec<_> = chunk.iter().filter_map(|(i, m)| sns_entry(*i, m)).collect();
                let sent = self
                    .sns
                    .publish_batch()
                    .topic_arn(arn)
                    .set_publish_batch_request_entries(Some(entries))
                    .send()
                    .await;
                match sent {
                    Ok(out) => ChunkResult::Entries(
                        out.failed()
                            .iter()
                            .map(|f| {
                                (f.id().to_string(), f.sender_fault(), failure_text(f.code(), f.message()))
                            })
                            .collect(),
                    ),
                    Err(err) => {
                        let transient = is_transient(&err);
                        let detail = DisplayErrorContext(&err).to_string();
                        let error = if err.code() == Some("NotFound") {
                            TransportError::NotFound(topic.clone())
                        } else {
                            TransportError::Operation {
                                operation: "PublishBatch",
                                resource: topic.clone(),
                                detail,
                            }
                        };
                        ChunkResult::Error(error, transient)
                    }
                }
            }
        }
    }
}

enum ChunkResult {
    /// The call succeeded; these entries (batch id, sender's fault, reason) failed.
    Entries(Vec<(String, bool, String)>),
    /// The whole call failed; `true` if worth retrying.
    Error(TransportError, bool),
}

fn failure_text(code: &str, message: Option<&str>) -> String {
    format!("{code}: {}", message.unwrap_or("no message"))
}

fn cached(map: &Mutex<HashMap<String, String>>, key: &str) -> Option<String> {
    map.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
}

fn remember(map: &Mutex<HashMap<String, String>>, key: &str, value: &str) {
    map.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_string(), value.to_string());
}

fn forget(map: &Mutex<HashMap<String, String>>, key: &str) {
    map.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
}

/// A queue policy that lets SNS deliver from `topic_arn` (and from topics already allowed).
fn policy_allowing(existing: Option<&str>, queue_arn: &str, topic_arn: &str) -> String {
    let sid = format!("resync-allow-{}", topic_arn.rsplit(':').next().unwrap_or(topic_arn));
    let mut statements: Vec<serde_json::Value> = existing
        .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
        .and_then(|p| p.get("Statement").and_then(|s| s.as_array()).cloned())
        .unwrap_or_default();
    statements.retain(|s| s.get("Sid").and_then(|v| v.as_str()) != Some(sid.as_str()));
    statements.push(json!({
        "Sid": sid,
        "Effect": "Allow",
        "Principal": {"Service": "sns.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue_arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}}
    }));
    json!({"Version": "2012-10-17", "Statement": statements}).to_string()
}

/// The policy without the statement [`policy_allowing`] added for `topic_arn`.
fn policy_without(existing: &str, topic_arn: &str) -> String {
    let sid = format!("resync-allow-{}", topic_arn.rsplit(':').next().unwrap_or(topic_arn));
    let mut policy: serde_json::Value = serde_json::from_str(existing).unwrap_or_else(|_| json!({}));
    if let Some(statements) = policy.get_mut("Statement").and_then(|s| s.as_array_mut()) {
        statements.retain(|s| s.get("Sid").and_then(|v| v.as_str()) != Some(sid.as_str()));
    }
    policy.to_string()
}

/// The SNS filter policy for type patterns, or `None` when every type passes.
fn filter_policy<'a>(patterns: impl IntoIterator<Item = &'a String>) -> Option<String> {
    let patterns: Vec<&String> = patterns.into_iter().collect();
    if patterns.iter().any(|p| *p == "*") {
        return None;
    }
    let rules: Vec<serde_json::Value> = patterns
        .iter()
        .map(|p| match p.strip_suffix('*') {
            Some(prefix) => json!({"prefix": prefix}),
            None => json!(p),
        })
        .collect();
    Some(json!({"type": rules}).to_string())
}

/// The type patterns of a filter policy written by [`filter_policy`].
fn patterns_of_filter_policy(policy: &str) -> BTreeSet<String> {
    let rules = serde_json::from_str::<serde_json::Value>(policy)
        .ok()
        .and_then(|p| p.get("type").and_then(|t| t.as_array()).cloned())
        .unwrap_or_default();
    rules
        .iter()
        .filter_map(|rule| match rule {
            serde_json::Value::String(exact) => Some(exact.clone()),
            other => other.get("prefix").and_then(|p| p.as_str()).map(|prefix| format!("{prefix}*")),
        })
        .collect()
}

fn body_text(message: &OutgoingMessage) -> std::result::Result<String, String> {
    String::from_utf8(message.body.to_vec())
        .map_err(|_| "SNS and SQS carry only UTF-8 text bodies".to_string())
}

fn checked(message: &OutgoingMessage) -> std::result::Result<(), String> {
    message.check_size()?;
    body_text(message)?;
    let non_empty = message.attributes.values().filter(|v| !v.is_empty()).count();
    if non_empty > MAX_ATTRIBUTES {
        return Err(format!("{non_empty} attributes, more than the {MAX_ATTRIBUTES} SNS/SQS allow"));
    }
    Ok(())
}

fn sqs_entry(index: usize, message: &OutgoingMessage) -> Option<SendMessageBatchRequestEntry> {
    let mut entry =
        SendMessageBatchRequestEntry::builder().id(index.to_string()).message_body(body_text(message).ok()?);
    for (key, value) in message.attributes.iter().filter(|(_, v)| !v.is_empty()) {
        let attribute = SqsAttribute::builder().data_type("String").string_value(value).build().ok()?;
        entry = entry.message_attributes(key, attribute);
    }
    entry.build().ok()
}

fn sns_entry(index: usize, message: &OutgoingMessage) -> Option<PublishBatchRequestEntry> {
    let mut entry =
        PublishBatchRequestEntry::builder().id(index.to_string()).message(body_text(message).ok()?);
    for (key, value) in message.attributes.iter().filter(|(_, v)| !v.is_empty()) {
        let attribute = SnsAttribute::builder().data_type("String").string_value(value).build().ok()?;
        entry = entry.message_attributes(key, attribute);
    }
    entry.build().ok()
}

/// The request size SNS and SQS count against their batch limit: bodies plus attributes.
fn wire_size(message: &OutgoingMessage) -> usize {
    message.body.len()
        + message.attributes.iter().map(|(k, v)| k.len() + v.len() + "String".len()).sum::<usize>()
}

/// Splits messages into batches of at most 10 entries and 256 KiB.
fn chunks(messages: Vec<(usize, OutgoingMessage)>) -> Vec<Vec<(usize, OutgoingMessage)>> {
    let mut out: Vec<Vec<(usize, OutgoingMessage)>> = Vec::new();
    let mut size = 0;
    for entry in messages {
        let entry_size = wire_size(&entry.1);
        match out.last_mut() {
            Some(last) if last.len() < MAX_BATCH_ENTRIES && size + entry_size <= MAX_MESSAGE_BYTES => {
                size += entry_size;
                last.push(entry);
            }
            _ => {
                size = entry_size;
                out.push(vec![entry]);
            }
        }
    }
    out
}

#[async_trait]
impl Transport for SnsSqsTransport {
    fn kind(&self) -> &'static str {
        "sns-sqs"
    }

    async fn declare_topic(&self, topic: &str, owner: Option<&str>) -> Result<()> {
        let tags = owner.map(|owner| Tag::builder().key(OWNER_MARK).value(owner).build()).transpose();
        let tags = tags.map_err(|e| TransportError::Config(format!("ownership tag: {e}")))?;
        let created =
            self.sns.create_topic().name(topic).set_tags(tags.clone().map(|t| vec![t])).send().await;
        let out = match created {
            // SNS refuses CreateTopic with tags other than an existing topic's: it exists and
            // keeps the mark it has (none if fare did not create it).
            Err(err) if tags.is_some() && err.code() == Some("InvalidParameter") => self
                .sns
                .create_topic()
                .name(topic)
                .send()
                .await
                .map_err(|e| op_error("CreateTopic", topic, &e))?,
            other => other.map_err(|e| op_error("CreateTopic", topic, &e))?,
        };
        if let Some(arn) = out.topic_arn() {
            remember(&self.topic_arns, topic, arn);
        }
        Ok(())
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<()> {
        let dlq = dead_letter_queue_name(&spec.name);
        let owner = spec.owner.as_deref();
        let dlq_url = self.create_queue(&dlq, HashMap::new(), owner).await?;
        let dlq_arn = self.queue_arn(&dlq_url).await?;
        let redrive =
            json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": spec.max_receive_count}).to_string();
        let attributes = HashMap::from([
            (QueueAttributeName::VisibilityTimeout, spec.visibility_timeout.as_secs().max(1).to_string()),
            (QueueAttributeName::RedrivePolicy, redrive),
        ]);
        self.create_queue(&spec.name, attributes, owner).await?;
        Ok(())
    }

    async fn bind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
        let topic_arn = self.topic_arn(topic).await?;
        let queue_url = self.queue_url(queue).await?;
        let queue_arn = self.queue_arn(&queue_url).await?;
        self.allow_topic(&queue_url, &queue_arn, &topic_arn).await?;
        // SNS delivers what it cannot hand to the queue to the queue's own DLQ instead of
        // dropping it after its retries.
        let dlq_url = self.queue_url(&dead_letter_queue_name(queue)).await?;
        let dlq_arn = self.queue_arn(&dlq_url).await?;
        self.allow_topic(&dlq_url, &dlq_arn, &topic_arn).await?;
        let resource = format!("{queue} <- {topic}");
        if let Some(existing) = self.subscription(&topic_arn, &queue_arn).await? {
            let mut patterns = self.subscription_patterns(&existing).await?;
            patterns.extend(filter.patterns.iter().cloned());
            return self.set_subscription_filter(&existing, &patterns, &resource).await;
        }
        let mut subscribe = self
            .sns
            .subscribe()
            .topic_arn(&topic_arn)
            .protocol("sqs")
            .endpoint(&queue_arn)
            .return_subscription_arn(true)
            .attributes("RawMessageDelivery", "true")
            .attributes("RedrivePolicy", json!({"deadLetterTargetArn": dlq_arn}).to_string());
        if let Some(policy) = filter_policy(&filter.patterns) {
            subscribe = subscribe
                .attributes("FilterPolicyScope", "MessageAttributes")
                .attributes("FilterPolicy", policy);
        }
        subscribe.send().await.map_err(|e| op_error("Subscribe", &resource, &e))?;
        debug!(topic, queue, ?filter, "subscribed");
        Ok(())
    }

    async fn unbind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
        let topic_arn = match self.topic_arn(topic).await {
            Ok(arn) => arn,
            Err(TransportError::NotFound(_)) => return Ok(()),
            Err(err) => return Err(err),
        };
        let queue_url = match self.queue_url(queue).await {
            Ok(url) => url,
            Err(TransportError::NotFound(_)) => return Ok(()),
            Err(err) => return Err(err),
        };
        let queue_arn = self.queue_arn(&queue_url).await?;
        let Some(existing) = self.subscription(&topic_arn, &queue_arn).await? else { return Ok(()) };
        let resource = format!("{queue} <- {topic}");
        let mut patterns = self.subscription_patterns(&existing).await?;
        let before = patterns.len();
        patterns.retain(|p| !filter.patterns.contains(p));
        if patterns.len() == before {
            return Ok(());
        }
        if !patterns.is_empty() {
            return self.set_subscription_filter(&existing, &patterns, &resource).await;
        }
        self.sns
            .unsubscribe()
            .subscription_arn(&existing)
            .send()
            .await
            .map_err(|e| op_error("Unsubscribe", &resource, &e))?;
        self.disallow_topic(&queue_url, &topic_arn).await
    }

    async fn inventory(&self, prefix: &str) -> Result<Inventory> {
        let mut inventory = Inventory::default();
        let urls = self.queue_urls_with_prefix(prefix).await?;
        let names: BTreeMap<String, String> = urls
            .iter()
            .map(|url| (url.rsplit('/').next().unwrap_or_default().to_string(), url.clone()))
            .collect();
        let mut arn_to_queue = HashMap::new();
        for (name, url) in &names {
            if name.strip_suffix("-dlq").is_some_and(|base| names.contains_key(base)) {
                continue; // a dead-letter queue, listed with its queue
            }
            let (arn, observed) =
                self.observe_queue(url, names.contains_key(&dead_letter_queue_name(name))).await?;
            arn_to_queue.insert(arn, name.clone());
            inventory.queues.insert(name.clone(), observed);
        }
        for (name, arn) in self.topics_with_prefix(prefix).await? {
            let tags = self
                .sns
                .list_tags_for_resource()
                .resource_arn(&arn)
                .send()
                .await
                .map_err(|e| op_error("ListTagsForResource", &name, &e))?;
            let owner = tags.tags().iter().find(|t| t.key() == OWNER_MARK).map(|t| t.value().to_string());
            for (subscription, endpoint) in self.sqs_subscriptions(&arn).await? {
                if let Some(queue) = arn_to_queue.get(&endpoint) {
                    let patterns = self.subscription_patterns(&subscription).await?;
                    inventory.bindings.insert((name.clone(), queue.clone()), patterns);
                }
            }
            inventory.topics.insert(name, owner);
        }
        Ok(inventory)
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        for name in [queue.to_string(), dead_letter_queue_name(queue)] {
            let url = match self.queue_url(&name).await {
                Ok(url) => url,
                Err(TransportError::NotFound(_)) => continue,
                Err(err) => return Err(err),
            };
            match self.sqs.delete_queue().queue_url(&url).send().await {
                Ok(_) => {}
                Err(err) if is_missing_queue(&err) => {}
                Err(err) => return Err(op_error("DeleteQueue", &name, &err)),
            }
            forget(&self.queue_urls, &name);
        }
        Ok(())
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        let arn = match self.topic_arn(topic).await {
            Ok(arn) => arn,
            Err(TransportError::NotFound(_)) => return Ok(()),
            Err(err) => return Err(err),
        };
        // SNS deletes the topic's subscriptions with it.
        self.sns
            .delete_topic()
            .topic_arn(arn)
            .send()
            .await
            .map_err(|e| op_error("DeleteTopic", topic, &e))?;
        forget(&self.topic_arns, topic);
        Ok(())
    }

    async fn publish_batch(&self, destination: &Destination, messages: Vec<OutgoingMessage>) -> Result<()> {
        let total = messages.len();
        let mut failed = Vec::new();
        let mut pending = Vec::with_capacity(total);
        for (index, message) in messages.into_iter().enumerate() {
            match checked(&message) {
                Ok(()) => pending.push((index, message)),
                Err(reason) => failed.push(FailedEntry { index, reason }),
            }
        }
        let deadline = Instant::now() + self.config.publish_timeout;
        let mut delays = retry_delays();
        while !pending.is_empty() {
            let mut retry = Vec::new();
            let mut last_error = None;
            for chunk in chunks(std::mem::take(&mut pending)) {
                match self.send_chunk(destination, &chunk).await {
                    ChunkResult::Entries(failures) => {
                        let by_id: HashMap<String, (bool, String)> =
                            failures.into_iter().map(|(id, sender, reason)| (id, (sender, reason))).collect();
                        for (index, message) in chunk {
                            match by_id.get(&index.to_string()) {
                                None => {}
                                Some((true, reason)) => {
                                    failed.push(FailedEntry { index, reason: reason.clone() })
                                }
                                Some((false, reason)) => {
                                    last_error = Some(reason.clone());
                                    retry.push((index, message));
                                }
                            }
                        }
                    }
                    ChunkResult::Error(err, true) => {
                        last_error = Some(err.to_string());
                        retry.extend(chunk);
                    }
                    ChunkResult::Error(err, false) => return Err(err),
                }
            }
            if retry.is_empty() {
                break;
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            if Instant::now() + delay >= deadline {
                failed.extend(retry.into_iter().map(|(index, _)| FailedEntry {
                    index,
                    reason: format!(
                        "still failing after {:?}: {}",
                        self.config.publish_timeout,
                        last_error.clone().unwrap_or_default()
                    ),
                }));
                break;
            }
            warn!(%destination, retrying = retry.len(), error = last_error.as_deref().unwrap_or(""), "publish failed transiently; retrying");
            tokio::time::sleep(delay).await;
            pending = retry;
        }
        failed.sort_by_key(|f| f.index);
        if failed.is_empty() {
            Ok(())
        } else {
            Err(TransportError::Partial { failed: failed.len(), total, entries: failed })
        }
    }

    async fn subscribe(&self, queue: &str, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        let queue_url = self.queue_url(queue).await?;
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(&queue_url)
            .attribute_names(QueueAttributeName::VisibilityTimeout)
            .send()
            .await
            .map_err(|e| op_error("GetQueueAttributes", queue, &e))?;
        let visibility_secs: u64 = out
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::VisibilityTimeout))
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        let visibility = Duration::from_secs(visibility_secs.max(1));
        let held: Held = Arc::default();
        let keeper =
            tokio::spawn(keep_visible(self.sqs.clone(), queue_url.clone(), visibility, held.clone()));
        Ok(Box::new(SqsSubscription {
            sqs: self.sqs.clone(),
            queue: queue.to_string(),
            queue_url,
            dlq_url: Arc::new(tokio::sync::OnceCell::new()),
            prefetch: usize::from(options.prefetch.max(1)),
            held,
            next_id: 0,
            keeper,
            delays: retry_delays(),
        }))
    }

    async fn queue_depth(&self, queue: &str) -> Result<QueueDepth> {
        let url = self.queue_url(queue).await?;
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| op_error("GetQueueAttributes", queue, &e))?;
        let number = |name: QueueAttributeName| -> u64 {
            out.attributes().and_then(|a| a.get(&name)).and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        Ok(QueueDepth {
            ready: number(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: number(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        })
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Receipt handles of deliveries held by one subscription, by delivery id.
#[derive(Default)]
struct HeldSet {
    receipts: Mutex<HashMap<u64, String>>,
    /// Taken by a visibility extension round and by a nack: an extension computed before a nack
    /// must not land after it and hide the message again for a whole timeout.
    turn: tokio::sync::Mutex<()>,
}

type Held = Arc<HeldSet>;

fn held_lock(held: &Held) -> std::sync::MutexGuard<'_, HashMap<u64, String>> {
    held.receipts.lock().unwrap_or_else(|p| p.into_inner())
}

/// Extends the visibility of every held delivery a third of the way into its timeout, so
/// held messages never become visible to other consumers while their handler still runs.
async fn keep_visible(sqs: aws_sdk_sqs::Client, queue_url: String, visibility: Duration, held: Held) {
    let period = (visibility / 3).max(Duration::from_millis(500));
    let seconds = i32::try_from(visibility.as_secs()).unwrap_or(i32::MAX);
    loop {
        tokio::time::sleep(period).await;
        let _turn = held.turn.lock().await;
        let receipts: Vec<(u64, String)> = held_lock(&held).iter().map(|(id, r)| (*id, r.clone())).collect();
        for chunk in receipts.chunks(MAX_BATCH_ENTRIES) {
            let entries: Vec<_> = chunk
                .iter()
                .filter_map(|(id, receipt)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(id.to_string())
                        .receipt_handle(receipt)
                        .visibility_timeout(seconds)
                        .build()
                        .ok()
                })
                .collect();
            let sent = sqs
                .change_message_visibility_batch()
                .queue_url(&queue_url)
                .set_entries(Some(entries))
                .send()
                .await;
            match sent {
                Ok(out) if !out.failed().is_empty() => {
                    warn!(
                        queue_url,
                        failed = out.failed().len(),
                        "could not extend visibility of some held messages"
                    )
                }
                Ok(_) => {}
                Err(err) => {
                    warn!(queue_url, error = %detail(&err), "could not extend visibility of held messages")
                }
            }
        }
    }
}

struct SqsSubscription {
    sqs: aws_sdk_sqs::Client,
    queue: String,
    queue_url: String,
    dlq_url: Arc<tokio::sync::OnceCell<String>>,
    prefetch: usize,
    held: Held,
    next_id: u64,
    keeper: JoinHandle<()>,
    delays: ExponentialBackoff,
}

impl Drop for SqsSubscription {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl SqsSubscription {
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
    ) -> SdkResult<
        aws_sdk_sqs::operation::receive_message::ReceiveMessageOutput,
        aws_sdk_sqs::operation::receive_message::ReceiveMessageError,
    > {
        self.sqs
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(i32::try_from(max.clamp(1, MAX_BATCH_ENTRIES)).unwrap_or(1))
            .wait_time_seconds(i32::try_from(wait.as_secs().min(MAX_WAIT_SECONDS)).unwrap_or(0))
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
    }

    fn delivery(&mut self, message: &aws_sdk_sqs::types::Message) -> Option<Delivery> {
        let receipt = message.receipt_handle()?.to_string();
        let attributes: Attributes = message
            .message_attributes()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.string_value()?.to_string())))
            .collect();
        let receive_count = message
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        self.next_id += 1;
        held_lock(&self.held).insert(self.next_id, receipt.clone());
        let settle = SqsSettle {
            sqs: self.sqs.clone(),
            queue: self.queue.clone(),
            queue_url: self.queue_url.clone(),
            dlq_url: self.dlq_url.clone(),
            receipt: Some(receipt),
            id: self.next_id,
            held: self.held.clone(),
        };
        let body = Bytes::from(message.body().unwrap_or_default().to_string());
        Some(Delivery::new(body, attributes, receive_count, self.queue.clone(), Box::new(settle)))
    }
}

#[async_trait]
impl Subscription for SqsSubscription {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = Instant::now() + wait;
        loop {
            let capacity = self.prefetch.saturating_sub(held_lock(&self.held).len()).min(max);
            let remaining = deadline.saturating_duration_since(Instant::now());
            if capacity == 0 {
                if remaining.is_zero() {
                    return Ok(Vec::new());
                }
                tokio::time::sleep(remaining.min(Duration::from_millis(50))).await;
                continue;
            }
            match self.receive(capacity, remaining).await {
                Ok(out) => {
                    self.delays = retry_delays();
                    let batch: Vec<Delivery> =
                        out.messages().iter().filter_map(|m| self.delivery(m)).collect();
                    if !batch.is_empty() || Instant::now() >= deadline {
                        return Ok(batch);
                    }
                    if remaining < Duration::from_secs(1) {
                        // A short poll answered at once; do not spin until the deadline.
                        tokio::time::sleep(remaining.min(Duration::from_millis(100))).await;
                    }
                }
                Err(err) if is_missing_queue(&err) => {
                    return Err(TransportError::NotFound(self.queue.clone()));
                }
                Err(err) if is_transient(&err) => {
                    let delay = self.delays.next().unwrap_or(Duration::from_secs(5));
                    warn!(queue = %self.queue, error = %detail(&err), retry_in = ?delay, "SQS receive failed; retrying");
                    tokio::time::sleep_until(deadline.min(Instant::now() + delay)).await;
                    if Instant::now() >= deadline {
                        return Ok(Vec::new());
                    }
                }
                Err(err) => return Err(op_error("ReceiveMessage", &self.queue, &err)),
            }
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        // Held deliveries stop being extended and reappear after the visibility timeout
        // unless settled before they are dropped.
        self.keeper.abort();
        Ok(())
    }
}

struct SqsSettle {
    sqs: aws_sdk_sqs::Client,
    queue: String,
    queue_url: String,
    dlq_url: Arc<tokio::sync::OnceCell<String>>,
    /// `Some` until settled.
    receipt: Option<String>,
    id: u64,
    held: Held,
}

impl SqsSettle {
    /// The URL of this queue's DLQ, looked up once per subscription.
    async fn dead_letter_queue_url(&self) -> Result<String> {
        let dlq = dead_letter_queue_name(&self.queue);
        let url = self
            .dlq_url
            .get_or_try_init(|| async {
                let out = self
                    .sqs
                    .get_queue_url()
                    .queue_name(&dlq)
                    .send()
                    .await
                    .map_err(|e| op_error("GetQueueUrl", &dlq, &e))?;
                Ok::<_, TransportError>(out.queue_url().unwrap_or_default().to_string())
            })
            .await?;
        Ok(url.clone())
    }

    fn release(&mut self) -> Option<String> {
        held_lock(&self.held).remove(&self.id);
        self.receipt.take()
    }

    async fn delete(&mut self) -> Result<()> {
        let Some(receipt) = self.release() else { return Ok(()) };
        self.sqs
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| op_error("DeleteMessage", &self.queue, &e))?;
        Ok(())
    }
}

#[async_trait]
impl Settle for SqsSettle {
    async fn ack(&mut self) -> Result<()> {
        self.delete().await
    }

    async fn nack(&mut self, delay: Duration) -> Result<()> {
        let held = self.held.clone();
        let _turn = held.turn.lock().await;
        let Some(receipt) = self.release() else { return Ok(()) };
        // SQS caps a message's visibility timeout at 12 hours.
        let seconds = i32::try_from(delay.as_secs().min(43_200)).unwrap_or(0);
        self.sqs
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds)
            .send()
            .await
            .map_err(|e| op_error("ChangeMessageVisibility", &self.queue, &e))?;
        Ok(())
    }

    async fn move_to(
        &mut self,
        queue: &str,
        body: &Bytes,
        attributes: Attributes,
        delay: Duration,
    ) -> Result<()> {
        let url =
            if queue == self.queue { self.queue_url.clone() } else { self.dead_letter_queue_url().await? };
        // SQS delays a message by at most 15 minutes.
        let delay = i32::try_from(delay.as_secs().min(900)).unwrap_or(0);
        let mut send = self
            .sqs
            .send_message()
            .queue_url(url)
            .message_body(String::from_utf8_lossy(body))
            .delay_seconds(delay);
        for (key, value) in attributes.iter().filter(|(_, v)| !v.is_empty()).take(MAX_ATTRIBUTES) {
            if let Ok(attribute) = SqsAttribute::builder().data_type("String").string_value(value).build() {
                send = send.message_attributes(key, attribute);
            }
        }
        send.send().await.map_err(|e| op_error("SendMessage", queue, &e))?;
        self.delete().await
    }
}

impl Drop for SqsSettle {
    fn drop(&mut self) {
        let Some(receipt) = self.release() else { return };
        // Unsettled: make it visible again now rather than after the timeout.
        let (sqs, url) = (self.sqs.clone(), self.queue_url.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = sqs
                    .change_message_visibility()
                    .queue_url(url)
                    .receipt_handle(receipt)
                    .visibility_timeout(0)
                    .send()
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_policies_use_exact_values_and_prefixes() {
        let policy = filter_policy(&Filter::types(["listing.*", "user.deleted"]).patterns).unwrap();
        assert_eq!(policy, r#"{"type":[{"prefix":"listing."},"user.deleted"]}"#);
        assert_eq!(filter_policy(&Filter::all().patterns), None);
    }

    #[test]
    fn filter_policies_read_back_into_the_patterns_they_were_written_from() {
        let patterns = BTreeSet::from(["listing.*".to_string(), "user.deleted".to_string()]);
        let policy = filter_policy(&patterns).unwrap();
        assert_eq!(patterns_of_filter_policy(&policy), patterns);
    }

    #[test]
    fn a_topic_taken_out_of_a_queue_policy_leaves_the_others() {
        let both = policy_allowing(
            Some(&policy_allowing(None, "arn:q", "arn:aws:sns:r:1:a")),
            "arn:q",
            "arn:aws:sns:r:1:b",
        );
        let left = policy_without(&both, "arn:aws:sns:r:1:a");
        assert!(!left.contains("sns:r:1:a\""), "{left}");
        assert!(left.contains("arn:aws:sns:r:1:b"), "{left}");
    }

    #[test]
    fn queue_policy_keeps_other_topics_and_replaces_its_own() {
        let first = policy_allowing(None, "arn:q", "arn:aws:sns:r:1:a");
        let second = policy_allowing(Some(&first), "arn:q", "arn:aws:sns:r:1:b");
        let again = policy_allowing(Some(&second), "arn:q", "arn:aws:sns:r:1:a");
        let statements = |p: &str| {
            serde_json::from_str::<serde_json::Value>(p).unwrap()["Statement"].as_array().unwrap().len()
        };
        assert_eq!(statements(&second), 2);
        assert_eq!(statements(&again), 2);
    }

    #[test]
    fn batches_respect_entry_and_size_limits() {
        let small = OutgoingMessage {
            body: Bytes::from(vec![b'x'; 100]),
            attributes: Attributes::new(),
            routing_key: String::new(),
            id: String::new(),
        };
        let big = OutgoingMessage { body: Bytes::from(vec![b'x'; 200 * 1024]), ..small.clone() };
        let sizes = |v: Vec<OutgoingMessage>| {
            chunks(v.into_iter().enumerate().collect()).iter().map(Vec::len).collect::<Vec<_>>()
        };
        assert_eq!(sizes(vec![small.clone(); 25]), vec![10, 10, 5]);
        assert_eq!(sizes(vec![big.clone(), big, small]), vec![1, 2]);
    }
}
