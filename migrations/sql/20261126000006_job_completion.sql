-- What a job published, per entity (written with each chunk's checkpoint), and how many of
-- those rows its sinks have accounted for: the job is `completed` when every row's version (or
-- a newer one) is applied or dead-lettered at every sink it was sent to. The rows go when the
-- job completes.
ALTER TABLE jobs ADD COLUMN applied bigint NOT NULL DEFAULT 0;

CREATE TABLE job_rows (
    job_id    uuid   NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    entity_id text   NOT NULL,
    version   bigint NOT NULL,
    PRIMARY KEY (job_id, entity_id)
);
