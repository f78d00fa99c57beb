//! Emitting from Rust and from plain SQL.

use resync_producer::{EmitError, NewEvent, emit};

use crate::support::{World, rabbitmq, with_world};

#[tokio::test]
async fn versions_increase_per_entity_and_sql_callers_get_the_same_function() {
    let world = World::new(rabbitmq().await, 0, 4).await;
    with_world(world, |w| async move {
        let mut tx = w.pool.begin().await.expect("begin");
        let first =
            emit(&mut tx, &w.schema, &NewEvent::new("listing.created", "7", serde_json::json!({"a": 1})))
                .await
                .expect("emit");
        let second =
            emit(&mut tx, &w.schema, &NewEvent::new("listing.updated", "7", serde_json::json!({"a": 2})))
                .await
                .expect("emit");
        let other = emit(&mut tx, &w.schema, &NewEvent::new("listing.updated", "8", serde_json::json!({})))
            .await
            .expect("emit");
        tx.commit().await.expect("commit");
        assert_eq!((first.version, second.version, other.version), (1, 2, 1));
        assert!(first.seq < second.seq && second.seq < other.seq, "the database assigns a global order");
        assert_eq!(first.id.get_version_num(), 7, "event ids are UUID v7");

        // A service in any language: one SQL call in its own transaction.
        let (seq, version): (i64, i64) =
            sqlx::query_as(w.schema.sql(
                "SELECT seq, version FROM {schema}.emit('listing', '7', 'listing.deleted', 'null', true)",
            ))
            .fetch_one(&w.pool)
            .await
            .expect("emit from SQL");
        assert_eq!(version, 3);
        assert!(seq > other.seq);
    })
    .await;
}

#[tokio::test]
async fn invalid_events_are_refused_with_the_reason() {
    let world = World::new(rabbitmq().await, 0, 4).await;
    with_world(world, |w| async move {
        let mut conn = w.pool.acquire().await.expect("connection");
        let cases = [
            (NewEvent::new("listing", "1", serde_json::json!({})), "<entity>.<verb>"),
            (NewEvent::new("Listing.Updated", "1", serde_json::json!({})), "<entity>.<verb>"),
            (NewEvent::new("listing.updated", "", serde_json::json!({})), "entity id"),
            (
                NewEvent::new("listing.updated", "1", serde_json::json!({"x": "y".repeat(250 * 1024)})),
                "240 KiB",
            ),
        ];
        for (event, expected) in cases {
            match emit(&mut conn, &w.schema, &event).await {
                Err(EmitError::Invalid(message)) => assert!(message.contains(expected), "{message}"),
                other => panic!("{event:?}: expected Invalid, got {other:?}"),
            }
        }
        let pending = w.pending().await;
        assert_eq!(pending, 0, "nothing was recorded");
    })
    .await;
}
