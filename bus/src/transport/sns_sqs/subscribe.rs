//! Consuming from SQS: subscriptions that long-poll in batches, keeping held messages invisible
//! while their handlers run, and settling deliveries (delete, change visibility, move to a queue).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::error::SdkError;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, MessageAttributeValue as SqsAttribute,
    MessageSystemAttributeName, QueueAttributeName,
};
use backon::ExponentialBackoff;
use bytes::Bytes;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;

use super::{
    MAX_ATTRIBUTES, MAX_BATCH_ENTRIES, SnsSqsTransport, detail, is_missing_queue, is_transient, op_error,
    retry_delays,
};
use crate::transport::{
    Attributes, Delivery, Result, Settle, SubscribeOptions, Subscription, TransportError,
    dead_letter_queue_name,
};

/// Longest long poll SQS allows.
const MAX_WAIT_SECONDS: u64 = 20;

type SdkResult<T, E> = std::result::Result<T, SdkError<E>>;

impl SnsSqsTransport {
    pub(super) async fn start_receiving(
        &self,
        queue: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
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
