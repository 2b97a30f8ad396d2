"""Services: the async parts of plugins, started in dependency order and stopped in reverse."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, AsyncContextManager, Awaitable, Callable, Sequence

import attrs
from loguru import logger

from .errors import StartupError


@attrs.frozen
class Service:
    """A long-running component.

    ``lifespan(node)`` returns an async context manager: entering it starts the service
    and returns when it is ready; exiting it stops the service gracefully. Loops that
    must survive crashes are started with ``node.supervisor.spawn(...)`` inside it.
    """

    name: str
    lifespan: Callable[[Any], AsyncContextManager[Any]]
    #: only started when the node runs this role; ``None`` means always
    role: str | None = None
    #: names of services that must be started before this one
    after: tuple[str, ...] = ()
    #: names of services that must be started after this one (and so stopped before it): an
    #: observer that must see every other service stop names them here
    before: tuple[str, ...] = ()


@attrs.frozen
class MaintenanceTask:
    """A chore for the scheduler leader: ``run(conn)`` every ``interval`` seconds."""

    name: str
    interval: float
    run: Callable[[Any], Awaitable[Any]]


def start_order(services: Sequence[Service]) -> list[Service]:
    """Topological order respecting ``after`` and ``before``; ties keep the given order. Raises on cycles or
    unknown names (an ``after`` naming a service that is not running is ignored only when
    the name belongs to a role this node does not run - the caller filters those first)."""
    by_name: dict[str, Service] = {}
    for s in services:
        if s.name in by_name:
            raise StartupError(f"two services are named {s.name!r}")
        by_name[s.name] = s
    deps: dict[str, list[str]] = {s.name: list(s.after) for s in services}
    for s in services:
        for later in s.before:
            if later in deps:
                deps[later].append(s.name)
    order: list[Service] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(s: Service, path: tuple[str, ...]) -> None:
        st = state.get(s.name)
        if st == 2:
            return
        if st == 1:
            raise StartupError(f"service dependency cycle: {' -> '.join(path + (s.name,))}")
        state[s.name] = 1
        for dep in deps[s.name]:
            if dep in by_name:
                visit(by_name[dep], path + (s.name,))
        state[s.name] = 2
        order.append(s)

    for s in services:
        visit(s, ())
    return order


@attrs.define
class TaskRecord:
    name: str
    service: str
    crashes: int = 0
    last_error: str | None = None
    task: asyncio.Task | None = None


class Supervisor:
    """Runs background loops and restarts the ones that crash, with capped exponential backoff.

    A loop that returns normally is done. A loop that raises is logged, counted and
    restarted after ``min(max_backoff, base * 2**n)`` seconds with jitter; it is never
    silently lost.
    """

    def __init__(self, *, base_backoff: float = 0.2, max_backoff: float = 30.0) -> None:
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.records: dict[str, TaskRecord] = {}
        self.on_crash: list[Callable[[TaskRecord, BaseException], None]] = []

    def spawn(self, name: str, factory: Callable[[], Awaitable[Any]], *, service: str = "") -> TaskRecord:
        if name in self.records and self.records[name].task and not self.records[name].task.done():
            raise RuntimeError(f"a supervised task named {name!r} is already running")
        rec = TaskRecord(name, service)
        rec.task = asyncio.create_task(self._run(rec, factory), name=f"forge:{name}")
        self.records[name] = rec
        return rec

    async def _run(self, rec: TaskRecord, factory: Callable[[], Awaitable[Any]]) -> None:
        streak = 0
        while True:
            started = time.monotonic()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - a crash of any kind is restarted
                rec.crashes += 1
                rec.last_error = f"{type(exc).__name__}: {exc}"
                # a loop that ran a good while before failing starts its backoff again
                streak = 0 if time.monotonic() - started > 60 else streak + 1
                delay = min(self.max_backoff, self.base_backoff * 2 ** (streak - 1)) * (0.5 + random.random() / 2)
                logger.opt(exception=exc).error(
                    f"service task {rec.name!r} crashed ({rec.crashes} so far); restarting in {delay:.2f}s")
                for cb in self.on_crash:
                    cb(rec, exc)
                await asyncio.sleep(delay)

    async def cancel(self, service: str | None = None, timeout: float = 5.0) -> None:
        recs = [r for r in self.records.values() if service is None or r.service == service]
        tasks = [r.task for r in recs if r.task and not r.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for r in recs:
            self.records.pop(r.name, None)


class ServiceStack:
    """Enters services' lifespans in order and exits them in exact reverse, within a deadline."""

    def __init__(self) -> None:
        self.entered: list[tuple[Service, Any]] = []

    async def enter(self, services: Sequence[Service], node: Any) -> None:
        """Start each service in order; on a failure, stop those already started and re-raise."""
        for svc in services:
            cm = svc.lifespan(node)
            try:
                await cm.__aenter__()
            except BaseException as exc:
                await self.exit(timeout=30.0, supervisor=getattr(node, "supervisor", None))
                if isinstance(exc, Exception) and not isinstance(exc, StartupError):
                    raise StartupError(f"service {svc.name!r} failed to start: {type(exc).__name__}: {exc}") from exc
                raise
            self.entered.append((svc, cm))

    async def exit(self, timeout: float, supervisor: Supervisor | None = None) -> list[str]:
        """Stop in reverse start order; returns the names in the order they were stopped."""
        deadline = time.monotonic() + timeout
        stopped = []
        while self.entered:
            svc, cm = self.entered.pop()
            left = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(cm.__aexit__(None, None, None), left)
            except asyncio.TimeoutError:
                logger.warning(f"service {svc.name!r} did not stop within the drain timeout; cancelling it")
            except Exception as exc:
                logger.opt(exception=exc).error(f"service {svc.name!r} failed while stopping")
            if supervisor is not None:
                await supervisor.cancel(service=svc.name, timeout=max(0.1, deadline - time.monotonic()))
            stopped.append(svc.name)
        return stopped
