//! The topology a catalog asks for, and applying it through a transport.
//!
//! One topic per (entity type, stream) that some service publishes; one queue per (service,
//! stream) it subscribes on, with its dead-letter queue; a binding from each topic to each
//! queue that wants some of its types, filtered on the `type` attribute / routing key.

use std::collections::{BTreeMap, BTreeSet};

use resync_bus::Stream;
use resync_bus::naming::{queue_name, topic_name};
use resync_bus::transport::{Filter, QueueSpec, Transport, TransportError};
use serde::Serialize;

use crate::config::Catalog;

/// What the broker should hold for a catalog in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub topics: BTreeSet<String>,
    pub queues: BTreeMap<String, QueueSpec>,
    pub bindings: Vec<Binding>,
}

/// Messages published to `topic` whose type matches one of `patterns` go to `queue`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Binding {
    pub topic: String,
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
        let mut bindings: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
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
                        bindings.entry(key).or_default().insert(pattern.clone());
                    }
                }
            }
        }
        let bindings = bindings
            .into_iter()
            .map(|((topic, queue), patterns)| Binding {
                topic,
                queue,
                patterns: patterns.into_iter().collect(),
            })
            .collect();
        Self { topics, queues, bindings }
    }
}

/// One thing `apply` made sure of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ensured {
    pub kind: &'static str,
    pub name: String,
    pub detail: String,
}

/// Creates whatever of `topology` is missing and converges queue settings. Idempotent and
/// safe to run concurrently or again after a crash half-way: every step is a declare.
pub async fn apply(transport: &dyn Transport, topology: &Topology) -> Result<Vec<Ensured>, TransportError> {
    let mut ensured = Vec::new();
    for topic in &topology.topics {
        transport.declare_topic(topic).await?;
        ensured.push(Ensured { kind: "topic", name: topic.clone(), detail: String::new() });
    }
    for spec in topology.queues.values() {
        transport.declare_queue(spec).await?;
        let detail = format!(
            "max_receive_count={}, visibility_timeout={}s, dead-letter queue {}",
            spec.max_receive_count,
            spec.visibility_timeout.as_secs(),
            resync_bus::dead_letter_queue_name(&spec.name)
        );
        ensured.push(Ensured { kind: "queue", name: spec.name.clone(), detail });
    }
    for binding in &topology.bindings {
        transport.bind(&binding.topic, &binding.queue, &Filter::types(&binding.patterns)).await?;
        ensured.push(Ensured {
            kind: "binding",
            name: format!("{} -> {}", binding.topic, binding.queue),
            detail: binding.patterns.join(", "),
        });
    }
    Ok(ensured)
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
                queue: "t-search-live".into(),
                patterns: vec!["listing.deleted".into(), "listing.updated".into()],
            }]
        );
    }
}
