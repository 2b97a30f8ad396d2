"""The scheduler's operator actions (``forge_admin_actions``): trigger, pause and resume crons.

They write what the leader reads (a ``forge_cron_triggers`` row, the ``paused`` flag), through
the same functions as ``forge-node crons``, so they work whichever node leads and across a
failover: the next leader turns a pending trigger into exactly one run.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from forge_kernel.admin import ActionResult, AdminAction
from forge_kernel.errors import InvalidArgument

from . import api
from .settings import CronSettings


def _names(targets: Sequence[str]) -> list[str]:
    out = []
    for t in targets:
        if not isinstance(t, str) or not t.strip() or len(t) > 200:
            raise InvalidArgument(f"a cron name is a non-empty string of at most 200 characters, got {t!r}")
        out.append(t)
    return out


def admin_actions(known: Callable[[], Iterable[CronSettings]]) -> list[AdminAction]:
    """``known()``: the crons of this node's registry (their state row may not exist yet)."""

    async def trigger(conn: Any, targets: Sequence[str], params: Mapping[str, Any], actor: str) -> ActionResult:
        names = _names(targets)
        ids = [await api.trigger(conn, n, requested_by=actor, known=known()) for n in names]
        return ActionResult(len(ids), [{"cron": n} for n in names],
                            [{"cron": n, "trigger_request": i} for n, i in zip(names, ids)],
                            f"{len(ids)} run(s) requested; the scheduler leader starts each on its next tick")

    def toggle(pause: bool) -> Any:
        async def run(conn: Any, targets: Sequence[str], params: Mapping[str, Any], actor: str) -> ActionResult:
            names, changed = _names(targets), []
            for n in names:
                if await (api.pause if pause else api.resume)(conn, n, known=known()):
                    changed.append(n)
            return ActionResult(len(changed), [{"cron": n, "paused": not pause} for n in changed],
                                [{"cron": n, "paused": pause} for n in changed],
                                f"{len(changed)} cron(s) {'paused' if pause else 'resumed'}")
        return run

    return [AdminAction("cron.trigger", "Run the cron once now (also when paused)", trigger, max_targets=100),
            AdminAction("cron.pause", "Stop scheduling the cron (slots while paused never run)", toggle(True),
                        max_targets=1000),
            AdminAction("cron.resume", "Schedule the cron again from now", toggle(False), max_targets=1000)]
