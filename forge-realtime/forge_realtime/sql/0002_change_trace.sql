-- The trace of the write: a sampled mutation's transaction sets forge.traceparent (transaction-local,
-- see forge_kernel.telemetry), so the live-query re-run and the push it causes join that trace.
-- A column default, so capture functions installed before this migration fill it too.
ALTER TABLE forge_changes ADD COLUMN trace text DEFAULT NULLIF(current_setting('forge.traceparent', true), '');
