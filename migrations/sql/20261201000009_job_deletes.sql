-- Tombstones a job sent (`job start --delete-missing`) for entities its sink held as present
-- that the source table no longer had.
ALTER TABLE jobs ADD COLUMN deleted bigint NOT NULL DEFAULT 0;
