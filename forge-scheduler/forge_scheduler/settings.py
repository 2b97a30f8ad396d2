"""The ``[scheduler]`` config section and the per-cron settings given to ``@cron(...)``."""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from forge_kernel.app import FunctionDef, Registry
from forge_kernel.config import in_range
from forge_kernel.convert import InvalidValue
from forge_kernel.errors import StartupError

from .schedule import CronExpressionError, CronSchedule

ROLE = "scheduler"


@attrs.frozen
class SchedulerConfig:
    """``[scheduler]``: election, cron loop and maintenance timings (seconds)."""

    #: how often a follower tries to take the leader lock (bounds takeover time)
    election_interval: float = attrs.field(default=0.5, validator=in_range(0.05, 60))
    #: how often the leader re-checks its lock and refreshes ``forge_leaders.renewed_at``
    renew_interval: float = attrs.field(default=1.0, validator=in_range(0.05, 60))
    #: a leader that has not renewed for this long (frozen process, half-open connection) has its
    #: session ended by a follower, which then takes over
    leader_lease: float = attrs.field(default=10.0, validator=in_range(1, 3600))
    #: a leadership check slower than this counts as lost leadership
    check_timeout: float = attrs.field(default=2.0, validator=in_range(0.1, 60))
    #: longest sleep of the cron loop (it also wakes for the next due slot)
    tick_interval: float = attrs.field(default=0.5, validator=in_range(0.01, 60))
    #: TCP keepalive on the leader connection: idle seconds, probe interval, probe count
    keepalive_idle: int = attrs.field(default=5, validator=in_range(1, 7200))
    keepalive_interval: int = attrs.field(default=2, validator=in_range(1, 600))
    keepalive_count: int = attrs.field(default=3, validator=in_range(1, 100))
    #: how often the leader marks nodes with stale heartbeats dead
    dead_node_interval: float = attrs.field(default=5.0, validator=in_range(0.1, 3600))
    #: finished cron runs older than this are deleted
    history_retention: float = attrs.field(default=7 * 86400.0, validator=in_range(60, 10 * 365 * 86400))
    #: stopped or dead node rows older than this are deleted from ``forge_nodes``
    node_retention: float = attrs.field(default=7 * 86400.0, validator=in_range(60, 10 * 365 * 86400))
    #: how often retention runs
    retention_interval: float = attrs.field(default=300.0, validator=in_range(1, 86400))
    #: how often open cron runs are checked against the job store (and how old they must be):
    #: closes runs whose job ended without a worker's report (cancelled before it ran, rescued)
    reconcile_interval: float = attrs.field(default=10.0, validator=in_range(0.1, 3600))


# --- per-cron settings ------------------------------------------------------------------
CRON_SETTINGS = ("catch_up", "overlap", "grace", "overlap_timeout")
#: job settings a cron may carry; the job store (forge-worker) interprets them
JOB_SETTINGS = ("max_attempts", "priority", "queue", "capability", "concurrency", "backoff")
KERNEL_KEYS = ("schedule", "timezone")


#: most missed slots a cron may run per outage (each becomes a job in one decision transaction)
MAX_CATCH_UP = 1000


def _catch_up(value: Any) -> int:
    if value == "skip":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CATCH_UP:
        raise InvalidValue("catch_up", value,
                           f"'skip' or a whole number from 0 to {MAX_CATCH_UP} of missed slots to run per outage")
    return value


@attrs.frozen
class CronSettings:
    """What the scheduler needs to know about one cron.

    * ``catch_up``: ``"skip"`` (default, same as ``0``) drops slots that were missed while no
      leader ran; a number ``N`` runs the ``N`` most recent missed slots of each outage and
      drops older ones.
    * ``overlap``: ``"allow"`` (default) enqueues every slot; ``"skip"`` records a slot as
      ``skipped`` while a previous run of the cron is still queued or running.
    * ``overlap_timeout``: seconds after which a run that is still open no longer blocks new
      ones under ``overlap="skip"`` (its outcome was lost, or it hangs); default 3600.
    * ``grace``: seconds a slot may be late and still count as on time rather than missed
      (a slot is missed when the leader reaches it more than ``grace`` seconds late).
    """

    name: str
    schedule: CronSchedule
    catch_up: int = 0
    overlap: str = "allow"
    grace: float = 30.0
    overlap_timeout: float = 3600.0
    defn: FunctionDef | None = attrs.field(default=None, eq=False, repr=False)

    @classmethod
    def from_definition(cls, defn: FunctionDef) -> "CronSettings":
        """Validate a ``@cron`` definition; raises :class:`StartupError` naming the cron."""
        opts: Mapping[str, Any] = defn.options
        where = f"cron {defn.name!r} ({defn.module}.{getattr(defn.fn, '__qualname__', defn.name)})"
        known = KERNEL_KEYS + CRON_SETTINGS + JOB_SETTINGS
        unknown = sorted(k for k in opts if k not in known)
        if unknown:
            raise StartupError(f"{where}: unknown setting(s) {', '.join(unknown)}; "
                               f"accepted: {', '.join(CRON_SETTINGS + JOB_SETTINGS)}")
        required = [p.name for p in defn.params if p.required]
        if required:
            raise StartupError(f"{where}: a cron takes no arguments besides ctx, but requires {', '.join(required)}")
        try:
            schedule = CronSchedule.parse(opts.get("schedule", ""), opts.get("timezone", "UTC"))
        except CronExpressionError as exc:
            raise StartupError(f"{where}: {exc}") from None
        try:
            catch_up = _catch_up(opts.get("catch_up", "skip"))
            overlap = opts.get("overlap", "allow")
            if overlap not in ("allow", "skip"):
                raise InvalidValue("overlap", overlap, "'allow' or 'skip'")
            grace = opts.get("grace", 30.0)
            if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= 86400:
                raise InvalidValue("grace", grace, "a number of seconds between 0 and 86400")
            overlap_timeout = opts.get("overlap_timeout", 3600.0)
            if (isinstance(overlap_timeout, bool) or not isinstance(overlap_timeout, (int, float))
                    or not 1 <= overlap_timeout <= 30 * 86400):
                raise InvalidValue("overlap_timeout", overlap_timeout, "a number of seconds between 1 and 2592000")
        except InvalidValue as exc:
            raise StartupError(f"{where}: {exc}") from None
        return cls(defn.name, schedule, catch_up, overlap, float(grace), float(overlap_timeout), defn)


def crons_of(registry: Registry) -> dict[str, CronSettings]:
    """Every cron of ``registry``, validated; the first problem stops start-up."""
    return {d.name: CronSettings.from_definition(d) for d in registry.of_kind("cron")}
