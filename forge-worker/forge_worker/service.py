"""The ``worker`` service and the maintenance chores the scheduler leader runs for us."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from forge_kernel import MaintenanceTask, Service, StartupError

from .config import WorkerConfig, WorkflowConfig
from .runtime import Worker, apply_retention, rescue_expired
from .workflows import runtime as wfruntime
from .workflows import store as wfstore
from .workflows.runtime import WorkflowRuntime
from .workflows.store import WorkflowEngine


@contextlib.asynccontextmanager
async def worker_lifespan(node: Any) -> AsyncIterator[Worker]:
    worker = Worker(node, node.config["worker"])
    node.worker = worker  # type: ignore[attr-defined]  # for tests and introspection
    flows = None
    if node.registry.of_kind("workflow"):  # no workflows, no workflow loops: nothing to claim
        flows = WorkflowRuntime(node, node.config["workflows"], workflow_engine(node), worker)
        worker.extra_channels[wfstore.WAKE_CHANNEL] = flows.on_wake
        worker.extra_channels[wfstore.CANCEL_CHANNEL] = flows.on_cancel
        worker.on_listening.append(flows.on_listening)
    node.workflows = flows  # type: ignore[attr-defined]
    check_pool_size(node.config["database"].pool_max, flows is not None)
    await worker.start()
    if flows is not None:
        await flows.start()
    try:
        yield worker
    finally:
        if flows is not None:
            await flows.stop()
        await worker.stop()


def check_pool_size(pool_max: int, workflows: bool) -> None:
    """Refuse a pool the worker's loops would take whole: they hold their connections for the
    node's life (job claim and lease; workflow claim, lease and writers), and a node whose pool
    they exhaust never becomes ready and says nothing."""
    held = 2 + (2 + wfruntime.writer_count(pool_max) if workflows else 0)
    need = held + 2  # and at least two for running jobs, steps and calls
    if pool_max < need:
        loops = "the job claim and lease loops" + (
            f", the workflow claim and lease loops and {wfruntime.writer_count(pool_max)} checkpoint writer(s)"
            if workflows else "")
        raise StartupError(f"[database] pool_max = {pool_max} is too small for this worker: {loops} hold {held} "
                           f"connections for the node's life, and running jobs and workflow steps need more; "
                           f"set pool_max to at least {need}")


def workflow_engine(node: Any) -> WorkflowEngine:
    cfg: WorkflowConfig = node.config["workflows"]
    registry = node.registry
    limits = {}
    if registry is not None:
        limits = {d.name: d.options["max_recoveries"] for d in registry.of_kind("workflow")
                  if d.options.get("max_recoveries") is not None}
    return WorkflowEngine(limits, cfg.max_recoveries, cfg.max_value_bytes)


def worker_service() -> Service:
    return Service("worker", worker_lifespan, role="worker")


def maintenance_tasks(node: Any) -> list[MaintenanceTask]:
    cfg: WorkerConfig = node.config["worker"]
    dead_after = node.config.node.dead_after

    async def rescue(conn: Any) -> int:
        return len(await rescue_expired(conn, dead_after))

    async def retention(conn: Any) -> int:
        return await apply_retention(conn, cfg.history_retention, dead_after)

    wcfg: WorkflowConfig = node.config["workflows"]

    async def rescue_runs(conn: Any) -> int:
        return len(await wfruntime.rescue_runs(conn, dead_after))

    async def run_retention(conn: Any) -> int:
        return await wfruntime.apply_retention(conn, wcfg.retention, dead_after)

    return [
        MaintenanceTask("worker.rescue_expired_leases", max(1.0, min(cfg.lease / 3, 10.0)), rescue),
        MaintenanceTask("worker.history_retention", 60.0, retention),
        MaintenanceTask("workflows.recover_runs", max(1.0, min(wcfg.lease / 3, 10.0)), rescue_runs),
        MaintenanceTask("workflows.retention", 60.0, run_retention),
    ]
