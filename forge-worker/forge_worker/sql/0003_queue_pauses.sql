-- Paused queues: workers claim no new job of a queue listed here (jobs already running finish).
-- A row per paused queue; resuming deletes it. Few rows: every claim reads it once (an InitPlan).
CREATE TABLE forge_worker_queue_pauses (
    queue     text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now(),
    paused_by text
);
