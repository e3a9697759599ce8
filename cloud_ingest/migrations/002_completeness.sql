-- Completeness accounting: drops the edges report, watermarks over committed + dropped,
-- and the view that tells missing records from records dropped on purpose.

ALTER TABLE committed_ranges
    ADD COLUMN dropped int8multirange NOT NULL DEFAULT '{}';

CREATE TABLE drop_markers (
    edge_id     text        NOT NULL,
    stream      text        NOT NULL,
    epoch       bigint      NOT NULL,
    first_seq   bigint      NOT NULL,
    last_seq    bigint      NOT NULL,
    count       bigint      NOT NULL,   -- records the edge deleted in that range
    reason      text        NOT NULL,   -- overflow | ttl
    dropped_at  timestamptz NOT NULL,   -- edge clock
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (edge_id, stream, epoch, first_seq)
);

-- The contiguous watermark: every seq up to it is committed or dropped on purpose.
CREATE FUNCTION es_watermark(ranges int8multirange) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(
        (SELECT upper(r) - 1 FROM unnest(ranges) AS r WHERE lower(r) = 1), 0)
$$;

CREATE FUNCTION es_count(ranges int8multirange) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(sum(upper(r) - lower(r)), 0)::bigint FROM unnest(ranges) AS r
$$;

-- v_stream_progress and v_completeness read these: views.sql.
