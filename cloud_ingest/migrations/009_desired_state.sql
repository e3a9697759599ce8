-- Desired state for the fleet: edge labels, versioned desired-state documents (for
-- one edge or a labelled group, with per-edge overrides), what each edge was sent,
-- what it reports (reported state and per-field drift), and rollouts in waves.
-- docs/desired-state.md.

CREATE TABLE edge_labels (
    edge_id     text        NOT NULL,
    key         text        NOT NULL,
    value       text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (edge_id, key)
);

CREATE INDEX edge_labels_key_value_idx ON edge_labels (key, value);

-- A group is a named label selector: every edge whose labels include all of it.
CREATE TABLE desired_groups (
    name        text        PRIMARY KEY,
    selector    jsonb       NOT NULL,            -- {"region": "eu", "tier": "store"}
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every version of every target's desired state; never updated, never deleted.
CREATE TABLE desired_versions (
    id           bigserial   PRIMARY KEY,         -- the "desired version" a rollout names
    target_kind  text        NOT NULL,
    target       text        NOT NULL,            -- an edge id or a group name
    version      int         NOT NULL,            -- 1, 2, ... per target
    document     jsonb       NOT NULL,            -- validated by the command specs
    overrides    jsonb       NOT NULL DEFAULT '{}',  -- {edge: JSON merge patch of document}
    note         text        NOT NULL DEFAULT '',
    created_by   text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (target_kind IN ('edge', 'group')),
    UNIQUE (target_kind, target, version)
);

-- Orders every signed desired-state message; an edge never applies a lower one.
CREATE SEQUENCE desired_revision_seq;

-- What each edge was last sent (the value of its key in the <P>_DESIRED bucket).
CREATE TABLE edge_desired (
    edge_id      text        PRIMARY KEY,
    version_id   bigint      REFERENCES desired_versions (id),  -- NULL: nothing desired
    revision     bigint      NOT NULL,
    document     jsonb       NOT NULL,            -- resolved: document + this edge's override
    digest       text        NOT NULL,            -- SHA-256 hex of the signed payload
    signed       bytea       NOT NULL,
    rollout_id   bigint,
    published_at timestamptz,                     -- NULL until JetStream acknowledged it
    assigned_at  timestamptz NOT NULL DEFAULT now(),
    assigned_by  text        NOT NULL
);

-- The edge's latest report: its reported state and status.
CREATE TABLE edge_reported_state (
    edge_id      text        PRIMARY KEY,
    revision     bigint      NOT NULL,
    version_id   bigint      NOT NULL,
    digest       text        NOT NULL,
    status       text        NOT NULL,            -- applying|healthy|drifted|failed|rejected
    observed     jsonb       NOT NULL,
    reason       text        NOT NULL DEFAULT '',
    applied      jsonb       NOT NULL DEFAULT '[]',
    reported_at  timestamptz NOT NULL,            -- edge clock
    received_at  timestamptz NOT NULL DEFAULT now(),
    current      boolean     NOT NULL             -- it is about what edge_desired holds
);

-- One row per field that differs, as of the edge's latest report.
CREATE TABLE edge_drift (
    edge_id      text        NOT NULL,
    path         text        NOT NULL,            -- deployments.prod/web.replicas, ...
    desired      jsonb,
    observed     jsonb,
    revision     bigint      NOT NULL,
    since        timestamptz NOT NULL,            -- edge clock of the first report of it
    PRIMARY KEY (edge_id, path)
);

CREATE TABLE rollouts (
    id                   bigserial   PRIMARY KEY,
    version_id           bigint      NOT NULL REFERENCES desired_versions (id),
    selector             jsonb       NOT NULL,    -- the edges it was started on
    waves                jsonb       NOT NULL,    -- as given: ["1", "10%", "50%", "100%"]
    max_failures         text        NOT NULL,    -- "2%" or "3"
    failure_budget       int         NOT NULL,    -- failures tolerated (resolved)
    wave_deadline_s      float8      NOT NULL,
    offline_deadline_at  timestamptz NOT NULL,    -- offline edges are pending until then
    state                text        NOT NULL DEFAULT 'running',
    current_wave         int         NOT NULL DEFAULT 0,   -- 0: none dispatched yet
    wave_started_at      timestamptz,
    reason               text        NOT NULL DEFAULT '',
    created_by           text        NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz,
    CHECK (state IN ('running', 'paused', 'halted', 'aborting', 'aborted', 'completed'))
);

CREATE INDEX rollouts_active_idx ON rollouts (id) WHERE state IN ('running', 'aborting');

CREATE TABLE rollout_edges (
    rollout_id           bigint      NOT NULL REFERENCES rollouts (id),
    edge_id              text        NOT NULL,
    wave                 int         NOT NULL,    -- 1-based
    status               text        NOT NULL DEFAULT 'waiting',
    previous_version_id  bigint,                  -- what abort rolls back to
    revision             bigint,                  -- of the message sent in this rollout
    rollback_revision    bigint,
    reason               text        NOT NULL DEFAULT '',
    dispatched_at        timestamptz,
    settled_at           timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rollout_id, edge_id),
    CHECK (status IN ('waiting', 'dispatched', 'healthy', 'failed', 'superseded',
                      'rolling_back', 'rolled_back', 'skipped'))
);

CREATE INDEX rollout_edges_edge_idx ON rollout_edges (edge_id, revision);

-- The stable views for analytics and dashboards (v_edge_desired_state, v_edge_drift,
-- v_rollout_progress): views.sql.
