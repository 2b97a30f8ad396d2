"""Plugin wiring for forge-mesh (entry point ``forge.plugins: mesh``); the work is in mesh.py and client.py."""

from __future__ import annotations

from typing import Any

from forge_kernel import MaintenanceTask, Service, hookimpl
from forge_kernel.migrations import from_package

from . import client, ledger
from .cli import add_commands
from .config import MeshConfig
from .mesh import mesh_for


@hookimpl
def forge_config_sections() -> dict[str, type]:
    return {"mesh": MeshConfig}


@hookimpl
def forge_migrations():
    return from_package("forge_mesh.sql", namespace="mesh")


@hookimpl
def forge_call_forwarder(node: Any) -> Any:
    return mesh_for(node)


@hookimpl
def forge_services(node: Any) -> list[Service]:
    return [Service("mesh", mesh_for(node).lifespan)]


@hookimpl
def forge_maintenance_tasks(node: Any) -> list[MaintenanceTask]:
    retention = node.config["mesh"].call_retention

    async def prune(conn: Any) -> int:
        return await ledger.prune(conn, retention)

    return [MaintenanceTask("mesh-prune-calls", 300.0, prune)]


@hookimpl
def forge_node_activity(node: Any) -> Any:
    mesh = mesh_for(node)
    return mesh.activity() if mesh.started else None


@hookimpl
def forge_live_status(config: Any, conn: Any, timeout: float) -> Any:
    return client.live_status(config, conn, timeout)


@hookimpl
def forge_job_cancel_requested(config: Any, conn: Any, job_id: int, node_id: str) -> Any:
    return client.cancel_job(config, conn, job_id, node_id)


@hookimpl(trylast=True)  # after forge-observe's: its stored-log 'logs' command keeps the name
def forge_cli_commands(subparsers: Any) -> None:
    add_commands(subparsers)
