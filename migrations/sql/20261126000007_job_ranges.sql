-- Parallel readers: a job's source is split, when the job first runs, into key ranges of about
-- equal size (one per reader), each read in id order with its own checkpoint. All readers of a
-- run share one exported snapshot, so together they see the table as of one instant. A range is
-- (after_id, upto_id]: NULL after_id is the table's start, NULL upto_id its end. `jobs.checkpoint`
-- is no longer written.
CREATE TABLE job_ranges (
    job_id     uuid    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    range_no   integer NOT NULL,
    after_id   text,
    upto_id    text,
    -- The last id of this range published and confirmed; NULL before its first chunk.
    checkpoint text,
    done       boolean NOT NULL DEFAULT false,
    PRIMARY KEY (job_id, range_no)
);
