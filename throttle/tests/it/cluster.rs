//! The shared rate limit, circuit and quota on a Redis Cluster of the test's own.

use resync_testkit::run_suite_on_a_redis_cluster;

/// Every other test of this binary, run again with `RESYNC_REDIS_URL` naming a cluster's seeds:
/// each limiter's keys share one hash slot, so its scripts run on a cluster unchanged.
#[tokio::test]
async fn the_whole_suite_passes_on_a_redis_cluster() {
    run_suite_on_a_redis_cluster(&["cluster::"], 10).await;
}
