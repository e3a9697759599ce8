-- Lost after commit: seqs the cloud once committed (the edge trimmed them on its
-- committed watermark) and no longer holds, e.g. after PostgreSQL was restored
-- from an older backup. The edge's heartbeat reports its trim floor per
-- (stream, epoch); whatever below it is neither committed, dropped nor already
-- known lost is recorded here, so the watermark moves on and the loss is a
-- number anyone can query rather than a stalled stream.

ALTER TABLE committed_ranges
    ADD COLUMN lost_after_commit int8multirange NOT NULL DEFAULT '{}';

-- Every accounted seq moves the watermark: committed, dropped, dead-lettered
-- (004), lost after commit (cloud_ingest.ranges.accounted is the same rule).
CREATE OR REPLACE VIEW v_stream_progress AS
    SELECT edge_id, stream, epoch,
           es_count(ranges) AS committed_records,
           ranges AS committed_ranges,
           es_watermark(ranges + dropped + dead_lettered + lost_after_commit)
               AS committed_watermark,
           coalesce(upper(ranges + dropped + dead_lettered + lost_after_commit) - 1, 0)
               AS highest_seq,
           updated_at
    FROM committed_ranges;

DROP VIEW v_completeness;
CREATE VIEW v_completeness AS
    SELECT c.edge_id, c.stream, c.epoch,
           es_count(c.ranges) AS committed_records,
           c.ranges AS committed_ranges,
           es_watermark(c.ranges + c.dropped + c.dead_lettered + c.lost_after_commit)
               AS watermark,
           coalesce(upper(c.ranges + c.dropped + c.dead_lettered + c.lost_after_commit) - 1, 0)
               AS highest_seq,
           c.dropped - c.ranges AS dropped_ranges,
           es_count(c.dropped - c.ranges) AS dropped_records,
           coalesce((SELECT sum(d.count) FILTER (WHERE d.reason = 'overflow')
                     FROM drop_markers d WHERE (d.edge_id, d.stream, d.epoch)
                     = (c.edge_id, c.stream, c.epoch)), 0)::bigint AS dropped_overflow,
           coalesce((SELECT sum(d.count) FILTER (WHERE d.reason = 'ttl')
                     FROM drop_markers d WHERE (d.edge_id, d.stream, d.epoch)
                     = (c.edge_id, c.stream, c.epoch)), 0)::bigint AS dropped_ttl,
           c.dead_lettered - c.ranges - c.dropped AS dead_lettered_ranges,
           es_count(c.dead_lettered - c.ranges - c.dropped) AS dead_lettered_records,
           int8multirange(int8range(1, coalesce(
               upper(c.ranges + c.dropped + c.dead_lettered + c.lost_after_commit), 1)))
               - c.ranges - c.dropped - c.dead_lettered - c.lost_after_commit
               AS missing_ranges,
           es_count(int8multirange(int8range(1, coalesce(
               upper(c.ranges + c.dropped + c.dead_lettered + c.lost_after_commit), 1)))
               - c.ranges - c.dropped - c.dead_lettered - c.lost_after_commit)
               AS missing_records,
           (e.streams -> c.stream ->> 'oldest_uncommitted_age_s')::double precision
               AS lag_seconds,
           c.updated_at,
           c.lost_after_commit - c.ranges - c.dropped - c.dead_lettered
               AS lost_after_commit_ranges,
           es_count(c.lost_after_commit - c.ranges - c.dropped - c.dead_lettered)
               AS lost_after_commit_records
    FROM committed_ranges c
    LEFT JOIN edges e ON e.edge_id = c.edge_id
        AND (e.streams -> c.stream ->> 'epoch')::bigint = c.epoch;
