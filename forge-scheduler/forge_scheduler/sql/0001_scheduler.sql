-- Who leads. One row per election (the scheduler uses name 'scheduler'). term grows by one
-- on every takeover and fences a stale leader: its writes check (node_id, term) first.
CREATE TABLE forge_leaders (
    name       text PRIMARY KEY,
    node_id    text,
    term       bigint NOT NULL DEFAULT 0,
    since      timestamptz,
    renewed_at timestamptz
);

-- One row per cron the cluster has seen: pause flag and how far its slots are decided.
CREATE TABLE forge_cron_state (
    cron          text PRIMARY KEY,
    schedule      text NOT NULL,
    timezone      text NOT NULL,
    paused        boolean NOT NULL DEFAULT false,
    paused_at     timestamptz,
    -- every slot <= decided_until has been enqueued, skipped or dropped; the next is after it
    decided_until timestamptz NOT NULL,
    -- slots dropped by the catch-up policy, in total and in the last outage
    dropped_total bigint NOT NULL DEFAULT 0,
    last_dropped  integer NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- "Run now" requests (CLI, Python API); the leader turns each into exactly one run.
CREATE TABLE forge_cron_triggers (
    id           bigserial PRIMARY KEY,
    cron         text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    requested_by text
);

-- Run history: one row per scheduled slot (unique) or manual trigger.
CREATE TABLE forge_cron_runs (
    id          bigserial PRIMARY KEY,
    cron        text NOT NULL,
    slot        timestamptz NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('scheduled', 'manual')),
    status      text NOT NULL CHECK (status IN ('queued', 'retrying', 'succeeded', 'failed', 'cancelled', 'skipped')),
    job_id      bigint,
    leader      text,
    leader_term bigint,
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at  timestamptz,
    finished_at timestamptz,
    duration_ms double precision,
    attempts    integer NOT NULL DEFAULT 0,
    node_id     text,
    error       text
);
-- exactly once per scheduled slot, whatever the leader does
CREATE UNIQUE INDEX forge_cron_runs_slot ON forge_cron_runs (cron, slot) WHERE kind = 'scheduled';
CREATE INDEX forge_cron_runs_recent ON forge_cron_runs (cron, id DESC);
CREATE INDEX forge_cron_runs_open ON forge_cron_runs (cron) WHERE status IN ('queued', 'retrying');
CREATE INDEX forge_cron_runs_finished ON forge_cron_runs (finished_at) WHERE finished_at IS NOT NULL;

-- What the leader's maintenance loop did last, per task.
CREATE TABLE forge_maintenance (
    task        text PRIMARY KEY,
    runs        bigint NOT NULL DEFAULT 0,
    failures    bigint NOT NULL DEFAULT 0,
    last_run_at timestamptz,
    last_node   text,
    last_ms     double precision,
    last_error  text
);
