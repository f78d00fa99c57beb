-- Entities with an event dead-lettered, per sink (the newest such version): what a resync of
-- "only the rejected entities" resends once the cause is fixed. An entity applied later at
-- that version or a newer one is no longer rejected; readers compare with applied_versions
-- rather than the consumer deleting rows on every apply (a write per event).
CREATE TABLE dead_lettered_entities (
    sink             text        NOT NULL,
    entity_type      text        NOT NULL,
    entity_id        text        NOT NULL,
    version          bigint      NOT NULL,
    reason           text        NOT NULL,
    detail           text        NOT NULL DEFAULT '',
    dead_lettered_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (sink, entity_type, entity_id)
);
