//! The checked-in JSON Schema of the service config format must match the Rust types.
//! Regenerate with `RESYNC_UPDATE_SCHEMAS=1 cargo test -p fare-config --test it schema`.

#[test]
fn service_config_schema_in_docs_is_current() {
    resync_testkit::assert_generated_file_current(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/fare-config.schema.json"),
        &fare_config::config::json_schema(),
        "RESYNC_UPDATE_SCHEMAS=1 cargo test -p fare-config --test it schema",
    );
}
