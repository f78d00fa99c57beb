//! Redis dies while a lock is held, then comes back empty. Runs its own redis-server: the
//! shared one is never stopped.

use std::time::Duration;

use resync_locks::{LockConfig, LockError, Locker, LostReason, Release};
use resync_testkit::unique_name;

use crate::support::{OwnRedis, calm_config, within};

const HANG: Duration = Duration::from_secs(30);

fn is_redis_unavailable(err: &LockError) -> bool {
    matches!(err, LockError::Unavailable { .. } | LockError::NoReply { .. })
}

#[tokio::test]
async fn redis_restart_while_held_gives_typed_errors_then_recovers() {
    let mut redis = OwnRedis::start().await;
    let config = LockConfig {
        lease: Duration::from_secs(3),
        renew_every: Duration::from_secs(1),
        op_timeout: Duration::from_millis(500),
        acquire_timeout: Duration::from_secs(1),
        ..calm_config()
    };
    let locker = Locker::connect(&redis.url(), config).await.expect("connect to own redis");
    let key = unique_name("lk");
    let held = locker.acquire(&key).await.expect("acquire while redis is up");

    redis.kill();

    let renewed = within(HANG, "renew while down", held.renew()).await;
    assert!(renewed.as_ref().is_err_and(is_redis_unavailable), "renew while down: {renewed:?}");
    let tried = within(HANG, "try_acquire while down", locker.try_acquire(&unique_name("lk"))).await;
    assert!(tried.as_ref().is_err_and(is_redis_unavailable), "try_acquire while down: {tried:?}");
    let waited = within(HANG, "acquire while down", locker.acquire(&unique_name("lk"))).await;
    assert!(waited.as_ref().is_err_and(is_redis_unavailable), "acquire while down: {waited:?}");
    assert_eq!(within(HANG, "guard reports lost", held.lost()).await, LostReason::Expired);
    assert!(held.is_lost());

    redis.restart().await;

    let again =
        within(HANG, "acquire after restart", locker.acquire_within(&key, Duration::from_secs(20))).await;
    let again = again.expect("acquire works once redis is back");
    assert!(
        again.fence() > held.fence(),
        "fence {} after {} across the restart",
        again.fence(),
        held.fence()
    );
    assert_eq!(held.release().await.expect("stale release"), Release::NotHeld);
    assert_eq!(again.release().await.expect("release"), Release::Released);
}
