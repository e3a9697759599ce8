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

CREATE OR REPLACE VIEW v_stream_progress AS
    SELECT edge_id, stream, epoch,
           es_count(ranges) AS committed_records,
           ranges AS committed_ranges,
           es_watermark(ranges + dropped) AS committed_watermark,
           coalesce(upper(ranges + dropped) - 1, 0) AS highest_seq,
           updated_at
    FROM committed_ranges;

CREATE VIEW v_completeness AS
    SELECT c.edge_id, c.stream, c.epoch,
           es_count(c.ranges) AS committed_records,
           c.ranges AS committed_ranges,
           es_watermark(c.ranges + c.dropped) AS watermark,
           coalesce(upper(c.ranges + c.dropped) - 1, 0) AS highest_seq,
           c.dropped - c.ranges AS dropped_ranges,
           es_count(c.dropped - c.ranges) AS dropped_records,
           coalesce((SELECT sum(d.count) FILTER (WHERE d.reason = 'overflow')
                     FROM drop_markers d WHERE (d.edge_id, d.stream, d.epoch)
                     = (c.edge_id, c.stream, c.epoch)), 0)::bigint AS dropped_overflow,
           coalesce((SELECT sum(d.count) FILTER (WHERE d.reason = 'ttl')
                     FROM drop_markers d WHERE (d.edge_id, d.stream, d.epoch)
                     = (c.edge_id, c.stream, c.epoch)), 0)::bigint AS dropped_ttl,
           int8multirange(int8range(1, coalesce(upper(c.ranges + c.dropped), 1)))
               - c.ranges - c.dropped AS missing_ranges,
           es_count(int8multirange(int8range(1, coalesce(upper(c.ranges + c.dropped), 1)))
               - c.ranges - c.dropped) AS missing_records,
           (e.streams -> c.stream ->> 'oldest_uncommitted_age_s')::double precision
               AS lag_seconds,
           c.updated_at
    FROM committed_ranges c
    LEFT JOIN edges e ON e.edge_id = c.edge_id
        AND (e.streams -> c.stream ->> 'epoch')::bigint = c.epoch;
