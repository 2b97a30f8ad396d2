"""forge-scheduler's hook implementations: thin wiring, the work is in the modules beside it."""

from __future__ import annotations

from forge_kernel import hookimpl
from forge_kernel.migrations import from_package

from . import admin, cli, crons, maintenance, service, settings


@hookimpl
def forge_roles():
    return [settings.ROLE]


@hookimpl
def forge_config_sections():
    return {"scheduler": settings.SchedulerConfig}


@hookimpl
def forge_migrations():
    return from_package("forge_scheduler.sql", namespace="scheduler")


@hookimpl
def forge_registry_loaded(registry, node):
    # every cron expression, time zone and setting is checked before anything starts
    settings.crons_of(registry)


@hookimpl
def forge_services(node):
    return [service.service()]


@hookimpl
def forge_maintenance_tasks(node):
    return maintenance.own_tasks(node.config["scheduler"], node.config.node.dead_after, node.executor.dispatcher)


@hookimpl
def forge_job_finished(node, outcome):
    if "cron_run" not in (outcome.options or {}):
        return None
    crons.count_run(node.telemetry, outcome)
    if node.pool is None:
        return None
    return crons.record_outcome(node.pool, outcome)


@hookimpl
def forge_cli_commands(subparsers):
    cli.add_commands(subparsers)


@hookimpl
def forge_admin_actions(node):
    return admin.admin_actions(lambda: settings.crons_of(node.registry).values() if node.registry else ())
