//! A holder that stalls past its lease: the lock moves on, and the stale holder can neither
//! release nor extend its successor's lock.

use std::time::Duration;

use resync_locks::{LockConfig, LockError, LostReason, Release};
use resync_testkit::unique_name;

use crate::support::{calm_config, get, locker, poll_some, pttl, raw, within};

const HANG: Duration = Duration::from_secs(20);

#[tokio::test]
async fn stalled_holder_loses_the_lock_and_cannot_touch_its_successor() {
    let short_lease = LockConfig {
        lease: Duration::from_millis(500),
        renew_every: Duration::from_millis(100),
        op_timeout: Duration::from_millis(300),
        ..calm_config()
    };
    let stalling = locker(short_lease).await;
    let successor = locker(calm_config()).await;
    let mut conn = raw().await;
    let key = unique_name("lk");
    let old = stalling.try_acquire(&key).await.expect("redis").expect("free key is acquired");

    // The scenario: the holder stops renewing (a long GC or VM pause) and its lease runs out.
    old.simulate_stall();
    let new = poll_some(HANG, "successor acquires once the stalled lease expired", || {
        let (successor, key) = (successor.clone(), key.clone());
        async move { successor.try_acquire(&key).await.expect("redis") }
    })
    .await;

    assert!(old.is_lost(), "the stalled holder must see its lock as lost");
    assert_eq!(within(HANG, "old.lost()", old.lost()).await, LostReason::Expired);
    assert!(matches!(old.ensure_held(), Err(LockError::Lost { .. })));
    assert!(new.fence() > old.fence(), "fence {} after {}", new.fence(), old.fence());

    assert_eq!(old.release().await.expect("stale release"), Release::NotHeld);
    assert_eq!(get(&mut conn, &key).await.as_deref(), Some(new.owner_token()), "successor's lock intact");
    assert!(pttl(&mut conn, &key).await > 0, "successor's lock still has its lease");
    assert!(!new.is_lost());
    assert_eq!(new.release().await.expect("release"), Release::Released);
}
