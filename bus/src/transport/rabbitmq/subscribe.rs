//! Consuming from RabbitMQ: subscriptions that reconnect after a broker loss, received
//! deliveries and their headers, and settling them (ack, nack, move to another queue).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::ExponentialBackoff;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::publish::Publisher;
use super::{RabbitMqConfig, RabbitMqTransport, backoff, connect, op_error};
use crate::transport::{
    Attributes, Delivery, Destination, OutgoingMessage, Result, Settle, SubscribeOptions, Subscription,
    TransportError,
};

impl RabbitMqTransport {
    pub(super) async fn start_consumer(
        &self,
        queue: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>> {
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
