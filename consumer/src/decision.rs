//! The version rule as a pure function: what to do with an event given what the sink already
//! has. All I/O lives around it (see `process`).

use sha2::{Digest, Sha256};

/// What a consumer recorded as applied to a sink for one entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: i64,
    pub content_hash: Vec<u8>,
}

/// How an event of exactly the version a sink already has is treated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Resend {
    /// A duplicate, never sent: live events and redeliveries.
    #[default]
    Never,
    /// Sent again: a resync event (the third party may hold something else than what was
    /// recorded, e.g. after a bug in the sync was fixed).
    Always,
    /// Sent again unless its content equals what the sink has (a resync with
    /// `--skip-unchanged`).
    IfChanged,
}

/// What to do with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Never applied, or older state applied: call the sink.
    Apply,
    /// Newer than what was applied, but the same content: record the version, skip the call.
    SkipUnchanged,
    /// This exact version was applied already (a redelivery or duplicate publish).
    Duplicate,
    /// A newer version was applied already: sending this would overwrite newer state.
    Stale,
}

/// The version rule from DESIGN.md: only a strictly newer version may reach the sink, and an
/// unchanged state need not.
///
/// `started` is the newest version whose sink call started (see `sink_intents`). If it is newer
/// than both this event and what was recorded as applied, a consumer died (or gave up) between
/// that call and recording it: the call may have landed, and its event, unacknowledged, will
/// be redelivered and applied. This older event is stale already and must not overwrite it.
pub fn decide(
    event_version: i64,
    event_hash: &[u8],
    applied: Option<&Applied>,
    started: Option<i64>,
    resend: Resend,
) -> Decision {
    let applied_version = applied.map_or(0, |a| a.version);
    if started.is_some_and(|s| s > event_version && s > applied_version) {
        return Decision::Stale;
    }
    match applied {
        None => Decision::Apply,
        Some(a) if a.version > event_version => Decision::Stale,
        Some(a) if a.version == event_version => match resend {
            Resend::Never => Decision::Duplicate,
            Resend::IfChanged if a.content_hash == event_hash => Decision::SkipUnchanged,
            Resend::Always | Resend::IfChanged => Decision::Apply,
        },
        // A resync re-sends whatever the record says: the third party may hold something else
        // (and an unchanged live update left it at the older version).
        Some(a) if a.content_hash == event_hash && resend != Resend::Always => Decision::SkipUnchanged,
        Some(_) => Decision::Apply,
    }
}

/// SHA-256 of the entity state as the sink would receive it. serde_json serialises objects
/// with sorted keys, so equal states hash equally whatever order the producer wrote.
pub fn content_hash(data: &serde_json::Value, deleted: bool) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update([u8::from(deleted)]);
    hasher.update(serde_json::to_vec(data).unwrap_or_default());
    hasher.finalize().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn applied(version: i64, data: serde_json::Value) -> Applied {
        Applied { version, content_hash: content_hash(&data, false) }
    }

    #[test]
    fn an_older_event_is_stale_while_a_newer_call_may_have_landed_unrecorded() {
        let a = applied(5, json!({"x": 1}));
        let hash = content_hash(&json!({"x": 2}), false);
        assert_eq!(
            decide(6, &hash, Some(&a), Some(7), Resend::Never),
            Decision::Stale,
            "7 may be at the sink already"
        );
        assert_eq!(
            decide(7, &hash, Some(&a), Some(7), Resend::Never),
            Decision::Apply,
            "7 itself is re-sent"
        );
        assert_eq!(decide(8, &hash, Some(&a), Some(7), Resend::Never), Decision::Apply);
        assert_eq!(decide(6, &hash, Some(&applied(7, json!({}))), Some(7), Resend::Never), Decision::Stale);
        assert_eq!(
            decide(1, &hash, None, Some(2), Resend::Never),
            Decision::Stale,
            "also before anything was recorded"
        );
        assert_eq!(
            decide(9, &hash, Some(&applied(8, json!({}))), Some(7), Resend::Never),
            Decision::Apply,
            "an old intent is moot"
        );
    }

    #[test]
    fn first_event_of_an_entity_is_applied() {
        assert_eq!(decide(1, &content_hash(&json!({}), false), None, None, Resend::Never), Decision::Apply);
    }

    #[test]
    fn older_and_equal_versions_are_never_sent() {
        let a = applied(5, json!({"x": 1}));
        assert_eq!(
            decide(4, &content_hash(&json!({"x": 0}), false), Some(&a), None, Resend::Never),
            Decision::Stale
        );
        assert_eq!(
            decide(5, &content_hash(&json!({"x": 1}), false), Some(&a), None, Resend::Never),
            Decision::Duplicate
        );
        // Even with different content: a same-version event is a duplicate by definition.
        assert_eq!(
            decide(5, &content_hash(&json!({"x": 9}), false), Some(&a), None, Resend::Never),
            Decision::Duplicate
        );
    }

    #[test]
    fn newer_versions_apply_unless_unchanged() {
        let a = applied(5, json!({"x": 1, "y": 2}));
        assert_eq!(
            decide(6, &content_hash(&json!({"x": 2, "y": 2}), false), Some(&a), None, Resend::Never),
            Decision::Apply
        );
        // Key order does not matter.
        assert_eq!(
            decide(6, &content_hash(&json!({"y": 2, "x": 1}), false), Some(&a), None, Resend::Never),
            Decision::SkipUnchanged
        );
    }

    #[test]
    fn resync_events_resend_an_equal_version_unless_asked_to_skip_unchanged_content() {
        let a = applied(5, json!({"x": 1}));
        let same = content_hash(&json!({"x": 1}), false);
        let other = content_hash(&json!({"x": 2}), false);
        assert_eq!(decide(5, &same, Some(&a), None, Resend::Always), Decision::Apply);
        assert_eq!(decide(5, &same, Some(&a), None, Resend::IfChanged), Decision::SkipUnchanged);
        assert_eq!(decide(5, &other, Some(&a), None, Resend::IfChanged), Decision::Apply);
        assert_eq!(decide(4, &same, Some(&a), None, Resend::Always), Decision::Stale, "never older");
    }

    #[test]
    fn a_resync_event_newer_than_the_record_is_sent_even_with_unchanged_content() {
        // A live update that changed nothing was recorded without a call: the third party
        // still holds the older version. The resync must send the newer one.
        let a = applied(5, json!({"x": 1}));
        let same = content_hash(&json!({"x": 1}), false);
        assert_eq!(decide(6, &same, Some(&a), None, Resend::Always), Decision::Apply);
        assert_eq!(decide(6, &same, Some(&a), None, Resend::IfChanged), Decision::SkipUnchanged);
        assert_eq!(decide(6, &same, Some(&a), None, Resend::Never), Decision::SkipUnchanged);
    }

    #[test]
    fn a_tombstone_is_a_change_even_with_the_same_data() {
        let a = applied(5, json!({"x": 1}));
        assert_eq!(
            decide(6, &content_hash(&json!({"x": 1}), true), Some(&a), None, Resend::Never),
            Decision::Apply
        );
    }
}
