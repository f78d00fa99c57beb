//! The shared quota against the real Redis: budgets over fixed windows hold for the whole fleet,
//! refuse until their window turns, turn on UTC boundaries, and the fleet's calls in flight stay
//! within their limit even when a process vanishes mid-call.

use std::time::Duration;

use resync_testkit::{Service, poll_some, service_unreachable, unique_name};
use resync_throttle::{Budget, QuotaConfig, QuotaGate, QuotaTicket, SharedQuota, ThrottleError};

use crate::support::raw;

fn config(budgets: Vec<Budget>, max_in_flight: Option<u32>) -> QuotaConfig {
    QuotaConfig {
        key_prefix: unique_name("quota-test"),
        sink: "apisim".into(),
        budgets,
        max_in_flight,
        in_flight_lease: Duration::from_secs(30),
        op_timeout: Duration::from_secs(5),
    }
}

fn per(limit: u64, secs: u64) -> Budget {
    Budget { limit, window: Duration::from_secs(secs) }
}

/// `count` quotas on one config, each with its own connection, as separate processes.
async fn quotas(config: &QuotaConfig, count: usize) -> Vec<SharedQuota> {
    let mut quotas = Vec::with_capacity(count);
    for _ in 0..count {
        match SharedQuota::connect(&Service::Redis.url(), config.clone()).await {
            Ok(quota) => quotas.push(quota),
            Err(e @ (ThrottleError::Connect { .. } | ThrottleError::Unavailable { .. })) => {
                service_unreachable(Service::Redis, e)
            }
            Err(e) => panic!("quota: {e}"),
        }
    }
    quotas
}

/// The Redis server's clock in ms: the clock the windows are counted on.
async fn redis_now_ms() -> u64 {
    let mut conn = raw().await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.expect("TIME");
    secs * 1000 + micros / 1000
}

fn granted(gate: QuotaGate) -> QuotaTicket {
    match gate {
        QuotaGate::Granted(ticket) => ticket,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[tokio::test]
async fn a_budget_shared_by_four_processes_grants_exactly_its_limit_in_a_window() {
    let day = 86_400_000;
    loop {
        let config = config(vec![per(25, 86_400)], None);
        let fleet = quotas(&config, 4).await;
        let before = redis_now_ms().await;
        let takes = fleet.iter().flat_map(|quota| (0..10).map(move |_| quota.take()));
        let gates = futures::future::join_all(takes).await;
        // The day turning mid-test would grant a fresh budget: ask again in the new day.
        if redis_now_ms().await / day != before / day {
            continue;
        }
        let (mut grants, mut spent) = (0, 0);
        for gate in gates {
            match gate.expect("take") {
                QuotaGate::Granted(_) => grants += 1,
                QuotaGate::Spent { window, resets_in } => {
                    assert_eq!(window, Duration::from_secs(86_400));
                    assert!(resets_in <= window, "{resets_in:?}");
                    spent += 1;
                }
                QuotaGate::Busy => panic!("no in-flight limit was configured"),
            }
        }
        assert_eq!((grants, spent), (25, 15), "40 takes against a budget of 25");
        for quota in &fleet {
            assert!(
                matches!(quota.take().await.expect("take"), QuotaGate::Spent { .. }),
                "every process is refused"
            );
            assert!(quota.spent_for().is_some(), "and holds");
        }
        return;
    }
}

#[tokio::test]
async fn a_spent_budget_refuses_until_its_window_turns_then_grants_again() {
    let config = config(vec![per(3, 2)], None);
    let fleet = quotas(&config, 2).await;
    let resets_in = poll_some(Duration::from_secs(10), "the budget to be spent", || async {
        match fleet[0].take().await.expect("take") {
            QuotaGate::Spent { resets_in, .. } => Some(resets_in),
            QuotaGate::Granted(_) => None,
            QuotaGate::Busy => panic!("no in-flight limit was configured"),
        }
    })
    .await;
    assert!(resets_in <= Duration::from_secs(2), "{resets_in:?}");
    assert!(
        matches!(fleet[1].take().await.expect("take"), QuotaGate::Spent { .. }),
        "the other process is refused too"
    );
    assert!(fleet[1].spent_for().is_some());
    // The window's end is what the quota waits for: the time it named is the condition.
    tokio::time::sleep(resets_in + Duration::from_millis(20)).await;
    let _ = granted(fleet[1].take().await.expect("take"));
    assert_eq!(fleet[1].spent_for(), None, "a grant ends this process's hold");
}

#[tokio::test]
async fn a_daily_budget_turns_at_midnight_utc() {
    let config = config(vec![per(1, 86_400), per(1_000, 60)], None);
    let quota = &quotas(&config, 1).await[0];
    let _ = granted(quota.take().await.expect("take"));
    let QuotaGate::Spent { window, resets_in } = quota.take().await.expect("take") else {
        panic!("a budget of 1 per day is spent after one call");
    };
    let now = redis_now_ms().await;
    assert_eq!(window, Duration::from_secs(86_400), "the spent budget is the daily one");
    let turns_at = now + resets_in.as_millis() as u64;
    let past_midnight = turns_at % 86_400_000;
    assert!(
        past_midnight < 1_000,
        "the window turns {past_midnight} ms after a midnight UTC, not at one (resets in {resets_in:?})"
    );
}

#[tokio::test]
async fn calls_in_flight_stay_within_the_fleet_limit_and_a_lost_place_comes_back_after_its_lease() {
    let config = QuotaConfig { in_flight_lease: Duration::from_millis(500), ..config(vec![], Some(3)) };
    let fleet = quotas(&config, 3).await;
    let first = granted(fleet[0].take().await.expect("take"));
    let _second = granted(fleet[1].take().await.expect("take"));
    // This process "dies" mid-call: its place is never given back.
    let lost = granted(fleet[2].take().await.expect("take"));
    std::mem::forget(lost);
    assert!(matches!(fleet[0].take().await.expect("take"), QuotaGate::Busy), "a fourth call is held");

    fleet[0].release(first).await.expect("release");
    let _third = granted(fleet[1].take().await.expect("take"));
    assert!(matches!(fleet[2].take().await.expect("take"), QuotaGate::Busy));

    let _back = poll_some(Duration::from_secs(10), "the lost place to come back", || async {
        match fleet[2].take().await.expect("take") {
            QuotaGate::Granted(ticket) => Some(ticket),
            QuotaGate::Busy => None,
            other => panic!("{other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn a_refused_call_takes_no_place_in_flight_and_no_unit_of_another_budget() {
    let config = config(vec![per(1, 3600), per(100, 86_400)], Some(1));
    let quota = &quotas(&config, 1).await[0];
    let ticket = granted(quota.take().await.expect("take"));
    quota.release(ticket).await.expect("release");
    for _ in 0..3 {
        assert!(matches!(quota.take().await.expect("take"), QuotaGate::Spent { .. }));
    }
    let mut conn = raw().await;
    let in_flight: u64 =
        redis::cmd("ZCARD").arg(config.in_flight_key()).query_async(&mut conn).await.expect("ZCARD");
    assert_eq!(in_flight, 0, "refused calls hold no place");
    let used_today: u64 =
        redis::cmd("HGET").arg(config.key()).arg("u:86400000").query_async(&mut conn).await.expect("HGET");
    assert_eq!(used_today, 1, "only the granted call counts against the daily budget");
}
