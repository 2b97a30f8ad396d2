-- Where each node's mesh listens, per process. Membership stays in forge_nodes (the kernel's):
-- a peer is used only while its forge_nodes row is running and fresh.
CREATE TABLE forge_mesh_nodes (
    node_id      text PRIMARY KEY,
    -- host:port other nodes dial
    address      text NOT NULL,
    -- a token of the node process: a call naming an older epoch is refused unstarted
    epoch        text NOT NULL,
    -- highest protocol this node speaks, and the lowest it still accepts
    protocol     integer NOT NULL,
    min_protocol integer NOT NULL,
    tls          boolean NOT NULL,
    -- set by `forge-node drain` and at shutdown: peers stop sending new calls
    draining     boolean NOT NULL DEFAULT false,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Forwarded mutations and actions by call id. A mutation's row is written in its own
-- transaction, so a retry finds it (with the result) exactly when the mutation committed.
CREATE TABLE forge_mesh_calls (
    call_id    text PRIMARY KEY,
    function   text NOT NULL,
    node_id    text NOT NULL,
    -- running: claimed (an action that started); done: result stored; abandoned: the caller gave
    -- up on it, nobody may run it any more
    state      text NOT NULL CHECK (state IN ('running', 'done', 'abandoned')),
    result     bytea,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX forge_mesh_calls_created ON forge_mesh_calls (created_at);

-- The cluster's shared mesh token: every mesh request carries it, so a process that can reach a
-- mesh port but cannot read this database (another user on a loopback-only machine) is refused.
CREATE TABLE forge_mesh_cluster (
    id     boolean PRIMARY KEY DEFAULT true CHECK (id),
    token  text NOT NULL
);
