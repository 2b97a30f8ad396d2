"""forge-realtime's hook implementations: thin wiring around :mod:`forge_realtime.service`."""

from __future__ import annotations

from forge_kernel import MaintenanceTask, Service, hookimpl
from forge_kernel.migrations import from_package

from .config import RealtimeConfig
from .service import SERVICE_NAME, for_node, websocket_handler
from .trim import trim_change_log

ROLE = "realtime"


@hookimpl
def forge_roles():
    return [ROLE]


@hookimpl
def forge_config_sections():
    return {"realtime": RealtimeConfig}


@hookimpl
def forge_migrations():
    return from_package("forge_realtime.sql", namespace="realtime")


@hookimpl
def forge_services(node):
    rt = for_node(node)
    # started after the gateway so that, stopping in reverse, sockets close with 1001 first
    return [Service(SERVICE_NAME, rt.lifespan, role=ROLE, after=("gateway-http",))]


@hookimpl
def forge_maintenance_tasks(node):
    cfg = node.config["realtime"]

    async def trim(conn):
        return await trim_change_log(conn, cfg.retention)

    return [MaintenanceTask("realtime.trim_change_log", cfg.trim_interval, trim)]


@hookimpl
def forge_registry_reloaded(node, registry):
    # every live query runs again on the new code; subscribers get only results that changed
    return for_node(node).reloaded(registry)


@hookimpl
def forge_dev_notice(node, notice):
    for_node(node).broadcast({"type": "dev", **notice})


@hookimpl
def forge_gateway_routes(node):
    if not node.runs(ROLE):
        return []
    return [websocket_handler(node)]


@hookimpl
def forge_node_activity(node):
    if not node.runs(ROLE):
        return None
    rt = for_node(node)
    engine = rt.engine
    return {"realtime": {"sockets": len(rt.sessions), "accepting": rt.accepting,
                         "subscriptions": sum(len(q.subscriptions) for q in engine.queries.values()) if engine else 0,
                         "live_queries": len(engine.queries) if engine else 0,
                         "running": len(engine.running) if engine else 0}}
