//! Publishing to SNS and SQS: batch entries with their attributes, the checks made before
//! sending (size, UTF-8 body, attribute count), chunking into batch calls, and retries.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sns::types::{MessageAttributeValue as SnsAttribute, PublishBatchRequestEntry};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_sqs::types::{MessageAttributeValue as SqsAttribute, SendMessageBatchRequestEntry};
use tokio::time::Instant;
use tracing::warn;

use super::{MAX_ATTRIBUTES, MAX_BATCH_ENTRIES, SnsSqsTransport, is_transient, op_error, retry_delays};
use crate::transport::{
    Destination, FailedEntry, MAX_MESSAGE_BYTES, OutgoingMessage, Result, TransportError,
};

impl SnsSqsTransport {
    pub(super) async fn publish_in_chunks(
        &self,
        destination: &Destination,
        messages: Vec<OutgoingMessage>,
    ) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::transport::Attributes;

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
