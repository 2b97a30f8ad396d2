"""The ``[worker]`` config section."""

from __future__ import annotations

import attrs

from forge_kernel.config import identifiers, in_range
from forge_kernel.convert import InvalidValue


def _limits(inst: object, attr: attrs.Attribute, value: dict[str, int]) -> None:
    for queue, limit in value.items():
        if not queue:
            raise InvalidValue(attr.name, queue, "non-empty queue names")
        if limit < 1:
            raise InvalidValue(f"{attr.name}.{queue}", limit, "a concurrency limit >= 1")


@attrs.frozen
class WorkerConfig:
    #: queues this node works on; empty means every queue
    queues: list[str] = attrs.field(factory=list, validator=identifiers)
    #: jobs this node runs at the same time
    concurrency: int = attrs.field(default=50, validator=in_range(1, 100_000))
    #: most jobs claimed in one round trip (0: up to the free capacity)
    claim_batch: int = attrs.field(default=0, validator=in_range(0, 100_000))
    #: cluster-wide limits on running jobs per queue, e.g. ``{ emails = 2 }`` (same on every node)
    queue_limits: dict[str, int] = attrs.field(factory=dict, validator=_limits)
    #: seconds a claimed job stays leased without a heartbeat; then another worker re-runs it
    lease: float = attrs.field(default=30.0, validator=in_range(1, 86_400))
    #: seconds between lease renewals (which also write coalesced progress and see cancellations)
    heartbeat_interval: float = attrs.field(default=1.0, validator=in_range(0.05, 3600))
    #: seconds between checks for new jobs when no NOTIFY arrives (fallback)
    poll_interval: float = attrs.field(default=1.0, validator=in_range(0.01, 3600))
    #: after a claim found work, look for more every ``spin_interval`` seconds for this long
    #: before going idle (idle workers are woken by hints); 0 disables
    spin_window: float = attrs.field(default=0.05, validator=in_range(0, 60))
    spin_interval: float = attrs.field(default=0.002, validator=in_range(0.0005, 1))
    #: seconds between this node's checks for jobs whose lease expired (0: leave it to maintenance)
    rescue_interval: float = attrs.field(default=5.0, validator=in_range(0, 3600))
    #: timeout of a job that sets none itself, seconds (0: no timeout)
    job_timeout: float = attrs.field(default=3600.0, validator=in_range(0, 30 * 86_400))
    #: seconds a graceful stop waits for running jobs before releasing them to other workers
    shutdown_timeout: float = attrs.field(default=20.0, validator=in_range(0, 3600))
    #: retry delay of attempt n: min(backoff_max, backoff_base * 2**(n-1)), jittered to 50-100 %
    backoff_base: float = attrs.field(default=1.0, validator=in_range(0, 86_400))
    backoff_max: float = attrs.field(default=3600.0, validator=in_range(0, 30 * 86_400))
    #: wait for the WAL flush when writing job results (off: a PostgreSQL crash may re-run the
    #: last finished jobs - at-least-once either way - and each result costs no flush)
    durable_results: bool = False
    #: seconds finished jobs stay in forge_job_history (0: delete them at once)
    history_retention: float = attrs.field(default=86_400.0, validator=in_range(0, 3650 * 86_400))
