"""Several queries' model-helper SELECTs in one round trip (live-query re-runs under load).

``FunctionExecutor.batched(jobs)`` runs jobs (each one query call, say one live query's re-run)
concurrently on ONE read connection. Their ``ctx.db.select`` statements are collected until
every job is either waiting on one or finished, then sent together: statements with the same
text (the same function with other arguments) become one statement, a ``LATERAL`` join over
the unnested arguments, so N re-runs cost one round trip instead of N (on a 2-core machine each
round trip also wakes a backend that competes with the node for a core). All of a batch's
statements read one snapshot: each result is still what a fresh run of its query returns.

Only ``select`` shares the connection. Anything else a job's function does on ``ctx.db`` (raw
SQL, ``get``, touching ``ctx.db.conn``) raises :class:`NotBatchable` inside the function; the
executor then runs that call again on its own connection (queries are read-only, so running
one twice changes nothing), even when the function caught the exception itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
from collections import defaultdict
from typing import Any, Awaitable, Callable, Sequence

import asyncpg

#: the batch a query call joins (set by ``FunctionExecutor.batched`` for its jobs)
BATCH: contextvars.ContextVar["QueryBatch | None"] = contextvars.ContextVar("forge_query_batch", default=None)

_PARAM = re.compile(r"\$(\d+)")
#: SQL text -> its parameters' types as SQL (None: not batchable, e.g. an array parameter)
_PARAM_TYPES: dict[str, tuple[str, ...] | None] = {}


class NotBatchable(Exception):
    """A statement other than a model-helper SELECT was attempted inside a batch."""


class RefusedConnection:
    """``ctx.db.conn`` inside a batch: the connection is shared, so any use of it is refused.

    It and its ``Database`` refer to each other (a use marks the call refused): :func:`detach`
    ends that once the call is over, so the pair is freed at once and not left to the cyclic GC.
    Every batched re-run used to leave one such cycle (with its read set, the batch and its
    connection proxy hanging off it): at 2,000 writes/s in bench/realtime (b) the node's young
    collections ran every 2-3 s and paused it 24-36 ms each, the heap grew until the timed full
    collection (~100 ms with 1,000 sockets) ran mid-load; together they were the p99."""

    __slots__ = ("_db",)

    def __init__(self, db: Any) -> None:
        self._db = db

    def __getattr__(self, name: str) -> Any:
        if self._db is not None:  # None: the call is over (a leftover reference used it late)
            self._db.refused = True
        raise NotBatchable(f"ctx.db.conn.{name} inside a batch of live-query re-runs")


def detach(refused: RefusedConnection) -> None:
    """The batched call that owned ``refused`` is over: drop its reference to the ``Database``
    (a function, not a method: any attribute of a ``RefusedConnection`` must stay refused)."""
    refused._db = None


def lateral_sql(sql: str, types: Sequence[str]) -> str:
    """``sql`` (a model helper's SELECT with bind parameters $1..$n of ``types``) for many argument
    tuples at once: every row carries ``forge_batch_n`` (which tuple, 1-based) and
    ``forge_batch_r`` (its position in that tuple's result)."""
    n = len(types)
    arrays = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
    names = ", ".join(f"p{i + 1}" for i in range(n))
    inner = _PARAM.sub(lambda m: f"forge_batch_args.p{m.group(1)}", sql)
    return (f"SELECT forge_batch_args.forge_batch_n, forge_batch_rows.* "
            f"FROM unnest({arrays}) WITH ORDINALITY AS forge_batch_args({names}, forge_batch_n) "
            f"CROSS JOIN LATERAL (SELECT forge_batch_one.*, row_number() OVER () AS forge_batch_r "
            f"FROM ({inner}) AS forge_batch_one) AS forge_batch_rows")


async def _param_types(conn: asyncpg.Connection, sql: str) -> tuple[str, ...] | None:
    if sql in _PARAM_TYPES:
        return _PARAM_TYPES[sql]
    stmt = await conn.prepare(sql)
    found: tuple[str, ...] | None = ()
    for t in stmt.get_parameters():
        if t.kind != "scalar":
            found = None
            break
        found += (f'"{t.schema}"."{t.name}"',)
    if len(_PARAM_TYPES) < 10_000:
        _PARAM_TYPES[sql] = found
    return found


def _key(args: tuple) -> Any:
    """``args`` as a dict key, or a key equal to nothing else when a value is unhashable."""
    try:
        hash(args)
    except TypeError:
        return object()
    return args


#: how much earlier than its own deadline a call may time out on its batch's shared timer (the calls
#: of a batch start in the same turn or two of the event loop, microseconds apart)
SHARE_EARLY = 0.001


class QueryBatch:
    """The jobs of one ``FunctionExecutor.batched`` call and their collected SELECTs."""

    def __init__(self, size: int, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self.size = size
        self._connect = connect
        self.conn: asyncpg.Connection | None = None
        self.finished = 0
        self.waiting: list[tuple[str, tuple, asyncio.Future]] = []
        self.flush_task: asyncio.Task | None = None
        #: round trips this batch made, and the statements they carried
        self.round_trips = 0
        self.statements = 0
        #: one timer for the calls of the batch (see :meth:`timeout`): when it fires, and the tasks of
        #: the calls under it with their ``Task.cancelling()`` as they entered
        self.deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timed: dict[asyncio.Task, int] = {}
        #: the same for the calls the timer cancelled that have not left yet
        self._expired: dict[asyncio.Task, int] = {}
        self._closed = False

    def timeout(self, seconds: float) -> "BatchTimeout | None":
        """A call's timeout on the batch's one timer (what ``asyncio.timeout(seconds)`` does for it), or
        None when the call cannot share it. A batch's re-runs start together with the same timeout:
        one timer for all of them, not one ``asyncio.timeout`` each (its timer handle, scheduled and
        cancelled on the loop, was about a sixth of a batched re-run's CPU). A call shares the timer
        when it fires at most ``SHARE_EARLY`` before the call's own deadline (never after it)."""
        if self._closed or seconds <= SHARE_EARLY:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        if self._timer is None:
            self.deadline = deadline
            # in a context of its own: the calls' context holds this batch (BATCH), and a handle keeps its
            # context until the loop lets go of it (asyncio: at its deadline, even when cancelled)
            self._timer = loop.call_at(deadline, self._expire, context=contextvars.Context())
        elif not deadline - SHARE_EARLY <= self.deadline <= deadline:
            return None
        return BatchTimeout(self)

    def _expire(self) -> None:
        for task, cancelling in self._timed.items():
            self._expired[task] = cancelling
            task.cancel()
        self._timed.clear()

    def close(self) -> None:
        """The batch is over: its timer goes, and the batch lets go of the handle. The handle used to run
        in the calls' context, where this batch is the current one (``BATCH``): a batch holding its
        handle was a reference cycle (with the read connection's proxies and the calls' span hanging off
        it, 13 objects) that only the cyclic GC freed. bench/realtime (b): 35,000 such objects per 10 s
        at 1,000 writes/s, and at 2,000 a young collection in the middle of the writes (106-338 ms with
        the wait for a core), none since."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[asyncpg.Record]:
        entry = (sql, tuple(args), asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        self._maybe_flush()
        try:
            return await entry[2]
        except asyncio.CancelledError:
            if entry in self.waiting:
                self.waiting.remove(entry)
            raise

    def job_finished(self) -> None:
        self.finished += 1
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self.waiting and self.flush_task is None and len(self.waiting) + self.finished >= self.size:
            self.flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        entries, self.waiting = self.waiting, []
        try:
            if self.conn is None:
                self.conn = await self._connect()
            groups: dict[str, list[tuple[str, tuple, asyncio.Future]]] = defaultdict(list)
            for entry in entries:
                groups[entry[0]].append(entry)
            for sql, group in groups.items():
                await self._run_group(sql, [e for e in group if not e[2].done()])
        except BaseException as exc:
            for _, _, fut in entries:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
        finally:
            self.flush_task = None
            self._maybe_flush()  # jobs that were cancelled meanwhile may leave the rest ready

    async def _run_group(self, sql: str, group: list[tuple[str, tuple, asyncio.Future]]) -> None:
        if not group:
            return
        conn = self.conn
        types = await _param_types(conn, sql) if len(group) > 1 else None
        if not types:  # one statement, no parameters, or parameters we cannot unnest: one by one
            done: dict[tuple, list[asyncpg.Record]] = {}  # the same arguments twice: one statement
            for _, args, fut in group:
                self.statements += 1
                key = _key(args)
                try:
                    rows = done.get(key)
                    if rows is None:
                        self.round_trips += 1
                        rows = done[key] = await conn.fetch(sql, *args)
                except Exception as exc:
                    if not fut.done():
                        fut.set_exception(exc)
                    continue
                if not fut.done():
                    fut.set_result(rows)
            return
        columns = [list(col) for col in zip(*(args for _, args, _ in group))]
        self.round_trips += 1
        self.statements += len(group)
        try:
            rows = await conn.fetch(lateral_sql(sql, types), *columns)
        except asyncpg.PostgresError:
            # one argument tuple the batch cannot take (a value its type refuses): each alone, with its own error
            for entry in group:
                await self._run_group(sql, [entry])
            return
        per: dict[int, list[asyncpg.Record]] = defaultdict(list)
        for r in rows:
            per[r["forge_batch_n"]].append(r)
        for i, (_, _, fut) in enumerate(group, 1):
            if not fut.done():
                fut.set_result(sorted(per[i], key=lambda r: r["forge_batch_r"]))


class BatchTimeout:
    """One call's timeout on its batch's timer: as with ``asyncio.timeout``, the call's task is
    cancelled when the timer fires and that cancellation leaves the call as ``TimeoutError``; a
    cancellation from anywhere else stays a cancellation."""

    __slots__ = ("_batch", "_task")

    def __init__(self, batch: QueryBatch) -> None:
        self._batch = batch
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> None:
        task = self._task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a batch's timeout must be used inside a task")
        self._batch._timed[task] = task.cancelling()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        batch, task = self._batch, self._task
        if batch._timed.pop(task, None) is not None:
            return
        cancelling = batch._expired.pop(task, None)
        if cancelling is not None and task.uncancel() <= cancelling and exc_type is not None \
                and issubclass(exc_type, asyncio.CancelledError):
            raise TimeoutError from exc
