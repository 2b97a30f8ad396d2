"""The workflow runtime's operator actions (``forge_admin_actions``): cancel and retry runs, send
them events.

Each is the engine's own function (:func:`.api.cancel_runs`, :func:`.api.retry_run`,
:meth:`.store.WorkflowEngine.send_event`, the same the ``forge.workflows.*`` functions and the
CLI use) run on the caller's connection and transaction. They only write rows; whichever worker
node claims the run next does the work (compensations, the retried steps, the resumed wait), so
no action depends on which node leads the cluster.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Mapping, Sequence

from forge_kernel.admin import ActionResult, AdminAction
from forge_kernel.errors import InvalidArgument, NotFound

from . import store
from .api import RETRIABLE, cancel_runs, retry_run
from .store import WorkflowEngine


def _run_ids(name: str, targets: Sequence[str]) -> list[uuid.UUID]:
    out = []
    for t in targets:
        rid = store.as_uuid(str(t).strip()) if isinstance(t, str) and len(t) <= 64 else None
        if rid is None:
            raise InvalidArgument(f"{name}: a workflow run id is a UUID, got {str(t)[:80]!r}")
        out.append(rid)
    return out


async def _names(conn: Any, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The runs' workflow names; ``NotFound`` naming a run that does not exist."""
    found = {r["id"]: r["name"] for r in await conn.fetch(
        "SELECT id, name FROM forge_workflow_runs WHERE id = ANY($1::uuid[])", ids)}
    missing = [str(i) for i in ids if i not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise NotFound(f"no workflow run {missing[0]}{more}")
    return found


async def cancel(conn: Any, targets: Sequence[str], params: Mapping[str, Any], actor: str) -> ActionResult:
    ids = _run_ids("workflow.cancel", targets)
    names = await _names(conn, ids) if ids else {}
    rows = await cancel_runs(conn, ids) if ids else []
    before = [{"id": str(r["id"]), "name": names[r["id"]], "status": r["was"]} for r in rows]
    after = [{"id": str(r["id"]), "name": names[r["id"]], "status": r["status"], "compensating": r["compensating"],
              "cancel_requested": True} for r in rows]
    return ActionResult(len(rows), before, after,
                        f"{len(rows)} run(s) asked to cancel: their compensations run, then they end as cancelled")


def _from_step(params: Mapping[str, Any]) -> str | None:
    value = params.get("from_step")
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise InvalidArgument(f"workflow.retry: from_step is a step key or name (text of at most 200 characters), "
                              f"got {str(value)[:80]!r}")
    return value


async def retry(conn: Any, targets: Sequence[str], params: Mapping[str, Any], actor: str) -> ActionResult:
    ids = _run_ids("workflow.retry", targets)
    from_step = _from_step(params)
    names = await _names(conn, ids) if ids else {}
    before, after = [], []
    for rid in dict.fromkeys(ids):
        was = await retry_run(conn, rid, from_step=from_step)
        if was in RETRIABLE:  # a run in another state is left alone (retrying twice retries once)
            before.append({"id": str(rid), "name": names[rid], "status": was})
            after.append({"id": str(rid), "name": names[rid], "status": "pending", "from_step": from_step})
    where = f"from step {from_step!r}" if from_step else "from the step that failed"
    return ActionResult(len(before), before, after, f"{len(before)} run(s) run again {where}")


def send_event_action(engine: Callable[[], WorkflowEngine]) -> Any:
    async def send_event(conn: Any, targets: Sequence[str], params: Mapping[str, Any], actor: str) -> ActionResult:
        event = params.get("event")
        if not isinstance(event, str) or not event:
            raise InvalidArgument(f"workflow.send_event: params.event (the event's name) is required, got {event!r}")
        payload, sender = params.get("payload"), engine()
        reached = []
        for target in dict.fromkeys(str(t) for t in targets):
            # NotFound when no live run has this id or correlation key: nothing is sent to any target
            reached.append((target, await sender.send_event(conn, target, event, payload)))
        total = sum(n for _, n in reached)
        return ActionResult(total, [{"target": t, "event": event} for t, _ in reached],
                            [{"target": t, "event": event, "runs": n} for t, n in reached],
                            f"event {event!r} sent to {total} run(s)")
    return send_event


def admin_actions(engine: Callable[[], WorkflowEngine]) -> list[AdminAction]:
    """``engine()``: the node's :class:`WorkflowEngine` (its ``max_value_bytes`` bounds a payload)."""
    return [
        AdminAction("workflow.cancel", "Cancel runs: their compensations run in reverse order, then they end "
                    "as cancelled", cancel, max_targets=1000),
        AdminAction("workflow.retry", "Run failed, cancelled or blocked runs again, from the step that failed "
                    "or from a chosen step (params.from_step: a step key or name; steps before it keep "
                    "their results)", retry, params=("from_step",), max_targets=100),
        AdminAction("workflow.send_event", "Send an event (params.event, params.payload: any JSON) to the live "
                    "runs with this id or correlation key", send_event_action(engine), params=("event", "payload"),
                    max_targets=100),
    ]
