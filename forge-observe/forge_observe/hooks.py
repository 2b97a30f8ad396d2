"""Plugin wiring for forge-observe (entry point ``forge.plugins: observe``)."""

from __future__ import annotations

from typing import Any

from forge_kernel import MaintenanceTask, Service, hookimpl
from forge_kernel.migrations import from_package

from .config import ObserveConfig
from .service import OBSERVED_SERVICES, SERVICE_NAME, for_node


@hookimpl
def forge_config_sections() -> dict[str, type]:
    return {"observe": ObserveConfig}


@hookimpl
def forge_migrations():
    return from_package("forge_observe.sql", namespace="observe")


@hookimpl
def forge_app_modules() -> list[str]:
    return ["forge_observe.jobs"]


@hookimpl
def forge_services(node: Any):
    obs = for_node(node)
    obs.cluster_gauges = [g for found in node.loader.hook.forge_cluster_gauges(node=node) for g in (found or ())]
    # started before the services it observes and stopped after them, so it stores what they log while stopping
    return [Service(SERVICE_NAME, obs.lifespan, before=OBSERVED_SERVICES)]


@hookimpl
def forge_gateway_routes(node: Any):
    from .routes import metrics_route

    return [metrics_route(for_node(node))]


@hookimpl
def forge_maintenance_tasks(node: Any):
    obs = for_node(node)
    cfg = obs.config
    tasks = [MaintenanceTask("observe.partitions", 3600.0, obs.partitions),
             MaintenanceTask("observe.cluster_gauges", cfg.cluster_interval, obs.collect_cluster)]
    if cfg.alerts:
        from .alerts import AlertEvaluator

        tasks.append(MaintenanceTask("observe.alerts", cfg.alert_interval, AlertEvaluator(node, cfg.alerts).run))
    return tasks


@hookimpl
def forge_cli_commands(subparsers: Any) -> None:
    from .cli import add_commands

    add_commands(subparsers)
