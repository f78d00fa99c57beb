//! Fault injection: rate limit, errors, rejections, applied-then-timeout, outages, runtime
//! changes, reset, shutdown during a held answer.

use std::cell::Cell;
use std::time::Duration;

use chrono::TimeDelta;
use futures::future::join_all;
use resync_apisim::{Config, Error, FaultsPatch, Latency, OutageNow};
use serde_json::{Value, json};

use crate::{HANG_GUARD, eventually, header, http, put, sim};

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_and_bounds_what_is_applied() {
    const RATE: f64 = 50.0;
    let (sim, client) = sim(Config { rate_limit_per_sec: Some(RATE), ..Config::default() }).await;
    let http = http();

    let ids: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    let empty = json!({});
    let requests = ids.iter().map(|id| put(&http, &sim, ("listing", id), Some(1), &empty));
    let responses = tokio::time::timeout(HANG_GUARD, join_all(requests)).await.expect("requests hung");

    let mut applied = 0;
    let mut limited = 0;
    for response in &responses {
        match response.status().as_u16() {
            200 | 201 => applied += 1,
            429 => {
                limited += 1;
                assert!(header(response, "retry-after").is_some_and(|s| s >= 1));
                // One token comes back every 1/RATE s = 20 ms.
                let ms = header(response, "retry-after-ms").expect("Retry-After-Ms");
                assert!((1..=20).contains(&ms), "Retry-After-Ms {ms}");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(applied >= 50, "the full burst is admitted: {applied}");
    assert!(limited > 0);
    assert_eq!(applied + limited, 200);

    // The token bucket's promise, read from the apply times: at most burst + rate writes in
    // the first second.
    let log = client.log_all().await.unwrap();
    assert_eq!(log.len(), applied);
    let first = log[0].at;
    let in_first_second = log.iter().filter(|e| e.at - first < TimeDelta::seconds(1)).count();
    assert!(in_first_second <= 100, "{in_first_second} applied in the first second");

    let stats = client.stats().await.unwrap();
    assert_eq!((stats.status(429), stats.applied), (limited as u64, applied as u64));
}

#[tokio::test]
async fn error_rate_one_fails_everything_and_applies_nothing() {
    let (sim, client) = sim(Config { error_rate: 1.0, seed: Some(3), ..Config::default() }).await;
    let http = http();
    let mut statuses = Vec::new();
    for i in 0..20 {
        statuses
            .push(put(&http, &sim, ("listing", &i.to_string()), Some(1), &json!({})).await.status().as_u16());
    }
    assert!(statuses.iter().all(|s| [500, 503].contains(s)), "{statuses:?}");
    assert!(statuses.contains(&500) && statuses.contains(&503), "{statuses:?}");
    assert_eq!(client.check().await.unwrap().writes, 0);
    assert!(client.state().await.unwrap().is_empty());
    assert_eq!(client.stats().await.unwrap().applied, 0);
}

#[tokio::test]
async fn reject_rate_one_answers_422_with_a_body_and_applies_nothing() {
    let (sim, client) = sim(Config { reject_rate: 1.0, ..Config::default() }).await;
    let http = http();
    let response = put(&http, &sim, ("listing", "1"), Some(1), &json!({})).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");

    client.set_faults(&FaultsPatch { reject_status: Some(409), ..FaultsPatch::default() }).await.unwrap();
    assert_eq!(put(&http, &sim, ("listing", "1"), Some(1), &json!({})).await.status(), 409);
    let error = client.upsert("listing", "1", 1, "e", &json!({})).await.unwrap_err();
    assert!(matches!(error, Error::Status { status: 409, .. }), "{error}");
    assert_eq!(client.check().await.unwrap().writes, 0);
}

#[tokio::test]
async fn applied_then_timeout_applies_although_the_client_times_out() {
    let config =
        Config { applied_then_timeout_rate: 1.0, applied_then_timeout_delay_ms: 1000, ..Config::default() };
    let (sim, client) = sim(config).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();

    let error = impatient
        .put(format!("{}/entities/listing/1", sim.url()))
        .header("X-Resync-Entity-Version", 7)
        .json(&json!({"title": "Flat"}))
        .send()
        .await
        .expect_err("the answer is held past the client's timeout");
    assert!(error.is_timeout(), "{error}");

    let log = eventually("the write in the log", || async {
        Some(client.log_all().await.unwrap()).filter(|log| !log.is_empty())
    })
    .await;
    assert_eq!((log.len(), log[0].version), (1, Some(7)));
    let state = client.entity("listing", "1").await.unwrap().expect("applied");
    assert_eq!(state.data, json!({"title": "Flat"}));
    let stats = client.stats().await.unwrap();
    assert_eq!((stats.applied, stats.status(504)), (1, 1));

    // A patient client sees the 504 after the hold.
    let response = put(&http(), &sim, ("listing", "1"), Some(8), &json!({})).await;
    assert_eq!(response.status(), 504);
}

#[tokio::test]
async fn an_outage_answers_503_until_it_ends() {
    let (sim, client) = sim(Config::default()).await;
    let http = http();
    assert!(put(&http, &sim, ("listing", "1"), Some(1), &json!({})).await.status().is_success());

    // Ten minutes: the checks below run inside it however slow the machine is.
    let outage = |for_ms| FaultsPatch { outage: Some(OutageNow { for_ms }), ..FaultsPatch::default() };
    client.set_faults(&outage(600_000)).await.unwrap();
    let during = put(&http, &sim, ("listing", "1"), Some(2), &json!({})).await;
    assert_eq!(during.status(), 503);
    assert!(header(&during, "retry-after-ms").is_some_and(|ms| (1..=600_000).contains(&ms)));
    assert!(client.stats().await.unwrap().outage_remaining_ms.is_some());

    // A new outage replaces the running one: this one ends by itself shortly.
    client.set_faults(&outage(200)).await.unwrap();
    let refused = Cell::new(1);
    eventually("the outage to end", || async {
        let status = put(&http, &sim, ("listing", "1"), Some(2), &json!({})).await.status();
        if status == 503 {
            refused.set(refused.get() + 1);
            return None;
        }
        assert!(status.is_success(), "{status}");
        Some(())
    })
    .await;
    let stats = client.stats().await.unwrap();
    assert_eq!((stats.status(503), stats.applied), (refused.get(), 2));
    assert_eq!(stats.outage_remaining_ms, None);
    assert_eq!(client.check().await.unwrap().writes, 2);
}

#[tokio::test]
async fn faults_change_at_runtime_and_reset_clears_everything() {
    let (sim, client) = sim(Config { rate_limit_per_sec: Some(2000.0), ..Config::default() }).await;
    let http = http();
    assert!(put(&http, &sim, ("listing", "1"), Some(1), &json!({})).await.status().is_success());

    for rate in [500.0, 2000.0] {
        let patch = FaultsPatch { rate_limit_per_sec: Some(Some(rate)), ..FaultsPatch::default() };
        assert_eq!(client.set_faults(&patch).await.unwrap().rate_limit_per_sec, Some(rate));
        assert_eq!(client.stats().await.unwrap().config.rate_limit_per_sec, Some(rate));
    }
    let config =
        client.set_faults(&FaultsPatch { error_rate: Some(1.0), ..FaultsPatch::default() }).await.unwrap();
    assert_eq!((config.error_rate, config.rate_limit_per_sec), (1.0, Some(2000.0)));
    assert!(put(&http, &sim, ("listing", "1"), Some(2), &json!({})).await.status().is_server_error());
    let patch = FaultsPatch {
        error_rate: Some(0.0),
        latency: Some(Some(Latency::Fixed { fixed_ms: 5.0 })),
        ..FaultsPatch::default()
    };
    client.set_faults(&patch).await.unwrap();
    assert!(put(&http, &sim, ("listing", "1"), Some(2), &json!({})).await.status().is_success());

    // Invalid or misspelled settings are refused, naming the problem, and change nothing.
    let invalid = client.set_faults(&FaultsPatch { error_rate: Some(2.0), ..FaultsPatch::default() }).await;
    assert!(
        matches!(&invalid, Err(Error::Status { status: 400, body }) if body.contains("error_rate")),
        "{invalid:?}"
    );
    let typo =
        http.put(format!("{}/admin/faults", sim.url())).json(&json!({"eror_rate": 1})).send().await.unwrap();
    assert_eq!(typo.status(), 400);
    assert_eq!(client.faults().await.unwrap().error_rate, 0.0);

    client.reset().await.unwrap();
    assert_eq!(client.faults().await.unwrap(), Config::default());
    assert!(client.state().await.unwrap().is_empty());
    assert!(client.log_all().await.unwrap().is_empty());
    let stats = client.stats().await.unwrap();
    assert_eq!((stats.requests, stats.applied), (0, 0));
    assert!(stats.by_status.is_empty());
    let report = client.check().await.unwrap();
    assert_eq!((report.writes, report.entities, report.ok), (0, 0, true));
    // Sequence numbers start over.
    assert_eq!(put(&http, &sim, ("listing", "1"), Some(1), &json!({})).await.status(), 201);
    assert_eq!(client.log_all().await.unwrap()[0].seq, 1);
}

#[tokio::test]
async fn shutdown_cuts_a_held_answer_short() {
    let config = Config {
        applied_then_timeout_rate: 1.0,
        applied_then_timeout_delay_ms: 600_000,
        ..Config::default()
    };
    let (sim, client) = sim(config).await;
    client.health().await.unwrap();
    let url = format!("{}/entities/listing/1", sim.url());
    let held = tokio::spawn(async move {
        http().put(url).header("X-Resync-Entity-Version", 1).json(&json!({})).send().await.map(|r| r.status())
    });
    eventually("the held write to be applied", || async {
        (client.stats().await.unwrap().applied == 1).then_some(())
    })
    .await;
    tokio::time::timeout(HANG_GUARD, sim.shutdown()).await.expect("shutdown hung").unwrap();
    let answer = tokio::time::timeout(HANG_GUARD, held).await.expect("held request hung").unwrap();
    assert_eq!(answer.map(|s| s.as_u16()).ok(), Some(504));
    assert!(client.health().await.is_err(), "the server is gone");
}
