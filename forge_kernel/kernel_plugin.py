"""The kernel's own hook implementations (its config sections and tables)."""

from __future__ import annotations

from .admin import kernel_actions
from .config import KERNEL_SECTIONS
from .hookspecs import hookimpl
from .migrations import from_package


@hookimpl
def forge_config_sections():
    return KERNEL_SECTIONS


@hookimpl
def forge_migrations():
    return from_package("forge_kernel.sql", namespace="kernel")


@hookimpl
def forge_admin_actions(node):
    return kernel_actions()


@hookimpl
def forge_node_activity(node):
    """The node itself: status, roles, version and how busy its database pools are."""
    import time

    pools = {}
    for name, pool in (("pool", node.pool), ("query_pool", node.query_pool)):
        if pool is not None:
            size, idle = pool.get_size(), pool.get_idle_size()
            pools[name] = {"in_use": size - idle, "size": size, "max": pool.get_max_size()}
    return {"node": {"id": node.id, "status": node.status, "version": node.version, "roles": list(node.roles),
                     "uptime": round(time.monotonic() - node.started_at, 1) if node.started_at else 0.0, **pools}}
