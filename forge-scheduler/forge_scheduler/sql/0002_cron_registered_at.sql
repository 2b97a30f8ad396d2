-- When the cluster first saw each cron: its first slot is the first one after this.
ALTER TABLE forge_cron_state ADD COLUMN registered_at timestamptz NOT NULL DEFAULT clock_timestamp();
