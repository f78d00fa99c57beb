-- What each consumer has applied to each sink, per entity: the version rule's memory.
--
-- An event whose version is not newer than `version` is acknowledged as stale or duplicate and
-- never sent. `content_hash` lets an unchanged state skip the sink call. `data`/`deleted` keep
-- the newest applied state so a consumer that finds a newer version recorded after its own
-- call (its lock was lost mid-call) can re-send that newest state: no stale write survives.
CREATE TABLE applied_versions (
    sink         text        NOT NULL,
    entity_type  text        NOT NULL,
    entity_id    text        NOT NULL,
    version      bigint      NOT NULL,
    content_hash bytea       NOT NULL,
    deleted      boolean     NOT NULL,
    data         jsonb       NOT NULL,
    event_id     uuid        NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (sink, entity_type, entity_id)
);

-- Streams an operator paused (`resync pause --service S --stream live`). Consumers poll this
-- and stop taking messages from a paused stream's queue; messages accumulate in the queue.
CREATE TABLE paused_streams (
    service   text        NOT NULL,
    stream    text        NOT NULL CHECK (stream IN ('live', 'resync')),
    paused_at timestamptz NOT NULL DEFAULT now(),
    reason    text,
    PRIMARY KEY (service, stream)
);
