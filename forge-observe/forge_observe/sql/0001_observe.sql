-- forge-observe's storage: logs, spans and metric snapshots, partitioned by day (UTC) so retention
-- drops whole partitions (no DELETE, no vacuum); alerts are few and kept in a plain table.
-- Partitions are made by forge_obs_ensure_partitions (the writer at start-up and when a day is
-- missing, the leader's maintenance ahead of time) and dropped by forge_obs_drop_partitions.

CREATE TABLE forge_obs_logs (
    at          timestamptz NOT NULL,
    node_id     text        NOT NULL,
    level       text        NOT NULL,
    logger      text,
    message     text        NOT NULL,
    trace_id    text,
    span_id     text,
    call_id     text,
    job_id      bigint,
    cron_run_id bigint,
    workflow_run_id text,
    extra       jsonb
) PARTITION BY RANGE (at);
CREATE INDEX forge_obs_logs_at ON forge_obs_logs USING brin (at);
CREATE INDEX forge_obs_logs_trace ON forge_obs_logs (trace_id) WHERE trace_id IS NOT NULL;
CREATE INDEX forge_obs_logs_job ON forge_obs_logs (job_id) WHERE job_id IS NOT NULL;

CREATE TABLE forge_obs_spans (
    trace_id    text        NOT NULL,
    span_id     text        NOT NULL,
    parent_id   text,
    name        text        NOT NULL,
    -- server (HTTP request), consumer (job run), internal (function, live query), client (SQL), producer (dispatch, push)
    kind        text        NOT NULL,
    node_id     text        NOT NULL,
    start_at    timestamptz NOT NULL,
    duration_ms double precision NOT NULL,
    error       text,
    attrs       jsonb
) PARTITION BY RANGE (start_at);
-- a B-tree on the trace id and BRIN on time: measured twice the COPY rate of three B-trees
CREATE INDEX forge_obs_spans_trace ON forge_obs_spans (trace_id);
CREATE INDEX forge_obs_spans_at ON forge_obs_spans USING brin (start_at);

-- One row per series per flush: counters and gauges as their value at ``at``; histograms as
-- their count (value), sum and cumulative bucket counts (``le`` bounds in ``bounds``).
CREATE TABLE forge_obs_metrics (
    at          timestamptz NOT NULL,
    node_id     text        NOT NULL,
    name        text        NOT NULL,
    labels      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    value       double precision NOT NULL,
    sum         double precision,
    bounds      double precision[],
    buckets     double precision[]
) PARTITION BY RANGE (at);
CREATE INDEX forge_obs_metrics_name_at ON forge_obs_metrics (name, at);

CREATE TABLE forge_obs_alerts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule        text        NOT NULL,
    metric      text        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('firing', 'resolved')),
    value       double precision,
    threshold   double precision NOT NULL,
    message     text        NOT NULL,
    node_id     text        NOT NULL,
    fired_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz
);
-- at most one firing row per rule
CREATE UNIQUE INDEX forge_obs_alerts_firing ON forge_obs_alerts (rule) WHERE state = 'firing';
CREATE INDEX forge_obs_alerts_fired ON forge_obs_alerts (fired_at);

-- Partitions of ``tbl`` for every day from ``first_day`` to ``last_day`` (UTC), named tbl_pYYYYMMDD.
CREATE FUNCTION forge_obs_ensure_partitions(tbls text[], first_day date, last_day date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t text;
    d date;
    made integer := 0;
BEGIN
    FOREACH t IN ARRAY tbls LOOP
        IF t NOT IN ('forge_obs_logs', 'forge_obs_spans', 'forge_obs_metrics') THEN
            RAISE EXCEPTION 'not a forge-observe table: %', t;
        END IF;
        d := first_day;
        WHILE d <= last_day LOOP
            IF to_regclass(format('%I', t || '_p' || to_char(d, 'YYYYMMDD'))) IS NULL THEN
                BEGIN
                    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                                   t || '_p' || to_char(d, 'YYYYMMDD'), t,
                                   (d::timestamp AT TIME ZONE 'UTC'), ((d + 1)::timestamp AT TIME ZONE 'UTC'));
                    made := made + 1;
                EXCEPTION WHEN duplicate_table THEN
                    NULL; -- another node made it meanwhile
                END;
            END IF;
            d := d + 1;
        END LOOP;
    END LOOP;
    RETURN made;
END
$$;

-- Detach and drop the partitions of ``tbl`` whose whole day is before ``before_day``; returns their names.
CREATE FUNCTION forge_obs_drop_partitions(tbl text, before_day date) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part text;
BEGIN
    IF tbl NOT IN ('forge_obs_logs', 'forge_obs_spans', 'forge_obs_metrics') THEN
        RAISE EXCEPTION 'not a forge-observe table: %', tbl;
    END IF;
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = tbl::regclass AND c.relname ~ ('^' || tbl || '_p[0-9]{8}$')
          AND to_date(right(c.relname, 8), 'YYYYMMDD') < before_day
        ORDER BY c.relname
    LOOP
        EXECUTE format('ALTER TABLE %I DETACH PARTITION %I', tbl, part);
        EXECUTE format('DROP TABLE %I', part);
        RETURN NEXT part;
    END LOOP;
END
$$;
