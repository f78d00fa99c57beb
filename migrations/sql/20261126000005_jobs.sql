-- Full resync jobs (`resync job ...`). A job reads a source table in id order in chunks and
-- publishes one resync event per row; after each chunk is confirmed by the broker its last id
-- is checkpointed here, so a runner killed at any point resumes after the last confirmed chunk
-- (re-sending at most one chunk, which the version rule makes harmless).
CREATE TABLE jobs (
    id            uuid        PRIMARY KEY,
    entity_type   text        NOT NULL,
    -- running | paused | cancelled | completed | failed
    status        text        NOT NULL,
    -- What was asked for: source, filter, rate, target (the runner's input on resume).
    spec          jsonb       NOT NULL,
    -- The last id published and confirmed, as text; NULL before the first chunk.
    checkpoint    text,
    emitted       bigint      NOT NULL DEFAULT 0,
    -- Rows the job will send, counted when it started.
    total         bigint,
    error         text,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at   timestamptz
);
