//! The checked-in JSON Schema of the envelope must match the Rust type.
//! Regenerate with `RESYNC_UPDATE_SCHEMAS=1 cargo test -p resync-bus --test it schema`.

#[test]
fn envelope_schema_in_docs_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/envelope.schema.json");
    let generated = resync_bus::envelope::json_schema();
    if std::env::var_os("RESYNC_UPDATE_SCHEMAS").is_some() {
        std::fs::write(path, &generated).expect("write schema");
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/envelope.schema.json is out of date; regenerate it with \
         `RESYNC_UPDATE_SCHEMAS=1 cargo test -p resync-bus --test it schema` and commit it"
    );
}
