-- Whether the scheduler leader of term defined_term defines this cron (its code has it): true,
-- or false (the row is left from an earlier deployment: the cron runs nowhere, so
-- trigger/pause/resume refuse it). Each leader writes both while it ticks; a value written in
-- another term than the current one (or by a leader running older code, which never writes
-- them) says nothing, and the API then accepts the name as before.
ALTER TABLE forge_cron_state ADD COLUMN defined boolean, ADD COLUMN defined_term bigint;
