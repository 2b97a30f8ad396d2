-- Durable workflow runs. A run row is its own queue entry (claimed with SKIP LOCKED, leased,
-- fenced by `claims`), so every state change of a run is one row's update.
CREATE TABLE forge_workflow_runs (
    id               uuid        PRIMARY KEY,
    name             text        NOT NULL,
    -- the code version the run started with ('' when started by name without knowing it)
    version          text        NOT NULL DEFAULT '',
    args             jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- pending: claimable from run_at; running: leased by node_id until lease_until;
    -- waiting: asleep / waiting for events, a child or a retry until run_at (NULL: no timeout);
    -- blocked: the code diverged from the recorded steps (wait says where);
    -- succeeded / failed / cancelled: ended
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'waiting', 'blocked', 'succeeded', 'failed', 'cancelled')),
    run_at           timestamptz,
    -- every claim increments it; each write of a claimed run names the claim it holds (fencing)
    claims           integer     NOT NULL DEFAULT 0,
    -- recoveries after a worker died holding the run, bounded by max_recoveries
    recoveries       integer     NOT NULL DEFAULT 0,
    max_recoveries   integer     NOT NULL DEFAULT 10 CHECK (max_recoveries >= 0),
    node_id          text,
    lease_until      timestamptz,
    -- what a pending / waiting / blocked run waits on, for people (see RunInfo.waiting_on)
    wait             jsonb,
    -- events that make a waiting run claimable at once
    wait_events      text[],
    -- bumped by every event sent to the run: a run only goes to sleep on the count it has seen
    events_sent      bigint      NOT NULL DEFAULT 0,
    compensating     boolean     NOT NULL DEFAULT false,
    cancel_requested boolean     NOT NULL DEFAULT false,
    -- checkpoint statements written; 0 means there is no history to load
    steps_done       integer     NOT NULL DEFAULT 0,
    idempotency_key  text,
    correlation_key  text,
    parent_id        uuid,
    parent_key       text,
    caller           text,
    -- the identity the run acts as (Auth.to_job() of whoever started it; NULL: the system)
    run_as           jsonb,
    result           jsonb,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- due runs, oldest first; also the next timer (min run_at)
CREATE INDEX forge_workflow_runs_due ON forge_workflow_runs (run_at) WHERE status IN ('pending', 'waiting');
-- rescue and concurrency counts; not on lease_until, so checkpoints (which extend it) stay HOT updates
CREATE INDEX forge_workflow_runs_running ON forge_workflow_runs (node_id) WHERE status = 'running';
CREATE UNIQUE INDEX forge_workflow_runs_idempotency ON forge_workflow_runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX forge_workflow_runs_correlation ON forge_workflow_runs (correlation_key)
    WHERE correlation_key IS NOT NULL;
CREATE INDEX forge_workflow_runs_parent ON forge_workflow_runs (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX forge_workflow_runs_finished ON forge_workflow_runs USING brin (finished_at);
ALTER TABLE forge_workflow_runs SET (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02,
                                     autovacuum_vacuum_insert_scale_factor = 0.05);

-- The run history: one row per recorded operation (step, sleep, event wait, child, now/random/uuid,
-- compensation). `key` is the operation's position in the code ("3", "4.2.1" in a parallel
-- branch, "c:3" for the compensation of step 3); retried-from runs keep old rows under "key~N".
CREATE TABLE forge_workflow_steps (
    run_id       uuid        NOT NULL,
    key          text        NOT NULL,
    -- order in which rows were first written (timelines, reverse order of compensation)
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    name         text        NOT NULL,
    kind         text        NOT NULL
                 CHECK (kind IN ('step', 'sleep', 'event', 'child', 'now', 'random', 'uuid', 'compensation')),
    -- succeeded / failed: final; retrying: an attempt failed, the next is due (result.next_at);
    -- waiting: an event wait began (result.deadline)
    status       text        NOT NULL CHECK (status IN ('succeeded', 'failed', 'retrying', 'waiting')),
    args         jsonb,
    result       jsonb,
    error        text,
    attempts     integer     NOT NULL DEFAULT 1,
    -- what undoes this step: {"function": "module:qualname", "args": [...], "kwargs": {...}}
    compensation jsonb,
    -- the run's claim and the node that wrote the row
    claim        integer     NOT NULL,
    node_id      text,
    started_at   timestamptz,
    finished_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, key)
);
ALTER TABLE forge_workflow_steps SET (autovacuum_vacuum_insert_scale_factor = 0.05);

-- Events are a mailbox: kept until a wait for their name consumes them (consumed_key names the
-- wait that did, in the same statement that recorded the wait's result).
CREATE TABLE forge_workflow_events (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       uuid        NOT NULL,
    name         text        NOT NULL,
    payload      jsonb,
    sent_at      timestamptz NOT NULL DEFAULT now(),
    consumed_key text,
    consumed_at  timestamptz
);
CREATE INDEX forge_workflow_events_mailbox ON forge_workflow_events (run_id, name, id) WHERE consumed_key IS NULL;
CREATE INDEX forge_workflow_events_run ON forge_workflow_events (run_id);

-- Worker nodes waiting for runs; starts and events NOTIFY one of them (a hint, rebuilt by live workers).
CREATE UNLOGGED TABLE forge_workflow_sleepers (
    node_id text PRIMARY KEY,
    since   timestamptz NOT NULL DEFAULT now()
);
