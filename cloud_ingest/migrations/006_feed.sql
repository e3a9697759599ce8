-- The commit-ordered feed (issue 13): every committed row gets a position that
-- increases in commit order, and named subscriptions keep a checkpoint over it.
--
-- A transaction that writes rows also inserts one feed_commits row: which rows
-- it inserted (as closed seq spans, in position order) and the completeness
-- watermark of every (edge, stream, epoch) it touched. Nothing is added to the
-- rows themselves: the COPY path stays as it was, and a row's position is
-- (commit_id << 24) | (its place among the commit's spans).
--
-- The race: a sequence value taken during the transaction is in start order, not
-- commit order, so a reader that saw commit 7 could later find a commit 6 that
-- was still in flight. Here commit_id is assigned by a DEFERRED constraint
-- trigger, i.e. inside COMMIT itself, under a transaction-level advisory lock.
-- PostgreSQL releases a transaction's locks only after the commit is visible
-- (ProcArrayEndTransaction precedes the lock release), so the next transaction
-- gets its commit id only once this one is visible or rolled back: a snapshot
-- that sees commit N sees every commit below N. A rolled-back transaction burns
-- its id (a gap, never a row). The lock is held from the trigger to the end of
-- COMMIT, without a client round trip, so an idle client cannot hold it.

CREATE SEQUENCE feed_commit_seq AS bigint;

CREATE TABLE feed_commits (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    commit_id    bigint      UNIQUE,         -- set at COMMIT; never NULL once visible
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),  -- cloud clock, at COMMIT
    rows         integer     NOT NULL,       -- rows inserted (sum of the spans)
    -- Rows inserted, as spans in position order: (edge, stream, epoch, first..last seq).
    edge_ids     text[]      NOT NULL DEFAULT '{}',
    streams      text[]      NOT NULL DEFAULT '{}',
    epochs       int8[]      NOT NULL DEFAULT '{}',
    first_seqs   int8[]      NOT NULL DEFAULT '{}',
    last_seqs    int8[]      NOT NULL DEFAULT '{}',
    -- Completeness after this commit of each key it touched (es_watermark of
    -- ranges + dropped + dead_lettered, read under the committed_ranges row lock).
    wm_edge_ids  text[]      NOT NULL DEFAULT '{}',
    wm_streams   text[]      NOT NULL DEFAULT '{}',
    wm_epochs    int8[]      NOT NULL DEFAULT '{}',
    watermarks   int8[]      NOT NULL DEFAULT '{}',
    CHECK (rows >= 0 AND rows < 16777215)
);

CREATE INDEX feed_commits_time_idx ON feed_commits (committed_at);

CREATE FUNCTION es_feed_assign() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    assigned bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7306078180709066084);  -- 'edgefeed'
    assigned := nextval('feed_commit_seq');
    UPDATE feed_commits SET commit_id = assigned, committed_at = clock_timestamp()
        WHERE id = NEW.id;
    PERFORM pg_notify('edgesync_feed', assigned::text);
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER feed_commits_assign AFTER INSERT ON feed_commits
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION es_feed_assign();

-- Named durable subscriptions: the checkpoint, and the lease that makes one
-- process at a time the consumer of a name (generation fences a stale holder).
CREATE TABLE feed_subscriptions (
    name        text        PRIMARY KEY,
    position    bigint      NOT NULL,        -- every row at or below it is processed
    filters     jsonb       NOT NULL DEFAULT '{}',
    generation  bigint      NOT NULL DEFAULT 0,
    holder      text,
    lease_until timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (position >= 0)
);

-- The feed as analytics read it, one row per committed row with its position:
-- v_feed (views.sql).
