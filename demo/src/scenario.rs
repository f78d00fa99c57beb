//! Event histories with duplicates and shuffled order, a source table holding the truth, and
//! the comparison of a third party's final state with it. Shared by the demo and the
//! end-to-end tests.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::{IndexedRandom, SliceRandom};
use resync_apisim::EntityState;
use resync_bus::Envelope;
use resync_migrations::Schema;
use serde_json::{Value, json};
use sqlx::PgPool;

/// What the source database says an entity is.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub version: i64,
    pub deleted: bool,
    pub data: Value,
}

/// `versions` events for each of `entities` listings (every 13th ends deleted), plus
/// `duplicate_share` of them again, in a seeded random order; and the final state of each.
pub fn shuffled_history(
    entities: usize,
    versions: i64,
    duplicate_share: f64,
    seed: u64,
) -> (Vec<Envelope>, BTreeMap<String, Expected>) {
    let mut events = Vec::with_capacity(entities * versions as usize);
    let mut truth = BTreeMap::new();
    for e in 0..entities {
        let id = format!("L{e:05}");
        for v in 1..=versions {
            let data = json!({"title": format!("listing {e} rev {v}"), "price": 100 + e as i64 * 3 + v});
            let event_type = if v == 1 { "listing.created" } else { "listing.updated" };
            let mut event = Envelope::new(event_type, id.clone(), v, data.clone());
            if v == versions && e % 13 == 0 {
                event = Envelope::new("listing.deleted", id.clone(), v, Value::Null);
                event.deleted = true;
            }
            if v == versions {
                truth.insert(
                    id.clone(),
                    Expected { version: v, deleted: event.deleted, data: event.data.clone() },
                );
            }
            events.push(event);
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let count = (events.len() as f64 * duplicate_share) as usize;
    let duplicates: Vec<Envelope> = events.choose_multiple(&mut rng, count).cloned().collect();
    events.extend(duplicates);
    events.shuffle(&mut rng);
    (events, truth)
}

/// A listings table in `schema`: the source of truth the third party must end up equal to.
pub struct SourceTable {
    schema: Schema,
}

impl SourceTable {
    pub async fn create(pool: &PgPool, schema: &Schema) -> Result<Self, sqlx::Error> {
        sqlx::query(schema.sql(
            "CREATE TABLE IF NOT EXISTS {schema}.listings \
             (id text PRIMARY KEY, version bigint NOT NULL, deleted boolean NOT NULL, data jsonb NOT NULL)",
        ))
        .execute(pool)
        .await?;
        Ok(Self { schema: schema.clone() })
    }

    /// Writes one row (in the caller's transaction, next to `emit`).
    pub async fn upsert(
        &self,
        conn: &mut sqlx::PgConnection,
        id: &str,
        state: &Expected,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(self.schema.sql(
            "INSERT INTO {schema}.listings (id, version, deleted, data) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET version = $2, deleted = $3, data = $4",
        ))
        .bind(id)
        .bind(state.version)
        .bind(state.deleted)
        .bind(&state.data)
        .execute(conn)
        .await?;
        Ok(())
    }

    pub async fn insert_all(
        &self,
        pool: &PgPool,
        rows: &BTreeMap<String, Expected>,
    ) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        for (id, state) in rows {
            self.upsert(&mut tx, id, state).await?;
        }
        tx.commit().await
    }

    pub async fn read_all(&self, pool: &PgPool) -> Result<BTreeMap<String, Expected>, sqlx::Error> {
        let rows: Vec<(String, i64, bool, Value)> =
            sqlx::query_as(self.schema.sql("SELECT id, version, deleted, data FROM {schema}.listings"))
                .fetch_all(pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(id, version, deleted, data)| (id, Expected { version, deleted, data }))
            .collect())
    }
}

/// One entity whose third-party state differs from the source.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub entity_id: String,
    pub expected: Option<Expected>,
    pub actual: Option<EntityState>,
}

/// Entities of `entity_type` where the third party's state (apisim's `/state`) is not the
/// source's: missing, extra, another version, other data, or deleted on one side only.
pub fn compare(
    entity_type: &str,
    expected: &BTreeMap<String, Expected>,
    actual: &BTreeMap<String, EntityState>,
) -> Vec<Mismatch> {
    let prefix = format!("{entity_type}/");
    let actual: BTreeMap<&str, &EntityState> =
        actual.iter().filter_map(|(key, state)| key.strip_prefix(&prefix).map(|id| (id, state))).collect();
    let mut mismatches = Vec::new();
    for (id, want) in expected {
        let have = actual.get(id.as_str()).copied();
        let equal = have.is_some_and(|have| {
            have.version == Some(want.version)
                && have.deleted == want.deleted
                && (want.deleted || have.data == want.data)
        });
        if !equal {
            mismatches.push(Mismatch {
                entity_id: id.clone(),
                expected: Some(want.clone()),
                actual: have.cloned(),
            });
        }
    }
    // An entity the source has no row for must be gone: absent, or deleted at the third party.
    for (id, have) in actual {
        if !expected.contains_key(id) && !have.deleted {
            mismatches.push(Mismatch {
                entity_id: id.to_string(),
                expected: None,
                actual: Some(have.clone()),
            });
        }
    }
    mismatches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histories_hold_every_version_plus_duplicates_and_end_in_the_newest() {
        let (events, truth) = shuffled_history(100, 10, 0.1, 1);
        assert_eq!(events.len(), 1100);
        assert_eq!(truth.len(), 100);
        assert!(truth.values().all(|t| t.version == 10));
        assert_eq!(truth.values().filter(|t| t.deleted).count(), 8);
        let in_order =
            events.windows(2).all(|w| (&w[0].entity_id, w[0].version) <= (&w[1].entity_id, w[1].version));
        assert!(!in_order, "the history is shuffled");
    }

    #[test]
    fn compare_finds_missing_stale_and_extra_entities() {
        let expected = BTreeMap::from([
            ("a".to_string(), Expected { version: 2, deleted: false, data: json!({"x": 2}) }),
            ("b".to_string(), Expected { version: 3, deleted: true, data: Value::Null }),
            ("c".to_string(), Expected { version: 1, deleted: false, data: json!({}) }),
        ]);
        let state = |version, deleted, data| EntityState { version: Some(version), deleted, data };
        let actual = BTreeMap::from([
            ("listing/a".to_string(), state(1, false, json!({"x": 1}))),
            ("listing/b".to_string(), state(3, true, Value::Null)),
            ("listing/z".to_string(), state(1, false, json!({}))),
        ]);
        let ids: Vec<String> =
            compare("listing", &expected, &actual).into_iter().map(|m| m.entity_id).collect();
        assert_eq!(ids, ["a", "c", "z"]);
    }
}
