"""The ``[realtime]`` config section."""

from __future__ import annotations

import attrs

from forge_kernel.config import in_range


@attrs.frozen
class RealtimeConfig:
    #: seconds between change-log polls when no wake-up hint arrives
    fallback_poll: float = attrs.field(default=0.1, validator=in_range(0.005, 60))
    #: change-log rows older than this many seconds are trimmed by the scheduler's maintenance
    retention: float = attrs.field(default=300.0, validator=in_range(1, 7 * 86400))
    #: seconds between trims
    trim_interval: float = attrs.field(default=30.0, validator=in_range(0.1, 86400))
    #: largest WebSocket message a client may send, in bytes (close 1009 above it)
    max_message_bytes: int = attrs.field(default=65536, validator=in_range(64, 16 * 1024 * 1024))
    #: live subscriptions one connection may hold at once
    max_subscriptions: int = attrs.field(default=100, validator=in_range(1, 100_000))
    #: subscribe messages per second per connection (token bucket with this burst)
    subscribe_rate: float = attrs.field(default=50.0, validator=in_range(0.1, 100_000))
    #: queued control messages per connection before it is closed as too slow (4008)
    outbox_limit: int = attrs.field(default=256, validator=in_range(1, 1_000_000))
    #: seconds one send may block before the connection is closed as too slow (4008)
    send_timeout: float = attrs.field(default=10.0, validator=in_range(0.01, 3600))
    #: query re-runs this node executes at once (keep below [database] pool_max)
    max_concurrent_runs: int = attrs.field(default=8, validator=in_range(1, 1000))
    #: queued re-runs of one function (model-helper selects only) one worker sends in one round trip
    #: (1: each re-run alone)
    batch_runs: int = attrs.field(default=32, validator=in_range(1, 1000))
    #: how far (a fraction of its subscribers) a long fan-out of a query's result gets before that
    #: query runs again for the changes that arrived meanwhile: 1 one result per pass (fewest re-runs),
    #: lower values fresher results for more re-runs (0: a run as soon as a change arrives)
    rerun_after_pass: float = attrs.field(default=1.0, validator=in_range(0, 1))
    #: seconds a socket may stay silent before the server closes it (clients ping)
    idle_timeout: float = attrs.field(default=120.0, validator=in_range(1, 86400))
