//! The checked-in JSON Schema of the service config format must match the Rust types.
//! Regenerate with `RESYNC_UPDATE_SCHEMAS=1 cargo test -p fare-config --test it schema`.

#[test]
fn service_config_schema_in_docs_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/fare-config.schema.json");
    let generated = fare_config::config::json_schema();
    if std::env::var_os("RESYNC_UPDATE_SCHEMAS").is_some() {
        std::fs::write(path, &generated).expect("write schema");
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/fare-config.schema.json is out of date; regenerate it with \
         `RESYNC_UPDATE_SCHEMAS=1 cargo test -p fare-config --test it schema` and commit it"
    );
}
