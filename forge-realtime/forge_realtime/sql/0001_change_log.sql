-- The change log that live queries are invalidated from. One row per captured statement:
-- statement-level triggers (transition tables) on the tables subscriptions read write
-- the old and new images (primary key + filtered columns) of every affected row.
--
-- UNLOGGED: captured writes pay no WAL for their log rows. After a PostgreSQL crash or a
-- failover the log is empty, but every node's reader loses its connection then and re-runs
-- all of its live queries on reconnect, so nothing is missed.
CREATE UNLOGGED TABLE forge_changes (
    -- the writing transaction; readers bound their cursor by the snapshot xmin horizon
    -- because sequence values (and so any id column) commit out of order
    xid       xid8 NOT NULL DEFAULT pg_current_xact_id(),
    at        timestamptz NOT NULL DEFAULT now(),
    tbl       text NOT NULL,
    op        text NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')),
    old_rows  jsonb,
    new_rows  jsonb
);
CREATE INDEX forge_changes_xid ON forge_changes (xid);
-- trimming by age (BRIN: nearly free to maintain on an append-only table)
CREATE INDEX forge_changes_at ON forge_changes USING brin (at);

-- Which tables carry capture triggers and which columns their images hold. Nodes extend
-- it (under an advisory lock) when a subscription filters on a column not yet captured.
CREATE TABLE forge_realtime_captures (
    tbl         text PRIMARY KEY,
    key_columns text[] NOT NULL,
    columns     text[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
