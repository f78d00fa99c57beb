-- The newest version whose sink call has started, per (sink, entity): written before the
-- call, so a consumer that dies between the call and recording it in `applied_versions`
-- leaves a trace. Its event was not acknowledged and will be redelivered; until then an older
-- event of the entity must not be sent, or it could overwrite what the dead consumer's call
-- already wrote. The version rule treats such an older event as stale.
CREATE TABLE sink_intents (
    sink        text        NOT NULL,
    entity_type text        NOT NULL,
    entity_id   text        NOT NULL,
    version     bigint      NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (sink, entity_type, entity_id)
);
