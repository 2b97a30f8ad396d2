"""Cluster chores the leader runs: every plugin's ``MaintenanceTask`` plus the scheduler's own.

Each task runs in its own loop so a slow chore never delays another. Before every run the
leader re-checks its leadership; the outcome of each run is kept in ``forge_maintenance``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

import asyncpg
from loguru import logger

from forge_kernel.errors import ForgeError
from forge_kernel.services import MaintenanceTask

from .crons import RunReconciler
from .election import LeaderElection, Leadership
from .settings import SchedulerConfig

#: delete in batches so retention never holds long locks on hot tables
RETENTION_BATCH = 5000


async def mark_dead_nodes(conn: asyncpg.Connection, dead_after: float) -> list[str]:
    """Nodes still listed as live whose heartbeat is older than ``dead_after`` become ``dead``.
    A node that was only slow sets itself back to its status with its next heartbeat."""
    rows = await conn.fetch(
        """UPDATE forge_nodes SET status = 'dead', stopped_at = clock_timestamp()
           WHERE status IN ('starting', 'running', 'draining')
             AND last_heartbeat < clock_timestamp() - make_interval(secs => $1)
           RETURNING id""", dead_after)
    ids = [r["id"] for r in rows]
    if ids:
        logger.warning(f"marked {len(ids)} node(s) dead (no heartbeat for {dead_after:g}s): {', '.join(ids)}")
    return ids


async def delete_old_runs(conn: asyncpg.Connection, older_than: float) -> int:
    """Finished cron runs (and skipped slots) older than ``older_than`` seconds."""
    total = 0
    while True:
        res = await conn.execute(
            """DELETE FROM forge_cron_runs WHERE id IN (
                   SELECT id FROM forge_cron_runs
                   WHERE finished_at IS NOT NULL AND finished_at < clock_timestamp() - make_interval(secs => $1)
                   LIMIT $2)""", older_than, RETENTION_BATCH)
        n = int(res.split()[-1])
        total += n
        if n < RETENTION_BATCH:
            return total


async def delete_old_nodes(conn: asyncpg.Connection, older_than: float) -> int:
    res = await conn.execute(
        """DELETE FROM forge_nodes WHERE status IN ('stopped', 'dead')
             AND COALESCE(stopped_at, last_heartbeat) < clock_timestamp() - make_interval(secs => $1)""", older_than)
    return int(res.split()[-1])


def own_tasks(config: SchedulerConfig, dead_after: float, dispatcher: Callable[[], Any]) -> list[MaintenanceTask]:
    """The scheduler's own chores (contributed through ``forge_maintenance_tasks`` like any plugin's).
    ``dispatcher`` returns the job store's dispatcher (raising ForgeError when none is installed)."""

    reconciler = RunReconciler(config.reconcile_interval)

    async def open_runs(conn: asyncpg.Connection) -> int:
        try:
            store = dispatcher()
        except ForgeError:
            return 0  # no job store on this node: no cron jobs to follow
        return await reconciler.run(conn, store)

    async def dead_nodes(conn: asyncpg.Connection) -> list[str]:
        return await mark_dead_nodes(conn, dead_after)

    async def cron_history(conn: asyncpg.Connection) -> int:
        return await delete_old_runs(conn, config.history_retention)

    async def node_rows(conn: asyncpg.Connection) -> int:
        return await delete_old_nodes(conn, config.node_retention)

    return [
        MaintenanceTask("scheduler.dead_nodes", config.dead_node_interval, dead_nodes),
        MaintenanceTask("scheduler.cron_history_retention", config.retention_interval, cron_history),
        MaintenanceTask("scheduler.node_retention", config.retention_interval, node_rows),
        MaintenanceTask("scheduler.reconcile_runs", config.reconcile_interval, open_runs),
    ]


class MaintenanceRunner:
    def __init__(self, pool: asyncpg.Pool, tasks: Sequence[MaintenanceTask], node_id: str) -> None:
        names = [t.name for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two maintenance tasks share the name(s) {', '.join(dupes)}")
        self.pool = pool
        self.tasks = list(tasks)
        self.node_id = node_id

    async def run(self, election: LeaderElection, leadership: Leadership) -> None:
        """While leading: one loop per task, each run preceded by a leadership check."""
        if not self.tasks:
            return
        loops = [asyncio.create_task(self._loop(t, election), name=f"forge:maintenance:{t.name}") for t in self.tasks]
        try:
            # the first loop to end (only by NotLeader) ends them all
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _loop(self, task: MaintenanceTask, election: LeaderElection) -> None:
        while True:
            await election.check()
            await self.run_once(task)
            await asyncio.sleep(task.interval)

    async def run_once(self, task: MaintenanceTask) -> bool:
        """Run ``task`` on a pool connection and record the outcome; errors are logged, not raised."""
        t0 = time.perf_counter()
        error = None
        try:
            async with self.pool.acquire() as conn:
                await task.run(conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one failing chore must not stop the others
            error = f"{type(exc).__name__}: {exc}"
            logger.opt(exception=exc).error(f"maintenance task {task.name!r} failed")
        ms = (time.perf_counter() - t0) * 1000.0
        try:
            await self.pool.execute(
                """INSERT INTO forge_maintenance (task, runs, failures, last_run_at, last_node, last_ms, last_error)
                   VALUES ($1, 1, $2, clock_timestamp(), $3, $4, $5)
                   ON CONFLICT (task) DO UPDATE SET runs = forge_maintenance.runs + 1,
                       failures = forge_maintenance.failures + EXCLUDED.failures, last_run_at = EXCLUDED.last_run_at,
                       last_node = EXCLUDED.last_node, last_ms = EXCLUDED.last_ms, last_error = EXCLUDED.last_error""",
                task.name, 1 if error else 0, self.node_id, ms, error)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning(f"could not record maintenance run of {task.name!r}: {exc}")
        return error is None
