"""Plugin wiring for the admin dashboard (entry point ``forge.plugins: dashboard``).

Every gateway node serves it: the ``dashboard`` service (role ``gateway``, started before the HTTP
server) opens the dashboard's own small pools and its live hub; the routes read it from the holder.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from forge_kernel import Service, hookimpl
from forge_kernel.admin import collect
from forge_kernel.migrations import from_package

from .config import DashboardConfig

SERVICE_NAME = "dashboard"
#: tables whose packages give the dashboard pages (a page of a package not installed says so)
TABLES = ("forge_jobs", "forge_cron_state", "forge_workflow_runs", "forge_obs_metrics", "forge_leaders")


class Holder:
    """The node's dashboard while its service runs."""

    dashboard: Any = None


def holder(node: Any) -> Holder:
    found = getattr(node, "_forge_dashboard", None)
    if found is None:
        found = Holder()
        node._forge_dashboard = found
    return found


@hookimpl
def forge_config_sections() -> dict[str, type]:
    return {"dashboard": DashboardConfig}


@hookimpl
def forge_migrations():
    return from_package("forge_observe.dashboard.sql", namespace="dashboard")


@contextlib.asynccontextmanager
async def lifespan(node: Any) -> AsyncIterator[Any]:
    from .access import Access
    from .actions import Actions
    from .live import Hub, Pools
    from .routes import Dashboard

    cfg = node.config["dashboard"]
    pools = Pools()
    # sessions on [database] direct_url: their startup settings would not pass a transaction pooler
    await pools.open(node.direct_url or node.url, cfg.statement_timeout)
    hub = Hub(pools, cfg.live_interval, cfg.live_poll, connect=lambda: node.connect(timeout=10))
    try:
        have = frozenset(r["t"] for r in await pools.read.fetch(
            "SELECT t FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NOT NULL", list(TABLES)))
        actions = Actions(node, cfg, pools, collect(node.loader.hook.forge_admin_actions(node=node)))
        holder(node).dashboard = Dashboard(node, cfg, pools, hub, actions, Access(node, cfg, pools), have)
        node.supervisor.spawn("dashboard-live", hub.run, service=SERVICE_NAME)
        node.supervisor.spawn("dashboard-hints", hub.listen, service=SERVICE_NAME)
        yield holder(node).dashboard
    finally:
        await hub.stop()
        holder(node).dashboard = None
        await pools.close()


@hookimpl
def forge_services(node: Any):
    if not node.config["dashboard"].enabled:
        return []
    return [Service(SERVICE_NAME, lifespan, role="gateway", before=("gateway-http",))]


@hookimpl
def forge_gateway_routes(node: Any):
    if not node.config["dashboard"].enabled:
        return []
    from .routes import routes

    # the dashboard service starts before the HTTP server, which asks for its routes while starting
    dash = holder(node).dashboard
    return [routes(dash)] if dash is not None else []
