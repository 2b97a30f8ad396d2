-- Cluster membership: one row per node process, kept fresh by its heartbeat.
CREATE TABLE forge_nodes (
    id             text PRIMARY KEY,
    host           text NOT NULL,
    pid            integer NOT NULL,
    ports          jsonb NOT NULL DEFAULT '{}'::jsonb,
    roles          text[] NOT NULL DEFAULT '{}',
    capabilities   text[] NOT NULL DEFAULT '{}',
    version        text NOT NULL,
    status         text NOT NULL CHECK (status IN ('starting', 'running', 'draining', 'stopped', 'dead')),
    started_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat timestamptz NOT NULL DEFAULT now(),
    stopped_at     timestamptz,
    info           jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX forge_nodes_status ON forge_nodes (status, last_heartbeat);
