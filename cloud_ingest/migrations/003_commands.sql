-- Control commands: what operators asked each edge to do, and what happened.
-- Lifecycle: pending -> delivered -> applied | failed | rejected, or expired
-- (set by the cloud when a command was not delivered before expires_at, or
-- reported by an edge that received it too late). docs/control-plane.md.

CREATE TABLE commands (
    id               uuid        PRIMARY KEY,
    edge_id          text        NOT NULL,
    kind             text        NOT NULL,
    spec             jsonb       NOT NULL,
    issuer           text        NOT NULL,
    idempotency_key  text,
    digest           text        NOT NULL,   -- SHA-256 hex of the signed payload
    signed           bytea       NOT NULL,   -- the exact message published on <prefix>.ctl.<edge>
    status           text        NOT NULL DEFAULT 'pending',
    code             text,                   -- machine-readable reason of a refusal
    reason           text,                   -- human-readable reason of failed/rejected/expired
    result           jsonb,                  -- what an applied command achieved
    issued_at        timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    published_at     timestamptz,            -- NULL until JetStream acknowledged it
    delivered_at     timestamptz,            -- edge clock
    finished_at      timestamptz,            -- edge clock, or cloud clock for expiry
    finished_by      text,                   -- 'edge' or 'cloud'
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (status IN ('pending', 'delivered', 'applied', 'failed', 'rejected', 'expired')),
    CHECK (finished_by IN ('edge', 'cloud')),
    UNIQUE (edge_id, idempotency_key)
);

CREATE INDEX commands_edge_idx ON commands (edge_id, issued_at DESC);
CREATE INDEX commands_pending_idx ON commands (expires_at) WHERE status = 'pending';
CREATE INDEX commands_unpublished_idx ON commands (issued_at) WHERE published_at IS NULL;

-- Every status report as received, including those that did not change a command:
-- repeats, replays, and reports about ids the cloud never issued (forgeries).
CREATE TABLE command_events (
    id           bigserial   PRIMARY KEY,
    command_id   text        NOT NULL,   -- as reported ('' when unreadable)
    edge_id      text        NOT NULL,   -- the reporting edge
    digest       text        NOT NULL,
    status       text        NOT NULL,
    code         text        NOT NULL DEFAULT '',
    reason       text        NOT NULL DEFAULT '',
    result       jsonb,
    reported_at  timestamptz NOT NULL,   -- edge clock
    received_at  timestamptz NOT NULL DEFAULT now(),
    effective    boolean     NOT NULL,   -- it changed the command's row
    UNIQUE (edge_id, command_id, status, reported_at)
);

CREATE INDEX command_events_command_idx ON command_events (command_id, id);

-- The stable view for analytics and dashboards, v_commands: views.sql.
