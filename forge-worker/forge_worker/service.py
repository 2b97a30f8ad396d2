"""The ``worker`` service and the maintenance chores the scheduler leader runs for us."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from forge_kernel import MaintenanceTask, Service

from .config import WorkerConfig
from .runtime import Worker, apply_retention, rescue_expired


@contextlib.asynccontextmanager
async def worker_lifespan(node: Any) -> AsyncIterator[Worker]:
    worker = Worker(node, node.config["worker"])
    node.worker = worker  # type: ignore[attr-defined]  # for tests and introspection
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


def worker_service() -> Service:
    return Service("worker", worker_lifespan, role="worker")


def maintenance_tasks(node: Any) -> list[MaintenanceTask]:
    cfg: WorkerConfig = node.config["worker"]
    dead_after = node.config.node.dead_after

    async def rescue(conn: Any) -> int:
        return len(await rescue_expired(conn, dead_after))

    async def retention(conn: Any) -> int:
        return await apply_retention(conn, cfg.history_retention, dead_after)

    return [
        MaintenanceTask("worker.rescue_expired_leases", max(1.0, min(cfg.lease / 3, 10.0)), rescue),
        MaintenanceTask("worker.history_retention", 60.0, retention),
    ]
