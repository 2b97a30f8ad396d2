"""Plugin wiring for forge-worker (entry point ``forge.plugins: worker``)."""

from __future__ import annotations

from typing import Any

from forge_kernel import hookimpl
from forge_kernel.migrations import from_package
from forge_kernel.telemetry import ClusterGauge

from .admin import admin_actions
from .cli import add_jobs_command
from .config import WorkerConfig, WorkflowConfig
from .queue import Dispatcher, job_counts, oldest_pending
from .service import maintenance_tasks, worker_service, workflow_engine
from .workflows.admin import admin_actions as workflow_admin_actions
from .workflows.cli import add_workflows_command
from .workflows.store import WorkflowEngine
from .validate import check_registry


@hookimpl
def forge_roles() -> list[str]:
    return ["worker"]


@hookimpl
def forge_config_sections() -> dict[str, type]:
    return {"worker": WorkerConfig, "workflows": WorkflowConfig}


@hookimpl
def forge_migrations():
    # workflows keep their own namespace: their versions never collide with the job queue's
    return from_package("forge_worker.sql", namespace="worker") + from_package(
        "forge_worker.workflow_sql", namespace="forge_workflows")


@hookimpl
def forge_registry_loaded(registry: Any, node: Any) -> None:
    check_registry(registry)


@hookimpl
def forge_job_dispatcher(node: Any) -> Dispatcher:
    # every node with forge-worker installed can store jobs, whatever roles it runs
    return Dispatcher()


@hookimpl
def forge_workflow_engine(node: Any):
    # like the dispatcher: any node with forge-worker installed can start runs and send events
    return workflow_engine(node)


@hookimpl
def forge_app_modules() -> list[str]:
    # forge.workflows.* admin functions (start, list, show, cancel, retry, send_event) over /rpc
    return ["forge_worker.workflows.functions"]


@hookimpl
def forge_services(node: Any):
    return [worker_service()]


@hookimpl
def forge_maintenance_tasks(node: Any):
    return maintenance_tasks(node)


@hookimpl
def forge_cli_commands(subparsers: Any) -> None:
    add_jobs_command(subparsers)
    add_workflows_command(subparsers)


@hookimpl
def forge_cancel_running_job(node: Any, job_id: int) -> Any:
    worker = getattr(node, "worker", None)
    return worker.cancel_running(job_id) if worker is not None else False


@hookimpl
def forge_node_activity(node: Any) -> Any:
    worker = getattr(node, "worker", None)
    return worker.activity() if worker is not None else None


@hookimpl
def forge_cluster_gauges(node: Any):
    return [ClusterGauge("forge_jobs", "Live jobs per queue and status (scheduled, pending, running, dead)",
                         ("queue", "status"), job_counts),
            ClusterGauge("forge_jobs_oldest_pending_seconds", "Age of the oldest due job per queue",
                         ("queue",), oldest_pending)]


@hookimpl
def forge_admin_actions(node: Any):
    # the engine is built when an event is sent (the node's config and registry are loaded by then)
    return admin_actions(lambda: node.registry) + workflow_admin_actions(
        lambda: workflow_engine(node) if node.config is not None else WorkflowEngine())
