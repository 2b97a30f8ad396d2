-- The identity a job runs as: its dispatcher's kind, user id and roles ({"kind": "user",
-- "user_id": "ann", "roles": ["admin"]}; {"kind": "system", ...} for crons and plain-Python
-- enqueues). NULL: stored before this column existed; such a job runs as its caller without
-- roles, or as the system when it has no caller (the old rule).
ALTER TABLE forge_jobs ADD COLUMN run_as jsonb;
