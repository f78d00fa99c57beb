//! The built-in HTTP sink against the API simulator (a real HTTP server): what a third party
//! sees of each write, and conditional writes.

use resync_apisim::Config as ApiConfig;
use resync_consumer::sink::http::HttpSink;
use resync_consumer::sink::{Origin, Sink, SinkWrite};
use uuid::Uuid;

fn spec(api: &resync_apisim::Running, conditional: bool) -> fare_config::SinkSpec {
    let mut text = format!(
        "name = \"s\"\n[[subscriptions]]\ntypes = [\"listing.*\"]\n[sink]\nurl = \"{}/entities/{{entity_type}}/{{entity_id}}\"\n",
        api.url()
    );
    if conditional {
        text.push_str("[sink.conditional]\n");
    }
    fare_config::load_str("s.toml", &text).expect("valid config").sink.expect("a sink")
}

fn write(version: i64, data: &serde_json::Value, origin: Origin) -> SinkWrite<'_> {
    SinkWrite {
        entity_type: "listing",
        entity_id: "L1",
        version,
        event_id: Uuid::new_v4(),
        deleted: false,
        data,
        origin,
    }
}

#[tokio::test]
async fn every_write_tells_the_third_party_its_stream_and_resync_job() {
    let api = resync_apisim::start(ApiConfig::default()).await.expect("start apisim");
    let sink = HttpSink::new(&spec(&api, false), "s").expect("sink");
    let data = serde_json::json!({"title": "a"});
    let job = Uuid::new_v4();
    sink.apply(&write(1, &data, Origin::Live)).await.expect("live write");
    sink.apply(&write(2, &data, Origin::Resync { job_id: Some(job) })).await.expect("resync write");
    let log = api.client().expect("client").log_all().await.expect("log");
    let seen: Vec<(Option<&str>, Option<String>)> =
        log.iter().map(|w| (w.stream.as_deref(), w.job_id.clone())).collect();
    assert_eq!(seen, [(Some("live"), None), (Some("resync"), Some(job.to_string()))]);
    api.shutdown().await.expect("shutdown");
}

/// A late write of an older version (a consumer frozen past its lock lease, then resumed) is
/// refused by a third party enforcing versions, and counts as applied: it never lands.
#[tokio::test]
async fn with_conditional_writes_an_older_version_sent_late_never_lands() {
    let api = resync_apisim::start(ApiConfig { conditional_writes: true, ..ApiConfig::default() })
        .await
        .expect("start apisim");
    let client = api.client().expect("client");
    let (newer, older) = (serde_json::json!({"title": "v2"}), serde_json::json!({"title": "v1"}));

    let sink = HttpSink::new(&spec(&api, true), "s").expect("sink");
    sink.apply(&write(2, &newer, Origin::Live)).await.expect("v2 applied");
    sink.apply(&write(1, &older, Origin::Live)).await.expect("v1 refused as not newer: done, not an error");
    sink.apply(&write(2, &newer, Origin::Live)).await.expect("v2 again (a resync): the third party has it");
    let state = client.entity("listing", "L1").await.expect("read").expect("entity");
    assert_eq!((state.version, state.data), (Some(2), newer.clone()));
    assert!(client.check().await.expect("check").ok, "no older version written over a newer one");

    // The same API without the sink's `[sink.conditional]`: the 412 is a refusal to dead-letter.
    let plain = HttpSink::new(&spec(&api, false), "s").expect("sink");
    let refused =
        plain.apply(&write(1, &older, Origin::Live)).await.expect_err("412 without conditional writes");
    assert!(!refused.is_transient(), "{refused}");
    assert_eq!(client.stats().await.expect("stats").status(412), 3, "v1, v2 again, v1 without the setting");
    api.shutdown().await.expect("shutdown");
}

/// With the default response classes, a DELETE answered 404 (already gone) is applied, the
/// same 404 on an upsert and a 422 are refusals that dead-letter the event at once.
#[tokio::test]
async fn a_delete_of_something_already_gone_is_applied_and_a_refusal_is_not_retried() {
    let api =
        resync_apisim::start(ApiConfig { reject_rate: 1.0, reject_status: 404, ..ApiConfig::default() })
            .await
            .expect("start apisim");
    let sink = HttpSink::new(&spec(&api, false), "s").expect("sink");
    let data = serde_json::Value::Null;
    let tombstone = SinkWrite { deleted: true, ..write(3, &data, Origin::Live) };
    sink.apply(&tombstone).await.expect("404 on a DELETE: already gone");
    let refused = sink.apply(&write(4, &data, Origin::Live)).await.expect_err("404 on an upsert");
    assert!(matches!(refused, resync_consumer::SinkError::Rejected { status: 404, .. }), "{refused}");
    let client = api.client().expect("client");
    let unprocessable = resync_apisim::FaultsPatch { reject_status: Some(422), ..Default::default() };
    client.set_faults(&unprocessable).await.expect("422s");
    let refused = sink.apply(&tombstone).await.expect_err("422");
    assert!(matches!(refused, resync_consumer::SinkError::Rejected { status: 422, .. }), "{refused}");
    api.shutdown().await.expect("shutdown");
}
