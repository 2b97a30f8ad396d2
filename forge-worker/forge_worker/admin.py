"""The worker's operator actions (``forge_admin_actions``): jobs and queues.

Each runs on the caller's connection and transaction, reads the targets' state first (locking
them), changes only targets the action applies to, and reports them before and after, so a
repeated action changes nothing. The statements are :class:`JobQueue`'s: the dashboard and the
CLI share one implementation.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from forge_kernel.admin import ActionResult, AdminAction
from forge_kernel.errors import InvalidArgument, NotFound

from .queue import JobQueue, _queues


def _job_ids(targets: Sequence[str]) -> list[int]:
    out = []
    for t in targets:
        text = str(t).strip()
        if not text.isdigit() or not 0 < int(text) < 2**63:
            raise InvalidArgument(f"a job id is a positive whole number, got {t!r}")
        out.append(int(text))
    return out


async def _states(conn: Any, ids: list[int]) -> dict[int, dict[str, Any]]:
    rows = await conn.fetch("SELECT id, status, name, queue, attempt, cancel_requested FROM forge_jobs "
                            "WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", ids)
    return {r["id"]: {"id": str(r["id"]), "status": r["status"], "name": r["name"], "queue": r["queue"],
                      "attempt": r["attempt"], "cancel_requested": r["cancel_requested"]} for r in rows}


async def retry_jobs(conn: Any, targets: Sequence[str], params: Mapping[str, Any], actor: str) -> ActionResult:
    ids = _job_ids(targets)
    before = await _states(conn, ids)
    done = await JobQueue(conn).retry(ids) if ids else []
    return ActionResult(len(done), [before[i] for i in done],
                        [{**before[i], "status": "pending", "attempt": 0} for i in done],
                        f"{len(done)} dead-lettered job(s) back in the queue")


async def discard_jobs(conn: Any, targets: Sequence[str], params: Mapping[str, Any], actor: str) -> ActionResult:
    ids = _job_ids(targets)
    before = await _states(conn, ids)
    done = await JobQueue(conn).discard(ids) if ids else []
    return ActionResult(len(done), [before[i] for i in done], [{**before[i], "status": "discarded"} for i in done],
                        f"{len(done)} dead-lettered job(s) discarded (kept in history)")


async def cancel_jobs(conn: Any, targets: Sequence[str], params: Mapping[str, Any], actor: str) -> ActionResult:
    ids = _job_ids(targets)
    before = await _states(conn, ids)
    removed, asked = await JobQueue(conn).cancel_many(ids) if ids else ([], [])
    after = [{**before[i], "status": "cancelled"} for i in removed]
    after += [{**before[i], "cancel_requested": True} for i in asked]
    changed = removed + asked
    return ActionResult(len(changed), [before[i] for i in changed], after,
                        f"{len(removed)} job(s) cancelled, {len(asked)} running job(s) asked to stop")


def registry_queues(registry: Any) -> set[str]:
    """Queues the app's jobs and crons name (``default`` always exists)."""
    found = {"default"}
    if registry is not None:
        for kind in ("job", "cron"):
            found |= {d.options.get("queue") or "default" for d in registry.of_kind(kind)}
    return found


def pause_action(known: Callable[[], set[str]]) -> Any:
    async def pause_queues(conn: Any, targets: Sequence[str], params: Mapping[str, Any], actor: str) -> ActionResult:
        queues = _queues(list(targets))
        names = known()
        for q in queues:
            # a queue is a name that jobs carry: one no job, cron or row knows is most likely a typo
            if q not in names and not await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM forge_jobs WHERE queue = $1) "
                    "OR EXISTS (SELECT 1 FROM forge_worker_queue_pauses WHERE queue = $1)", q):
                raise NotFound(f"no queue named {q!r}: no job or cron of the app uses it and no job is in it; "
                               f"known queues: {', '.join(sorted(names))}")
        done = await JobQueue(conn).pause(queues, by=actor)
        return ActionResult(len(done), [{"queue": q, "paused": False} for q in done],
                            [{"queue": q, "paused": True} for q in done], f"{len(done)} queue(s) paused")
    return pause_queues


async def resume_queues(conn: Any, targets: Sequence[str], params: Mapping[str, Any], actor: str) -> ActionResult:
    done = await JobQueue(conn).resume(_queues(list(targets)))
    return ActionResult(len(done), [{"queue": q, "paused": True} for q in done],
                        [{"queue": q, "paused": False} for q in done], f"{len(done)} queue(s) resumed")


def admin_actions(registry: Callable[[], Any]) -> list[AdminAction]:
    return [
        AdminAction("job.retry", "Put dead-lettered jobs back in the queue with fresh attempts", retry_jobs),
        AdminAction("job.cancel", "Cancel jobs: waiting ones are removed, running ones asked to stop", cancel_jobs),
        AdminAction("job.discard", "Drop dead-lettered jobs (kept in history as discarded)", discard_jobs),
        AdminAction("queue.pause", "Stop claiming jobs of the queue (running jobs finish)",
                    pause_action(lambda: registry_queues(registry())), max_targets=100),
        AdminAction("queue.resume", "Claim jobs of the queue again", resume_queues, max_targets=100),
    ]
