"""``forge-node workflows check``: replay stored histories against the current code, without
running or writing anything, and report every run the code would block (a divergence)."""

from __future__ import annotations

import uuid
from typing import Any

import attrs

from forge_kernel.app import Registry, definition
from forge_kernel.errors import ForgeError
from forge_kernel.executor import bind_arguments

from ..config import WorkflowConfig
from . import store
from .context import Diverged, Record, ReplayEnd, WorkflowContext, new_scope
from .runtime import Execution, workflow_function


@attrs.frozen
class Divergence:
    run_id: str
    name: str
    run_version: str
    code_version: str
    key: str
    recorded: str
    code: str

    def __str__(self) -> str:
        return (f"run {self.run_id} ({self.name}): at step {self.key} the run (version {self.run_version or '(unknown)'}) "
                f"recorded {self.recorded} but the code (version {self.code_version}) asks for {self.code}")


class _Replayer:
    def __init__(self, registry: Registry, config: WorkflowConfig) -> None:
        self.registry = registry
        self.config = config

    def resolve(self, workflow: Any) -> Any:
        defn = definition(workflow)
        if isinstance(defn, str):
            return self.registry.get(defn) or defn
        return defn


async def replay(registry: Registry, config: WorkflowConfig, row: Any, history: dict[str, Record]) -> Divergence | str | None:
    """Replay one run: a :class:`Divergence`, a message when it cannot be replayed, or ``None``."""
    x = Execution.from_row(_Replayer(registry, config), row)
    x.replay_only = True
    try:
        defn, fn, binder = workflow_function(registry, x.name, x.version)
        args = bind_arguments(binder, x.args or {})
    except (LookupError, ForgeError) as exc:
        return f"run {x.run_id} ({x.name}): " + (exc.message if isinstance(exc, ForgeError) else str(exc))
    new_scope()
    ctx = WorkflowContext(x, history)
    code_version = str(defn.options.get("version", ""))

    def diverged(key: str, recorded: str, code: str) -> Divergence:
        return Divergence(str(x.run_id), x.name, x.version, code_version, key, recorded, code)

    try:
        await fn(ctx, **args)
    except ReplayEnd:
        return None
    except Diverged as d:
        return diverged(d.key, d.recorded, d.code)
    except Exception:
        pass  # a recorded failure raised again: the history was consistent up to it
    left = ctx.unvisited()
    if left:
        rec = history[left[0]]
        return diverged(left[0], f"{rec.kind} {rec.name}", "nothing (the function returned)")
    return None


async def check_runs(conn: Any, registry: Registry, config: WorkflowConfig, *, include_ended: bool = False,
                     limit: int = 10_000) -> tuple[int, list[Divergence | str]]:
    """Replay live runs (and ended ones too with ``include_ended``); (runs checked, problems)."""
    statuses = list(store.LIVE + (store.FINAL if include_ended else ()))
    names = [d.name for d in registry.of_kind("workflow")]
    rows = await conn.fetch(
        """SELECT id, name, version, args::text AS args, claims, steps_done, compensating, cancel_requested, caller,
                  run_as::text AS run_as, error
           FROM forge_workflow_runs WHERE status = ANY($1::text[]) AND NOT compensating
           ORDER BY created_at LIMIT $2""", statuses, limit)
    problems: list[Divergence | str] = []
    for row in rows:
        hist_rows = await conn.fetch(store.HISTORY, row["id"])
        history = {r["key"]: Record(r["key"], r["name"], r["kind"], r["status"], store.loads(r["result"]), r["error"],
                                    r["attempts"]) for r in hist_rows}
        if row["name"] not in names:
            problems.append(f"run {row['id']} ({row['name']}): no workflow of that name in the current code")
            continue
        found = await replay(registry, config, row, history)
        if found is not None:
            problems.append(found)
    return len(rows), problems


__all__ = ["Divergence", "check_runs", "replay", "uuid"]
