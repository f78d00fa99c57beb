//! The locks on a Redis Cluster of the test's own (three primaries, a replica each): the whole
//! suite again, batches spread over every slot, and a primary killed while locks are in use.

use std::time::Duration;

use resync_locks::Locker;
use resync_testkit::{OwnRedisCluster, run_suite_on_a_redis_cluster, unique_name};

use crate::support::{calm_config, within};

/// Every other test of this binary, run again with `RESYNC_REDIS_URL` naming a cluster's
/// seeds. The restart and TLS tests start a single redis-server of their own; they are skipped.
#[tokio::test]
async fn the_whole_suite_passes_on_a_redis_cluster() {
    run_suite_on_a_redis_cluster(&["cluster::", "restart::", "tls::"], 10).await;
}

async fn cluster_locker(cluster: &OwnRedisCluster) -> Locker {
    Locker::connect(&cluster.urls(), calm_config()).await.expect("connect to the test's cluster")
}

#[tokio::test]
async fn a_batch_spanning_every_primary_is_taken_and_released_whole() {
    let cluster = OwnRedisCluster::start().await;
    let locker = cluster_locker(&cluster).await;
    let prefix = unique_name("lk");
    let keys: Vec<String> = (0..200).map(|i| format!("{prefix}:listing:{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let held_elsewhere = locker.try_acquire(&keys[7]).await.expect("redis").expect("free key");

    let guards = locker.try_acquire_many(&refs).await.expect("one batch over many slots");

    let taken = guards.iter().filter(|g| g.is_some()).count();
    assert_eq!(taken, keys.len() - 1, "every free key is taken, the held one is not");
    assert!(guards[7].is_none(), "the key held elsewhere stays with its holder");
    let deleted = locker.release_many(guards.into_iter().flatten().collect()).await.expect("release");
    assert_eq!(deleted, keys.len() - 1, "every lock of the batch is released");
    held_elsewhere.release().await.expect("release");
}

/// A primary dies while locks on its slots are held and taken. Its replica is promoted; the
/// locker follows without a restart. A lock held across the failover may be lost (Redis
/// replicates asynchronously): that is the guard's `lost` signal, not a second holder unseen.
#[tokio::test]
async fn locks_keep_working_after_a_primary_fails_over() {
    let mut cluster = OwnRedisCluster::start().await;
    let locker = cluster_locker(&cluster).await;
    let key = unique_name("lk");
    let held = locker.try_acquire(&key).await.expect("redis").expect("free key");
    held.release().await.expect("release");
    let victim = cluster.primary_of(&key);

    cluster.kill(victim);
    let killed_at = tokio::time::Instant::now();
    let guard = within(Duration::from_secs(60), "a lock on the failed primary's slot", async {
        loop {
            match locker.try_acquire(&key).await {
                Ok(Some(guard)) => return guard,
                Ok(None) => panic!("nobody else holds {key}"),
                Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => panic!("not a transient error while the cluster fails over: {e}"),
            }
        }
    })
    .await;
    eprintln!("locks on the failed primary's slots worked again {:?} after the kill", killed_at.elapsed());

    assert_ne!(cluster.primary_of(&key), victim, "a replica took over the slot");
    assert!(guard.ensure_held().is_ok(), "the new lock is held");
    assert!(locker.try_acquire(&key).await.expect("redis").is_none(), "and only once");
    guard.release().await.expect("release after the failover");
}
