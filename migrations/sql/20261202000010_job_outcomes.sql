-- What each sink's consumers did with a job's events, counted per batch (one upsert per batch
-- that holds resync events): applied, skipped unchanged, stale, duplicate, dead-lettered, ...
-- Written by the consumers; read by `resync job show`.
CREATE TABLE job_outcomes (
    job_id  uuid   NOT NULL,
    sink    text   NOT NULL,
    outcome text   NOT NULL,
    events  bigint NOT NULL,
    PRIMARY KEY (job_id, sink, outcome)
);
