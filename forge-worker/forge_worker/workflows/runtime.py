"""The workflow runtime of a worker node: claims due runs, executes them (replaying recorded
steps), keeps their leases, runs compensations, recovers runs whose worker died.

Loops (each holds one pool connection while it works):

* **claim** - claims due runs up to the free capacity with ``FOR UPDATE SKIP LOCKED`` (limited
  workflows under an advisory lock, so limits hold cluster-wide), then sleeps until a NOTIFY
  hint, a free slot, the next due timer or the poll interval;
* **lease** - renews the leases of running runs, notices cancellations and lost leases; every
  ``rescue_interval`` recovers runs whose worker stopped heartbeating anywhere.

Wake-up hints arrive on the job worker's LISTEN connection (one per node).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
import traceback
import uuid
from typing import Any

import asyncpg
import attrs
from loguru import logger

from forge_kernel.app import FunctionDef, _signature
from forge_kernel.errors import ForgeError
from forge_kernel.executor import SYSTEM, Auth, bind_arguments, workflow_request
from forge_kernel.convert import unstructure

from ..config import WorkflowConfig
from ..runtime import backoff_delay
from . import store
from .context import (Diverged, LeaseLost, Park, Record, ReplayEnd, Suspended, WorkflowContext, _error_text,
                      _structured_args, new_scope, resolve_ref)

# InternalClientError: asyncpg's answer on a connection whose protocol state a lost server left
# mid-operation ("cannot switch to state 12; another operation (2) is in progress")
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
              asyncio.TimeoutError, ConnectionError)
#: what a failed write of the runtime raises into workflow code (never a workflow's own failure)
_WRITE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, ConnectionError)
#: errors after which a writer's connection is not used again (the server's own errors leave it usable)
_CONNECTION_BROKEN = (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError, ConnectionError)


#: connections that write checkpoints and run endings, each held for the node's life (no pool
#: round trip and reset per statement), each writing whatever is waiting in one statement
WRITERS = 4


def writer_count(pool_max: int) -> int:
    """Writers for a pool of ``pool_max``: up to WRITERS, one per 5 pool connections (at least one),
    so the writers never hold the connections running steps and jobs need."""
    return max(1, min(WRITERS, pool_max // 5))
WRITER_BATCH = 500


async def _retrying(call: Any, *args: Any) -> Any:
    """A statement that lost a deadlock or serialization race (it did nothing) runs again."""
    for attempt in range(5):
        try:
            return await call(*args)
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
            if attempt == 4:
                raise
            await asyncio.sleep(0.01 * (attempt + 1))


class Writer:
    """Writes for executions on a few held connections. Checkpoints waiting together go out in
    one statement (one commit); other statements run one by one, in arrival order."""

    def __init__(self, pool: Any, lease: float, node_id: str, commit_mode: str) -> None:
        self.pool, self.lease, self.node_id, self.commit_mode = pool, lease, node_id, commit_mode
        self.checkpoints: list[tuple[uuid.UUID, int, list[tuple], asyncio.Future]] = []
        self.endings: list[tuple[uuid.UUID, int, str, str | None, str | None, list[tuple], asyncio.Future]] = []
        self.statements: list[tuple[str, str, tuple, asyncio.Future]] = []
        self.ready = asyncio.Event()

    async def checkpoint(self, run_id: uuid.UUID, claims: int, rows: list[tuple]) -> bool:
        """Record ``rows`` for this claim of the run; False when the claim is stale."""
        fut = asyncio.get_running_loop().create_future()
        self.checkpoints.append((run_id, claims, rows, fut))
        self.ready.set()
        return await fut

    async def finish(self, run_id: uuid.UUID, claims: int, status: str, result: str | None,
                     error: str | None, rows: list[tuple] = ()) -> bool:
        """End this claim of the run, recording ``rows`` (operations not checkpointed yet) with
        it; False when the claim is stale (and nothing was written)."""
        fut = asyncio.get_running_loop().create_future()
        self.endings.append((run_id, claims, status, result, error, rows, fut))
        self.ready.set()
        return await fut

    async def run(self, method: str, sql: str, *args: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.statements.append((method, sql, args, fut))
        self.ready.set()
        return await fut

    async def loop(self) -> None:
        while True:
            try:
                async with self.pool.acquire() as conn:
                    while True:
                        await self.ready.wait()
                        if not self.checkpoints and not self.statements and not self.endings:
                            self.ready.clear()
                            continue
                        # one of each per turn: nothing waits behind a stream of the others
                        if self.statements:
                            await self._statement(conn, *self.statements.pop(0))
                        if self.checkpoints:
                            batch, self.checkpoints = self.checkpoints[:WRITER_BATCH], self.checkpoints[WRITER_BATCH:]
                            await self._write(conn, batch)
                        if self.endings:
                            batch, self.endings = self.endings[:WRITER_BATCH], self.endings[WRITER_BATCH:]
                            await self._end(conn, batch)
            except _DB_ERRORS as exc:
                logger.warning(f"workflow writer lost the database ({type(exc).__name__}: {exc}); retrying")
                await asyncio.sleep(0.2 + random.random() * 0.3)

    async def _statement(self, conn: Any, method: str, sql: str, args: tuple, fut: asyncio.Future) -> None:
        if fut.done():
            return
        try:
            result = await getattr(conn, method)(sql, *args)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError("writer stopped"))
            if conn.is_closed() or not isinstance(exc, Exception) or isinstance(exc, _CONNECTION_BROKEN):
                raise
            return  # a statement's own error fails its caller, not the writer
        if not fut.done():
            fut.set_result(result)

    async def _write(self, conn: Any, batch: list[tuple]) -> None:
        cols: list[list[Any]] = [[] for _ in range(12)]
        for run_id, claims, rows, _ in batch:
            for row in rows:
                cols[0].append(run_id)
                cols[1].append(claims)
                for col, value in zip(cols[2:], row):
                    col.append(value)
        try:
            got = await _retrying(conn.fetch, store.CHECKPOINT, self.lease, self.node_id, self.commit_mode, *cols)
        except BaseException as exc:
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError("writer stopped"))
            if conn.is_closed() or not isinstance(exc, Exception) or isinstance(exc, _CONNECTION_BROKEN):
                raise
            return
        written: dict[uuid.UUID, int] = {}
        for r in got:
            written[r["run_id"]] = written.get(r["run_id"], 0) + 1
        for run_id, _, rows, fut in batch:
            if not fut.done():
                fut.set_result(written.get(run_id, 0) >= len(rows))
                written[run_id] = written.get(run_id, 0) - len(rows)


    async def _end(self, conn: Any, batch: list[tuple]) -> None:
        steps: list[list[Any]] = [[] for _ in range(11)]
        for b in batch:
            for row in b[5]:
                steps[0].append(b[0])
                for col, value in zip(steps[1:], row):
                    col.append(value)
        try:
            rows = await _retrying(conn.fetch, store.FINISH, [b[0] for b in batch], [b[1] for b in batch],
                                   [b[2] for b in batch], [b[3] for b in batch], [b[4] for b in batch], self.commit_mode,
                                   *steps, self.node_id)
        except BaseException as exc:
            for b in batch:
                if not b[6].done():
                    b[6].set_exception(exc if isinstance(exc, Exception) else ConnectionError("writer stopped"))
            if conn.is_closed() or not isinstance(exc, Exception) or isinstance(exc, _CONNECTION_BROKEN):
                raise
            return
        ended = {r["id"] for r in rows}
        for b in batch:
            if not b[6].done():
                b[6].set_result(b[0] in ended)


class CancelRequested(BaseException):
    """Someone asked to cancel the run while it was about to wait."""


@attrs.define(eq=False)
class Execution:
    """One claim of one run on this node: the fenced writes the workflow context makes."""

    runtime: Any
    run_id: uuid.UUID
    name: str
    version: str
    args: Any
    claims: int
    steps_done: int
    compensating: bool
    cancel_requested: bool
    caller: str | None
    error: str | None
    run_as: Any = None
    task: asyncio.Task | None = None
    #: why the task was cancelled from outside: cancel | lease_lost | shutdown
    stop_reason: str | None = None
    #: compensation has begun: a cancellation must not interrupt it
    undoing: bool = False
    #: ``workflows check``: return recorded results, never run or write anything
    replay_only: bool = False
    #: the run was given up or ended by this claim: nothing left to renew
    ended: bool = False
    #: the run's ending is being written: a renewal that no longer finds it running is not a lost lease
    ending: bool = False
    #: the workflow context of this execution (its operations not checkpointed yet)
    ctx: Any = None

    @classmethod
    def from_row(cls, runtime: Any, row: Any) -> "Execution":
        return cls(runtime, row["id"], row["name"], row["version"], store.loads(row["args"]), row["claims"],
                   row["steps_done"], row["compensating"], row["cancel_requested"], row["caller"], row["error"],
                   store.loads(row.get("run_as")))

    @property
    def config(self) -> WorkflowConfig:
        return self.runtime.config

    @property
    def auth(self) -> Auth:
        """Who started the run: its steps (app functions) and children act as that identity."""
        return Auth.from_job(self.run_as, self.caller)

    def resolve(self, workflow: Any) -> Any:
        return self.runtime.resolve(workflow)

    async def checkpoint(self, rows: list[tuple]) -> None:
        if not await self.runtime.writer.checkpoint(self.run_id, self.claims, rows):
            raise LeaseLost()
        self.runtime.stats["checkpoints"] += 1

    async def consume(self, key: str, op_name: str, names: list[str], info: str) -> tuple[Any, int]:
        row = await self.runtime.writer.run("fetchrow", store.CONSUME, self.run_id, self.claims, self.config.lease,
                                            self.runtime.node_id, names, key, op_name, info,
                                            dt.datetime.now(dt.timezone.utc))
        if not row["owned"]:
            raise LeaseLost()
        if row["id"] is not None:
            return {"name": row["name"], "payload": store.loads(row["payload"]), "event_id": row["id"]}, row["seen"]
        return None, row["seen"]

    async def suspend(self, run_at: dt.datetime | None, wait: dict[str, Any], wait_events: list[str] | None,
                      seen: int | None) -> None:
        """Give the run up until ``run_at`` / an event; raises :class:`Suspended`. Returns when an
        event arrived since ``seen`` (the run must look at its mailbox again)."""
        writer = self.runtime.writer
        done = await writer.run("fetchval", store.SUSPEND, self.run_id, self.claims, run_at, store.dumps(wait, "wait"),
                                wait_events, seen)
        if done is None:
            state = await writer.run("fetchrow", store.STATE, self.run_id)
        if done is not None:
            self.ended = True
            self.runtime.suspended(run_at)
            raise Suspended()
        if state is None or state["claims"] != self.claims or state["status"] != "running":
            raise LeaseLost()
        if state["cancel_requested"]:
            raise CancelRequested()
        # an event arrived: look again

    async def start_child(self, defn: Any, args: dict[str, Any], child_id: uuid.UUID, key: str) -> None:
        try:
            req = workflow_request(defn, args, run_as=self.auth)
        except ForgeError as exc:
            raise TypeError(f"ctx.start_child: {exc.message}") from None
        async with self.runtime.node.pool.acquire() as conn:
            await self.runtime.engine.start(conn, [req], ids=[child_id], parent=(self.run_id, key))

    async def call_app(self, defn: FunctionDef, kwargs: dict[str, Any]) -> Any:
        return await self.runtime.node.executor.call(defn.name, kwargs, self.auth, unstructured=False,
                                                     request_id=f"wf-{self.run_id}-{self.claims}")

    async def finish(self, status: str, result: str | None, error: str | None, rows: list[tuple] = ()) -> bool:
        """End the run (succeeded, failed, cancelled), recording ``rows`` (its last operations)
        in the same statement; False if the claim is stale."""
        self.ending = True
        try:
            done = await self.runtime.writer.finish(self.run_id, self.claims, status, result, error, rows)
        finally:
            self.ending = False
        self.ended = self.ended or done
        return done

    async def fenced(self, sql: str, *args: Any) -> bool:
        """A write of this claim (ending, blocking, handing back the run); False if the claim is stale."""
        done = await self.runtime.writer.run("fetchval", sql, self.run_id, self.claims, *args) is not None
        if done and sql is not store.START_COMPENSATING:
            self.ended = True
        return done


class WorkflowRuntime:
    """The workflow part of the ``worker`` role on one node."""

    def __init__(self, node: Any, config: WorkflowConfig, engine: store.WorkflowEngine, worker: Any = None) -> None:
        self.node = node
        self.config = config
        self.engine = engine
        self.worker = worker
        self.node_id: str = node.id
        self.writer = Writer(node.pool, config.lease, node.id, "on" if config.durable_steps else "off")
        self.running: dict[uuid.UUID, Execution] = {}
        self.wake = asyncio.Event()
        self.slot_free = asyncio.Event()
        self.stopping = False
        self.sleeping = False
        self.next_due = 0.0
        self.last_work = 0.0
        self.last_rescue = 0.0
        self.names = sorted(d.name for d in node.registry.of_kind("workflow"))
        self.limits = {d.name: d.options["concurrency"] for d in node.registry.of_kind("workflow")
                       if d.options.get("concurrency")}
        self._claim_done = asyncio.Event()
        self.stats = {"claimed": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "suspended": 0, "blocked": 0,
                      "lost": 0, "released": 0, "checkpoints": 0}
        #: synchronous_commit of checkpoints and run endings ([workflows] durable_steps)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.node.pool.execute(store.AWAKE, self.node_id)
        sup = self.node.supervisor
        for i in range(writer_count(self.node.config["database"].pool_max)):
            sup.spawn(f"workflows.writer.{i}", self.writer.loop, service="worker")
        sup.spawn("workflows.claim", self._claim_loop, service="worker")
        sup.spawn("workflows.lease", self._lease_loop, service="worker")

    async def stop(self) -> None:
        """Claim nothing more, give running runs ``shutdown`` seconds, then hand the rest back."""
        self.stopping = True
        self.wake.set()
        self.slot_free.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._claim_done.wait(), 10)
        tasks = [x.task for x in self.running.values() if x.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.worker.config.shutdown_timeout if self.worker else 5)
        left = [x for x in self.running.values() if x.task is not None and not x.task.done()]
        for x in left:
            x.stop_reason = "shutdown"
            x.task.cancel()
        if left:
            await asyncio.wait([x.task for x in left], timeout=5)
            logger.info(f"workflows: handed {len(left)} unfinished run(s) back to other workers")
        with contextlib.suppress(*_DB_ERRORS):
            await asyncio.wait_for(self.node.pool.execute(store.AWAKE, self.node_id), 5)

    def on_wake(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload == self.node_id or payload == "*":
            self.wake.set()

    def on_cancel(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        x = self.running.get(store.as_uuid(payload))
        if x is not None:
            self._stop(x, "cancel")

    def on_listening(self) -> None:
        self.sleeping = False
        self.wake.set()

    def suspended(self, run_at: dt.datetime | None) -> None:
        self.stats["suspended"] += 1
        if run_at is not None:  # this node resumes it on time without waiting for a poll
            left = (run_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
            self.next_due = min(self.next_due, time.monotonic() + max(0.0, left))
            self.wake.set()

    # --- claiming ----------------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        try:
            while not self.stopping:
                try:
                    async with self.node.pool.acquire() as conn:
                        await self._claim_on(conn)
                except _DB_ERRORS as exc:
                    if self.stopping:
                        break
                    logger.warning(f"workflow claim loop lost the database ({type(exc).__name__}: {exc}); retrying")
                    self.sleeping = False
                    await asyncio.sleep(0.2 + random.random() * 0.3)
        finally:
            self._claim_done.set()

    async def _claim_on(self, conn: asyncpg.Connection) -> None:
        cfg = self.config
        limited = list(self.limits)
        listening = lambda: self.worker is not None and self.worker.listening  # noqa: E731
        while not self.stopping:
            capacity = cfg.concurrency - len(self.running)
            if capacity <= 0:
                self.slot_free.clear()
                await self.slot_free.wait()
                continue
            self.wake.clear()
            rows = await claim(conn, store.CLAIM, self.node_id, cfg.lease, self.names, limited, capacity)
            got = len(rows)
            self._start(rows)
            for name in limited:
                if capacity - got <= 0:
                    break
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                                       "forge_workflows.limit." + name)
                    await conn.execute(store.WALK_DUE_INDEX)
                    more = await conn.fetch(store.CLAIM_LIMITED, self.node_id, cfg.lease, name, capacity - got,
                                            self.limits[name])
                self._start(more)
                got += len(more)
            now = time.monotonic()
            if got:
                self.last_work = now
            if got >= capacity:
                if self.sleeping:
                    await conn.execute(store.AWAKE, self.node_id)
                    self.sleeping = False
                continue
            if cfg.spin_window and now - self.last_work < cfg.spin_window:
                if self.sleeping:
                    await conn.execute(store.AWAKE, self.node_id)
                    self.sleeping = False
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), cfg.spin_interval)
                continue
            if not self.sleeping and listening():
                # announce we wait, then look once more: a run started just before sent no NOTIFY
                await conn.execute(store.SLEEP, self.node_id)
                self.sleeping = True
                continue
            if now >= self.next_due:
                nxt = await conn.fetchval(store.NEXT_DUE, self.names)
                self.next_due = now + (min(max(float(nxt), 0.0), cfg.poll_interval) if nxt is not None
                                       else cfg.poll_interval)
                if nxt is not None and float(nxt) <= 0:
                    continue
            timeout = max(0.0, min(cfg.poll_interval, self.next_due - time.monotonic()))
            if timeout > 0:
                self.slot_free.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout)

    def _start(self, rows: list[Any]) -> None:
        for row in rows:
            x = Execution.from_row(self, row)
            self.running[x.run_id] = x
            x.task = asyncio.create_task(self._run(x), name=f"forge-workflow:{x.name}:{x.run_id}")
        self.stats["claimed"] += len(rows)

    # --- executing ---------------------------------------------------------------------------------
    def resolve(self, workflow: Any) -> Any:
        return self.node.executor.resolve(workflow)

    def function(self, name: str, version: str) -> tuple[FunctionDef, Any, FunctionDef]:
        return workflow_function(self.node.registry, name, version, self.node_id)

    async def _run(self, x: Execution) -> None:
        new_scope()
        try:
            await self._execute(x)
        except (LeaseLost, Suspended):
            pass
        except asyncio.CancelledError:
            if x.stop_reason == "shutdown":
                with contextlib.suppress(*_DB_ERRORS, LeaseLost):
                    if x.ctx is not None:  # a step that completed keeps its result
                        await asyncio.shield(x.ctx._flush())
                    await asyncio.shield(x.fenced(store.RELEASE + " RETURNING id"))
                self.stats["released"] += 1
            elif x.stop_reason != "lease_lost":
                raise
        except _DB_ERRORS as exc:
            # the lease runs out and another worker (or this one) resumes the run
            logger.warning(f"workflow run {x.run_id} ({x.name}) lost the database ({type(exc).__name__}: {exc}); "
                           f"it resumes once its lease expires")
        except Exception as exc:
            logger.error(f"workflow run {x.run_id} ({x.name}): runtime error: {_error_text(exc)}")
        finally:
            if x.stop_reason == "lease_lost":
                self.stats["lost"] += 1
            if self.running.get(x.run_id) is x:  # not a later claim of the same run on this node
                del self.running[x.run_id]
            self.slot_free.set()

    async def load_history(self, run_id: uuid.UUID) -> dict[str, Record]:
        async with self.node.pool.acquire() as conn:
            rows = await conn.fetch(store.HISTORY, run_id)
        return {r["key"]: Record(r["key"], r["name"], r["kind"], r["status"], store.loads(r["result"]), r["error"],
                                 r["attempts"]) for r in rows}

    async def _execute(self, x: Execution) -> None:
        if x.compensating or x.cancel_requested:
            await self._compensate(x, x.error or "cancelled on request")
            return
        history = await self.load_history(x.run_id) if x.steps_done else {}
        try:
            defn, fn, binder = self.function(x.name, x.version)
            args = bind_arguments(binder, x.args or {})
        except (LookupError, ForgeError) as exc:
            message = exc.message if isinstance(exc, ForgeError) else str(exc)
            await self._compensate(x, f"cannot run workflow {x.name!r}: {message}")
            return
        ctx = x.ctx = WorkflowContext(x, history)
        # every way out first records what the run did since its last checkpoint (a step's result
        # is written when the next operation starts, or with the run's ending)
        try:
            result = await fn(ctx, **args)
        except Diverged as d:
            await ctx._flush()
            await self._block(x, defn, d.key, d.recorded, d.code)
            return
        except Park as park:
            await ctx._flush()
            await self._park(x, park)
            return
        except CancelRequested:
            await ctx._flush()
            await self._compensate(x, "cancelled on request")
            return
        except asyncio.CancelledError:
            if x.stop_reason != "cancel":
                raise
            asyncio.current_task().uncancel()
            await ctx._flush()
            await self._compensate(x, "cancelled on request")
            return
        except (LeaseLost, Suspended):
            raise
        except _WRITE_ERRORS:
            raise  # the runtime lost the database, the workflow did not fail: the run resumes after its lease
        except Exception as exc:
            await ctx._flush()
            await self._compensate(x, _error_text(exc) if not hasattr(exc, "step") else str(exc))
            return
        left = ctx.unvisited()
        if left:
            await ctx._flush()
            rec = history[left[0]]
            await self._block(x, defn, left[0], f"{rec.kind} {rec.name}", "nothing (the function returned)")
            return
        try:
            text = store.dumps(unstructure(result), f"the result of workflow {x.name!r}", self.config.max_value_bytes)
        except Exception as exc:
            await ctx._flush()
            await self._compensate(x, f"workflow {x.name}: the result cannot be stored: {exc}")
            return
        # the last step's result and the run's end: one statement
        if await x.finish("succeeded", text, None, ctx._take()):
            self.stats["succeeded"] += 1

    async def _park(self, x: Execution, park: Park) -> None:
        """Give the run up until its timer or events. If an event arrived since its mailbox was
        read, hand it back due at once instead (it replays and finds the event)."""
        try:
            await x.suspend(park.until, park.wait, park.events, park.seen)
        except CancelRequested:
            await self._compensate(x, "cancelled on request")
            return
        if await x.fenced(store.RELEASE + " RETURNING id"):
            self.wake.set()

    async def _block(self, x: Execution, defn: FunctionDef, key: str, recorded: str, code: str) -> None:
        code_version = defn.options.get("version", "")
        wait = {"kind": "blocked", "key": key, "recorded": recorded, "code": code,
                "run_version": x.version or "(unknown)", "code_version": code_version}
        logger.error(f"workflow run {x.run_id} ({x.name}) blocked: at step {key} it recorded {recorded} (version "
                     f"{x.version or '(unknown)'}) but the code (version {code_version}) asks for {code}")
        if await x.fenced(store.BLOCK, store.dumps(wait, "wait")):
            self.stats["blocked"] += 1

    async def _compensate(self, x: Execution, error: str) -> None:
        """Run the recorded compensations in reverse order, each a checkpointed step, then end the
        run as failed (or cancelled). A crash here resumes here: recorded compensations are skipped."""
        x.undoing = True
        if not x.compensating:
            if not await x.fenced(store.START_COMPENSATING, error):
                raise LeaseLost()
            x.compensating = True
        history = await self.load_history(x.run_id)
        async with self.node.pool.acquire() as conn:
            todo = await conn.fetch(store.COMPENSATIONS, x.run_id)
        problem = None
        for row in todo:
            key = "c:" + row["key"]
            rec = history.get(key)
            if rec is not None and rec.status == "succeeded":
                continue
            if rec is not None and rec.status == "failed":
                problem = f"compensation of step {row['name']!r} failed: {rec.error}"
                break
            comp = store.loads(row["compensation"])
            attempts = rec.attempts if rec is not None else 0
            retries = int(comp.get("retries", self.config.step_retries))
            while True:
                attempts += 1
                started = dt.datetime.now(dt.timezone.utc)
                try:
                    await self._call_compensation(x, comp)
                except (asyncio.CancelledError, LeaseLost):
                    raise
                except Exception as exc:
                    err = _error_text(exc)
                    status = "failed" if attempts > retries else "retrying"
                    await x.checkpoint([(key, row["name"], "compensation", status, None, None, err, attempts,
                                         None, started)])
                    if status == "failed":
                        problem = f"compensation of step {row['name']!r} failed: {err.splitlines()[0]}"
                        break
                    await asyncio.sleep(backoff_delay(attempts, float(comp.get("backoff", self.config.step_backoff)),
                                                      self.config.step_backoff_max))
                    continue
                await x.checkpoint([(key, row["name"], "compensation", "succeeded", None, None, None, attempts, None,
                                     started)])
                break
            if problem:
                break
        async with self.node.pool.acquire() as conn:
            state = await conn.fetchrow(store.STATE, x.run_id)
        status = "cancelled" if state is not None and state["cancel_requested"] else "failed"
        final = error if problem is None else f"{error}\n{problem} (later compensations were not run)"
        if await x.finish(status, None, final):
            self.stats[status] += 1

    async def _call_compensation(self, x: Execution, comp: dict[str, Any]) -> None:
        ref = comp["function"]
        if ref.startswith("app:"):
            defn = self.node.registry.get(ref[4:])
            if defn is None:
                raise LookupError(f"compensation {ref[4:]!r} is not an app function on this node")
            await x.call_app(defn, dict(comp.get("kwargs") or {}))
            return
        fn = resolve_ref(ref, self.node.registry.modules)
        args, kwargs = _structured_args(fn, comp.get("args") or [], comp.get("kwargs") or {})
        value = fn(*args, **kwargs)
        if asyncio.iscoroutine(value) or hasattr(value, "__await__"):
            await value

    def _stop(self, x: Execution, reason: str) -> None:
        if x.task is None or x.task.done() or x.stop_reason is not None:
            return
        if reason == "cancel" and x.undoing:
            return  # already compensating
        x.stop_reason = reason
        x.task.cancel()

    # --- leases -------------------------------------------------------------------------------------
    async def _lease_loop(self) -> None:
        cfg = self.config
        while True:
            try:
                async with self.node.pool.acquire() as conn:
                    while True:
                        await self._renew(conn)
                        now = time.monotonic()
                        if cfg.rescue_interval and now - self.last_rescue >= cfg.rescue_interval:
                            self.last_rescue = now
                            rescued = await rescue_runs(conn, self.node.config.node.dead_after)
                            if rescued:
                                logger.warning(f"workflows: recovered {len(rescued)} run(s) whose worker stopped "
                                               f"heartbeating")
                                self.wake.set()
                        await asyncio.sleep(cfg.heartbeat_interval)
            except _DB_ERRORS as exc:
                logger.warning(f"workflow lease loop lost the database ({type(exc).__name__}: {exc}); retrying")
                await asyncio.sleep(0.2 + random.random() * 0.3)

    async def _renew(self, conn: asyncpg.Connection) -> None:
        xs = [x for x in self.running.values() if x.task is not None and not x.task.done() and not x.ended]
        if not xs:
            return
        rows = await conn.fetch(store.RENEW, [x.run_id for x in xs], [x.claims for x in xs], self.config.lease,
                                self.node_id)
        seen = {r["id"]: r["cancel_requested"] for r in rows}
        for x in xs:
            if self.running.get(x.run_id) is not x:
                continue
            if x.run_id not in seen:
                if x.task is not None and not x.task.done() and not x.ended and not x.ending:
                    logger.warning(f"workflow run {x.run_id} lost its lease; stopping it here")
                    self._stop(x, "lease_lost")
            elif seen[x.run_id]:
                self._stop(x, "cancel")


def workflow_function(registry: Any, name: str, version: str, where: str = "") -> tuple[FunctionDef, Any, FunctionDef]:
    """(definition, the function to run for a run of ``version``, the definition to bind its
    arguments with): a version listed in ``previous`` runs that code, any other the current code."""
    defn = registry.get(name)
    if defn is None or defn.kind != "workflow":
        raise LookupError(f"no workflow named {name!r}" + (f" on node {where}" if where else ""))
    previous = defn.options.get("previous") or {}
    if version and version != defn.options.get("version") and version in previous:
        fn = previous[version]
        params, returns = _signature(fn, "workflow")
        return defn, fn, FunctionDef(name=name, kind="workflow", fn=fn, params=params, returns=returns)
    return defn, defn.fn, defn


async def claim(conn: Any, sql: str, *args: Any) -> list[Any]:
    """Claim due runs (``sql``: store.CLAIM) in a transaction that walks the due index in run_at
    order (store.WALK_DUE_INDEX): two round trips besides the claim itself."""
    await conn.execute("BEGIN; " + store.WALK_DUE_INDEX)
    try:
        rows = await conn.fetch(sql, *args)
        await conn.execute("COMMIT")
    except BaseException:
        if not conn.is_closed():
            with contextlib.suppress(*_DB_ERRORS):
                await conn.execute("ROLLBACK")
        raise
    return rows


async def rescue_runs(conn: Any, dead_after: float) -> list[tuple[uuid.UUID, str]]:
    """Recover runs whose worker stopped heartbeating (anywhere); safe to run on any node, any
    number of times."""
    rows = await conn.fetch(store.RESCUE, float(dead_after))
    return [(r["id"], r["status"]) for r in rows]


RETENTION = """
WITH old AS (
    DELETE FROM forge_workflow_runs WHERE status IN ('succeeded', 'failed', 'cancelled')
      AND finished_at < now() - make_interval(secs => $1) RETURNING id
), steps AS (
    DELETE FROM forge_workflow_steps s USING old WHERE s.run_id = old.id RETURNING 1
), events AS (
    DELETE FROM forge_workflow_events e USING old WHERE e.run_id = old.id RETURNING 1
)
SELECT count(*) FROM old
"""


async def apply_retention(conn: Any, retention: float, dead_after: float) -> int:
    await conn.execute("""DELETE FROM forge_workflow_sleepers s
                          WHERE NOT EXISTS (SELECT 1 FROM forge_nodes n WHERE n.id = s.node_id
                                            AND n.status IN ('starting', 'running', 'draining')
                                            AND n.last_heartbeat > now() - make_interval(secs => $1))""",
                       float(dead_after))
    if retention <= 0:
        return 0
    return await conn.fetchval(RETENTION, float(retention))
