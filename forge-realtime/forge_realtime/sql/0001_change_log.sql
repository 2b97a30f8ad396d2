-- The change log that live queries are invalidated from. One row per captured statement:
-- statement-level triggers (transition tables) on the tables subscriptions read write
-- the old and new images (primary key + filtered columns) of every affected row.
CREATE TABLE forge_changes (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- the writing transaction; readers bound their cursor by the snapshot xmin horizon
    -- because ids (a sequence) commit out of order
    xid       xid8 NOT NULL DEFAULT pg_current_xact_id(),
    at        timestamptz NOT NULL DEFAULT now(),
    tbl       text NOT NULL,
    op        text NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')),
    old_rows  jsonb,
    new_rows  jsonb
);
CREATE INDEX forge_changes_xid ON forge_changes (xid);
CREATE INDEX forge_changes_at ON forge_changes USING brin (at);

-- Which tables carry capture triggers and which columns their images hold. Nodes extend
-- it (under an advisory lock) when a subscription filters on a column not yet captured.
CREATE TABLE forge_realtime_captures (
    tbl         text PRIMARY KEY,
    key_columns text[] NOT NULL,
    columns     text[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The wake-up hint: at most one NOTIFY in flight. Only the transaction holding the
-- advisory lock notifies; the others commit without touching NOTIFY's global commit lock
-- and are picked up by the poll the hint triggers (or the short fallback poll).
CREATE FUNCTION forge_realtime_hint() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF pg_try_advisory_xact_lock(7217301, 1) THEN
        PERFORM pg_notify('forge_changes', '');
    END IF;
END
$$;
