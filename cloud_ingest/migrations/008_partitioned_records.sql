-- Data at rest (issue 13): `records` partitioned by received_at, one partition
-- per UTC day, a retention per stream enforced by dropping whole partitions,
-- and the completeness accounting told what retention retired.
--
-- Why a day (docs/schema.md): retention is enforced a partition at a time, so
-- a partition's width is how long data outlives its retention (at most one day
-- at 30 days, 3 %; a week would be up to 23 %), and 30 to 365 partitions stay
-- well within what the planner prunes cheaply.
--
-- Identity without a primary key: a unique index on a partitioned table must
-- hold the partition key, and a retransmitted record gets a new received_at,
-- so no index can refuse the duplicate. Exactly-once rows rest on
-- committed_ranges instead (cloud_ingest.writing): a writer locks the
-- committed_ranges rows of every key it writes, in key order, and inserts only
-- the seqs those rows do not hold yet; its COMMIT adds them. The one index
-- leads with (edge_id, stream, received_at): it serves the typical query (one
-- stream, one edge, a time range) and the feed, which knows each commit's
-- received_at (every row of a commit shares it; feed_commits.received_at
-- below) and so reads one partition per span.

-- The views that read records (v_records, v_feed) are dropped before this runs and
-- created again after it (views.sql).
ALTER TABLE records RENAME TO records_unpartitioned;
ALTER INDEX records_pkey RENAME TO records_unpartitioned_pkey;
ALTER INDEX records_event_time_idx RENAME TO records_unpartitioned_received_idx;

-- Fixed-width columns first: no alignment padding between them (8 bytes a row).
CREATE TABLE records (
    epoch       bigint      NOT NULL,
    seq         bigint      NOT NULL,
    event_time  timestamptz NOT NULL,   -- as the producer said (edge clock)
    received_at timestamptz NOT NULL,   -- when the cloud ingest wrote it (cloud clock)
    edge_id     text        NOT NULL,
    stream      text        NOT NULL,
    key         text,
    headers     jsonb,
    payload     jsonb,                  -- JSON payloads
    payload_raw bytea,                  -- opaque payloads, byte for byte
    CONSTRAINT records_payload_check CHECK ((payload IS NULL) <> (payload_raw IS NULL))
) PARTITION BY RANGE (received_at);

CREATE INDEX records_identity_idx ON records (edge_id, stream, received_at, epoch, seq);
CREATE INDEX records_received_idx ON records USING brin (received_at);

-- One partition per UTC day, named records_pYYYYMMDD. Created as a table of
-- its own and then attached: ATTACH takes SHARE UPDATE EXCLUSIVE on records
-- (writers and readers go on), where CREATE TABLE ... PARTITION OF would take
-- ACCESS EXCLUSIVE. The advisory lock makes concurrent callers (several ingest
-- processes, the CLI) take turns. Returns the partition's name when created now.
CREATE FUNCTION es_records_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    name text := 'records_p' || to_char(day, 'YYYYMMDD');
BEGIN
    FOR i IN 1..2 LOOP  -- look, then look again under the lock
        IF EXISTS (SELECT 1 FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
                   WHERE h.inhparent = 'records'::regclass AND c.relname = name) THEN
            RETURN NULL;
        END IF;
        IF i = 1 THEN
            PERFORM pg_advisory_xact_lock(7306078180709066096);  -- 'edgepart'
        END IF;
    END LOOP;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I '
                   '(LIKE records INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
    EXECUTE format('ALTER TABLE records ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   name, day::timestamp AT TIME ZONE 'UTC',
                   (day + 1)::timestamp AT TIME ZONE 'UTC');
    RETURN name;
END
$$;

-- The partitions of the days from `first` to today + `ahead` (UTC) that are
-- missing; returns the names created now.
CREATE FUNCTION es_ensure_records_partitions(first date, ahead int) RETURNS SETOF text
LANGUAGE sql AS $$
    SELECT p FROM generate_series(first, (now() AT TIME ZONE 'UTC')::date + ahead,
                                  interval '1 day') AS d,
                  es_records_partition(d::date) AS p
    WHERE p IS NOT NULL
$$;

-- Move the rows: a partition for every day they span, and today's and the
-- next days' ahead of the ingest.
SELECT count(*) FROM es_ensure_records_partitions(
    coalesce((SELECT min(received_at) AT TIME ZONE 'UTC' FROM records_unpartitioned)::date,
             (now() AT TIME ZONE 'UTC')::date), 3);
INSERT INTO records (epoch, seq, event_time, received_at, edge_id, stream, key, headers,
                     payload, payload_raw)
    SELECT epoch, seq, event_time, received_at, edge_id, stream, key, headers,
           payload, payload_raw
    FROM records_unpartitioned;
DROP TABLE records_unpartitioned;

-- Every row of a commit has the same received_at (one per group, or the
-- replay's); readers use it to read one partition per span. NULL for a commit
-- that inserted no rows.
ALTER TABLE feed_commits ADD COLUMN received_at timestamptz;
CREATE INDEX feed_commits_received_idx ON feed_commits (received_at);
UPDATE feed_commits c SET received_at = (
    SELECT r.received_at FROM records r
    WHERE (r.edge_id, r.stream, r.epoch, r.seq)
        = (c.edge_ids[1], c.streams[1], c.epochs[1], c.first_seqs[1])
    LIMIT 1)
WHERE c.rows > 0;
-- v_feed reads one partition per span through it (views.sql).

-- Retention: how long each stream's rows are kept ('*' = streams without a
-- setting of their own; no row at all = kept forever). A day partition is
-- dropped once every stream with rows in it is past its retention.
CREATE TABLE stream_retention (
    stream     text        PRIMARY KEY,
    keep       interval    NOT NULL CHECK (keep >= interval '1 hour'),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- What retention removed: committed seqs that are no longer in records on
-- purpose. They stay in committed_ranges.ranges (they were committed, the
-- watermark and a redelivery's de-duplication still count them), so they never
-- show up as missing; `retired` says which of them are gone.
ALTER TABLE committed_ranges
    ADD COLUMN retired int8multirange NOT NULL DEFAULT '{}';

CREATE TABLE retired_partitions (
    name       text        PRIMARY KEY,
    lower_at   timestamptz NOT NULL,
    upper_at   timestamptz NOT NULL,
    rows       bigint      NOT NULL,
    keys       integer     NOT NULL,   -- (edge, stream, epoch) with rows in it
    streams    text[]      NOT NULL,
    retired_at timestamptz NOT NULL DEFAULT now()
);

-- The feed's retention: commits whose rows all lie in dropped partitions are
-- deleted with them; the last watermark of each key they carried is kept here,
-- so the completeness at a cursor stays what it was.
CREATE TABLE feed_baseline (
    edge_id   text   NOT NULL,
    stream    text   NOT NULL,
    epoch     bigint NOT NULL,
    watermark bigint NOT NULL,
    upto      bigint NOT NULL,   -- the last commit id folded in
    PRIMARY KEY (edge_id, stream, epoch)
);

-- v_completeness counts retired seqs apart from missing ones (views.sql).
