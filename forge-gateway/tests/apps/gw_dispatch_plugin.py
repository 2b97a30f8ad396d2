"""A stand-in job store for the gateway tests: records each dispatched JobRequest (name, caller) in
the caller's transaction, so the tests see who HTTP callers' jobs are attributed to without
depending on the worker package."""

from forge_kernel import hookimpl


class RecordingDispatcher:
    async def dispatch(self, conn, requests):
        return [await conn.fetchval("INSERT INTO gw_jobs (name, caller) VALUES ($1, $2) RETURNING id", r.name, r.caller)
                for r in requests]


@hookimpl
def forge_job_dispatcher(node):
    return RecordingDispatcher()
