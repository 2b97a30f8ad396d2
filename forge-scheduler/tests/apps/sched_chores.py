"""Test plugin: maintenance tasks that record which node ran them, and one that always fails."""

from forge_kernel import MaintenanceTask, hookimpl
from forge_kernel.migrations import Migration

SQL = """
CREATE TABLE sched_chore_runs (
    id bigserial PRIMARY KEY,
    node_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


@hookimpl
def forge_migrations():
    return [Migration("sched_chores", 1, "runs", SQL)]


@hookimpl
def forge_maintenance_tasks(node):
    async def record(conn):
        await conn.execute("INSERT INTO sched_chore_runs (node_id) VALUES ($1)", node.id)

    async def broken(conn):
        raise ValueError("this chore always fails")

    return [MaintenanceTask("test.record", 0.1, record), MaintenanceTask("test.broken", 0.1, broken)]
