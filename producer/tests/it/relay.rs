//! The relay under concurrent writers, on both transports.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use resync_bus::Transport;
use resync_producer::RelayStatus;
use uuid::Uuid;

use crate::support::{
    World, assert_versions_increase, rabbitmq, sns_sqs, spawn_collector, with_world, write_concurrently,
};

async fn concurrent_writers_case(
    transport: Arc<dyn Transport>,
    writers: usize,
    target: usize,
    entities: u32,
) {
    let world = World::new(transport, 1, writers as u32 + 4).await;
    with_world(world, move |w| async move {
        let relay = w.start_relay(&w.database_url, w.transport.clone());
        relay.wait_for(RelayStatus::Leader).await;
        let (expect, collector) = spawn_collector(w.subscribe(0).await, Duration::from_secs(120));
        let written = write_concurrently(&w.pool, &w.schema, writers, target, entities).await;
        expect.send(written.committed.clone()).expect("collector running");
        let received = collector.await.expect("collector");
        assert_eq!(w.pending().await, 0, "the relay published everything");

        let ids: HashSet<Uuid> = received.iter().map(|e| e.id).collect();
        assert!(written.committed.len() >= target);
        assert!(written.committed.is_subset(&ids), "every committed event is published");
        assert!(ids.is_disjoint(&written.rolled_back), "no rolled-back event is published");
        assert!(!written.rolled_back.is_empty(), "the run exercised rollbacks");
        assert_eq!(ids.len(), received.len(), "no duplicates without a crash");
        assert_versions_increase(&received);
        relay.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_32_writers_20000_events_with_rollbacks_and_long_transactions() {
    concurrent_writers_case(rabbitmq().await, 32, 20_000, 2_000).await;
}

/// Smaller on the emulator: moto's SQS slows down as a queue grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sns_sqs_8_writers_1000_events_with_rollbacks_and_long_transactions() {
    concurrent_writers_case(sns_sqs().await, 8, 1_000, 200).await;
}
