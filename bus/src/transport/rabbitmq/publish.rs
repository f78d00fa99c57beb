//! Publishing on RabbitMQ: the confirm-mode [`Publisher`] shared by the transport and its
//! subscriptions, publish rounds that resend after a broker loss, and message properties.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::warn;

use super::{Failure, RabbitMqConfig, backoff, classify, connect_with_backoff, op_error};
use crate::transport::{Destination, FailedEntry, OutgoingMessage, Result, TransportError};

/// The publisher connection and its confirm-mode channel, shared by the transport and by
/// subscriptions (which publish dead letters).
pub(super) struct Publisher {
    pub(super) config: RabbitMqConfig,
    pub(super) channel: Mutex<Option<(Connection, Channel)>>,
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
    pub(super) async fn publish(
        &self,
        destination: &Destination,
        messages: Vec<OutgoingMessage>,
    ) -> Result<()> {
        self.publish_sized(destination, messages, true).await
    }

    /// `publish`, with or without the size limit every transport keeps for new
    /// messages. A dead letter goes without it: the broker accepted the message once, and an
    /// oversize one must reach the DLQ with its reason, unchanged.
    pub(super) async fn publish_sized(
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

    pub(super) async fn close(&self) {
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
