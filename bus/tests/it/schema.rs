//! The checked-in JSON Schema of the envelope must match the Rust type.
//! Regenerate with `RESYNC_UPDATE_SCHEMAS=1 cargo test -p resync-bus --test it schema`.

#[test]
fn envelope_schema_in_docs_is_current() {
    resync_testkit::assert_generated_file_current(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/envelope.schema.json"),
        &resync_bus::envelope::json_schema(),
        "RESYNC_UPDATE_SCHEMAS=1 cargo test -p resync-bus --test it schema",
    );
}
