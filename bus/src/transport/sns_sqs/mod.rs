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

mod admin;
mod publish;
mod subscribe;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use backon::ExponentialBackoff;
use tracing::info;

use crate::transport::{
    Destination, Filter, Inventory, OutgoingMessage, QueueDepth, QueueSpec, Result, SubscribeOptions,
    Subscription, Transport, TransportError,
};

/// Most entries in one SendMessageBatch / PublishBatch / ChangeMessageVisibilityBatch call.
const MAX_BATCH_ENTRIES: usize = 10;
/// Most message attributes SNS and SQS carry per message.
const MAX_ATTRIBUTES: usize = 10;

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
/// Every SNS/SQS call ends: the SDK sets no read or attempt timeout of its own, so one answer
/// that never comes (a stalled connection, an overloaded endpoint) would hold a consumer's
/// event, and with it the consumer, for ever. An attempt may last a long poll (20 s) and then
/// some; a call, its retries.
fn call_timeouts() -> aws_config::timeout::TimeoutConfig {
    aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(MAX_CALL_ATTEMPT_SECS))
        .operation_timeout(Duration::from_secs(3 * MAX_CALL_ATTEMPT_SECS))
        .build()
}

/// Longest SNS/SQS call attempt: a 20 s long poll and 10 s to spare.
const MAX_CALL_ATTEMPT_SECS: u64 = 30;

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
            .region(aws_config::Region::new(config.region.clone()))
            .timeout_config(call_timeouts());
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

// The bodies live in `admin`, `publish` and `subscribe`, named for what this backend does.
#[async_trait]
impl Transport for SnsSqsTransport {
    fn kind(&self) -> &'static str {
        "sns-sqs"
    }

    async fn declare_topic(&self, topic: &str, owner: Option<&str>) -> Result<()> {
        self.create_tagged_topic(topic, owner).await
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<()> {
        self.create_queue_with_dlq(spec).await
    }

    async fn bind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
        self.subscribe_with_filter(topic, queue, filter).await
    }

    async fn unbind(&self, topic: &str, queue: &str, filter: &Filter) -> Result<()> {
        self.narrow_or_unsubscribe(topic, queue, filter).await
    }

    async fn inventory(&self, prefix: &str) -> Result<Inventory> {
        self.inventory_by_prefix(prefix).await
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        self.delete_queue_and_its_dlq(queue).await
    }

    async fn delete_topic(&self, topic: &str) -> Result<()> {
        self.delete_sns_topic(topic).await
    }

    async fn publish_batch(&self, destination: &Destination, messages: Vec<OutgoingMessage>) -> Result<()> {
        self.publish_in_chunks(destination, messages).await
    }

    async fn subscribe(&self, queue: &str, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        self.start_receiving(queue, options).await
    }

    async fn queue_depth(&self, queue: &str) -> Result<QueueDepth> {
        self.approximate_depth(queue).await
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
