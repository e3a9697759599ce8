-- Compact rows at rest (issue 13: bytes on disk per record <= 1.6x the payload's
-- JSON). A ~180-byte telemetry record cost ~460 bytes as migration 008 stored it:
-- the payload as jsonb (a binary tree bigger than the JSON text), the edge id,
-- stream and epoch repeated in every row, a 10-column tuple header (32 bytes), and
-- an identity index holding (edge, stream, received_at, epoch, seq) per row.
--
-- The new row (docs/schema.md):
-- * the payload (and headers) as `json`: the JSON text verbatim, as the producer
--   sent it. PostgreSQL still checks it is JSON on the way in, and the ingest's
--   validator (broker.protocol.validation) admits only JSON jsonb can hold, so
--   every view casts it back to jsonb;
-- * (edge, stream, epoch) as one integer, `stream_key`, from the dictionary
--   `stream_keys` (rows only ever added; the writer caches it). That leaves 8
--   columns, whose null bitmap fits the 24-byte tuple header;
-- * one btree on (stream_key, received_at, seq >> 7): every row of a commit shares its
--   received_at, so btree deduplication stores ~7 bytes a row. A lookup by
--   (edge, stream, epoch, seq) goes through stream_keys, then this index with the
--   commit's received_at (the feed and v_feed know it: feed_commits.received_at)
--   or a received_at range, and the seq's bucket.
--
-- Every view keeps its columns, names and types: v_records and v_feed (views.sql) join
-- the dictionary back and cast json to jsonb.

CREATE TABLE stream_keys (
    id      integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    edge_id text    NOT NULL,
    stream  text    NOT NULL,
    epoch   bigint  NOT NULL,
    UNIQUE (edge_id, stream, epoch)
);

-- The id of (edge, stream, epoch), added when new. Call it in a transaction of its
-- own when the id is to be cached (an id added by a transaction that rolls back is
-- gone): cloud_ingest.writing does.
CREATE FUNCTION es_stream_key(edge_name text, stream_name text, key_epoch bigint)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    found integer;
BEGIN
    SELECT k.id INTO found FROM stream_keys k
        WHERE (k.edge_id, k.stream, k.epoch) = (edge_name, stream_name, key_epoch);
    IF found IS NULL THEN
        INSERT INTO stream_keys (edge_id, stream, epoch)
            VALUES (edge_name, stream_name, key_epoch)
            ON CONFLICT DO NOTHING RETURNING id INTO found;
    END IF;
    IF found IS NULL THEN  -- a concurrent caller added it first
        SELECT k.id INTO found FROM stream_keys k
            WHERE (k.edge_id, k.stream, k.epoch) = (edge_name, stream_name, key_epoch);
    END IF;
    RETURN found;
END
$$;

-- The old table and its partitions step aside (their names go to the new ones).
ALTER TABLE records RENAME TO records_v8;
DO $$
DECLARE
    p record;
    i record;
BEGIN
    FOR p IN SELECT c.oid, c.relname FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
             WHERE h.inhparent = 'records_v8'::regclass LOOP
        FOR i IN SELECT x.relname FROM pg_index ix JOIN pg_class x ON x.oid = ix.indexrelid
                 WHERE ix.indrelid = p.oid LOOP
            EXECUTE format('ALTER INDEX %I RENAME TO %I', i.relname, 'v8_' || i.relname);
        END LOOP;
        EXECUTE format('ALTER TABLE %I RENAME TO %I', p.relname, 'v8_' || p.relname);
    END LOOP;
END
$$;
ALTER INDEX records_identity_idx RENAME TO records_v8_identity_idx;
ALTER INDEX records_received_idx RENAME TO records_v8_received_idx;

-- Fixed-width columns first, 8-byte ones before the 4-byte one (no padding).
CREATE TABLE records (
    seq         bigint      NOT NULL,
    event_time  timestamptz NOT NULL,   -- as the producer said (edge clock)
    received_at timestamptz NOT NULL,   -- when the cloud ingest wrote it (cloud clock)
    stream_key  integer     NOT NULL,   -- stream_keys.id: (edge, stream, epoch)
    key         text,
    headers     json,
    payload     json,                   -- JSON payloads, the text as sent
    payload_raw bytea,                  -- opaque payloads, byte for byte
    CONSTRAINT records_payload_check CHECK ((payload IS NULL) <> (payload_raw IS NULL))
) PARTITION BY RANGE (received_at);

-- The identity index: (stream_key, received_at) leads (the typical query: one edge, one
-- stream, a time range; the feed knows each commit's received_at), then the seq's
-- bucket of 128 (seq >> 7). Every row of a commit shares its received_at, so 128
-- consecutive seqs of a key share one index key and B-tree deduplication stores them
-- as one posting list: ~7 bytes a row. A lookup of seqs lo..hi adds
-- (seq >> 7) BETWEEN lo >> 7 AND hi >> 7 and reads at most a bucket more on each side
-- (a feed page reading part of a 16,000-row commit does not read all of it).
CREATE INDEX records_identity_idx ON records (stream_key, received_at, (seq >> 7));
CREATE INDEX records_received_idx ON records USING brin (received_at);

-- Move the rows: the keys first (in key order, so ids follow it), then a partition
-- for every day the rows span and the days ahead, then the rows, in the order they
-- were written per day (a commit's rows stay together on disk).
INSERT INTO stream_keys (edge_id, stream, epoch)
    SELECT DISTINCT edge_id, stream, epoch FROM records_v8 ORDER BY 1, 2, 3;
SELECT count(*) FROM es_ensure_records_partitions(
    coalesce((SELECT min(received_at) AT TIME ZONE 'UTC' FROM records_v8)::date,
             (now() AT TIME ZONE 'UTC')::date), 3);
INSERT INTO records (seq, event_time, received_at, stream_key, key, headers, payload,
                     payload_raw)
    SELECT r.seq, r.event_time, r.received_at, k.id, r.key, r.headers::json, r.payload::json,
           r.payload_raw
    FROM records_v8 r
    JOIN stream_keys k ON (k.edge_id, k.stream, k.epoch) = (r.edge_id, r.stream, r.epoch)
    ORDER BY r.received_at, k.id, r.seq;
DROP TABLE records_v8;
