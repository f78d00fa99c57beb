//! The shared circuit breaker against the real Redis: a run of failures over several processes
//! opens it for all, one probe at a time is let through, and its answer closes or reopens it.

use std::time::Duration;

use resync_testkit::{Service, service_unreachable, unique_name};
use resync_throttle::{CircuitConfig, CircuitState, Gate, SharedCircuit, ThrottleError};

use crate::support::raw;
use resync_testkit::poll_some;

fn config(threshold: u32) -> CircuitConfig {
    CircuitConfig {
        key_prefix: unique_name("circuit-test"),
        sink: "apisim".into(),
        failure_threshold: threshold,
        min_probe_interval: Duration::from_millis(100),
        max_probe_interval: Duration::from_millis(800),
        probe_lease: Duration::from_secs(30),
        refresh_every: Duration::from_millis(50),
        idle_ttl: Duration::from_secs(60),
        op_timeout: Duration::from_secs(5),
    }
}

/// `count` circuits on one config, each with its own connection, as separate processes.
async fn circuits(config: &CircuitConfig, count: usize) -> Vec<SharedCircuit> {
    let mut circuits = Vec::with_capacity(count);
    for _ in 0..count {
        match SharedCircuit::connect(&Service::Redis.url(), config.clone()).await {
            Ok(circuit) => circuits.push(circuit),
            Err(e @ (ThrottleError::Connect { .. } | ThrottleError::Unavailable { .. })) => {
                service_unreachable(Service::Redis, e)
            }
            Err(e) => panic!("circuit: {e}"),
        }
    }
    circuits
}

async fn fail(circuit: &SharedCircuit, times: usize) -> CircuitState {
    let mut state = CircuitState::Closed;
    for _ in 0..times {
        state = circuit.failed(false, None).await.expect("report a failure");
    }
    state
}

/// Asks `circuit` until the probe is its own; the other answers must all be holds.
async fn wait_for_probe(circuit: &SharedCircuit, what: &str) {
    poll_some(Duration::from_secs(10), what, || async {
        match circuit.gate().await.expect("gate") {
            Gate::Probe => Some(()),
            Gate::Hold(_) => None,
            Gate::Pass => panic!("{what}: the circuit let a call through while open"),
        }
    })
    .await;
}

async fn field(key: &str, name: &str) -> Option<i64> {
    let mut conn = raw().await;
    redis::cmd("HGET").arg(key).arg(name).query_async(&mut conn).await.expect("HGET")
}

#[tokio::test]
async fn a_run_of_failures_over_several_processes_opens_the_circuit_for_all_of_them() {
    let config = config(3);
    let fleet = circuits(&config, 3).await;
    assert_eq!(fail(&fleet[0], 2).await, CircuitState::Closed, "two failures of three");
    assert_eq!(fail(&fleet[1], 1).await, CircuitState::Open, "the third, from another process");
    assert!(matches!(fleet[1].gate().await.expect("gate"), Gate::Hold(_)), "the opener holds");
    // A process that made none of those calls notices within its refresh interval.
    poll_some(Duration::from_secs(10), "the third process sees the circuit open", || async {
        fleet[2].is_open().await.expect("read").then_some(())
    })
    .await;
    assert!(matches!(fleet[2].gate().await.expect("gate"), Gate::Hold(_)));
}

#[tokio::test]
async fn a_success_from_a_process_that_failed_ends_the_run() {
    let config = config(3);
    let fleet = circuits(&config, 2).await;
    fail(&fleet[0], 2).await;
    assert_eq!(fleet[0].succeeded(false).await.expect("success"), CircuitState::Closed);
    assert_eq!(field(&config.key(), "failures").await, Some(0), "the run was reset");
    assert_eq!(fail(&fleet[1], 2).await, CircuitState::Closed, "two in a row again, not four");
}

#[tokio::test]
async fn one_probe_at_a_time_across_processes_and_its_success_closes_the_circuit_for_all() {
    let config = config(1);
    let fleet = circuits(&config, 3).await;
    fail(&fleet[0], 1).await;
    wait_for_probe(&fleet[0], "the first probe").await;
    for other in &fleet[1..] {
        other.is_open().await.expect("read");
        assert!(
            matches!(other.gate().await.expect("gate"), Gate::Hold(_)),
            "a second probe while the first is out"
        );
    }
    assert_eq!(fleet[0].succeeded(true).await.expect("probe succeeded"), CircuitState::Closed);
    for other in &fleet[1..] {
        poll_some(Duration::from_secs(10), "another process sees the circuit closed", || async {
            (other.gate().await.expect("gate") == Gate::Pass).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn a_failed_probe_waits_twice_as_long_up_to_the_longest_interval() {
    let config = config(1);
    let circuit = circuits(&config, 1).await.remove(0);
    fail(&circuit, 1).await;
    assert_eq!(field(&config.key(), "backoff").await, Some(100));
    for expected in [200, 400, 800, 800] {
        wait_for_probe(&circuit, "a probe").await;
        assert_eq!(circuit.failed(true, None).await.expect("probe failed"), CircuitState::Open);
        assert_eq!(field(&config.key(), "backoff").await, Some(expected));
    }
}

#[tokio::test]
async fn a_probe_whose_process_vanished_is_given_to_another_after_its_lease() {
    let config = CircuitConfig { probe_lease: Duration::from_millis(300), ..config(1) };
    let fleet = circuits(&config, 2).await;
    fail(&fleet[0], 1).await;
    wait_for_probe(&fleet[0], "the first probe").await;
    // Process 0 never reports (it died mid-call): process 1 gets the probe once the lease ends.
    assert!(fleet[1].is_open().await.expect("read"));
    wait_for_probe(&fleet[1], "the probe after the lease").await;
}

#[tokio::test]
async fn the_third_partys_retry_after_delays_the_first_probe() {
    let config = config(1);
    let circuit = circuits(&config, 1).await.remove(0);
    circuit.failed(false, Some(Duration::from_secs(30))).await.expect("failure");
    let retry_at = field(&config.key(), "retry_at").await.expect("retry_at");
    let opened_at = field(&config.key(), "opened_at").await.expect("opened_at");
    // Capped at the longest probe interval (800 ms here), not the 30 s asked for.
    assert_eq!(retry_at - opened_at, 800);
}
