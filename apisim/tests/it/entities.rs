//! Writes, reads, the write log and the stale-overwrite check, with no faults.

use resync_apisim::{Config, EntityState, Op};
use serde_json::{Value, json};

use crate::{delete, http, put, sim};

#[tokio::test]
async fn upsert_delete_get_state_and_log_round_trip() {
    let (sim, client) = sim(Config::default()).await;
    let http = http();

    let created = put(&http, &sim, ("listing", "1"), Some(1), &json!({"title": "Flat"})).await;
    assert_eq!(created.status(), 201);
    assert_eq!(
        created.json::<Value>().await.unwrap(),
        json!({"entity_type": "listing", "entity_id": "1", "version": 1})
    );
    let updated = put(&http, &sim, ("listing", "1"), Some(2), &json!({"title": "Flat in Lisbon"})).await;
    assert_eq!(updated.status(), 200);
    let state = client.entity("listing", "1").await.unwrap().unwrap();
    assert_eq!(
        state,
        EntityState { version: Some(2), data: json!({"title": "Flat in Lisbon"}), deleted: false }
    );

    assert_eq!(delete(&http, &sim, ("listing", "1"), 3).await.status(), 200);
    // Deleting what was never there is fine, and leaves a tombstone.
    assert_eq!(delete(&http, &sim, ("listing", "9"), 1).await.status(), 200);
    assert_eq!(delete(&http, &sim, ("listing", "9"), 1).await.status(), 200);
    // The typed client writes the same way.
    let ack = client.upsert("room", "a/b", 4, "e-4", &json!({"beds": 2})).await.unwrap();
    assert_eq!((ack.entity_id.as_str(), ack.version), ("a/b", Some(4)));

    assert_eq!(client.entity("listing", "404").await.unwrap(), None);
    let raw = http.get(format!("{}/entities/listing/404", sim.url())).send().await.unwrap();
    assert_eq!(raw.status(), 404);

    let state = client.state().await.unwrap();
    assert_eq!(state.keys().collect::<Vec<_>>(), ["listing/1", "listing/9", "room/a/b"]);
    assert_eq!(state["listing/1"], EntityState { version: Some(3), data: Value::Null, deleted: true });
    assert_eq!(state["room/a/b"].data, json!({"beds": 2}));

    let log = client.log_all().await.unwrap();
    let summary: Vec<_> =
        log.iter().map(|e| (e.seq, e.entity_type.as_str(), e.entity_id.as_str(), e.version, e.op)).collect();
    assert_eq!(
        summary,
        [
            (1, "listing", "1", Some(1), Op::Upsert),
            (2, "listing", "1", Some(2), Op::Upsert),
            (3, "listing", "1", Some(3), Op::Delete),
            (4, "listing", "9", Some(1), Op::Delete),
            (5, "listing", "9", Some(1), Op::Delete),
            (6, "room", "a/b", Some(4), Op::Upsert),
        ]
    );
    assert_eq!(log[0].event_id.as_deref(), Some("00000000-0000-7000-8000-000000000001"));
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
    let page = client.log(2, 2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);

    let stats = client.stats().await.unwrap();
    assert_eq!((stats.requests, stats.applied, stats.status(201), stats.status(200)), (6, 6, 2, 4));
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_writes_are_refused_and_unversioned_ones_counted() {
    let (sim, client) = sim(Config::default()).await;
    let http = http();

    let bad_version = http
        .put(format!("{}/entities/listing/1", sim.url()))
        .header("X-Resync-Entity-Version", "seven")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_version.status(), 400);
    assert!(bad_version.json::<Value>().await.unwrap()["error"].as_str().unwrap().contains("seven"));
    let bad_body = http
        .put(format!("{}/entities/listing/1", sim.url()))
        .header("X-Resync-Entity-Version", "1")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_body.status(), 400);

    assert_eq!(put(&http, &sim, ("listing", "1"), None, &json!({"a": 1})).await.status(), 201);
    let report = client.check().await.unwrap();
    assert_eq!((report.writes, report.unversioned_writes, report.ok), (1, 1, true));
    assert_eq!(client.log_all().await.unwrap()[0].version, None);
}

#[tokio::test]
async fn check_finds_a_stale_overwrite_and_nothing_in_order() {
    let (sim, client) = sim(Config::default()).await;
    let http = http();

    for version in [1, 2, 2, 3] {
        let response = put(&http, &sim, ("listing", "ordered"), Some(version), &json!({"v": version})).await;
        assert!(response.status().is_success());
    }
    let report = client.check().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!((report.writes, report.entities, report.duplicate_writes), (4, 1, 1));
    assert!(report.stale_overwrites.is_empty());

    put(&http, &sim, ("listing", "stale"), Some(2), &json!({"v": 2})).await;
    put(&http, &sim, ("listing", "stale"), Some(1), &json!({"v": 1})).await;
    let report = client.check().await.unwrap();
    assert!(!report.ok);
    assert_eq!(report.stale_overwrites.len(), 1);
    let stale = &report.stale_overwrites[0];
    assert_eq!(
        (stale.entity_id.as_str(), stale.version_written, stale.newer_version_already_written, stale.seq),
        ("stale", 1, 2, 6)
    );
    // The simulated API, like a real one, let the stale write win.
    assert_eq!(client.entity("listing", "stale").await.unwrap().unwrap().version, Some(1));

    // The raw JSON has the documented field names.
    let raw: Value = http.get(format!("{}/check", sim.url())).send().await.unwrap().json().await.unwrap();
    for key in ["writes", "entities", "stale_overwrites", "duplicate_writes", "unversioned_writes", "ok"] {
        assert!(raw.get(key).is_some(), "{key} missing from {raw}");
    }
}
