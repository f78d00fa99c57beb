//! The event envelope: the one JSON shape every event has on every transport.
//!
//! Decoding is strict and cheap to reject: the body size and JSON nesting depth are checked
//! before parsing, then every field is checked on its own so an error names the field and what
//! was expected. Encoding never fails for a validated envelope.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Which stream an event travels on. Live events come from the outbox relay; resync events come
/// from a full resync job and travel on their own topic/exchange so they never delay live ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Live,
    Resync,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Live => "live",
            Stream::Resync => "resync",
        }
    }
}

impl std::fmt::Display for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Stream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "live" => Ok(Stream::Live),
            "resync" => Ok(Stream::Resync),
            other => Err(format!("unknown stream `{other}`: expected `live` or `resync`")),
        }
    }
}

/// One domain event. Field meanings are in DESIGN.md ("The envelope").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "resync event envelope")]
pub struct Envelope {
    /// UUID v7 of this event; the deduplication key.
    pub id: Uuid,
    /// `<entity>.<verb>`, e.g. `listing.updated`; the entity part equals `entity_type`.
    #[serde(rename = "type")]
    #[schemars(regex(pattern = r"^[a-z][a-z0-9_]{0,63}\.[a-z][a-z0-9_]{0,63}$"))]
    pub event_type: String,
    /// What kind of entity the event is about, e.g. `listing`.
    #[schemars(regex(pattern = r"^[a-z][a-z0-9_]{0,63}$"))]
    pub entity_type: String,
    /// The entity's id in the producer's database, as text.
    #[schemars(length(min = 1, max = 256))]
    pub entity_id: String,
    /// The entity's version: strictly increasing per entity, assigned by the producer's database.
    #[schemars(range(min = 1))]
    pub version: i64,
    /// `live` or `resync`.
    pub stream: Stream,
    /// The resync job that emitted this event; required on the resync stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<Uuid>,
    /// When the change happened (RFC 3339).
    pub occurred_at: DateTime<Utc>,
    /// Tombstone: the entity was deleted; `data` holds its last state or null.
    #[serde(default)]
    pub deleted: bool,
    /// The entity's full state (state transfer, not a diff).
    pub data: Value,
    /// W3C trace context (`00-<trace id>-<span id>-<flags>`), when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"))]
    pub traceparent: Option<String>,
}

/// Limits applied before and while decoding, so a hostile or broken producer cannot make a
/// consumer allocate or recurse without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted body in bytes. SNS and SQS cap messages at 256 KiB, so that is the default.
    pub max_bytes: usize,
    /// Deepest accepted nesting of JSON arrays/objects (the envelope itself is level 1).
    pub max_depth: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_bytes: 256 * 1024, max_depth: 32 }
    }
}

/// Why a body is not a valid envelope. Every variant says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("body is {actual} bytes, more than the limit of {limit} bytes")]
    TooLarge { actual: usize, limit: usize },
    #[error("JSON nesting is deeper than the limit of {limit} levels")]
    TooDeep { limit: usize },
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("body is JSON but not an object: an envelope is a JSON object")]
    NotAnObject,
    #[error("field `{field}` is missing")]
    Missing { field: &'static str },
    #[error("field `{field}` is invalid: {problem}")]
    Invalid { field: &'static str, problem: String },
}

impl EnvelopeError {
    fn invalid(field: &'static str, problem: impl Into<String>) -> Self {
        EnvelopeError::Invalid { field, problem: problem.into() }
    }
}

impl Envelope {
    /// A new live event with a fresh v7 id, stamped now. `event_type` is `<entity>.<verb>`; the
    /// entity type is taken from it. Call [`Envelope::validate`] if the inputs are untrusted.
    pub fn new(event_type: &str, entity_id: impl Into<String>, version: i64, data: Value) -> Self {
        let entity_type = event_type.split('.').next().unwrap_or_default().to_string();
        Self {
            id: Uuid::now_v7(),
            event_type: event_type.to_string(),
            entity_type,
            entity_id: entity_id.into(),
            version,
            stream: Stream::Live,
            job_id: None,
            occurred_at: Utc::now(),
            deleted: false,
            data,
            traceparent: None,
        }
    }

    /// Decodes and validates a message body.
    pub fn decode(body: &[u8], limits: &DecodeLimits) -> Result<Self, EnvelopeError> {
        if body.len() > limits.max_bytes {
            return Err(EnvelopeError::TooLarge { actual: body.len(), limit: limits.max_bytes });
        }
        check_depth(body, limits.max_depth)?;
        let value: Value = serde_json::from_slice(body).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let Value::Object(object) = value else {
            return Err(EnvelopeError::NotAnObject);
        };
        let envelope = from_object(object)?;
        envelope.validate()?;
        Ok(envelope)
    }

    /// Checks the rules a type cannot express: formats, ranges, and agreement between fields.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        let Some((entity, verb)) = self.event_type.split_once('.') else {
            return Err(EnvelopeError::invalid(
                "type",
                format!("`{}` is not of the form `<entity>.<verb>`", self.event_type),
            ));
        };
        if !is_identifier(entity) || !is_identifier(verb) {
            return Err(EnvelopeError::invalid(
                "type",
                format!(
                    "`{}` is not of the form `<entity>.<verb>` (lowercase letters, digits and `_`, \
                     each part starting with a letter, at most 64 characters)",
                    self.event_type
                ),
            ));
        }
        if !is_identifier(&self.entity_type) {
            return Err(EnvelopeError::invalid(
                "entity_type",
                format!(
                    "`{}` must be lowercase letters, digits and `_`, starting with a letter",
                    self.entity_type
                ),
            ));
        }
        if entity != self.entity_type {
            return Err(EnvelopeError::invalid(
                "type",
                format!("`{}` is not about entity_type `{}`", self.event_type, self.entity_type),
            ));
        }
        if self.entity_id.is_empty() || self.entity_id.len() > 256 {
            return Err(EnvelopeError::invalid("entity_id", "must be 1 to 256 bytes long"));
        }
        if self.version < 1 {
            return Err(EnvelopeError::invalid("version", format!("must be >= 1, got {}", self.version)));
        }
        if self.stream == Stream::Resync && self.job_id.is_none() {
            return Err(EnvelopeError::Missing { field: "job_id" });
        }
        if let Some(tp) = self.traceparent.as_deref().filter(|tp| !is_traceparent(tp)) {
            return Err(EnvelopeError::invalid(
                "traceparent",
                format!("`{tp}` is not W3C trace context `00-<32 hex>-<16 hex>-<2 hex>`"),
            ));
        }
        Ok(())
    }

    /// The JSON body of this envelope.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing this type cannot fail: every field is a plain JSON value and map keys are
        // strings.
        serde_json::to_vec(self).expect("envelope serializes to JSON")
    }

    /// The routing metadata that travels beside the body (message attributes, routing key).
    pub fn routing(&self) -> Routing {
        Routing {
            event_type: self.event_type.clone(),
            entity_type: self.entity_type.clone(),
            stream: self.stream,
        }
    }
}

/// Routing metadata copied out of the envelope so brokers can filter without parsing bodies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Routing {
    pub event_type: String,
    pub entity_type: String,
    pub stream: Stream,
}

/// The JSON Schema of the envelope, as checked in at `docs/envelope.schema.json`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(Envelope);
    // A schema is a JSON object; serializing it cannot fail.
    let mut text = serde_json::to_string_pretty(&schema).expect("schema serializes");
    text.push('\n');
    text
}

fn from_object(mut object: Map<String, Value>) -> Result<Envelope, EnvelopeError> {
    Ok(Envelope {
        id: take_parsed(&mut object, "id", "a UUID")?,
        event_type: take_string(&mut object, "type")?,
        entity_type: take_string(&mut object, "entity_type")?,
        entity_id: take_string(&mut object, "entity_id")?,
        version: take(&mut object, "version")?
            .as_i64()
            .ok_or_else(|| EnvelopeError::invalid("version", "must be an integer >= 1"))?,
        stream: take_parsed(&mut object, "stream", "`live` or `resync`")?,
        job_id: take_optional_parsed(&mut object, "job_id", "a UUID")?,
        occurred_at: take_parsed(&mut object, "occurred_at", "an RFC 3339 timestamp")?,
        deleted: match object.remove("deleted") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(_) => return Err(EnvelopeError::invalid("deleted", "must be true or false")),
        },
        data: take(&mut object, "data")?,
        traceparent: match object.remove("traceparent") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(EnvelopeError::invalid("traceparent", "must be a string")),
        },
    })
}

fn take(object: &mut Map<String, Value>, field: &'static str) -> Result<Value, EnvelopeError> {
    object.remove(field).ok_or(EnvelopeError::Missing { field })
}

fn take_string(object: &mut Map<String, Value>, field: &'static str) -> Result<String, EnvelopeError> {
    match take(object, field)? {
        Value::String(s) => Ok(s),
        other => Err(EnvelopeError::invalid(field, format!("must be a string, got {}", kind(&other)))),
    }
}

fn take_parsed<T: serde::de::DeserializeOwned>(
    object: &mut Map<String, Value>,
    field: &'static str,
    expected: &str,
) -> Result<T, EnvelopeError> {
    let value = take(object, field)?;
    serde_json::from_value(value.clone())
        .map_err(|_| EnvelopeError::invalid(field, format!("must be {expected}, got {value}")))
}

fn take_optional_parsed<T: serde::de::DeserializeOwned>(
    object: &mut Map<String, Value>,
    field: &'static str,
    expected: &str,
) -> Result<Option<T>, EnvelopeError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => take_parsed(object, field, expected).map(Some),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z'))
        && s.len() <= 64
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

fn is_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4 && hex(parts[0], 2) && hex(parts[1], 32) && hex(parts[2], 16) && hex(parts[3], 2)
}

/// Rejects bodies nested deeper than `limit` without building them: serde_json would recurse
/// (and has its own hard limit of 128), and a clear error beats a parser error.
fn check_depth(body: &[u8], limit: usize) -> Result<(), EnvelopeError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return Err(EnvelopeError::TooDeep { limit });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({
            "id": "0192f0c1-7d3a-7cc0-8a4e-3f1f2b8c9d10",
            "type": "listing.updated",
            "entity_type": "listing",
            "entity_id": "42",
            "version": 3,
            "stream": "live",
            "occurred_at": "2026-11-24T10:00:00Z",
            "data": {"title": "flat"}
        })
    }

    fn decode(value: &Value) -> Result<Envelope, EnvelopeError> {
        Envelope::decode(value.to_string().as_bytes(), &DecodeLimits::default())
    }

    #[test]
    fn decodes_a_valid_envelope_and_round_trips() {
        let env = decode(&valid()).unwrap();
        assert_eq!(env.version, 3);
        assert!(!env.deleted);
        let again = Envelope::decode(&env.to_bytes(), &DecodeLimits::default()).unwrap();
        assert_eq!(env, again);
    }

    #[test]
    fn missing_fields_are_named() {
        for field in ["id", "type", "entity_type", "entity_id", "version", "stream", "occurred_at", "data"] {
            let mut v = valid();
            v.as_object_mut().unwrap().remove(field);
            assert_eq!(decode(&v), Err(EnvelopeError::Missing { field }), "{field}");
        }
    }

    #[test]
    fn wrong_values_name_the_field() {
        let cases = [
            ("id", json!("nope")),
            ("type", json!("listing")),
            ("type", json!("user.updated")),
            ("type", json!("Listing.Updated")),
            ("version", json!(0)),
            ("version", json!("3")),
            ("stream", json!("fast")),
            ("occurred_at", json!("yesterday")),
            ("entity_id", json!("")),
            ("entity_id", json!(42)),
            ("deleted", json!("yes")),
            ("traceparent", json!("00-abc")),
        ];
        for (field, value) in cases {
            let mut v = valid();
            v[field] = value.clone();
            match decode(&v) {
                Err(EnvelopeError::Invalid { field: f, .. }) => assert_eq!(f, field, "{value}"),
                other => panic!("{field}={value}: expected Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn resync_events_need_a_job_id() {
        let mut v = valid();
        v["stream"] = json!("resync");
        assert_eq!(decode(&v), Err(EnvelopeError::Missing { field: "job_id" }));
        v["job_id"] = json!("0192f0c1-7d3a-7cc0-8a4e-3f1f2b8c9d11");
        assert_eq!(decode(&v).unwrap().stream, Stream::Resync);
    }

    #[test]
    fn size_and_depth_limits_reject_before_parsing() {
        let limits = DecodeLimits { max_bytes: 64, max_depth: 4 };
        let big = valid().to_string();
        assert_eq!(
            Envelope::decode(big.as_bytes(), &limits),
            Err(EnvelopeError::TooLarge { actual: big.len(), limit: 64 })
        );
        let deep = format!("{}{}", "[".repeat(5), "]".repeat(5));
        assert_eq!(Envelope::decode(deep.as_bytes(), &limits), Err(EnvelopeError::TooDeep { limit: 4 }));
        // Brackets inside strings do not count.
        let mut v = valid();
        v["data"] = json!({"s": "[[[[[[[[[[\"]]]]"});
        assert!(decode(&v).is_ok());
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        assert!(matches!(
            Envelope::decode(b"not json", &DecodeLimits::default()),
            Err(EnvelopeError::NotJson(_))
        ));
        assert_eq!(Envelope::decode(b"[1]", &DecodeLimits::default()), Err(EnvelopeError::NotAnObject));
    }

    #[test]
    fn new_derives_entity_type_and_validates() {
        let env = Envelope::new("listing.created", "7", 1, json!({}));
        assert_eq!(env.entity_type, "listing");
        assert_eq!(env.id.get_version_num(), 7);
        env.validate().unwrap();
    }
}
