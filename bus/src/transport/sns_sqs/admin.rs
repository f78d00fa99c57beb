//! SNS/SQS topology operations, which only provisioning (`fare`) uses: creating, subscribing,
//! listing and deleting topics and queues, queue depth, queue policies and filter policies.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use aws_sdk_sns::types::Tag;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::json;
use tracing::debug;

use super::{SnsSqsTransport, forget, is_missing_queue, op_error, remember};
use crate::transport::{
    Filter, Inventory, OWNER_MARK, ObservedQueue, QueueDepth, QueueSpec, Result, TransportError,
    dead_letter_queue_name,
};

impl SnsSqsTransport {
    pub(super) async fn create_tagged_topic(&self, topic: &str, owner: Option<&str>) -> Result<()> {
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

    pub(super) async fn create_queue_with_dlq(&self, spec: &QueueSpec) -> Result<()> {
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

    pub(super) async fn subscribe_with_filter(
        &self,
        topic: &str,
        queue: &str,
        filter: &Filter,
    ) -> Result<()> {
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

    pub(super) async fn narrow_or_unsubscribe(
        &self,
        topic: &str,
        queue: &str,
        filter: &Filter,
    ) -> Result<()> {
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

    pub(super) async fn inventory_by_prefix(&self, prefix: &str) -> Result<Inventory> {
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

    pub(super) async fn delete_queue_and_its_dlq(&self, queue: &str) -> Result<()> {
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

    pub(super) async fn delete_sns_topic(&self, topic: &str) -> Result<()> {
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

    pub(super) async fn approximate_depth(&self, queue: &str) -> Result<QueueDepth> {
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
}
