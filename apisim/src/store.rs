//! The simulated API's data: entity states, the write log, and the stale-overwrite check,
//! kept incrementally so `/check` costs nothing more than a copy.
//!
//! Every write is applied under one lock with its log entry, so the log order *is* the apply
//! order. The critical section is a map lookup and two pushes; parsing happens before it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::model::{CheckReport, EntityState, LogEntry, Op, StaleOverwrite};

/// A parsed write, ready to apply.
pub(crate) struct Write {
    pub(crate) entity_type: String,
    pub(crate) entity_id: String,
    pub(crate) version: Option<i64>,
    pub(crate) event_id: Option<Box<str>>,
    pub(crate) op: Op,
    pub(crate) data: Value,
    pub(crate) stream: Option<Box<str>>,
    pub(crate) job_id: Option<Box<str>>,
}

struct Entity {
    entity_type: Arc<str>,
    entity_id: Arc<str>,
    state: EntityState,
    /// The newest version ever written, the yardstick for stale writes.
    newest: Option<i64>,
}

/// A log entry as kept: the names are shared with the entity, not copied per write.
struct Record {
    entity_type: Arc<str>,
    entity_id: Arc<str>,
    version: Option<i64>,
    op: Op,
    at: DateTime<Utc>,
    event_id: Option<Box<str>>,
    stream: Option<Box<str>>,
    job_id: Option<Box<str>>,
}

#[derive(Default)]
pub(crate) struct Store {
    entities: HashMap<(String, String), Entity>,
    log: Vec<Record>,
    stale: Vec<StaleOverwrite>,
    duplicates: u64,
    unversioned: u64,
}

/// What applying did.
pub(crate) struct Applied {
    /// The entity did not exist before.
    pub(crate) created: bool,
}

impl Store {
    /// Applies `write` unless it carries a version not newer than the newest the entity has
    /// had (`None`: refused, nothing changed): an API enforcing conditional writes.
    pub(crate) fn apply_if_newer(&mut self, write: Write, at: DateTime<Utc>) -> Option<Applied> {
        let key = (write.entity_type.clone(), write.entity_id.clone());
        let newest = self.entities.get(&key).and_then(|e| e.newest);
        match (write.version, newest) {
            (Some(version), Some(newest)) if version <= newest => None,
            _ => Some(self.apply(write, at)),
        }
    }

    pub(crate) fn apply(&mut self, write: Write, at: DateTime<Utc>) -> Applied {
        let seq = self.log.len() as u64 + 1;
        let mut created = false;
        let entity =
            self.entities.entry((write.entity_type, write.entity_id)).or_insert_with_key(|(ty, id)| {
                created = true;
                Entity {
                    entity_type: ty.as_str().into(),
                    entity_id: id.as_str().into(),
                    state: EntityState { version: None, data: Value::Null, deleted: false },
                    newest: None,
                }
            });
        match (write.version, entity.newest) {
            (None, _) => self.unversioned += 1,
            (Some(v), Some(newest)) if v < newest => self.stale.push(StaleOverwrite {
                entity_type: entity.entity_type.to_string(),
                entity_id: entity.entity_id.to_string(),
                version_written: v,
                newer_version_already_written: newest,
                seq,
            }),
            (Some(v), Some(newest)) if v == newest => self.duplicates += 1,
            (Some(v), _) => entity.newest = Some(v),
        }
        entity.state =
            EntityState { version: write.version, data: write.data, deleted: write.op == Op::Delete };
        self.log.push(Record {
            entity_type: entity.entity_type.clone(),
            entity_id: entity.entity_id.clone(),
            version: write.version,
            op: write.op,
            at,
            event_id: write.event_id,
            stream: write.stream,
            job_id: write.job_id,
        });
        Applied { created }
    }

    pub(crate) fn get(&self, entity_type: &str, entity_id: &str) -> Option<EntityState> {
        // The map is keyed by owned strings; a lookup by borrowed pair would need a custom
        // key type, and reads are rare next to writes.
        self.entities.get(&(entity_type.to_string(), entity_id.to_string())).map(|e| e.state.clone())
    }

    /// Every entity as `"<entity_type>/<entity_id>"`.
    pub(crate) fn state(&self) -> BTreeMap<String, EntityState> {
        self.entities
            .values()
            .map(|e| (format!("{}/{}", e.entity_type, e.entity_id), e.state.clone()))
            .collect()
    }

    /// Entries with `seq > since`, at most `limit`.
    pub(crate) fn log(&self, since: u64, limit: usize) -> Vec<LogEntry> {
        let start = usize::try_from(since).unwrap_or(usize::MAX).min(self.log.len());
        self.log[start..]
            .iter()
            .take(limit)
            .zip(start as u64 + 1..)
            .map(|(r, seq)| LogEntry {
                seq,
                entity_type: r.entity_type.to_string(),
                entity_id: r.entity_id.to_string(),
                version: r.version,
                op: r.op,
                at: r.at,
                event_id: r.event_id.as_deref().map(str::to_string),
                stream: r.stream.as_deref().map(str::to_string),
                job_id: r.job_id.as_deref().map(str::to_string),
            })
            .collect()
    }

    pub(crate) fn check(&self) -> CheckReport {
        CheckReport {
            writes: self.log.len() as u64,
            entities: self.entities.len() as u64,
            stale_overwrites: self.stale.clone(),
            duplicate_writes: self.duplicates,
            unversioned_writes: self.unversioned,
            ok: self.stale.is_empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn write(store: &mut Store, id: &str, version: Option<i64>, op: Op) -> Applied {
        let data = if op == Op::Upsert { json!({ "v": version }) } else { Value::Null };
        let write = Write {
            entity_type: "listing".into(),
            entity_id: id.into(),
            version,
            event_id: None,
            op,
            data,
            stream: None,
            job_id: None,
        };
        store.apply(write, Utc::now())
    }

    #[test]
    fn in_order_writes_with_a_duplicate_are_ok() {
        let mut store = Store::default();
        assert!(write(&mut store, "1", Some(1), Op::Upsert).created);
        for v in [2, 2, 3] {
            assert!(!write(&mut store, "1", Some(v), Op::Upsert).created);
        }
        let report = store.check();
        assert!(report.ok);
        assert_eq!((report.writes, report.entities, report.duplicate_writes), (4, 1, 1));
        assert_eq!(store.get("listing", "1").unwrap().data, json!({"v": 3}));
    }

    #[test]
    fn an_older_write_after_a_newer_one_is_stale_and_wins_the_state() {
        let mut store = Store::default();
        write(&mut store, "1", Some(2), Op::Upsert);
        write(&mut store, "2", Some(5), Op::Upsert);
        write(&mut store, "1", Some(1), Op::Upsert);
        write(&mut store, "2", Some(4), Op::Delete);
        write(&mut store, "2", None, Op::Upsert);
        let report = store.check();
        assert!(!report.ok);
        assert_eq!(report.unversioned_writes, 1);
        let stale: Vec<_> = report
            .stale_overwrites
            .iter()
            .map(|s| (s.entity_id.as_str(), s.version_written, s.newer_version_already_written, s.seq))
            .collect();
        assert_eq!(stale, [("1", 1, 2, 3), ("2", 4, 5, 4)]);
        // Like a real API, the last write wins, stale or not.
        assert_eq!(store.get("listing", "1").unwrap().version, Some(1));
    }

    #[test]
    fn log_pages_by_seq() {
        let mut store = Store::default();
        for v in 1..=5 {
            write(&mut store, "1", Some(v), Op::Upsert);
        }
        let page: Vec<_> = store.log(1, 2).iter().map(|e| (e.seq, e.version)).collect();
        assert_eq!(page, [(2, Some(2)), (3, Some(3))]);
        assert!(store.log(5, 10).is_empty());
        assert!(store.log(u64::MAX, 10).is_empty());
        assert_eq!(store.state().keys().collect::<Vec<_>>(), ["listing/1"]);
    }
}
