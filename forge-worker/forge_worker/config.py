"""The ``[worker]`` config section."""

from __future__ import annotations

import attrs

from forge_kernel.config import identifiers, in_range
from forge_kernel.convert import InvalidValue


def _prefetch(inst: object, attr: attrs.Attribute, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not 0 <= value <= 100_000):
        raise InvalidValue(attr.name, value, "a whole number of jobs between 0 and 100000 (0: no claim-ahead)")


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
    #: jobs claimed ahead, beyond ``concurrency``: they wait on this node, leased to it, and start
    #: as running jobs finish, while the next claim is in flight (no idle gap for its round trip).
    #: A node holds at most ``concurrency + prefetch`` jobs; 0: claim only into free slots.
    #: Unset: twice ``concurrency`` (one statement writes and claims about half of what a node may
    #: hold: see the README, "Claim-ahead"). A graceful stop releases them at once.
    prefetch: int | None = attrs.field(default=None, validator=_prefetch)
    #: the most jobs claimed ahead while a backlog lasts: under a backlog a claim that found its
    #: node's jobs claimed ahead all started (slots waited for the claim's round trip) doubles the
    #: reserve, up to this; a claim that finds fewer pending jobs than it asked for, or most jobs
    #: claimed ahead still waiting (the jobs outlast the round trip), sets it back to ``prefetch``. A node then holds at most ``concurrency + prefetch_max`` rows (what a crash
    #: leaves leased to it). Unset: ``32 x concurrency`` when ``prefetch`` is unset too, else
    #: ``prefetch`` (a fixed reserve). See the README, "Claim-ahead".
    prefetch_max: int | None = attrs.field(default=None, validator=_prefetch)
    #: statements writing results and claiming that may be in flight at once under a backlog (2: a
    #: second connection sends while the first waits for its commit's WAL flush; see the README)
    claim_lanes: int = attrs.field(default=1, validator=in_range(1, 2))
    #: most jobs claimed in one round trip (0: up to the free capacity)
    claim_batch: int = attrs.field(default=0, validator=in_range(0, 100_000))
    #: cluster-wide limits on running jobs per queue, e.g. ``{ emails = 2 }`` (same on every node)
    queue_limits: dict[str, int] = attrs.field(factory=dict, validator=_limits)
    #: seconds a claimed job stays leased without a heartbeat; then another worker re-runs it
    lease: float = attrs.field(default=30.0, validator=in_range(1, 86_400))
    #: seconds between lease checks: each sees cancellations and lost leases, writes coalesced
    #: progress, and renews the leases that would be past half their length by the next one
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


@attrs.frozen
class WorkflowConfig:
    """The ``[workflows]`` section: the durable workflow runtime on worker nodes."""

    #: workflow runs this node executes at the same time (waiting runs do not count)
    concurrency: int = attrs.field(default=100, validator=in_range(1, 100_000))
    #: seconds a claimed run stays leased without a checkpoint or renewal; then another worker resumes it
    lease: float = attrs.field(default=30.0, validator=in_range(1, 86_400))
    #: seconds between lease renewals of running runs (which also notice cancellations)
    heartbeat_interval: float = attrs.field(default=1.0, validator=in_range(0.05, 3600))
    #: seconds between checks for due runs when no NOTIFY arrives (fallback)
    poll_interval: float = attrs.field(default=1.0, validator=in_range(0.01, 3600))
    #: after a claim found work, look for more every ``spin_interval`` seconds for this long
    spin_window: float = attrs.field(default=0.05, validator=in_range(0, 60))
    spin_interval: float = attrs.field(default=0.002, validator=in_range(0.0005, 1))
    #: seconds between this node's checks for runs whose worker died (0: leave it to maintenance)
    rescue_interval: float = attrs.field(default=2.0, validator=in_range(0, 3600))
    #: sleeps, retry back-offs and waits shorter than this stay in the worker holding the lease;
    #: longer ones give the run up until they are due (it then costs no worker slot)
    suspend_after: float = attrs.field(default=1.0, validator=in_range(0, 86_400))
    #: retries of a step that sets none (attempts = retries + 1)
    step_retries: int = attrs.field(default=3, validator=in_range(0, 1000))
    #: retry delay of a step's attempt n: min(step_backoff_max, step_backoff * 2**(n-1)), jittered to 50-100 %
    step_backoff: float = attrs.field(default=1.0, validator=in_range(0, 86_400))
    step_backoff_max: float = attrs.field(default=300.0, validator=in_range(0, 30 * 86_400))
    #: recoveries after a worker died holding a run before the run fails (``@workflow(max_recoveries=)``)
    max_recoveries: int = attrs.field(default=10, validator=in_range(0, 1_000_000))
    #: largest JSON text of a step result, a step's or run's arguments, an event payload (bytes)
    max_value_bytes: int = attrs.field(default=1_048_576, validator=in_range(1024, 256 * 1_048_576))
    #: wait for the WAL flush on every checkpoint. Off (the default, like ``[worker]
    #: durable_results``): a checkpoint is committed and visible at once, but a PostgreSQL crash
    #: (never a worker crash) may forget the last few hundred milliseconds of them - a consistent
    #: earlier state, whose steps then run again, as after a worker crash. On: every step waits
    #: for a disk flush (fdatasync: ~4-6 ms on this machine's disk)
    durable_steps: bool = False
    #: seconds ended runs (and their steps and events) are kept (0: forever)
    retention: float = attrs.field(default=7 * 86_400.0, validator=in_range(0, 3650 * 86_400))
