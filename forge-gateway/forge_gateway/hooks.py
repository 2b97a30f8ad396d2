"""Plugin wiring: config section, migrations, the HTTP service, the auth verifier, maintenance."""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from forge_kernel import MaintenanceTask, Service, hookimpl
from forge_kernel.migrations import from_package

from .app import Gateway, build_app
from .auth import Verifier
from .clients import ClientAddress
from .config import GatewayConfig
from .ratelimit import CallLimits, RateLimiter, prune
from .server import serve

SERVICE_NAME = "gateway-http"
#: the running Gateway of a node (set while its HTTP service runs)
_ATTR = "_forge_gateway"


@hookimpl
def forge_roles() -> list[str]:
    # gateway: serve HTTP; function: answer /rpc calls on this node (a gateway without it serves
    # only /health, /ready, /openapi.json and the routes other plugins add)
    return ["gateway", "function"]


@hookimpl
def forge_config_sections() -> dict[str, type]:
    return {"gateway": GatewayConfig}


@hookimpl
def forge_migrations():
    return from_package("forge_gateway.sql", namespace="gateway")


_VERIFIER_ATTR = "_forge_gateway_verifier"


def verifier_for(node: Any) -> Verifier:
    """One verifier per node (kept on the node, not in a global), so every WebSocket connection
    and the HTTP server share its parsed keys and JWKS cache."""
    verifier = getattr(node, _VERIFIER_ATTR, None)
    if verifier is None:
        verifier = Verifier(node.config["gateway"])
        setattr(node, _VERIFIER_ATTR, verifier)
    return verifier


@hookimpl
def forge_auth_verifier(node: Any) -> Verifier:
    return verifier_for(node)


_LIMITS_ATTR = "_forge_gateway_limits"


def limits_for(node: Any) -> CallLimits:
    """One rate limiter per node (kept on the node), shared by /rpc and the /ws of realtime, so a
    call spends the same leases and windows whichever transport brought it."""
    limits = getattr(node, _LIMITS_ATTR, None)
    if limits is None:
        cfg: GatewayConfig = node.config["gateway"]
        limits = CallLimits(RateLimiter(node.pool, lease_fraction=cfg.rate_limit_lease),
                            ClientAddress(cfg.trust_forwarded_for, cfg.trusted_proxies))
        setattr(node, _LIMITS_ATTR, limits)
    return limits


@hookimpl
def forge_rate_limiter(node: Any) -> CallLimits:
    return limits_for(node)


@hookimpl
def forge_registry_reloaded(node: Any, registry: Any) -> None:
    # /rpc looks functions up per call; the OpenAPI document is built once, so build it again
    gateway = getattr(node, _ATTR, None)
    if gateway is not None:
        gateway.describe(registry)


@hookimpl
def forge_services(node: Any) -> list[Service]:
    return [Service(SERVICE_NAME, gateway_lifespan, role="gateway")]


@hookimpl
def forge_maintenance_tasks(node: Any) -> list[MaintenanceTask]:
    return [MaintenanceTask("gateway-rate-limit-prune", 60.0, prune)]


def _flat(results: Any) -> list[Any]:
    out: list[Any] = []
    for r in results or ():
        if r is None:
            continue
        out.extend(r if isinstance(r, (list, tuple)) else [r])
    return out


@contextlib.asynccontextmanager
async def gateway_lifespan(node: Any) -> AsyncIterator[Gateway]:
    cfg: GatewayConfig = node.config["gateway"]
    gateway = Gateway(node, cfg, verifier_for(node), limits_for(node))
    app = build_app(gateway, _flat(node.loader.hook.forge_gateway_routes(node=node)))
    async with serve(app, cfg) as port:
        node.ports["http"] = port
        await node.publish_ports()
        setattr(node, _ATTR, gateway)
        try:
            yield gateway
        finally:
            setattr(node, _ATTR, None)
