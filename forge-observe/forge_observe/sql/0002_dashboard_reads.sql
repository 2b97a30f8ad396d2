-- Indexes for the admin dashboard's reads at scale (measured by bench/dashboard on 50M spans, 10M log lines).

-- Logs newest first in any window (the logs page, a job's and a trace's lines): a B-tree on time.
-- Rows arrive in time order, so it grows at its right edge (cheap to keep, unlike a random key),
-- and the BRIN it replaces could only hand every row of the window to a sort.
CREATE INDEX forge_obs_logs_at_btree ON forge_obs_logs (at);
DROP INDEX forge_obs_logs_at;
-- A workflow run's log lines (the workflow page); most lines have none, so the index stays small.
CREATE INDEX forge_obs_logs_workflow ON forge_obs_logs (workflow_run_id) WHERE workflow_run_id IS NOT NULL;
-- The traces page: each trace's local roots, newest first (one span in five or so).
CREATE INDEX forge_obs_spans_roots ON forge_obs_spans (start_at) WHERE parent_id IS NULL OR kind = 'server';
