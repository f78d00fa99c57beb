//! RabbitMQ only: broker connection loss mid-stream. Only this test's own connections are
//! closed (found by their client-provided name), so parallel tests are not disturbed.

use std::collections::BTreeSet;
use std::time::Duration;

use resync_testkit::unique_name;

use crate::support::{Topology, entity_of, message, rabbitmq_named, with_topology};

/// Closes every connection whose client-provided name starts with `prefix`; returns the
/// provided names of the connections it closed.
async fn close_connections_named(prefix: String) -> Vec<String> {
    tokio::task::spawn_blocking(move || {
        // Table output: the pid (in the form close_connection accepts), then the client
        // properties, which hold `{"connection_name",longstr,"<name>"}`.
        let listed = std::process::Command::new("rabbitmqctl")
            .args(["list_connections", "-s", "pid", "client_properties"])
            .output()
            .expect("run rabbitmqctl (it ships with rabbitmq-server)");
        assert!(
            listed.status.success(),
            "rabbitmqctl list_connections: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let mut closed = Vec::new();
        for line in String::from_utf8_lossy(&listed.stdout).lines() {
            let Some(start) = line.find(&prefix) else { continue };
            let provided: String = line[start..].chars().take_while(|c| *c != '"').collect();
            let pid = line.split_whitespace().next().expect("pid column").to_string();
            let status = std::process::Command::new("rabbitmqctl")
                .args(["-q", "close_connection", &pid, "resync test: simulated broker loss"])
                .status()
                .expect("run rabbitmqctl close_connection");
            assert!(status.success(), "rabbitmqctl close_connection {pid}");
            closed.push(provided);
        }
        closed
    })
    .await
    .expect("rabbitmqctl task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_connections_mid_stream_loses_none_of_10000_messages() {
    const TOTAL: usize = 10_000;
    const BATCH: usize = 100;
    let connection_name = unique_name("it-kill");
    let topology = Topology::new(rabbitmq_named(&connection_name).await, 1).await;
    with_topology(topology, move |t| async move {
        let mut subscription = t.subscribe(0).await;
        // The publisher stops at half way until the kill, so the second half must go out over
        // a reconnected connection, and the consumer must reconnect to receive it.
        let (half_published, mut wait_for_half) = tokio::sync::oneshot::channel::<()>();
        let (killed, wait_for_kill) = tokio::sync::oneshot::channel::<()>();
        let publisher = {
            let t = t.clone();
            tokio::spawn(async move {
                let mut wait_for_kill = Some(wait_for_kill);
                let mut half_published = Some(half_published);
                for start in (0..TOTAL).step_by(BATCH) {
                    if start == TOTAL / 2 {
                        let _ = half_published.take().map(|tx| tx.send(()));
                        let _ = wait_for_kill.take().expect("once").await;
                    }
                    let batch = (start..start + BATCH).map(|i| message(&i.to_string(), 1)).collect();
                    t.transport.publish_batch(&t.topic(), batch).await.expect("publishing survives the kill");
                }
            })
        };
        let mut received = BTreeSet::new();
        let mut killed = Some(killed);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
        while received.len() < TOTAL {
            assert!(tokio::time::Instant::now() < deadline, "only {} of {TOTAL} arrived", received.len());
            for delivery in subscription.next_batch(BATCH, Duration::from_secs(1)).await.expect("next_batch")
            {
                received.insert(entity_of(&delivery));
                // After the kill, acks on the dead channel fail; the broker redelivers those.
                let _ = delivery.ack().await;
            }
            if killed.is_some() && wait_for_half.try_recv().is_ok() {
                let closed = close_connections_named(connection_name.clone()).await;
                let roles: BTreeSet<&str> = closed.iter().filter_map(|n| n.split('/').nth(1)).collect();
                assert!(
                    roles.contains("publisher") && roles.contains("consumer"),
                    "the kill hits both the publisher and the consumer: {closed:?}"
                );
                assert!(received.len() < TOTAL, "the kill happened mid-stream");
                let _ = killed.take().map(|tx| tx.send(()));
            }
        }
        publisher.await.expect("publisher task");
        assert!(killed.is_none(), "connections were killed");
        let expected: BTreeSet<String> = (0..TOTAL).map(|i| i.to_string()).collect();
        assert_eq!(received, expected, "every message arrived");
    })
    .await;
}
