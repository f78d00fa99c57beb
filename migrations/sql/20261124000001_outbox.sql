-- The transactional outbox and the event log.
--
-- Written without schema prefixes: `resync migrate` runs it with search_path set to the target
-- schema (`resync` by default), and every function pins that search_path.

-- The last version assigned per entity. `emit` bumps it under a row lock, so versions are
-- strictly increasing per entity and concurrent writers of one entity serialise here.
CREATE TABLE entity_versions (
    entity_type text   NOT NULL,
    entity_id   text   NOT NULL,
    version     bigint NOT NULL,
    PRIMARY KEY (entity_type, entity_id)
);

-- Every event ever emitted, in the global order the database assigned (`seq`). Kept after
-- publishing as a replayable log; `resync outbox prune` trims it.
CREATE TABLE outbox (
    seq         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          uuid        NOT NULL,
    event_type  text        NOT NULL,
    entity_type text        NOT NULL,
    entity_id   text        NOT NULL,
    version     bigint      NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    deleted     boolean     NOT NULL DEFAULT false,
    data        jsonb       NOT NULL,
    traceparent text
);
CREATE INDEX outbox_occurred_at_idx ON outbox (occurred_at);
CREATE INDEX outbox_entity_type_seq_idx ON outbox (entity_type, seq);

-- Committed events the relay has not yet had confirmed by the broker. A separate narrow table
-- (rather than a flag on `outbox`) because the relay deletes from it at publishing speed.
-- An event becomes visible here only when its transaction commits, so the relay can never
-- skip an event committed late by a long transaction.
CREATE TABLE outbox_pending (
    seq bigint PRIMARY KEY
);

-- A UUID v7 (RFC 9562): 48-bit Unix milliseconds, version 7, random rest.
CREATE FUNCTION uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE
AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- Records one domain event in the caller's transaction. Callable from any language:
--   SELECT * FROM resync.emit('listing', '42', 'listing.updated', '{"title":"flat"}');
-- Returns the event's global sequence number, id and the entity version it was given.
CREATE FUNCTION emit(
    p_entity_type text,
    p_entity_id   text,
    p_type        text,
    p_data        jsonb,
    p_deleted     boolean DEFAULT false,
    p_traceparent text    DEFAULT NULL
) RETURNS TABLE (seq bigint, id uuid, version bigint)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_version bigint;
    v_id      uuid := uuid_v7();
    v_seq     bigint;
BEGIN
    IF p_type IS NULL OR p_type !~ '^[a-z][a-z0-9_]{0,63}\.[a-z][a-z0-9_]{0,63}$' THEN
        RAISE EXCEPTION 'resync.emit: event type "%" is not <entity>.<verb> (lowercase letters, digits, _)', p_type
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF split_part(p_type, '.', 1) IS DISTINCT FROM p_entity_type THEN
        RAISE EXCEPTION 'resync.emit: event type "%" is not about entity type "%"', p_type, p_entity_type
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_entity_id IS NULL OR length(p_entity_id) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'resync.emit: entity id must be 1 to 256 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The envelope around data must fit the 256 KiB SNS/SQS message limit.
    IF octet_length(coalesce(p_data, 'null'::jsonb)::text) > 240 * 1024 THEN
        RAISE EXCEPTION 'resync.emit: data of % %:% is % bytes, more than 240 KiB',
            p_type, p_entity_type, p_entity_id, octet_length(p_data::text)
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF p_traceparent IS NOT NULL AND p_traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' THEN
        RAISE EXCEPTION 'resync.emit: traceparent "%" is not W3C trace context', p_traceparent
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO entity_versions AS ev (entity_type, entity_id, version)
    VALUES (p_entity_type, p_entity_id, 1)
    ON CONFLICT (entity_type, entity_id) DO UPDATE SET version = ev.version + 1
    RETURNING ev.version INTO v_version;

    INSERT INTO outbox AS o (id, event_type, entity_type, entity_id, version, deleted, data, traceparent)
    VALUES (v_id, p_type, p_entity_type, p_entity_id, v_version, coalesce(p_deleted, false),
            coalesce(p_data, 'null'::jsonb), p_traceparent)
    RETURNING o.seq INTO v_seq;

    INSERT INTO outbox_pending (seq) VALUES (v_seq);
    -- Delivered at commit, once per transaction: wakes the relay.
    PERFORM pg_notify('resync_outbox_' || current_schema(), '');

    RETURN QUERY SELECT v_seq, v_id, v_version;
END
$$;
