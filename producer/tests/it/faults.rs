//! Relay failures: a killed leader replaced by a standby, a broker outage, a database outage.
//! Outages go through a TCP proxy owned by the test, so the shared services keep running.

use std::time::Duration;

use resync_producer::RelayStatus;
use resync_testkit::Service;
use resync_testkit::proxy::TcpProxy;

use crate::support::{
    World, assert_versions_increase, eventually, rabbitmq, rabbitmq_at, spawn_collector, with_world,
    write_concurrently,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_leader_is_replaced_by_the_standby_and_nothing_is_lost() {
    let world = World::new(rabbitmq().await, 1, 12).await;
    with_world(world, |w| async move {
        let leader = w.start_relay(&w.database_url, w.transport.clone());
        leader.wait_for(RelayStatus::Leader).await;
        let standby = w.start_relay(&w.database_url, rabbitmq().await);
        standby.wait_for(RelayStatus::Standby).await;
        let (expect, collector) = spawn_collector(w.subscribe(0).await, Duration::from_secs(120));

        let writers = tokio::spawn({
            let w = w.clone();
            async move { write_concurrently(&w.pool, &w.schema, 8, 4_000, 300).await }
        });
        // Kill the leader mid-stream: the task is dropped wherever it is, its database session
        // (and so its leader lock) with it, as in a crash.
        eventually("the leader published 500 events", Duration::from_secs(60), || async {
            w.published().await >= 500
        })
        .await;
        assert!(!writers.is_finished(), "writers are still writing when the leader dies");
        leader.task.abort();
        standby.wait_for(RelayStatus::Leader).await;

        let written = writers.await.expect("writers");
        expect.send(written.committed.clone()).expect("collector running");
        let received = collector.await.expect("collector");
        let ids: std::collections::HashSet<_> = received.iter().map(|e| e.id).collect();
        assert!(written.committed.is_subset(&ids), "every committed event is published after the takeover");
        assert!(ids.is_disjoint(&written.rolled_back));
        // A crash between publish and delete may republish a batch; each copy is in order.
        let mut unique = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for e in received {
            if seen.insert(e.id) {
                unique.push(e);
            }
        }
        assert_versions_increase(&unique);
        standby.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_outage_of_10s_while_writers_continue_loses_nothing() {
    let proxy = TcpProxy::start(Service::RabbitMq.socket_addr()).await;
    let world = World::new(rabbitmq().await, 1, 12).await;
    let relay_transport = rabbitmq_at(&proxy.url(&Service::RabbitMq.url())).await;
    with_world(world, move |w| async move {
        let relay = w.start_relay(&w.database_url, relay_transport);
        relay.wait_for(RelayStatus::Leader).await;
        let (expect, collector) = spawn_collector(w.subscribe(0).await, Duration::from_secs(120));
        let before = write_concurrently(&w.pool, &w.schema, 8, 1_000, 300).await;
        proxy.cut();
        // The outage itself is the scenario: the broker is unreachable for 10 s while writers
        // keep committing.
        let outage = tokio::time::Instant::now();
        let during = write_concurrently(&w.pool, &w.schema, 8, 1_000, 300).await;
        tokio::time::sleep_until(outage + Duration::from_secs(10)).await;
        let backlog = w.pending().await;
        proxy.restore();
        let after = write_concurrently(&w.pool, &w.schema, 8, 1_000, 300).await;
        let written = before.merge(during).merge(after);
        assert!(backlog >= 1_000, "events piled up in the outbox during the outage: {backlog}");
        expect.send(written.committed.clone()).expect("collector running");
        let received = collector.await.expect("collector");
        let ids: std::collections::HashSet<_> = received.iter().map(|e| e.id).collect();
        assert!(written.committed.is_subset(&ids), "every committed event is published after the outage");
        assert!(ids.is_disjoint(&written.rolled_back));
        relay.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outage_is_survived_by_the_relay() {
    let proxy = TcpProxy::start(Service::Postgres.socket_addr()).await;
    let world = World::new(rabbitmq().await, 1, 12).await;
    let relay_database = proxy.url(&Service::Postgres.url());
    with_world(world, move |w| async move {
        let relay = w.start_relay(&relay_database, w.transport.clone());
        relay.wait_for(RelayStatus::Leader).await;
        let (expect, collector) = spawn_collector(w.subscribe(0).await, Duration::from_secs(120));
        let before = write_concurrently(&w.pool, &w.schema, 8, 1_000, 300).await;
        proxy.cut();
        let during = write_concurrently(&w.pool, &w.schema, 8, 1_000, 300).await;
        relay.wait_for(RelayStatus::Reconnecting).await;
        proxy.restore();
        relay.wait_for(RelayStatus::Leader).await;
        let written = before.merge(during);
        expect.send(written.committed.clone()).expect("collector running");
        let received = collector.await.expect("collector");
        let ids: std::collections::HashSet<_> = received.iter().map(|e| e.id).collect();
        assert!(written.committed.is_subset(&ids), "every committed event is published after the outage");
        relay.stop().await;
    })
    .await;
}
