-- The admin dashboard's own tables: sign-in sessions and the audit trail of operator actions.

-- A browser session: the cookie holds a random id, this table only its SHA-256 (a stolen table
-- row does not sign anyone in). csrf is the token every POST of the session must carry.
CREATE TABLE forge_dashboard_sessions (
    id_sha256  bytea       PRIMARY KEY,
    who        text        NOT NULL,
    kind       text        NOT NULL,
    role       text        NOT NULL CHECK (role IN ('admin', 'read')),
    csrf       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    client     text
);
CREATE INDEX forge_dashboard_sessions_expires ON forge_dashboard_sessions (expires_at);

-- Every operator action: who, what, when, how many rows, the targets' state before and after.
CREATE TABLE forge_dashboard_audit (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    who             text        NOT NULL,
    kind            text        NOT NULL,
    role            text        NOT NULL,
    node_id         text        NOT NULL,
    client          text,
    action          text        NOT NULL,
    targets         text[]      NOT NULL,
    -- the filter a bulk action was applied to (NULL: targets named one by one)
    filter          jsonb,
    params          jsonb,
    affected        integer     NOT NULL DEFAULT 0,
    before          jsonb,
    after           jsonb,
    outcome         text        NOT NULL CHECK (outcome IN ('ok', 'error')),
    error           text,
    -- a repeated request (double click, retried POST) with the same key acts once
    idempotency_key text        UNIQUE
);
CREATE INDEX forge_dashboard_audit_at ON forge_dashboard_audit (at);
