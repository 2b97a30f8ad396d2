-- Whether the scheduler's current leader defines this cron (its code has it): true, false (the row
-- is left from an earlier deployment: the cron runs nowhere, and trigger/pause/resume refuse it),
-- NULL (no leader has looked yet). Each leader keeps it current while it ticks.
ALTER TABLE forge_cron_state ADD COLUMN defined boolean;
UPDATE forge_cron_state SET defined = true;
