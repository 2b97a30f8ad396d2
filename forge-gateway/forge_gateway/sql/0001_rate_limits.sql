-- Rate-limit counters: one row per (bucket, fixed window). UNLOGGED because the counts are
-- worth less than the WAL they would cost: after a crash every window simply starts empty.
CREATE UNLOGGED TABLE forge_gateway_rate_limits (
    bucket     text    NOT NULL,
    window_no  bigint  NOT NULL,
    used       integer NOT NULL,
    -- tokens handed out by the last claim (UPDATE ... SET sees old values, so RETURNING can report it)
    last_grant integer NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (bucket, window_no)
);
CREATE INDEX forge_gateway_rate_limits_expires ON forge_gateway_rate_limits (expires_at);
