-- Lost after commit: seqs the cloud once committed (the edge trimmed them on its
-- committed watermark) and no longer holds, e.g. after PostgreSQL was restored
-- from an older backup. The edge's heartbeat reports its trim floor per
-- (stream, epoch); whatever below it is neither committed, dropped nor already
-- known lost is recorded here, so the watermark moves on and the loss is a
-- number anyone can query rather than a stalled stream.

ALTER TABLE committed_ranges
    ADD COLUMN lost_after_commit int8multirange NOT NULL DEFAULT '{}';

-- Every accounted seq moves the watermark: committed, dropped, dead-lettered
-- (004), lost after commit (cloud_ingest.ranges.accounted is the same rule); the
-- views v_stream_progress and v_completeness say so (views.sql).
