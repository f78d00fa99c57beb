-- Rows of a job its sinks have applied (or skipped as unchanged, or found superseded, or
-- dead-lettered), counted in id order once the job is published: the job is `completed` when
-- every row is accounted for at every sink it was sent to.
ALTER TABLE jobs ADD COLUMN applied bigint NOT NULL DEFAULT 0;
