"""Operator actions published by the packages that own the tables they change.

The admin dashboard (and any other operator tool) never writes another package's tables itself:
it asks the owners, through the ``forge_admin_actions`` hook, for named actions (``job.retry``,
``cron.trigger``, ``node.drain`` ...) and runs them. The invariants stay with the owner (which
rows a cancel may delete, how a trigger reaches the scheduler leader), and a tool only chooses
the targets and records who did what.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable, Mapping, Sequence

import attrs

from .errors import InvalidArgument

#: what an action applies to; a target is always given as text (a job id, a queue or cron name, a run
#: id, a node id)
TARGET_KINDS = ("job", "queue", "cron", "workflow", "node")
_NAME = re.compile(r"^(job|queue|cron|workflow|node)\.[a-z][a-z_]{1,30}$")


@attrs.frozen
class ActionResult:
    """What one run of an action did: how many targets changed, each changed target's state
    before and after (small dicts an operator can read: ``{"id": "12", "status": "dead"}``), and
    a sentence for people. Targets left alone (already in the end state, or not found) are not
    counted, which is what makes a repeated action a no-op."""

    affected: int
    before: list[dict[str, Any]] = attrs.field(factory=list)
    after: list[dict[str, Any]] = attrs.field(factory=list)
    message: str = ""


def _action_name(inst: Any, attr: Any, value: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"admin action name {value!r} must be '<target>.<verb>' with target one of "
                         f"{', '.join(TARGET_KINDS)} and a lower-case verb")


@attrs.frozen
class AdminAction:
    """One operator action. ``run(conn, targets, params, actor)`` performs it on ``conn`` (inside the
    caller's transaction, so the caller's audit record commits with it) and returns an
    :class:`ActionResult`. ``params`` holds only the names listed in ``params``; ``actor`` names who
    asked (for the owner's own records, e.g. a cron trigger's ``requested_by``)."""

    name: str = attrs.field(validator=_action_name)
    summary: str
    run: Callable[[Any, Sequence[str], Mapping[str, Any], str], Awaitable[ActionResult]]
    #: parameter names the action takes besides its targets (``("event", "payload")``)
    params: tuple[str, ...] = ()
    #: whether one call may name many targets (a whole filter); False: exactly one target
    bulk: bool = True
    #: most targets one call may name (the owner's bound on a single transaction)
    max_targets: int = 10_000

    @property
    def target(self) -> str:
        return self.name.split(".", 1)[0]


def collect(results: Sequence[Sequence[AdminAction] | None]) -> dict[str, AdminAction]:
    """The hook's results by name; two plugins publishing one name is an error naming it."""
    out: dict[str, AdminAction] = {}
    for group in results:
        for action in group or ():
            if not isinstance(action, AdminAction):
                raise TypeError(f"forge_admin_actions must return AdminAction objects, got {action!r}")
            if action.name in out:
                raise ValueError(f"admin action {action.name!r} is published by two plugins")
            out[action.name] = action
    return out


# --- the kernel's own: draining a node ------------------------------------------------------
#: a node's heartbeat reads this key of its ``forge_nodes.info`` and drains itself when it is set
DRAIN_KEY = "drain_requested"


async def drain_nodes(conn: Any, targets: Sequence[str], params: Mapping[str, Any], actor: str) -> ActionResult:
    """Ask nodes to drain (stop taking work, finish what runs, exit 0) as on SIGTERM. The node sees
    the request on its next heartbeat. Nodes already draining, stopped, dead, asked before or
    unknown are left alone."""
    ids = [str(t) for t in targets]
    for t in ids:  # PostgreSQL text cannot hold NUL: say which target, do not fail in the driver
        if not t or "\x00" in t or len(t) > 200:
            raise InvalidArgument(f"node.drain: {t!r} is not a node id")
    rows = await conn.fetch(
        """WITH asked AS (
               SELECT id, status FROM forge_nodes
               WHERE id = ANY($1::text[]) AND status IN ('starting', 'running') AND NOT (info ? $2)
               FOR UPDATE)
           UPDATE forge_nodes n SET info = n.info || jsonb_build_object($2::text, jsonb_build_object(
                   'by', $3::text, 'at', now()))
           FROM asked WHERE n.id = asked.id
           RETURNING n.id, asked.status""", ids, DRAIN_KEY, actor)
    before = [{"id": r["id"], "status": r["status"]} for r in rows]
    after = [{"id": r["id"], "status": r["status"], DRAIN_KEY: True} for r in rows]
    return ActionResult(len(rows), before, after, f"{len(rows)} node(s) asked to drain")


def kernel_actions() -> list[AdminAction]:
    return [AdminAction("node.drain", "Drain the node: stop taking work, finish running work, exit", drain_nodes,
                        max_targets=1000)]
