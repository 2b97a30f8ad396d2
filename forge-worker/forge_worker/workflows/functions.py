"""``forge.workflows.*``: the workflow API over ``/rpc`` for operators (role ``admin``).

Every function needs an authenticated caller with the ``admin`` role (``[gateway]`` API keys or
tokens carry roles). Apps start runs of their own from their own mutations and actions with
``ctx.start_workflow(...)``, under their own rules.
"""

from __future__ import annotations

from typing import Any

from forge_kernel import mutation, query
from forge_kernel.errors import InvalidArgument

from .api import WorkflowClient

ADMIN = ("admin",)


def _client(ctx: Any) -> WorkflowClient:
    return WorkflowClient(ctx.db.conn, ctx.node.registry if ctx.node is not None else None)


def _info(info: Any) -> dict[str, Any]:
    return info.to_dict() if info is not None else None


@mutation(name="forge.workflows.start", roles=ADMIN)
async def start(ctx: Any, workflow: str, args: dict[str, Any] | None = None, idempotency_key: str | None = None,
                correlation_key: str | None = None, delay: float | None = None) -> str:
    """Start a run of ``workflow`` (its id; the existing run's for a known idempotency key)."""
    defn = ctx.node.registry.get(workflow) if ctx.node is not None else None
    if defn is None or defn.kind != "workflow":
        raise InvalidArgument(f"no workflow named {workflow!r}")
    return await ctx.start_workflow(defn, idempotency_key=idempotency_key, correlation_key=correlation_key,
                                    delay=delay, **dict(args or {}))


@mutation(name="forge.workflows.send_event", roles=ADMIN)
async def send_event(ctx: Any, target: str, name: str, payload: Any = None) -> int:
    """Send an event to the live run(s) with this id or correlation key; how many it reached."""
    return await ctx.send_event(target, name, payload)


@query(name="forge.workflows.get", roles=ADMIN)
async def get(ctx: Any, run_id: str) -> dict[str, Any] | None:
    """A run with its steps and what it waits on."""
    return _info(await _client(ctx).get(run_id))


@query(name="forge.workflows.list", roles=ADMIN)
async def list_runs(ctx: Any, status: str | None = None, workflow: str | None = None,
                    correlation_key: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Runs, newest first."""
    return [_info(i) for i in await _client(ctx).list(status=status, name=workflow, correlation_key=correlation_key,
                                                      limit=limit)]


@mutation(name="forge.workflows.cancel", roles=ADMIN)
async def cancel(ctx: Any, run_id: str) -> str:
    """Cancel a run (its compensations run, then it ends as cancelled)."""
    return await _client(ctx).cancel(run_id)


@mutation(name="forge.workflows.retry", roles=ADMIN)
async def retry(ctx: Any, run_id: str, from_step: str | None = None) -> str:
    """Run a failed, cancelled or blocked run again (from a chosen step)."""
    return await _client(ctx).retry(run_id, from_step=from_step)


__all__ = ["cancel", "get", "list_runs", "retry", "send_event", "start"]
