-- Events the relay could not route: their entity type has no topic (no service config
-- publishes it, or it is a typo). They are set aside here, with every later event of the same
-- entity type (so an entity's events are never reordered), instead of blocking every other
-- event behind them. `resync outbox release` puts them back in line once a topic exists;
-- `resync outbox drop` gives up on them (they stay in the log).
CREATE TABLE outbox_parked (
    seq         bigint      PRIMARY KEY,
    entity_type text        NOT NULL,
    reason      text        NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX outbox_parked_entity_type_idx ON outbox_parked (entity_type, seq);
