//! Single-process behaviour of acquire, renew and release against the shared Redis.

use std::time::Duration;

use resync_locks::{LockConfig, LockError, Locker, LostReason, Release};
use resync_testkit::unique_name;

use crate::support::{calm_config, eventually, free_port, get, locker, pttl, raw, within};

const HANG: Duration = Duration::from_secs(20);

#[tokio::test]
async fn try_acquire_on_a_held_key_returns_none() {
    let locker = locker(calm_config()).await;
    let key = unique_name("lk");
    let _held = locker.try_acquire(&key).await.expect("redis").expect("free key is acquired");

    let second = locker.try_acquire(&key).await.expect("redis");

    assert!(second.is_none(), "a held key must not be acquired twice");
}

#[tokio::test]
async fn acquire_times_out_with_an_error_naming_the_key() {
    let locker = locker(calm_config()).await;
    let key = unique_name("lk");
    let _held = locker.try_acquire(&key).await.expect("redis").expect("free key is acquired");
    let wait = Duration::from_millis(200);

    let err = within(HANG, "acquire", locker.acquire_within(&key, wait)).await.expect_err("busy");

    match err {
        LockError::Timeout { key: named, waited } => {
            assert_eq!(named, key);
            assert!(waited >= wait, "gave up after {waited:?}, before the {wait:?} asked for");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn release_is_idempotent() {
    let locker = locker(calm_config()).await;
    let mut conn = raw().await;
    let key = unique_name("lk");
    let guard = locker.try_acquire(&key).await.expect("redis").expect("free key is acquired");

    assert_eq!(guard.release().await.expect("first release"), Release::Released);
    assert_eq!(guard.release().await.expect("second release"), Release::NotHeld);

    assert_eq!(get(&mut conn, &key).await, None, "the lock key is gone");
    let next = locker.try_acquire(&key).await.expect("redis");
    assert!(next.is_some(), "a released key can be acquired again");
}

#[tokio::test]
async fn renew_extends_the_ttl() {
    let locker = locker(calm_config()).await;
    let mut conn = raw().await;
    let key = unique_name("lk");
    let guard = locker.try_acquire(&key).await.expect("redis").expect("free key is acquired");
    // Stand in for time passing: shorten the remaining lease to one second.
    let _: i64 = redis::cmd("PEXPIRE").arg(&key).arg(1000).query_async(&mut conn).await.expect("PEXPIRE");

    guard.renew().await.expect("renew");

    let ttl = pttl(&mut conn, &key).await;
    assert!(ttl > 1000, "PTTL after renew is {ttl}ms, not extended past the 1000ms left");
}

#[tokio::test]
async fn background_renewal_extends_the_ttl() {
    let config = LockConfig {
        lease: Duration::from_secs(5),
        renew_every: Duration::from_millis(200),
        op_timeout: Duration::from_secs(2),
        ..calm_config()
    };
    let locker = locker(config).await;
    let mut conn = raw().await;
    let key = unique_name("lk");
    let guard = locker.try_acquire(&key).await.expect("redis").expect("free key is acquired");
    let _: i64 = redis::cmd("PEXPIRE").arg(&key).arg(1000).query_async(&mut conn).await.expect("PEXPIRE");

    eventually(HANG, "background renewal pushed the expiry out", || {
        let (mut conn, key) = (conn.clone(), key.clone());
        async move { pttl(&mut conn, &key).await > 1000 }
    })
    .await;
    assert!(!guard.is_lost());
}

#[tokio::test]
async fn renewal_detects_a_takeover_and_cannot_extend_it() {
    let config = LockConfig {
        lease: Duration::from_secs(10),
        renew_every: Duration::from_millis(100),
        op_timeout: Duration::from_secs(2),
        ..calm_config()
    };
    let locker = locker(config).await;
    let mut conn = raw().await;
    let key = unique_name("lk");
    let guard = locker.try_acquire(&key).await.expect("redis").expect("free key is acquired");
    // Another owner now holds the key (as if our lease had expired and it acquired).
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("someone-else")
        .arg("PX")
        .arg(5000)
        .query_async(&mut conn)
        .await
        .expect("SET");

    let reason = within(HANG, "guard notices the takeover", guard.lost()).await;

    assert_eq!(reason, LostReason::TakenOver);
    assert!(matches!(guard.renew().await, Err(LockError::Lost { reason: LostReason::TakenOver, .. })));
    assert_eq!(guard.release().await.expect("release"), Release::NotHeld);
    assert_eq!(
        get(&mut conn, &key).await.as_deref(),
        Some("someone-else"),
        "the other owner's lock survives"
    );
    assert!(pttl(&mut conn, &key).await <= 5000, "the other owner's lease was not extended");
}

#[tokio::test]
async fn fencing_tokens_increase_per_key_even_after_the_counter_is_lost() {
    let locker = locker(calm_config()).await;
    let mut conn = raw().await;
    let key = unique_name("lk");
    let mut fences = Vec::new();
    for round in 0..6 {
        if round == 3 {
            // As if the counter expired or Redis lost its data.
            let _: i64 = redis::cmd("DEL")
                .arg(resync_locks::fence_key(&key))
                .query_async(&mut conn)
                .await
                .expect("DEL");
        }
        let guard = locker.try_acquire(&key).await.expect("redis").expect("free key is acquired");
        fences.push(guard.fence());
        guard.release().await.expect("release");
    }

    assert!(fences.windows(2).all(|w| w[0] < w[1]), "fences not strictly increasing: {fences:?}");
}

#[tokio::test]
async fn dropping_a_guard_releases_the_lock() {
    let locker = locker(calm_config()).await;
    let key = unique_name("lk");
    let guard = locker.try_acquire(&key).await.expect("redis").expect("free key is acquired");
    let signal = guard.lost_signal();

    drop(guard);

    assert_eq!(within(HANG, "signal after drop", signal.lost()).await, LostReason::Released);
    eventually(HANG, "key free again after drop", || {
        let (locker, key) = (locker.clone(), key.clone());
        async move { locker.try_acquire(&key).await.expect("redis").is_some() }
    })
    .await;
}

#[tokio::test]
async fn lost_signal_reports_an_explicit_release() {
    let locker = locker(calm_config()).await;
    let key = unique_name("lk");
    let guard = locker.try_acquire(&key).await.expect("redis").expect("free key is acquired");
    let signal = guard.lost_signal();
    assert!(!signal.is_lost() && guard.ensure_held().is_ok());

    guard.release().await.expect("release");

    assert_eq!(within(HANG, "signal after release", signal.lost()).await, LostReason::Released);
    assert!(matches!(guard.ensure_held(), Err(LockError::Lost { reason: LostReason::Released, .. })));
}

#[tokio::test]
async fn connect_rejects_an_invalid_config() {
    let config = LockConfig { renew_every: Duration::from_secs(20), ..LockConfig::default() };

    let err = Locker::connect("redis://127.0.0.1:6379", config).await.expect_err("invalid");

    assert!(matches!(err, LockError::InvalidConfig { field: "renew_every", .. }), "got {err:?}");
}

#[tokio::test]
async fn connect_to_nothing_fails_with_a_connect_error() {
    let config = LockConfig { op_timeout: Duration::from_millis(500), ..LockConfig::default() };
    let url = format!("redis://127.0.0.1:{}", free_port());

    let err = within(HANG, "connect", Locker::connect(&url, config)).await.expect_err("nothing listens");

    assert!(matches!(err, LockError::Connect { .. }), "got {err:?}");
}

#[tokio::test]
async fn many_keys_are_acquired_and_released_in_one_call_each_on_its_own() {
    let locker = locker(calm_config()).await;
    let mut conn = raw().await;
    let (free_a, busy, free_b) = (unique_name("lk"), unique_name("lk"), unique_name("lk"));
    let held = locker.try_acquire(&busy).await.expect("redis").expect("free key is acquired");

    let guards = locker.try_acquire_many(&[&free_a, &busy, &free_b]).await.expect("redis");

    assert!(guards[0].is_some() && guards[2].is_some(), "free keys are acquired");
    assert!(guards[1].is_none(), "a held key is not acquired, and does not stop the others");
    let fences: Vec<u64> = guards.iter().flatten().map(|g| g.fence()).collect();
    assert!(fences.iter().all(|f| *f > 0), "every acquired lock has a fencing token: {fences:?}");
    let signals: Vec<_> = guards.iter().flatten().map(|g| g.lost_signal()).collect();

    let deleted = locker.release_many(guards.into_iter().flatten().collect()).await.expect("redis");

    assert_eq!(deleted, 2);
    assert_eq!(get(&mut conn, &free_a).await, None);
    assert_eq!(get(&mut conn, &free_b).await, None);
    assert!(get(&mut conn, &busy).await.is_some(), "the other holder's lock is untouched");
    assert!(signals.iter().all(|s| s.is_lost()), "released guards report it");
    assert_eq!(held.release().await.expect("release"), Release::Released);
}
