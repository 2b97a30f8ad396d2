-- Indexes for the admin dashboard's workflows page at scale (bench/dashboard): runs newest first,
-- of every status (created_at) or of one (status, created_at), without sorting the whole table.
CREATE INDEX forge_workflow_runs_created ON forge_workflow_runs (created_at);
CREATE INDEX forge_workflow_runs_status_created ON forge_workflow_runs (status, created_at);
