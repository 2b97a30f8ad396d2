"""``forge.workflows.*``: the workflow API over ``/rpc`` for operators (role ``admin``).

Every function needs an authenticated caller with the ``admin`` role (``[gateway]`` API keys or
tokens carry roles). Apps start runs of their own from their own mutations and actions with
``ctx.start_workflow(...)``, under their own rules. Arguments, payloads and results that can be
any JSON travel as JSON text (``args``, ``payload``, ``*_json``), so every function has concrete
types (the TypeScript client generator needs them).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import attrs

from forge_kernel import mutation, query
from forge_kernel.errors import InvalidArgument

from .api import RunInfo, WorkflowClient

ADMIN = ("admin",)


@attrs.frozen
class StepView:
    key: str
    name: str
    kind: str
    status: str
    attempts: int
    error: str | None
    result_json: str | None
    args_json: str | None
    compensation_json: str | None
    node_id: str | None
    started_at: dt.datetime | None
    finished_at: dt.datetime


@attrs.frozen
class RunView:
    id: str
    name: str
    version: str
    status: str
    compensating: bool
    waiting_on: str | None
    error: str | None
    args_json: str
    result_json: str | None
    node_id: str | None
    claims: int
    recoveries: int
    idempotency_key: str | None
    correlation_key: str | None
    parent_id: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    steps: list[StepView]


def _text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def _view(info: RunInfo) -> RunView:
    return RunView(
        id=info.id, name=info.name, version=info.version, status=info.status, compensating=info.compensating,
        waiting_on=info.waiting_on, error=info.error, args_json=_text(info.args) or "{}",
        result_json=_text(info.result), node_id=info.node_id, claims=info.claims, recoveries=info.recoveries,
        idempotency_key=info.idempotency_key, correlation_key=info.correlation_key, parent_id=info.parent_id,
        created_at=info.created_at, started_at=info.started_at, finished_at=info.finished_at,
        steps=[StepView(key=s.key, name=s.name, kind=s.kind, status=s.status, attempts=s.attempts, error=s.error,
                        result_json=_text(s.result), args_json=_text(s.args), compensation_json=_text(s.compensation),
                        node_id=s.node_id, started_at=s.started_at, finished_at=s.finished_at) for s in info.steps])


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{what} must be JSON text: {exc}") from None


def _client(ctx: Any) -> WorkflowClient:
    return WorkflowClient(ctx.db.conn, ctx.node.registry if ctx.node is not None else None)


@mutation(name="forge.workflows.start", roles=ADMIN)
async def start(ctx: Any, workflow: str, args: str = "{}", idempotency_key: str | None = None,
                correlation_key: str | None = None, delay: float | None = None) -> str:
    """Start a run of ``workflow`` with ``args`` (a JSON object as text); returns its id (the
    existing run's for a known idempotency key)."""
    defn = ctx.node.registry.get(workflow) if ctx.node is not None else None
    if defn is None or defn.kind != "workflow":
        raise InvalidArgument(f"no workflow named {workflow!r}")
    values = _json(args, "args")
    if not isinstance(values, dict):
        raise InvalidArgument(f"args must be a JSON object, got {type(values).__name__}")
    return await ctx.start_workflow(defn, idempotency_key=idempotency_key, correlation_key=correlation_key,
                                    delay=delay, **values)


@mutation(name="forge.workflows.send_event", roles=ADMIN)
async def send_event(ctx: Any, target: str, name: str, payload: str = "null") -> int:
    """Send an event (``payload``: JSON text) to the live run(s) with this id or correlation key;
    how many it reached."""
    return await ctx.send_event(target, name, _json(payload, "payload"))


@query(name="forge.workflows.get", roles=ADMIN)
async def get(ctx: Any, run_id: str) -> RunView | None:
    """A run with its steps and what it waits on."""
    info = await _client(ctx).get(run_id)
    return _view(info) if info is not None else None


@query(name="forge.workflows.list", roles=ADMIN)
async def list_runs(ctx: Any, status: str | None = None, workflow: str | None = None,
                    correlation_key: str | None = None, limit: int = 100) -> list[RunView]:
    """Runs, newest first (without their steps)."""
    return [_view(i) for i in await _client(ctx).list(status=status, name=workflow, correlation_key=correlation_key,
                                                      limit=limit)]


@mutation(name="forge.workflows.cancel", roles=ADMIN)
async def cancel(ctx: Any, run_id: str) -> str:
    """Cancel a run (its compensations run, then it ends as cancelled)."""
    return await _client(ctx).cancel(run_id)


@mutation(name="forge.workflows.retry", roles=ADMIN)
async def retry(ctx: Any, run_id: str, from_step: str | None = None) -> str:
    """Run a failed, cancelled or blocked run again (from a chosen step)."""
    return await _client(ctx).retry(run_id, from_step=from_step)


__all__ = ["RunView", "StepView", "cancel", "get", "list_runs", "retry", "send_event", "start"]
