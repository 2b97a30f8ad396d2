"""Test-only job store: a forge_job_dispatcher that writes jobs into sched_fake_jobs.

It lets scheduler tests check what was enqueued (and that it commits with the run row)
without the real worker. Loaded with FORGE_PLUGINS=sched_fake_store.
"""

from __future__ import annotations


from forge_kernel import hookimpl
from forge_kernel.migrations import Migration

SQL = """
CREATE TABLE sched_fake_jobs (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    options jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class FakeDispatcher:
    async def dispatch(self, conn, requests):
        ids = []
        for r in requests:
            ids.append(await conn.fetchval("INSERT INTO sched_fake_jobs (name, options) VALUES ($1, $2) RETURNING id",
                                           r.name, dict(r.options)))
        return ids


@hookimpl
def forge_migrations():
    return [Migration("sched_fake_store", 1, "jobs", SQL)]


@hookimpl
def forge_job_dispatcher(node):
    return FakeDispatcher()
