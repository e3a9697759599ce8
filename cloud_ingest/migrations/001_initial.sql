-- edgesync schema v1: records, dead letters, edges, committed ranges.
-- Tables are internal; analytics read the views (stable contract, docs/schema.md).

CREATE TABLE records (
    edge_id     text        NOT NULL,
    stream      text        NOT NULL,
    epoch       bigint      NOT NULL,
    seq         bigint      NOT NULL,
    event_time  timestamptz NOT NULL,   -- as the producer said (edge clock)
    received_at timestamptz NOT NULL,   -- when the cloud ingest wrote it (cloud clock)
    key         text,
    headers     jsonb,
    payload     jsonb,                  -- JSON payloads
    payload_raw bytea,                  -- opaque payloads, byte for byte
    PRIMARY KEY (edge_id, stream, epoch, seq),
    CHECK ((payload IS NULL) <> (payload_raw IS NULL))
);

CREATE INDEX records_event_time_idx ON records USING brin (received_at);

-- Which seqs of each (edge, stream, epoch) are committed, maintained in the same
-- transaction as the rows, so it is exact whatever the commit order of workers.
CREATE TABLE committed_ranges (
    edge_id    text           NOT NULL,
    stream     text           NOT NULL,
    epoch      bigint         NOT NULL,
    ranges     int8multirange NOT NULL,
    updated_at timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (edge_id, stream, epoch)
);

CREATE TABLE dead_letters (
    id          bigserial   PRIMARY KEY,
    subject     text        NOT NULL,
    headers     jsonb,
    data        bytea       NOT NULL,
    reason      text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE edges (
    edge_id                 text        PRIMARY KEY,
    first_seen              timestamptz NOT NULL DEFAULT now(),
    last_seen               timestamptz NOT NULL,
    version                 text        NOT NULL,
    buffer_records          bigint      NOT NULL,
    buffer_bytes            bigint      NOT NULL,
    buffer_max_bytes        bigint      NOT NULL,
    unshipped_records       bigint      NOT NULL,
    oldest_unshipped_age_s  double precision NOT NULL,
    disk_bytes              bigint      NOT NULL,
    dropped                 jsonb       NOT NULL,
    streams                 jsonb       NOT NULL,
    edge_clock              timestamptz NOT NULL
);

-- The stable views for analytics (v_records, v_stream_progress) are in views.sql.
