//! `fare verify`: proves the routes work by sending one probe event per declared route through
//! the real broker and checking it arrives in exactly the queues that should get it.
//!
//! Probes are ordinary envelopes for the entity id `fare-probe-<run>` carrying the attribute
//! [`attr::PROBE`]; verify acks them as it finds them, and `resync consume` acks any probe it
//! receives without calling its sink, so a late probe never reaches a third party. Other
//! messages verify meets while draining a queue go back to it at once (on a quorum queue or
//! SQS that counts as one receive).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use resync_bus::transport::{Destination, Filter, OutgoingMessage, Transport, TransportError, attr};
use resync_bus::{Envelope, Stream};
use serde::Serialize;
use uuid::Uuid;

use crate::topology::Topology;

/// One probe: an event type published to a topic, where it should arrive and where it did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub topic: String,
    pub event_type: String,
    pub expected: BTreeSet<String>,
    pub arrived: BTreeSet<String>,
}

impl Probe {
    pub fn missing(&self) -> Vec<&String> {
        self.expected.difference(&self.arrived).collect()
    }

    pub fn unexpected(&self) -> Vec<&String> {
        self.arrived.difference(&self.expected).collect()
    }

    pub fn ok(&self) -> bool {
        self.expected == self.arrived
    }
}

/// What [`verify_routes`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteVerification {
    pub probes: Vec<Probe>,
    /// Messages that were not this run's probes, put back in their queues.
    pub requeued: u64,
}

impl RouteVerification {
    pub fn ok(&self) -> bool {
        self.probes.iter().all(Probe::ok)
    }
}

/// A concrete type a pattern lets through: itself, or `<entity>.fare_probe` for `<entity>.*`.
fn probe_type(pattern: &str) -> String {
    match pattern.strip_suffix(".*") {
        Some(entity) => format!("{entity}.fare_probe"),
        None => pattern.to_string(),
    }
}

/// The probes for a topology: one per (topic, type pattern) declared, expected in every queue
/// whose routes from that topic let its type through.
fn probes(desired: &Topology) -> Vec<(Probe, Stream)> {
    let mut probes: BTreeMap<(String, String), (Probe, Stream)> = BTreeMap::new();
    for binding in &desired.bindings {
        for pattern in &binding.patterns {
            let event_type = probe_type(pattern);
            let expected = desired
                .bindings
                .iter()
                .filter(|b| b.topic == binding.topic && Filter::types(&b.patterns).matches(&event_type))
                .map(|b| b.queue.clone())
                .collect();
            let probe = Probe {
                topic: binding.topic.clone(),
                event_type: event_type.clone(),
                expected,
                arrived: BTreeSet::new(),
            };
            probes.entry((binding.topic.clone(), event_type)).or_insert((probe, binding.stream));
        }
    }
    probes.into_values().collect()
}

/// Publishes the probes, drains every declared queue until its expected probes arrived (and a
/// quiet poll after, to catch what should not arrive) or `wait` passed, and reports.
pub async fn verify_routes(
    transport: &dyn Transport,
    desired: &Topology,
    wait: Duration,
) -> Result<RouteVerification, TransportError> {
    let run = Uuid::now_v7();
    let entity_id = format!("fare-probe-{run}");
    let mut probes = probes(desired);
    let mut by_event_id = BTreeMap::new();
    for (index, (probe, stream)) in probes.iter().enumerate() {
        let mut event =
            Envelope::new(&probe.event_type, entity_id.clone(), index as i64 + 1, serde_json::json!({}));
        event.stream = *stream;
        if *stream == Stream::Resync {
            event.job_id = Some(run);
        }
        let mut message = OutgoingMessage::from_envelope(&event);
        message.attributes.insert(attr::PROBE.into(), run.to_string());
        transport.publish(&Destination::Topic(probe.topic.clone()), message).await?;
        by_event_id.insert(event.id, index);
    }
    let mut requeued = 0;
    for queue in desired.queues.keys() {
        let expected = probes.iter().filter(|(p, _)| p.expected.contains(queue)).count();
        let (arrived, others) = drain_probes(transport, queue, &run.to_string(), expected, wait).await?;
        requeued += others;
        for event_id in arrived {
            if let Some(index) = by_event_id.get(&event_id) {
                probes[*index].0.arrived.insert(queue.clone());
            }
        }
    }
    Ok(RouteVerification { probes: probes.into_iter().map(|(p, _)| p).collect(), requeued })
}

/// Receives from `queue` until `expected` probes of `run` arrived and one poll after came back
/// empty, or `wait` passed. Acks this run's probes, requeues everything else. Returns the
/// probes' event ids and how many other messages were requeued.
async fn drain_probes(
    transport: &dyn Transport,
    queue: &str,
    run: &str,
    expected: usize,
    wait: Duration,
) -> Result<(Vec<Uuid>, u64), TransportError> {
    let mut subscription = transport.subscribe(queue, Default::default()).await?;
    let deadline = tokio::time::Instant::now() + wait;
    let (mut arrived, mut requeued) = (Vec::new(), 0);
    while tokio::time::Instant::now() < deadline {
        let batch = subscription.next_batch(32, Duration::from_millis(500)).await?;
        if batch.is_empty() && arrived.len() >= expected {
            break;
        }
        for delivery in batch {
            let probe_id = (delivery.attributes.get(attr::PROBE).map(String::as_str) == Some(run))
                .then(|| delivery.envelope(&Default::default()).ok().map(|e| e.id))
                .flatten();
            match probe_id {
                Some(id) => {
                    arrived.push(id);
                    delivery.ack().await?;
                }
                None => {
                    requeued += 1;
                    delivery.nack(Duration::ZERO).await?;
                }
            }
        }
    }
    subscription.close().await?;
    Ok((arrived, requeued))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Catalog, load_str};

    #[test]
    fn one_probe_per_topic_and_pattern_expected_wherever_its_type_is_routed() {
        let listings =
            load_str("l.toml", "name = \"listings\"\npublishes = [\"listing.updated\"]").expect("valid");
        let all = load_str(
            "a.toml",
            "name = \"all\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\nstreams = [\"live\"]",
        )
        .expect("valid");
        let some = load_str(
            "s.toml",
            "name = \"some\"\n[[subscriptions]]\ntypes = [\"listing.updated\"]\nstreams = [\"live\"]",
        )
        .expect("valid");
        let topology = Topology::desired(&Catalog::new(vec![listings, all, some]).expect("valid"), None);

        let probes: Vec<_> = probes(&topology).into_iter().map(|(p, _)| (p.event_type, p.expected)).collect();

        let queues = |q: &[&str]| q.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            probes,
            [
                ("listing.fare_probe".to_string(), queues(&["all-live"])),
                ("listing.updated".to_string(), queues(&["all-live", "some-live"])),
            ]
        );
    }
}
