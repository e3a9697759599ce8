-- The views: the stable contract analytics read (docs/schema.md), each defined once,
-- in its final form. They are not numbered migrations: the runner (cloud_ingest.schema)
-- drops every view named here at the start of each pending migration's transaction and,
-- before that transaction commits, creates again those whose `-- @since NNN` is at or
-- below the migration just applied (the version whose tables the final form reads).
-- So migrations change tables and data only, never a view, and at every committed
-- version exactly the views it can hold exist. To change a view: edit it here, raise its
-- @since to the new migration's number, and add that migration (even one holding only a
-- comment): views are re-created only when a migration is applied. docs/schema.md.

-- @since 010
-- Every record, once; raw-bytes payloads as a base64 JSON string. The names of
-- (edge, stream, epoch) come from the dictionary (010); json is cast back to jsonb.
CREATE VIEW v_records AS
    SELECT k.edge_id, k.stream, k.epoch, r.seq, r.event_time, r.received_at, r.key,
           r.headers::jsonb AS headers,
           coalesce(r.payload::jsonb, to_jsonb(encode(r.payload_raw, 'base64'))) AS payload,
           r.payload IS NULL AS payload_is_binary
    FROM records r
    JOIN stream_keys k ON k.id = r.stream_key;

-- @since 003
CREATE VIEW v_commands AS
    SELECT id, edge_id, kind, spec, issuer, status, code, reason, result,
           issued_at, expires_at, published_at, delivered_at, finished_at, finished_by
    FROM commands;

-- @since 005
-- Every accounted seq moves the watermark: committed, dropped, dead-lettered
-- (004), lost after commit (005) (cloud_ingest.ranges.accounted is the same rule).
CREATE VIEW v_stream_progress AS
    SELECT edge_id, stream, epoch,
           es_count(ranges) AS committed_records,
           ranges AS committed_ranges,
           es_watermark(ranges + dropped + dead_lettered + lost_after_commit)
               AS committed_watermark,
           coalesce(upper(ranges + dropped + dead_lettered + lost_after_commit) - 1, 0)
               AS highest_seq,
           updated_at
    FROM committed_ranges;

-- @since 008
-- Missing records told from those dropped on purpose, dead-lettered, lost after
-- commit (the edge trimmed them, the cloud no longer holds them) or retired by retention.
-- The dropped counts are the edges' own claims, summed: held within bigint (changed with
-- 014, which only makes databases past 008 create the views again; the form reads 008's
-- tables, so its @since stays).
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
           least(coalesce((SELECT sum(d.count) FILTER (WHERE d.reason = 'overflow')
                           FROM drop_markers d WHERE (d.edge_id, d.stream, d.epoch)
                           = (c.edge_id, c.stream, c.epoch)), 0),
                 9223372036854775807)::bigint AS dropped_overflow,
           least(coalesce((SELECT sum(d.count) FILTER (WHERE d.reason = 'ttl')
                           FROM drop_markers d WHERE (d.edge_id, d.stream, d.epoch)
                           = (c.edge_id, c.stream, c.epoch)), 0),
                 9223372036854775807)::bigint AS dropped_ttl,
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
               AS lost_after_commit_records,
           c.retired AS retired_ranges,
           es_count(c.retired) AS retired_records
    FROM committed_ranges c
    LEFT JOIN edges e ON e.edge_id = c.edge_id
        AND (e.streams -> c.stream ->> 'epoch')::bigint = c.epoch;

-- @since 010
-- The feed as analytics read it: one row per committed row, with its position
-- (docs/analytics.md); every row of a commit shares its received_at (008), and a
-- commit's rows of one key are found through the seq's bucket (seq >> 7, 010).
CREATE VIEW v_feed AS
    SELECT (c.commit_id << 24) | (s.base + r.seq - s.first_seq) AS position,
           c.commit_id, c.committed_at, s.edge_id, s.stream, s.epoch, r.seq,
           r.event_time, r.received_at, r.key, r.headers::jsonb AS headers,
           coalesce(r.payload::jsonb, to_jsonb(encode(r.payload_raw, 'base64'))) AS payload,
           r.payload IS NULL AS payload_is_binary
    FROM feed_commits c
    CROSS JOIN LATERAL (
        SELECT u.edge_id, u.stream, u.epoch, u.first_seq, u.last_seq,
               coalesce(sum(u.last_seq - u.first_seq + 1) OVER (
                   ORDER BY u.i ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)::bigint
                   AS base
        FROM unnest(c.edge_ids, c.streams, c.epochs, c.first_seqs, c.last_seqs)
             WITH ORDINALITY AS u(edge_id, stream, epoch, first_seq, last_seq, i)
    ) s
    JOIN stream_keys k ON (k.edge_id, k.stream, k.epoch) = (s.edge_id, s.stream, s.epoch)
    JOIN records r ON r.stream_key = k.id
                  AND r.seq BETWEEN s.first_seq AND s.last_seq
                  AND (r.seq >> 7) BETWEEN (s.first_seq >> 7) AND (s.last_seq >> 7)
                  AND (c.received_at IS NULL OR r.received_at = c.received_at)
    WHERE c.commit_id IS NOT NULL;

-- @since 009
CREATE VIEW v_edge_desired_state AS
    SELECT d.edge_id, v.target_kind, v.target, v.version, d.version_id, d.revision,
           d.rollout_id, d.assigned_at, r.status AS reported_status,
           r.revision = d.revision AS reported_current, r.reason, r.reported_at,
           (SELECT count(*) FROM edge_drift x WHERE x.edge_id = d.edge_id) AS drift_fields
    FROM edge_desired d
    LEFT JOIN desired_versions v ON v.id = d.version_id
    LEFT JOIN edge_reported_state r ON r.edge_id = d.edge_id;

-- @since 009
-- Drift with the latest applied imperative command on the same object, if any: an
-- operator's `edgesync cmd scale` that diverged from the desired state shows here.
CREATE VIEW v_edge_drift AS
    SELECT x.edge_id, x.path, x.desired, x.observed, x.revision, x.since,
           c.id AS command_id, c.kind AS command_kind, c.issuer AS command_issuer,
           c.finished_at AS command_applied_at
    FROM edge_drift x
    LEFT JOIN LATERAL (
        SELECT id, kind, issuer, finished_at FROM commands
        WHERE commands.edge_id = x.edge_id AND status = 'applied'
          AND x.path LIKE CASE WHEN kind = 'configmap.patch' THEN 'configmaps.'
                               ELSE 'deployments.' END
                          || (spec->>'namespace') || '/' || (spec->>'name') || '.%'
        ORDER BY finished_at DESC LIMIT 1
    ) c ON true;

-- @since 009
CREATE VIEW v_rollout_progress AS
    SELECT rollout_id, wave, count(*) AS edges,
           count(*) FILTER (WHERE status = 'waiting') AS waiting,
           count(*) FILTER (WHERE status = 'dispatched') AS pending,
           count(*) FILTER (WHERE status = 'healthy') AS healthy,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'superseded') AS superseded,
           count(*) FILTER (WHERE status IN ('rolling_back', 'rolled_back')) AS rolled_back
    FROM rollout_edges GROUP BY rollout_id, wave;
