"""The ``scheduler`` service: campaigns for leadership and, while leading, runs crons and maintenance."""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, AsyncIterator

import attrs

from forge_kernel.errors import ForgeError, StartupError
from forge_kernel.services import Service

from .crons import CronEngine
from .election import LeaderElection
from .maintenance import MaintenanceRunner
from .settings import ROLE, crons_of

SERVICE = "scheduler"

#: the running scheduler of each in-process node (tests and the Python API look it up)
_running: "weakref.WeakKeyDictionary[Any, Scheduler]" = weakref.WeakKeyDictionary()


@attrs.define
class Scheduler:
    election: LeaderElection
    engine: CronEngine
    maintenance: MaintenanceRunner


def scheduler_of(node: Any) -> Scheduler | None:
    """The scheduler running in ``node`` (None when the node does not run the role)."""
    return _running.get(node)


def build(node: Any) -> Scheduler:
    cfg = node.config["scheduler"]
    crons = crons_of(node.registry)
    if crons:
        try:
            node.executor.dispatcher()
        except ForgeError as exc:
            names = ", ".join(sorted(crons))
            raise StartupError(f"the scheduler runs crons ({names}) as jobs but no job store is installed: {exc}") from None
    engine = CronEngine(node.pool, crons, node.executor.dispatcher, tick_interval=cfg.tick_interval,
                        telemetry=node.telemetry)
    runner = MaintenanceRunner(node.pool, node.maintenance, node.id)
    election = LeaderElection(node.id, node.connect, cfg)

    async def crons_loop(leadership: Any) -> None:
        await engine.run(election, leadership)

    async def maintenance_loop(leadership: Any) -> None:
        await runner.run(election, leadership)

    election.workers = [crons_loop, maintenance_loop]
    return Scheduler(election, engine, runner)


@contextlib.asynccontextmanager
async def lifespan(node: Any) -> AsyncIterator[Scheduler]:
    sched = build(node)
    node.supervisor.spawn("scheduler.election", sched.election.run, service=SERVICE)
    _running[node] = sched
    try:
        yield sched
    finally:
        _running.pop(node, None)
        # cancelling the election releases the lock and clears forge_leaders at once
        await node.supervisor.cancel(service=SERVICE)


def service() -> Service:
    return Service(SERVICE, lifespan, role=ROLE)
