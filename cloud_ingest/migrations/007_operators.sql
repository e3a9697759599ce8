-- Operators and the audit log (issue 11, "Operators"; docs/security.md).
--
-- An operator is a name, a set of scopes and the SHA-256 of its bearer token: the
-- token itself is shown once, when it is made, and never stored. Tokens are
-- random (>= 128 bits), so a fast hash is enough: nothing to brute-force.
-- Revoking keeps the row (the audit log names it) and frees the name.

CREATE TABLE operators (
    id            bigserial   PRIMARY KEY,
    name          text        NOT NULL,
    scopes        text[]      NOT NULL,
    token_sha256  text        NOT NULL UNIQUE,   -- hex of SHA-256 over the whole token
    token_prefix  text        NOT NULL,          -- its first characters, to recognise it
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text        NOT NULL,
    revoked_at    timestamptz,
    last_used_at  timestamptz,
    CHECK (name ~ '^[A-Za-z0-9_.@-]{1,64}$'),
    CHECK (cardinality(scopes) > 0)
);

-- One active operator per name; a revoked name may be given to someone new.
CREATE UNIQUE INDEX operators_active_name ON operators (name) WHERE revoked_at IS NULL;

-- Every operator action: who (the operator, or the CLI's OS user), what (an action
-- and its target), when, from where (client address), and how it ended.
CREATE TABLE audit_log (
    id        bigserial   PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    operator  text        NOT NULL,
    action    text        NOT NULL,   -- 'command.issue', 'operator.add', 'POST /v1/...'
    target    text        NOT NULL DEFAULT '',
    client    text        NOT NULL DEFAULT '',   -- peer address, or 'cli:<user>@<host>'
    status    integer,                -- the HTTP status answered (NULL from the CLI)
    detail    jsonb       NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_log_at_idx ON audit_log (at);

-- Append-only: rows are never changed or removed, whoever asks (a superuser can still
-- drop the trigger; that is what the PostgreSQL log is for).
CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();
