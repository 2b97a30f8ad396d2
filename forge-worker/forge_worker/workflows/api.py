"""Start and manage workflow runs with only a pool (or a connection): no node needed.

>>> client = WorkflowClient(pool)
>>> run_id = await client.start(onboarding, {"user": user_id}, idempotency_key=f"onboard-{user_id}")
>>> await client.send_event(run_id, "approved", {"by": "alice"})
>>> info = await client.get(run_id)          # status, what it waits on, every step
>>> await client.cancel(run_id)               # runs the compensations, then 'cancelled'
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from typing import Any, Mapping, Sequence

import asyncpg
import attrs

from forge_kernel.app import Registry, definition
from forge_kernel.errors import Conflict, ForgeError, InvalidArgument, NotFound
from forge_kernel.executor import WorkflowRequest, workflow_request

from . import store
from .store import FINAL, LIVE, WorkflowEngine


@attrs.frozen
class StepInfo:
    """One recorded operation of a run (a timeline row)."""

    key: str
    name: str
    kind: str
    status: str
    args: Any
    result: Any
    error: str | None
    attempts: int
    compensation: Any
    claim: int
    node_id: str | None
    started_at: dt.datetime | None
    finished_at: dt.datetime


@attrs.frozen
class RunInfo:
    """A run as stored, with ``waiting_on``: what a run that has not ended waits for, in words."""

    id: str
    name: str
    version: str
    status: str
    compensating: bool
    cancel_requested: bool
    args: Any
    result: Any
    error: str | None
    waiting_on: str | None
    wait: Any
    run_at: dt.datetime | None
    node_id: str | None
    lease_until: dt.datetime | None
    claims: int
    recoveries: int
    idempotency_key: str | None
    correlation_key: str | None
    parent_id: str | None
    caller: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    steps: tuple[StepInfo, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


_COLS = """r.id, r.name, r.version, r.status, r.compensating, r.cancel_requested, r.args::text AS args,
           r.result::text AS result, r.error, r.wait::text AS wait,
           r.run_at, r.node_id, r.lease_until, r.claims, r.recoveries, r.idempotency_key, r.correlation_key,
           r.parent_id, r.caller, r.created_at, r.started_at, r.finished_at"""

# what a due run queues behind: runs due before it (of its workflow, when that one is limited),
# and how many of its workflow are running
_EXPLAIN = f"""
SELECT {_COLS}, now() AS now,
       CASE WHEN r.status = 'pending' AND r.run_at <= now() THEN
           (SELECT count(*) FROM forge_workflow_runs q WHERE q.status IN ('pending', 'waiting') AND q.run_at < r.run_at
              AND ($2::boolean IS FALSE OR q.name = r.name)) END AS ahead,
       CASE WHEN r.status = 'pending' THEN
           (SELECT count(*) FROM forge_workflow_runs q WHERE q.status = 'running' AND q.name = r.name) END AS running
FROM forge_workflow_runs r WHERE r.id = $1
"""

_STEPS = """SELECT key, name, kind, status, args::text AS args, result::text AS result, error, attempts,
                   compensation::text AS compensation, claim, node_id, started_at,
                   finished_at
            FROM forge_workflow_steps WHERE run_id = $1 ORDER BY seq"""


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
    return str(value)


def explain(row: Mapping[str, Any], limit: int | None) -> str | None:
    """What a run that has not ended waits on, from its row (see :class:`RunInfo`)."""
    status, wait = row["status"], store.loads(row["wait"]) or {}
    doing = "compensating" if row["compensating"] else "running"
    if status in FINAL:
        return None
    if status == "running":
        return (f"{doing} on worker {row['node_id']}, which holds its lease until {_fmt(row['lease_until'])} "
                f"(claim {row['claims']})")
    if status == "blocked":
        return (f"blocked: at step {wait.get('key')} the run (version {wait.get('run_version')}) recorded "
                f"{wait.get('recorded')} but the code (version {wait.get('code_version')}) asks for {wait.get('code')}; "
                f"deploy code that matches, or retry/cancel the run")
    if status == "waiting":
        if wait.get("kind") == "parallel":
            parts = [explain({**row, "wait": json.dumps(w)}, limit) for w in wait.get("waits", [])]
            return "parallel branches: " + "; ".join(p for p in parts if p)
        kind = wait.get("kind")
        if kind == "sleep":
            return f"sleeping until {_fmt(wait.get('until'))} (step {wait.get('key')})"
        if kind == "retry":
            return (f"retrying step {wait.get('step')!r} at {_fmt(wait.get('at'))} "
                    f"(attempt {wait.get('attempt')} of {wait.get('of')})")
        if kind in ("event", "child"):
            what = (f"event {' or '.join(repr(e) for e in wait.get('events', []))}" if kind == "event"
                    else f"child run {wait.get('run')} to end")
            deadline = wait.get("deadline")
            return f"waiting for {what}" + (f" until {_fmt(deadline)}" if deadline else " (no timeout)")
        return "waiting"
    # pending
    prefix = "compensating: " if row["compensating"] else ""
    if wait.get("kind") == "recovered":
        prefix += f"recovered after worker {wait.get('node')} stopped (claim {wait.get('claim')}); "
    if row["run_at"] is not None and row["run_at"] > row["now"]:
        return f"{prefix}scheduled for {_fmt(row['run_at'])}"
    if limit is not None and row["running"] is not None and row["running"] >= limit:
        return (f"{prefix}held by the concurrency limit of {row['name']} ({row['running']} of {limit} running); "
                f"position {row['ahead'] + 1} in its queue")
    return f"{prefix}due, waiting for a worker (position {(row['ahead'] or 0) + 1} among due runs)"


def _run_id(value: Any) -> uuid.UUID:
    rid = store.as_uuid(value)
    if rid is None:
        raise InvalidArgument(f"run ids are UUIDs, got {value!r}")
    return rid


class WorkflowClient:
    """Start, inspect, cancel and retry runs and send them events, with a pool or a connection.

    ``registry`` resolves workflow names given as strings (their arguments are then checked and
    their version recorded) and concurrency limits for :meth:`get`'s explanation.
    """

    def __init__(self, db: asyncpg.Pool | asyncpg.Connection, registry: Registry | None = None, *,
                 engine: WorkflowEngine | None = None) -> None:
        self.db = db
        self.registry = registry
        self.engine = engine or WorkflowEngine()

    # --- starting and events -------------------------------------------------------------------------
    def request(self, workflow: Any, args: Mapping[str, Any] | None = None, /, *,
                idempotency_key: str | None = None, correlation_key: str | None = None,
                delay: float | dt.timedelta | None = None, run_at: dt.datetime | None = None,
                run_as: Any = None) -> WorkflowRequest:
        """``run_as``: the ``forge_kernel.Auth`` the run acts as (default: the system, as for jobs
        enqueued from plain Python)."""
        defn = definition(workflow)
        if isinstance(defn, str) and self.registry is not None and self.registry.get(defn) is not None:
            defn = self.registry.get(defn)
        try:
            return workflow_request(defn, dict(args or {}), run_as=run_as, idempotency_key=idempotency_key,
                                    correlation_key=correlation_key, delay=delay, run_at=run_at)
        except TypeError as exc:
            raise InvalidArgument(str(exc)) from None

    async def start(self, workflow: Any, args: Mapping[str, Any] | None = None, /, **options: Any) -> str:
        """Start one run; returns its id (the existing run's id for a known ``idempotency_key``)."""
        return (await self.engine.start(self.db, [self.request(workflow, args, **options)]))[0]

    async def start_many(self, requests: Sequence[WorkflowRequest]) -> list[str]:
        """Start many runs in one round trip; ids in order."""
        return await self.engine.start(self.db, list(requests))

    async def send_event(self, target: str, name: str, payload: Any = None) -> int:
        """Send an event to the live run(s) with this id or correlation key; returns how many."""
        return await self.engine.send_event(self.db, str(target), name, payload)

    # --- reading ---------------------------------------------------------------------------------------
    def _limit(self, name: str) -> int | None:
        defn = self.registry.get(name) if self.registry is not None else None
        return defn.options.get("concurrency") if defn is not None else None

    async def get(self, run_id: str | uuid.UUID, *, steps: bool = True) -> RunInfo | None:
        rid = _run_id(run_id)
        row = await self.db.fetchrow(_EXPLAIN, rid, False)
        if row is None:
            return None
        limit = self._limit(row["name"])
        if limit is not None and row["status"] == "pending":
            row = await self.db.fetchrow(_EXPLAIN, rid, True)
        step_rows = await self.db.fetch(_STEPS, rid) if steps else []
        return _info(row, explain(row, limit), step_rows)

    async def list(self, *, status: str | None = None, name: str | None = None, correlation_key: str | None = None,
                   limit: int = 100) -> list[RunInfo]:
        """Runs, newest first, without their steps."""
        if status is not None and status not in LIVE + FINAL + ("compensating",):
            raise InvalidArgument(f"status must be one of {', '.join(LIVE + FINAL + ('compensating',))}, got {status!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100_000:
            raise InvalidArgument(f"limit must be an integer between 1 and 100000, got {limit!r}")
        rows = await self.db.fetch(
            f"""SELECT {_COLS}, now() AS now, NULL::bigint AS ahead, NULL::bigint AS running
                FROM forge_workflow_runs r
                WHERE ($1::text IS NULL
                       OR (r.status = $1 AND NOT (r.compensating AND r.status IN ('pending', 'running')))
                       OR ($1 = 'compensating' AND r.compensating AND r.status IN ('pending', 'running')))
                  AND ($2::text IS NULL OR r.name = $2) AND ($3::text IS NULL OR r.correlation_key = $3)
                ORDER BY r.created_at DESC, r.id LIMIT $4""", status, name, correlation_key, limit)
        return [_info(r, explain(r, self._limit(r["name"])), []) for r in rows]

    async def counts(self) -> dict[str, dict[str, int]]:
        """Runs per workflow and status."""
        rows = await self.db.fetch("SELECT name, status, count(*) AS n FROM forge_workflow_runs GROUP BY name, status")
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["name"], {})[r["status"]] = r["n"]
        return out

    async def wait(self, run_id: str | uuid.UUID, *, timeout: float = 60.0, interval: float = 0.05) -> RunInfo:
        """Poll until the run has ended; ``forge_kernel.errors.Timeout`` after ``timeout`` seconds."""
        from forge_kernel.errors import Timeout

        rid = _run_id(run_id)
        deadline = time.monotonic() + timeout
        while True:
            info = await self.get(rid, steps=False)
            if info is None:
                raise NotFound(f"no workflow run {rid}")
            if info.status in FINAL:
                return info
            if time.monotonic() > deadline:
                raise Timeout(f"workflow run {rid} has not ended after {timeout:g}s: {info.waiting_on}")
            await asyncio.sleep(interval)

    # --- managing ----------------------------------------------------------------------------------------
    async def cancel(self, run_id: str | uuid.UUID) -> str:
        """Cancel a run: its recorded compensations run in reverse order, then it ends as
        ``cancelled``. Returns ``"requested"`` (a running run is stopped within moments; a run
        asked before stays asked). ``NotFound`` for an unknown run, ``Conflict`` for one that has ended."""
        rid = _run_id(run_id)
        if await cancel_runs(self.db, [rid]):
            return "requested"
        was = await self.db.fetchval("SELECT status FROM forge_workflow_runs WHERE id = $1", rid)
        if was is None:
            raise NotFound(f"no workflow run {rid}")
        if was in LIVE:
            return "requested"  # asked before: its compensations are under way
        raise Conflict(f"workflow run {rid} has already ended ({was})")

    async def retry(self, run_id: str | uuid.UUID, *, from_step: str | None = None) -> str:
        """Run a failed, cancelled or blocked run again (see :func:`retry_run`). ``NotFound`` for an
        unknown run, ``Conflict`` for one in another state."""
        rid = _run_id(run_id)
        conn_ctx = self.db.acquire() if isinstance(self.db, asyncpg.Pool) else _Same(self.db)
        async with conn_ctx as conn:
            async with conn.transaction():
                was = await retry_run(conn, rid, from_step=from_step)
        if was is None:
            raise NotFound(f"no workflow run {rid}")
        if was not in RETRIABLE:
            raise Conflict(f"workflow run {rid} is {was}; only failed, cancelled or blocked runs can be retried")
        return "pending"


#: the statuses a run can be retried from
RETRIABLE = ("failed", "cancelled", "blocked")


async def cancel_runs(db: Any, run_ids: Sequence[uuid.UUID]) -> list[Any]:
    """Ask live runs to cancel, on ``db`` (a pool or a connection, inside the caller's transaction
    if any): a running run is told and stops, any other becomes due and compensates. Runs already
    asked, ended or unknown are left alone. Returns a row (``id``, ``was``: the status before,
    ``status``, ``compensating``) per run asked now."""
    return await db.fetch(store.CANCEL, list(run_ids))


async def retry_run(conn: Any, rid: uuid.UUID, *, from_step: str | None = None) -> str | None:
    """Run a failed, cancelled or blocked run again, on ``conn`` (call inside a transaction).
    Steps recorded before ``from_step`` (a step key or name) keep their results; that step and
    every later record are kept in the history under ``key~N`` and run again. Without
    ``from_step``: from the step that failed, or from the start when compensations already ran
    (their steps were undone). Returns the run's status before (the run changed only when it is
    one of :data:`RETRIABLE`), ``None`` for an unknown run; ``InvalidArgument`` when the run has no
    recorded step ``from_step``."""
    run = await conn.fetchrow("SELECT status FROM forge_workflow_runs WHERE id = $1 FOR UPDATE", rid)
    if run is None or run["status"] not in RETRIABLE:
        return None if run is None else run["status"]
    steps = await conn.fetch("""SELECT key, name, kind, status, seq FROM forge_workflow_steps
                                WHERE run_id = $1 AND position('~' in key) = 0 ORDER BY seq""", rid)
    if from_step is not None:
        start = next((s for s in steps if s["key"] == from_step), None) or next(
            (s for s in steps if s["name"] == from_step and s["kind"] == "step"), None)
        if start is None:
            raise InvalidArgument(f"workflow run {rid} has no recorded step {from_step!r}")
        retire = [s["key"] for s in steps if s["seq"] >= start["seq"] or s["kind"] == "compensation"]
    elif any(s["kind"] == "compensation" for s in steps):
        retire = [s["key"] for s in steps]
    else:
        retire = [s["key"] for s in steps if s["status"] in ("failed", "retrying", "waiting")]
    generation = await conn.fetchval(
        "SELECT count(DISTINCT split_part(key, '~', 2)) FROM forge_workflow_steps "
        "WHERE run_id = $1 AND position('~' in key) > 0", rid)
    await conn.execute("""UPDATE forge_workflow_steps SET key = key || '~' || $3::text
                          WHERE run_id = $1 AND key = ANY($2::text[])""", rid, retire, str(generation + 1))
    await conn.execute(
        """UPDATE forge_workflow_runs SET status = 'pending', run_at = now(), compensating = false,
                  cancel_requested = false, error = NULL, result = NULL, finished_at = NULL, wait = NULL,
                  wait_events = NULL, recoveries = 0, steps_done = steps_done + 1, updated_at = now()
           WHERE id = $1""", rid)
    await conn.execute("""SELECT pg_notify('forge_workflows', s.node_id)
                          FROM (SELECT node_id FROM forge_workflow_sleepers ORDER BY random() LIMIT 1) s""")
    return run["status"]


class _Same:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def __aenter__(self) -> Any:
        return self.conn

    async def __aexit__(self, *exc: Any) -> None:
        return None


def _info(row: Mapping[str, Any], waiting_on: str | None, step_rows: Sequence[Any]) -> RunInfo:
    steps = tuple(StepInfo(key=s["key"], name=s["name"], kind=s["kind"], status=s["status"],
                           args=store.loads(s["args"]), result=store.loads(s["result"]), error=s["error"],
                           attempts=s["attempts"], compensation=store.loads(s["compensation"]), claim=s["claim"],
                           node_id=s["node_id"], started_at=s["started_at"], finished_at=s["finished_at"])
                  for s in step_rows)
    return RunInfo(
        id=str(row["id"]), name=row["name"], version=row["version"], status=row["status"],
        compensating=row["compensating"], cancel_requested=row["cancel_requested"], args=store.loads(row["args"]),
        result=store.loads(row["result"]), error=row["error"], waiting_on=waiting_on, wait=store.loads(row["wait"]),
        run_at=row["run_at"], node_id=row["node_id"], lease_until=row["lease_until"], claims=row["claims"],
        recoveries=row["recoveries"], idempotency_key=row["idempotency_key"], correlation_key=row["correlation_key"],
        parent_id=str(row["parent_id"]) if row["parent_id"] else None, caller=row["caller"],
        created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"], steps=steps)


__all__ = ["RETRIABLE", "ForgeError", "RunInfo", "StepInfo", "WorkflowClient", "cancel_runs", "retry_run"]
