//! The topology a catalog asks for, and applying it through a transport.
//!
//! One topic per (entity type, stream) that some service publishes; one queue per (service,
//! stream) it subscribes on, with its dead-letter queue; a binding from each topic to each
//! queue that wants some of its types, filtered on the `type` attribute / routing key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use resync_bus::Stream;
use resync_bus::naming::{queue_name, topic_name};
use resync_bus::transport::{Filter, Inventory, QueueSpec, Transport, TransportError};
use serde::Serialize;

use crate::config::Catalog;

/// What the broker should hold for a catalog in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The mark fare gives what it creates ([`owner_mark`]).
    pub owner: String,
    /// What every name in the namespace starts with; the part of the broker fare looks at.
    pub prefix: String,
    pub topics: BTreeSet<String>,
    pub queues: BTreeMap<String, QueueSpec>,
    pub bindings: Vec<Binding>,
}

/// Messages published to `topic` whose type matches one of `patterns` go to `queue`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Binding {
    pub topic: String,
    pub stream: Stream,
    pub queue: String,
    pub patterns: Vec<String>,
}

impl Topology {
    pub fn desired(catalog: &Catalog, namespace: Option<&str>) -> Self {
        let streams = [Stream::Live, Stream::Resync];
        let topics = catalog
            .published_entities()
            .iter()
            .flat_map(|entity| streams.iter().map(move |s| topic_name(namespace, entity, *s)))
            .collect();
        let mut queues = BTreeMap::new();
        let mut bindings: BTreeMap<(String, String), (Stream, BTreeSet<String>)> = BTreeMap::new();
        for service in &catalog.services {
            for (_, spec) in service.queues(namespace) {
                queues.insert(spec.name.clone(), spec);
            }
            for subscription in &service.subscriptions {
                for stream in &subscription.streams {
                    for pattern in &subscription.types {
                        let Some((entity, _)) = pattern.split_once('.') else { continue };
                        let key = (
                            topic_name(namespace, entity, *stream),
                            queue_name(namespace, &service.name, *stream),
                        );
                        bindings
                            .entry(key)
                            .or_insert_with(|| (*stream, BTreeSet::new()))
                            .1
                            .insert(pattern.clone());
                    }
                }
            }
        }
        let bindings = bindings
            .into_iter()
            .map(|((topic, queue), (stream, patterns))| Binding {
                topic,
                stream,
                queue,
                patterns: patterns.into_iter().collect(),
            })
            .collect();
        Self { owner: owner_mark(namespace), prefix: name_prefix(namespace), topics, queues, bindings }
    }
}

/// The ownership mark fare gives what it creates in a namespace: `fare:<namespace>`, or
/// `fare` without one. `prune` deletes only what carries the mark of its own namespace.
pub fn owner_mark(namespace: Option<&str>) -> String {
    match namespace.filter(|n| !n.is_empty()) {
        Some(ns) => format!("fare:{ns}"),
        None => "fare".to_string(),
    }
}

/// The prefix every name in a namespace starts with (empty without one).
fn name_prefix(namespace: Option<&str>) -> String {
    namespace.filter(|n| !n.is_empty()).map(|ns| format!("{ns}-")).unwrap_or_default()
}

/// One difference between the config and the broker, and what fixes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Change {
    CreateTopic {
        topic: String,
    },
    CreateQueue {
        queue: String,
        dead_letter_queue: String,
        max_receive_count: u32,
        visibility_timeout_secs: u64,
    },
    /// A queue setting differs from the config (or its dead-letter queue is missing).
    UpdateQueue {
        queue: String,
        setting: String,
        from: String,
        to: String,
    },
    /// Route these types from the topic into the queue.
    Bind {
        topic: String,
        queue: String,
        patterns: Vec<String>,
    },
    /// Stop routing these types from the topic into the queue.
    Unbind {
        topic: String,
        queue: String,
        patterns: Vec<String>,
    },
    /// Only in `prune`: a queue (and its dead-letter queue) fare created that no config declares.
    DeleteQueue {
        queue: String,
    },
    /// Only in `prune`: a topic fare created that no config declares.
    DeleteTopic {
        topic: String,
    },
}

impl Change {
    /// `+`, `~` or `-`, as in a diff.
    fn sign(&self) -> char {
        match self {
            Change::CreateTopic { .. } | Change::CreateQueue { .. } | Change::Bind { .. } => '+',
            Change::UpdateQueue { .. } => '~',
            Change::Unbind { .. } | Change::DeleteQueue { .. } | Change::DeleteTopic { .. } => '-',
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = self.sign();
        match self {
            Change::CreateTopic { topic } | Change::DeleteTopic { topic } => {
                write!(f, "{sign} topic {topic}")
            }
            Change::CreateQueue { queue, dead_letter_queue, max_receive_count, visibility_timeout_secs } => {
                write!(
                    f,
                    "{sign} queue {queue} (max_receive_count={max_receive_count}, \
                     visibility_timeout={visibility_timeout_secs}s, dead-letter queue {dead_letter_queue})"
                )
            }
            Change::UpdateQueue { queue, setting, from, to } => {
                write!(f, "{sign} queue {queue}: {setting} {from} -> {to}")
            }
            Change::Bind { topic, queue, patterns } | Change::Unbind { topic, queue, patterns } => {
                write!(f, "{sign} route {topic} -> {queue} [{}]", patterns.join(", "))
            }
            Change::DeleteQueue { queue } => write!(f, "{sign} queue {queue} (and its dead-letter queue)"),
        }
    }
}

/// What `apply` and `prune` would do, computed from the config and the broker's inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// What `apply` changes, in the order it does it.
    pub changes: Vec<Change>,
    /// What `prune --yes` deletes: resources carrying this namespace's mark that no config
    /// declares any more.
    pub prune: Vec<Change>,
    /// Declared names that exist on the broker without fare's mark: used as they are, never
    /// deleted by fare.
    pub not_owned: Vec<String>,
}

impl Plan {
    /// Compares what the config asks for with what the broker holds.
    pub fn between(desired: &Topology, actual: &Inventory) -> Self {
        let mut plan = Plan::default();
        plan.diff_topics(desired, actual);
        let updates = plan.diff_queues(desired, actual);
        plan.diff_bindings(desired, actual);
        // Last: a setting the broker refuses to change in place must not hold back the rest.
        plan.changes.extend(updates);
        plan
    }

    fn diff_topics(&mut self, desired: &Topology, actual: &Inventory) {
        for topic in &desired.topics {
            match actual.topics.get(topic) {
                None => self.changes.push(Change::CreateTopic { topic: topic.clone() }),
                Some(owner) if owner.as_deref() != Some(&desired.owner) => {
                    self.not_owned.push(format!("topic {topic}"));
                }
                Some(_) => {}
            }
        }
        for (topic, owner) in &actual.topics {
            if owner.as_deref() == Some(&desired.owner) && !desired.topics.contains(topic) {
                self.prune.push(Change::DeleteTopic { topic: topic.clone() });
            }
        }
    }

    /// Adds the queues to create and to prune; returns the settings to update.
    fn diff_queues(&mut self, desired: &Topology, actual: &Inventory) -> Vec<Change> {
        let mut updates = Vec::new();
        for (name, spec) in &desired.queues {
            let Some(observed) = actual.queues.get(name) else {
                self.changes.push(Change::CreateQueue {
                    queue: name.clone(),
                    dead_letter_queue: resync_bus::dead_letter_queue_name(name),
                    max_receive_count: spec.max_receive_count,
                    visibility_timeout_secs: spec.visibility_timeout.as_secs(),
                });
                continue;
            };
            if observed.owner.as_deref() != Some(&desired.owner) {
                self.not_owned.push(format!("queue {name}"));
            }
            let update = |setting: &str, from: String, to: String| Change::UpdateQueue {
                queue: name.clone(),
                setting: setting.into(),
                from,
                to,
            };
            if let Some(count) = observed.max_receive_count.filter(|c| *c != spec.max_receive_count) {
                updates.push(update(
                    "max_receive_count",
                    count.to_string(),
                    spec.max_receive_count.to_string(),
                ));
            }
            if let Some(timeout) =
                observed.visibility_timeout.filter(|t| t.as_secs() != spec.visibility_timeout.as_secs())
            {
                updates.push(update(
                    "visibility_timeout",
                    format!("{}s", timeout.as_secs()),
                    format!("{}s", spec.visibility_timeout.as_secs()),
                ));
            }
            if !observed.has_dead_letter_queue {
                updates.push(update(
                    "dead-letter queue",
                    "missing".into(),
                    resync_bus::dead_letter_queue_name(name),
                ));
            }
        }
        for (name, observed) in &actual.queues {
            if observed.owner.as_deref() == Some(&desired.owner) && !desired.queues.contains_key(name) {
                self.prune.push(Change::DeleteQueue { queue: name.clone() });
            }
        }
        updates
    }

    fn diff_bindings(&mut self, desired: &Topology, actual: &Inventory) {
        let wanted: BTreeMap<(&str, &str), BTreeSet<&str>> = desired
            .bindings
            .iter()
            .map(|b| ((b.topic.as_str(), b.queue.as_str()), b.patterns.iter().map(String::as_str).collect()))
            .collect();
        for ((topic, queue), patterns) in &wanted {
            let present = actual.bindings.get(&(topic.to_string(), queue.to_string()));
            let missing: Vec<String> = patterns
                .iter()
                .filter(|p| !present.is_some_and(|present| present.contains(**p)))
                .map(|p| p.to_string())
                .collect();
            if !missing.is_empty() {
                self.changes.push(Change::Bind {
                    topic: topic.to_string(),
                    queue: queue.to_string(),
                    patterns: missing,
                });
            }
        }
        // Routes into the queues fare manages that no config asks for any more. Routes into
        // queues `prune` deletes go with them.
        for ((topic, queue), present) in &actual.bindings {
            if !desired.queues.contains_key(queue) {
                continue;
            }
            let wanted = wanted.get(&(topic.as_str(), queue.as_str()));
            let extra: Vec<String> =
                present.iter().filter(|p| !wanted.is_some_and(|w| w.contains(p.as_str()))).cloned().collect();
            if !extra.is_empty() {
                self.changes.push(Change::Unbind {
                    topic: topic.clone(),
                    queue: queue.clone(),
                    patterns: extra,
                });
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.prune.is_empty()
    }
}

/// Why `apply` or `prune` stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("reading what the broker holds")]
    Inventory(#[source] TransportError),
    /// A step the broker refused; the steps before it were done.
    #[error("stopped at `{change}`{}", hint(.change, .transport))]
    Step {
        change: Change,
        transport: &'static str,
        #[source]
        source: TransportError,
    },
}

fn hint(change: &Change, transport: &str) -> &'static str {
    match change {
        Change::UpdateQueue { setting, .. } if transport == "rabbitmq" && setting == "max_receive_count" => {
            ": RabbitMQ cannot change a queue's x-delivery-limit in place; drain the queue, delete it \
             and run `fare apply` again"
        }
        _ => "",
    }
}

/// Reads what the broker holds in the namespace and compares it with `desired`.
pub async fn plan(transport: &dyn Transport, desired: &Topology) -> Result<Plan, TransportError> {
    let inventory = transport.inventory(&desired.prefix).await?;
    Ok(Plan::between(desired, &inventory))
}

/// Makes the broker match `desired` (except for what only `prune` deletes) and returns what it
/// changed: nothing when it already matched. Every step is a declare, a bind or an unbind, so
/// `apply` is safe to run concurrently and to run again after a crash half-way.
pub async fn apply(transport: &dyn Transport, desired: &Topology) -> Result<Vec<Change>, ApplyError> {
    let plan = plan(transport, desired).await.map_err(ApplyError::Inventory)?;
    execute_all(transport, desired, plan.changes).await
}

/// Deletes what carries this namespace's mark and no config declares, and returns it.
pub async fn prune(transport: &dyn Transport, desired: &Topology) -> Result<Vec<Change>, ApplyError> {
    let plan = plan(transport, desired).await.map_err(ApplyError::Inventory)?;
    execute_all(transport, desired, plan.prune).await
}

async fn execute_all(
    transport: &dyn Transport,
    desired: &Topology,
    changes: Vec<Change>,
) -> Result<Vec<Change>, ApplyError> {
    for change in &changes {
        execute(transport, desired, change).await.map_err(|source| ApplyError::Step {
            change: change.clone(),
            transport: transport.kind(),
            source,
        })?;
    }
    Ok(changes)
}

async fn execute(
    transport: &dyn Transport,
    desired: &Topology,
    change: &Change,
) -> Result<(), TransportError> {
    match change {
        Change::CreateTopic { topic } => transport.declare_topic(topic, Some(&desired.owner)).await,
        Change::CreateQueue { queue, .. } | Change::UpdateQueue { queue, .. } => {
            match desired.queues.get(queue) {
                Some(spec) => transport.declare_queue(spec).await,
                None => Ok(()),
            }
        }
        Change::Bind { topic, queue, patterns } => {
            transport.bind(topic, queue, &Filter::types(patterns)).await
        }
        Change::Unbind { topic, queue, patterns } => {
            transport.unbind(topic, queue, &Filter::types(patterns)).await
        }
        Change::DeleteQueue { queue } => transport.delete_queue(queue).await,
        Change::DeleteTopic { topic } => transport.delete_topic(topic).await,
    }
}

/// Deletes every queue and topic of `topology` (tests, the demo's cleanup).
pub async fn delete(transport: &dyn Transport, topology: &Topology) -> Result<(), TransportError> {
    for queue in topology.queues.keys() {
        transport.delete_queue(queue).await?;
    }
    for topic in &topology.topics {
        transport.delete_topic(topic).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    #[test]
    fn topics_per_published_entity_queues_per_service_and_merged_bindings() {
        let listings =
            load_str("l.toml", "name = \"listings\"\npublishes = [\"listing.updated\", \"listing.deleted\"]")
                .expect("valid");
        let search = load_str(
            "s.toml",
            "name = \"search\"\n[[subscriptions]]\ntypes = [\"listing.updated\", \"listing.deleted\"]\nstreams = [\"live\"]",
        )
        .expect("valid");
        let catalog = Catalog::new(vec![listings, search]).expect("valid");

        let topology = Topology::desired(&catalog, Some("t"));

        assert_eq!(topology.topics.iter().collect::<Vec<_>>(), ["t-listing-live", "t-listing-resync"]);
        assert_eq!(topology.queues.keys().collect::<Vec<_>>(), ["t-search-live"]);
        assert_eq!(
            topology.bindings,
            [Binding {
                topic: "t-listing-live".into(),
                stream: Stream::Live,
                queue: "t-search-live".into(),
                patterns: vec!["listing.deleted".into(), "listing.updated".into()],
            }]
        );
    }
}
