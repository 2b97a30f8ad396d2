"""Live queries: one execution per (function, arguments, auth scope), re-run only when a
captured change touches its read set, pushed only when its result hash changed.

The engine is transport-agnostic: a subscriber is anything with ``push(sub_id, text,
kind)`` and ``end(sub_id, error)``; the WebSocket session in :mod:`forge_realtime.session`
is one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import functools
import hashlib
import json
import time
import uuid
from collections import deque
from typing import Any, Callable, Iterable, Protocol

import attrs
import msgspec
from loguru import logger

from forge_kernel.db import TableRead
from forge_kernel.errors import DatabaseUnavailable, ForgeError, InvalidArgument, NotFound
from forge_kernel.executor import database_lost
from forge_kernel.executor import Auth, bind_arguments
from forge_kernel.telemetry import current_span, traceparent

from .capture import CaptureError, CaptureManager
from .changes import Change

#: the scope of a query that never reads ``ctx.auth``: every caller shares its result
SHARED = "*"
#: changes that arrived during a run kept for it at least (the RunJournal holds twice as many);
#: past that it only remembers which tables the dropped ones wrote
_PENDING_LIMIT = 2000
#: the kinds of push (``Subscriber.push``; also the ``rt.push`` telemetry label)
_DATA, _UNCHANGED = "data", "unchanged"
#: subscribers sent to between two yields to the event loop in a fan-out (under a millisecond of
#: socket writes): the change-log reader and the re-run a write needs take several turns of the loop
#: each (a hint, a poll and its answer, a worker waking, the query's round trip), and each turn waits
#: for the chunk in progress. At 256 (about 3 ms a chunk, more when the node shares its core) that
#: is up to about 20 ms on a write's latency in bench (c) on a busy machine: side by side, 64 against
#: 256 had p99 403/454 against 412/514 ms and 1-3 against 12-20 loop stalls over 20 ms per step,
#: for 1-2 % more CPU per push
FANOUT_CHUNK = 64
#: how far a fan-out gets (a fraction of the subscribers) before its query may run again: one result
#: per pass, so a hot query is not re-run for every write (see LiveQueryEngine._fan_out). Bench (c)
#: (5,000 subscribers, 50 writes/s, same runs): at 0.5 the query ran 0.40-0.57 times per write, at
#: 0.75 0.23-0.35, at 1.0 0.29 against 0.33 for the fan-out that held the event loop, with no p99 to
#: show for the extra runs on a shared machine (a write waits for the next run, then for the pass to
#: reach its subscriber: about a pass each whatever the fraction, see bench/realtime/README.md)
RERUN_AFTER = 1.0


thread_time_ns = time.thread_time_ns

#: a message to send: the concatenation of these buffers is one JSON text (see forge_kernel.websocket)
Message = tuple[bytes, ...]


class Subscriber(Protocol):
    #: writes a ``data`` message of a subscription it still holds at once and returns True, or
    #: returns False having written nothing (then ``push`` it); None when nothing can be written
    #: at once (queued messages must go first, the connection is closing). The fan-out's fast path:
    #: no call of ``push`` per subscriber when the connection takes the message straight away
    direct: Callable[[Message], bool] | None

    def push(self, sub_id: str, message: Message, kind: str) -> None: ...
    def end(self, sub_id: str, error: ForgeError) -> None: ...


def _json_default(value: Any) -> Any:
    if isinstance(value, (uuid.UUID, decimal.Decimal)):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot send {type(value).__name__} as JSON")


#: compact UTF-8 JSON that any strict parser reads, as the gateway writes /rpc (msgspec): NaN and
#: infinities (a float column can hold them) become ``null``
encode: Callable[[Any], bytes] = msgspec.json.Encoder(enc_hook=_json_default).encode


def result_hash(result_json: bytes) -> str:
    return hashlib.blake2b(result_json, digest_size=16).hexdigest()


def canonical_args(args: Any) -> str:
    return json.dumps(args, sort_keys=True, default=_json_default, separators=(",", ":"))


# --- matching changes against read sets ---------------------------------------------------
def _norm(value: Any) -> Any:
    """One spelling per value, whichever side it comes from. Row images come through jsonb, so
    a float8 2.0 or a numeric 2.00 arrives as 2 or 2.0, and PostgreSQL accepts True for an
    integer column: numbers that are equal must compare equal (a bool as 1 or 0)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_COMPARABLE = (str, int, float, bool, uuid.UUID, type(None))


def row_matches(filters: tuple[tuple[str, Any], ...], row: dict[str, Any]) -> bool:
    """Does a captured row image satisfy every equality filter? A column the image lacks (it
    was captured before a subscription filtered on it) or a value we cannot compare
    exactly matches conservatively: a spurious re-run costs a query, a missed one a bug."""
    for col, val in filters:
        if col not in row or not isinstance(val, _COMPARABLE):
            continue
        if _norm(row[col]) != _norm(val):
            return False
    return True


def change_touches(read: TableRead, change: Change) -> bool:
    if read.table != change.table:
        return False
    if read.filters is None or change.op == "TRUNCATE":
        return True
    # old images catch rows moving out of a result, new images rows moving in
    return any(row_matches(read.filters, row) for row in change.rows())


def capture_needs(reads: Iterable[TableRead]) -> dict[str, set[str]]:
    needs: dict[str, set[str]] = {}
    for r in reads:
        needs.setdefault(r.table, set()).update(c for c, _ in (r.filters or ()))
    return needs


class ReadIndex:
    """Which live queries a change may touch, found without testing every query of its table.

    A read with an equality filter is filed under one filtered column and the value it wants;
    a change looks up the values its row images hold. Reads without a usable filter are filed
    as whole-table reads. Candidates are then confirmed with :func:`change_touches`, so the
    index only has to be conservative: it may return too many queries, never too few.
    """

    def __init__(self) -> None:
        #: table -> queries reading all of it (or with filters we cannot index)
        self.whole: dict[str, set[Any]] = {}
        #: (table, column) -> normalised value -> queries filtering on column = value
        self.keyed: dict[tuple[str, str], dict[Any, set[Any]]] = {}
        #: table -> the columns it is indexed by in ``keyed``
        self.columns: dict[str, set[str]] = {}

    @staticmethod
    def _slot(read: TableRead) -> tuple[str, Any] | None:
        # file under the most telling filter: a boolean (``done = false``) splits a table in two
        # at best, so any other comparable value goes first
        fallback = None
        for col, val in read.filters or ():
            if isinstance(val, _COMPARABLE):
                if not isinstance(val, bool):
                    return col, _norm(val)
                if fallback is None:
                    fallback = col, _norm(val)
        return fallback

    def add(self, q: Any, reads: Iterable[TableRead]) -> None:
        for read in reads:
            slot = self._slot(read)
            if slot is None:
                self.whole.setdefault(read.table, set()).add(q)
            else:
                col, val = slot
                self.keyed.setdefault((read.table, col), {}).setdefault(val, set()).add(q)
                self.columns.setdefault(read.table, set()).add(col)

    def remove(self, q: Any, reads: Iterable[TableRead]) -> None:
        for read in reads:
            slot = self._slot(read)
            if slot is None:
                _discard(self.whole, read.table, q)
                continue
            col, val = slot
            values = self.keyed.get((read.table, col))
            if values is not None:
                _discard(values, val, q)
                if not values:
                    del self.keyed[(read.table, col)]
                    cols = self.columns[read.table]
                    cols.discard(col)
                    if not cols:
                        del self.columns[read.table]

    def candidates(self, change: Change) -> set[Any]:
        found = set(self.whole.get(change.table, ()))
        for col in self.columns.get(change.table, ()):
            values = self.keyed[(change.table, col)]
            if change.op == "TRUNCATE":
                for qs in values.values():
                    found |= qs
                continue
            for row in change.rows():
                if col not in row:  # an image captured before anyone filtered on col: every value may match
                    for qs in values.values():
                        found |= qs
                    break
                found |= values.get(_norm(row[col]), _NONE)
        return found


_NONE: frozenset[Any] = frozenset()


def _discard(index: dict[Any, set[Any]], key: Any, q: Any) -> None:
    qs = index.get(key)
    if qs is not None:
        qs.discard(q)
        if not qs:
            del index[key]


class RunJournal:
    """The changes that arrived while queries ran, kept once for all of them and indexed by the
    values their row images hold, so a finishing run checks only the changes that may touch its
    new read set.

    A run's read set is known only when it finishes (a flag in one table may make it read
    another), so every change that arrives meanwhile must be checked against it then. Each
    running query used to keep its own list of them and check the whole list: with batched
    re-runs hundreds of queries run at once, so a change cost a list append per running query and
    a check per finishing one. That work grows with the write rate times the runs in flight, and
    the runs in flight grow with the latency it adds: bench/realtime (b) spent 0.5 % of the node's
    busy samples on it at 1,000 writes/s, 3.5 % at 2,000 and 13 % at 3,000, the cliff. Here a
    change costs one append and an index entry per column of its images, and a finishing run looks
    up the value it filters on.

    Memory is bounded: past ``limit`` changes kept, the oldest are dropped and a run that started
    before them only remembers which tables they wrote (``LiveQuery.overflow``: any read of those
    makes it dirty)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: the running queries and the sequence number of the first change their runs may have missed
        self.holders: dict[Any, int] = {}
        self.base = 0  # sequence number of entries[0]
        self.entries: list[Change] = []
        self._tables: dict[str, _TableJournal] = {}

    @property
    def next(self) -> int:
        return self.base + len(self.entries)

    def start(self, q: Any) -> None:
        """``q``'s run starts (before its snapshot): it must see every change from now on."""
        self.holders[q] = self.next

    def end(self, q: Any) -> None:
        self.holders.pop(q, None)
        if not self.holders:  # nobody needs what is kept: start afresh (cheap)
            self.base = self.next
            self.entries = []
            self._tables = {}

    def add(self, change: Change) -> None:
        if not self.holders:
            return
        self._index(self.next, change)
        self.entries.append(change)
        if len(self.entries) > self.limit:
            self._trim()

    def _index(self, seq: int, change: Change) -> None:
        t = self._tables.get(change.table)
        if t is None:
            t = self._tables[change.table] = _TableJournal()
        t.seqs.append(seq)
        if change.op == "TRUNCATE":
            t.truncated = seq
            return
        rows = change.rows()
        if not rows:
            return
        cols = frozenset(rows[0])
        for row in rows[1:]:
            if row.keys() != cols:
                cols = cols.intersection(row)
        t.by_columns.setdefault(cols, []).append(seq)
        keyed = t.keyed
        for row in rows:
            for col, val in row.items():
                key = (col, _norm(val))
                found = keyed.get(key)
                if found is None:
                    keyed[key] = [seq]
                elif found[-1] != seq:
                    found.append(seq)

    def _trim(self) -> None:
        oldest = min(self.holders.values())
        cut = oldest if self.next - oldest <= self.limit // 2 else self.next - self.limit // 2
        dropped = self.entries[:cut - self.base]
        if oldest < cut:  # runs that started before the cut lose their changes: keep the tables they wrote
            tables = {c.table for c in dropped}
            for q, since in self.holders.items():
                if since < cut:
                    q.overflow |= tables
        kept = self.entries[cut - self.base:]
        self.base, self.entries, self._tables = cut, [], {}
        for change in kept:
            self._index(self.next, change)
            self.entries.append(change)

    def touches(self, q: Any, reads: Iterable[TableRead]) -> bool:
        """Did a change that arrived since ``q``'s run started touch ``reads``?"""
        since = max(self.holders.get(q, self.next), self.base)
        entries, base = self.entries, self.base
        for read in reads:
            t = self._tables.get(read.table)
            if t is None or t.seqs[-1] < since:
                continue
            if read.filters is None or t.truncated >= since:
                return True
            slot = ReadIndex._slot(read)
            if slot is None:
                lists: Iterable[list[int]] = (t.seqs,)
            else:
                col, val = slot
                # images that hold the column with the value; images without it (captured before
                # anyone filtered on it) match whatever the value
                lists = [t.keyed.get((col, val), []), *(seqs for cols, seqs in t.by_columns.items() if col not in cols)]
            for seqs in lists:
                for seq in reversed(seqs):
                    if seq < since:
                        break
                    if change_touches(read, entries[seq - base]):
                        return True
        return False


@attrs.define(eq=False)
class _TableJournal:
    """One table's part of a RunJournal (sequence numbers ascending)."""

    seqs: list[int] = attrs.field(factory=list)
    #: (column, normalised value) -> changes with an image holding it
    keyed: dict[tuple[str, Any], list[int]] = attrs.field(factory=dict)
    #: the columns every image of a change holds -> those changes
    by_columns: dict[frozenset[str], list[int]] = attrs.field(factory=dict)
    truncated: int = -1


# --- state -----------------------------------------------------------------------------------
@attrs.define(eq=False)
class Subscription:
    """One client subscription (``sub_id`` is the client's id, unique per connection)."""

    owner: Any  # a Subscriber
    sub_id: str
    function: str
    args: dict[str, Any]
    auth: Auth
    last_hash: str | None = None
    acked: bool = False
    query: "LiveQuery | None" = None
    #: the start of every ``data`` message of this subscription (the rest is its query's, shared)
    data_head: bytes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.data_head = _data_head(self.sub_id)


@functools.lru_cache(maxsize=4096)
def _data_head(sub_id: str) -> bytes:
    """The start of a ``data`` message of ``sub_id``, one object for every subscription with that id
    (clients tend to pick the same ids): a fan-out then reads one head, in cache, instead of one
    bytes object per subscriber, and tells heads apart by identity. Bounded: ids a client makes up
    by the thousand only push others out (they then get a head of their own)."""
    return b'{"type":"data","id":' + encode(sub_id)


@attrs.define(eq=False)
class LiveQuery:
    """One execution shared by every subscription with the same key."""

    key: tuple[str, str, str]
    function: str
    args: dict[str, Any]
    #: in the order they subscribed (a dict as an ordered set): a fan-out visits its subscribers'
    #: sessions, connections and sockets, allocated at connect time, in about the order they lie in
    #: memory (a set's order is by address modulo its table size: a jump between distant pages per push)
    subscriptions: dict[Subscription, None] = attrs.field(factory=dict)
    reads: list[TableRead] | None = None
    #: the last result, encoded once for every subscriber
    result_json: bytes | None = None
    #: the end of its ``data`` message (hash, position, data), shared by every subscriber
    data_tail: bytes = b""
    hash: str | None = None
    position: int = 0
    running: bool = False
    queued: bool = False
    dirty: bool = False
    #: the traceparent of a traced write that made this query dirty: its next run continues that trace
    cause: str | None = None
    #: tables whose changes during its run were dropped from the engine's RunJournal (past its
    #: bound) before the run finished: any read of them makes it dirty
    overflow: set[str] = attrs.field(factory=set)
    runs: int = 0
    dropped: bool = False
    #: a fan-out of this query's results is in progress (see LiveQueryEngine._fan_out)
    fanning: bool = False
    #: where in its subscribers the next fan-out pass starts: passes rotate, so no subscriber is always last
    cursor: int = 0
    #: runs wait until the fan-out in progress is ``rerun_after`` through (it schedules the next one)
    holding: bool = False
    #: runs in a row that found the database unavailable (backs off the next try)
    lost_runs: int = 0
    #: when a fan-out pass started the run it waits for (``time.perf_counter_ns``; 0: none)
    released_at: int = 0
    #: how long such a run took to hand its result to the fan-out (ns, a moving average): the next
    #: one starts that much before the pass reaches ``rerun_after``
    rerun_lag: int = 0
    #: when its last chunked fan-out pass ended with the run it started still to come (0: otherwise)
    pass_ended: int = 0
    #: a run's result reached the pass in progress (see LiveQueryEngine._fan_out): when it is the
    #: result the pass sends, the pass goes on, and subscribers that joined since it began (and wait
    #: for that run) are sent it at its end
    overtaken: bool = False

    def runner_auth(self) -> Auth | None:
        for s in self.subscriptions:
            return s.auth
        return None


@attrs.define
class EngineStats:
    runs: int = 0
    pushes: int = 0
    unchanged: int = 0
    changes: int = 0
    invalidations: int = 0
    #: batches of re-runs (``batch_runs``) and the re-runs they carried
    batches: int = 0
    batched_runs: int = 0
    #: CPU time (ns, this thread's) spent writing chunked fan-outs (more than ``FANOUT_CHUNK``
    #: subscribers): with ``pushes`` it splits a node's CPU between a hot query's pushes and the rest
    fanout_cpu_ns: int = 0
    #: chunked fan-out passes, their wall time, and the time hot queries' fan-outs stood idle
    #: between passes waiting for a run they started (ns): with ``rerun_lag_ns`` where a hot
    #: query's latency goes (bench (c))
    fanout_passes: int = 0
    fanout_wall_ns: int = 0
    fanout_idle_ns: int = 0
    #: runs started by a fan-out pass and the time from their start to their result's fan-out (ns)
    rerun_lags: int = 0
    rerun_lag_ns: int = 0


class LiveQueryEngine:
    """Subscriptions, their shared executions, invalidation from the change log."""

    def __init__(self, executor: Any, capture: CaptureManager, *, max_concurrent_runs: int = 4,
                 position: Any = lambda: 0, batch_runs: int = 32, rerun_after: float = RERUN_AFTER) -> None:
        self.executor = executor
        self.capture = capture
        self.max_concurrent_runs = max_concurrent_runs
        #: queued re-runs of one function a worker runs together, their selects in one round trip
        self.batch_runs = batch_runs
        #: a hot query runs again once a fan-out pass is this far through (``[realtime] rerun_after_pass``)
        self.rerun_after = rerun_after
        #: whether a function's last run issued only ``ctx.db.select`` (it may run in a batch)
        self.batchable: dict[str, bool] = {}
        self._position = position
        self.queries: dict[tuple[str, str, str], LiveQuery] = {}
        #: the read sets of every query with a finished run
        self.index = ReadIndex()
        #: queries being re-run right now (at most ``max_concurrent_runs`` batches of them)
        self.running: set[LiveQuery] = set()
        #: the changes that arrived while they ran, for each to check when it finishes
        self.journal = RunJournal(2 * _PENDING_LIMIT)  # a run keeps at least _PENDING_LIMIT of them
        #: whether a function read ctx.auth the last time it ran (decides its dedupe scope)
        self.uses_auth: dict[str, bool] = {}
        self.stats = EngineStats()
        self._queue: deque[LiveQuery] = deque()
        #: the node's telemetry (``node.telemetry``), when it has one
        self.telemetry = getattr(getattr(executor, "node", None), "telemetry", None)
        self._wake = asyncio.Event()
        self._workers: list[asyncio.Task] = []

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.max_concurrent_runs):
            self._workers.append(asyncio.create_task(self._worker(), name=f"forge:realtime-run-{i}"))

    async def stop(self) -> None:
        for t in self._workers:
            t.cancel()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    # --- subscriptions --------------------------------------------------------------------
    def validate(self, function: str, args: Any, auth: Auth) -> dict[str, Any]:
        """Raise the ForgeError a call would raise before running (unknown function, not a
        query, not allowed, bad arguments); return the bound arguments."""
        if not isinstance(function, str) or not function:
            raise InvalidArgument("subscribe: function must be a non-empty string")
        found = self.executor.registry.get(function)
        if found is not None and found.kind != "query":
            raise InvalidArgument(f"{function} is a {found.kind}; only queries can be subscribed to")
        defn = self.executor.lookup(function, kinds=("query",))
        self.executor.authorize(defn, auth)
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise InvalidArgument(f"{function}: args must be an object, got {type(args).__name__}")
        bind_arguments(defn, args)
        return args

    def subscribe(self, sub: Subscription) -> None:
        """Register ``sub`` (already validated). Its query is registered before the first run
        starts, so a change committed while it runs triggers another run."""
        argkey = canonical_args(sub.args)
        uses = self.uses_auth.get(sub.function)
        scope = SHARED if uses is False else sub.auth.scope_key()
        key = (sub.function, argkey, scope)
        q = self.queries.get(key)
        if q is None:
            q = LiveQuery(key, sub.function, sub.args)
            self.queries[key] = q
        q.subscriptions[sub] = None
        sub.query = q
        if q.result_json is not None and not q.running and not q.queued and not q.dirty:
            self._deliver(q, [sub])
        else:
            if q.cause is None and not q.running:
                q.cause = traceparent()  # the first run joins the trace of the subscribe that asked for it
            self._schedule(q)

    def unsubscribe(self, sub: Subscription) -> None:
        q = sub.query
        sub.query = None
        if q is None:
            return
        q.subscriptions.pop(sub, None)
        if not q.subscriptions:
            self._drop(q)

    def _drop(self, q: LiveQuery) -> None:
        q.dropped = True
        if self.queries.get(q.key) is q:
            del self.queries[q.key]
        self.index.remove(q, q.reads or ())

    def _index(self, q: LiveQuery, reads: list[TableRead]) -> None:
        if reads == q.reads:
            return  # the usual re-run: the same read set, already filed
        self.index.remove(q, q.reads or ())
        self.index.add(q, reads)
        q.reads = reads

    # --- invalidation ---------------------------------------------------------------------
    def on_changes(self, changes: list[Change], position: int) -> None:
        self.stats.changes += len(changes)
        for change in changes:
            # a running query may come back with another read set (a flag in one table makes it
            # read another): it checks the changes when it finishes, so keep them all, whatever
            # table (once for every running query: see RunJournal)
            self.journal.add(change)
            for q in self.index.candidates(change):
                if not q.running and not q.dirty and any(change_touches(r, change) for r in q.reads or ()):
                    self.stats.invalidations += 1
                    q.dirty = True
                    if change.trace:
                        q.cause = change.trace
                    self._schedule(q)

    def on_resync(self, position: int) -> None:
        """Changes may have been missed (reader reconnected): re-run everything."""
        for q in list(self.queries.values()):
            q.dirty = True
            self._schedule(q)

    def reevaluate(self, registry: Any) -> None:
        """The app's code was reloaded (``forge-node dev``): what functions were learned to read is
        forgotten and every live query runs again as its subscriber; results whose hash did not
        change are not pushed. Subscriptions to a function that is gone, or no longer a query, end
        with an error (a mutation must never be re-run as a live query)."""
        self.uses_auth.clear()
        self.batchable.clear()
        for q in list(self.queries.values()):
            defn = registry.get(q.function)
            if defn is None:
                self._fail(q, NotFound(f"no function named {q.function!r} (the app was reloaded without it)"))
            elif defn.kind != "query":
                self._fail(q, InvalidArgument(f"{q.function} is a {defn.kind} now; only queries can be subscribed to"))
            else:
                q.dirty = True
                self._schedule(q)

    def _schedule(self, q: LiveQuery) -> None:
        if q.queued or q.running or q.dropped or q.holding:
            return  # a running query re-checks ``dirty`` and the journal when it finishes
        q.queued = True
        self._queue.append(q)
        self._wake.set()

    # --- running ----------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            q = self._queue.popleft()
            q.queued = False
            if q.dropped or not q.subscriptions:
                continue
            batch = self._batch_with(q)
            if len(batch) == 1:
                await self._run_one(q)
                continue
            # the re-runs of one function waiting in the queue: their selects share one round trip
            self.stats.batches += 1
            self.stats.batched_runs += len(batch)
            await self.executor.batched([functools.partial(self._run_one, b) for b in batch])

    def _batch_with(self, q: LiveQuery) -> list[LiveQuery]:
        """``q`` and up to ``batch_runs - 1`` queued queries of the same function, taken off the queue
        (the others keep their order), when that function ran only ``ctx.db.select`` last time."""
        if self.batch_runs <= 1 or not self._queue or not self.batchable.get(q.function):
            return [q]
        batch, keep = [q], deque()
        while self._queue and len(batch) < self.batch_runs:
            other = self._queue.popleft()
            if other.function != q.function:
                keep.append(other)
                continue
            other.queued = False
            if not other.dropped and other.subscriptions:
                batch.append(other)
        keep.extend(self._queue)
        self._queue = keep
        return batch

    async def _run_one(self, q: LiveQuery) -> None:
        self.running.add(q)
        try:
            await self._run(q)
        except Exception:  # never lose the worker; the query gets an INTERNAL error
            logger.exception(f"live query {q.function} failed unexpectedly")
            q.running = False
            self._fail(q, ForgeError("internal error while re-running the live query"))
        finally:
            # a run ends with its result's fan-out, and a fan-out pass starts the query's next run
            # (in another worker) before it ends: that run's changes are in the journal until it
            # finishes, so only a query that is not running again is let go of here
            if not q.running:
                self.running.discard(q)
                self.journal.end(q)

    async def _run(self, q: LiveQuery) -> None:
        auth = q.runner_auth()
        if auth is None:
            return
        q.running, q.dirty = True, False
        q.overflow = set()
        self.journal.start(q)
        position = self._position()
        self.stats.runs += 1
        q.runs += 1
        calls: list[Any] = []
        started = time.monotonic()  # before the query's snapshot (see CaptureManager.ensure)
        tel = self.telemetry
        span = tel.start_span(f"live query {q.function}", "internal", remote=q.cause or "",
                              attrs={"live.subscribers": len(q.subscriptions), "live.run": q.runs}) \
            if tel is not None and tel.enabled else None
        q.cause = None
        try:
            result = await self.executor.call(q.function, q.args, auth, track_reads=True, call_out=calls)
        except DatabaseUnavailable as exc:
            if span is not None:
                tel.end_span(span, exc.code)
            self._retry_later(q)
            return
        except ForgeError as exc:
            q.running = False
            if span is not None:
                tel.end_span(span, exc.code)
            self._fail(q, exc)
            return
        finally:
            if tel is not None and tel.enabled:
                tel.emit("rt.rerun", q.function, time.monotonic() - started)
        if span is not None:
            # the pushes it causes are children of this span; it ends once they are queued
            try:
                await self._finish_run(q, calls, result, started, position)
            finally:
                tel.end_span(span)
            return
        await self._finish_run(q, calls, result, started, position)

    async def _finish_run(self, q: LiveQuery, calls: list[Any], result: Any, started: float, position: int) -> None:
        call = calls[0]
        defn = call.defn
        reads = list(dict.fromkeys(call.reads + [TableRead(t) for t in defn.reads])) if defn.reads else call.reads
        try:
            if reads == q.reads:
                # the usual re-run: its read set was captured for the last run and capture only grows,
                # so only a capture installed during this run (by another query) can have missed writes
                if self.capture.changed_since((r.table for r in reads), started):
                    q.dirty = True
            elif await self.capture.ensure(capture_needs(reads), since=started):
                q.dirty = True  # triggers appeared after our snapshot: writes in between were not captured
        except CaptureError as exc:
            logger.warning(f"live query {q.function}: {exc}")
        except Exception as exc:
            if database_lost(exc):
                self._retry_later(q)
                return
            q.running = False
            logger.opt(exception=exc).error(f"live query {q.function}: installing change capture failed")
            self._fail(q, ForgeError("internal error: cannot capture changes for this query"))
            return
        q.running = False
        q.lost_runs = 0
        if q.dropped:
            return
        self.uses_auth[q.function] = call.used_auth
        self.batchable[q.function] = getattr(call, "batchable", False)  # (an executor without batches: never)
        if call.used_auth and q.key[2] == SHARED:
            self._split(q)  # never send a caller a result computed as someone else
            return
        if not call.used_auth and q.key[2] != SHARED:
            merged = self._merge(q)
            if merged is None:
                return
        self._index(q, reads)
        if not q.dirty and (any(r.table in q.overflow for r in reads)
                            or self.journal.touches(q, reads)):
            q.dirty = True
        self.journal.end(q)  # later changes reach it through the index
        q.overflow = set()
        body = encode(result)
        q.result_json, q.hash, q.position = body, result_hash(body), position
        q.data_tail = b"".join((b',"hash":"', q.hash.encode(), b'","position":', str(position).encode(), b',"data":',
                                body, b"}"))
        await self._fan_out(q)
        if q.dirty:
            self._schedule(q)  # coalesced: one more run covers every change seen meanwhile

    async def _fan_out(self, q: LiveQuery) -> None:
        """Send ``q``'s latest result to all its subscribers, yielding to the event loop every
        ``FANOUT_CHUNK`` of them, so the change-log reader and re-runs go on while thousands of
        sockets are written (about 50 ms for 5,000 on this kind of machine).

        Latest wins: a result that arrives meanwhile (a re-run in another worker) is not fanned out
        on its own; this pass sends it to every subscriber it has not reached yet, then starts a new
        pass for the others. A subscriber may so skip an intermediate result, as a slow socket's
        outbox does: live queries promise the latest result, each push carries its own hash and
        position. Passes start where the previous one stopped, so no subscriber is always last.

        The query runs again (changes arrived) only once a pass with the newest result is
        ``rerun_after`` through (by default all of it): one result per pass, not a run for every
        write of a hot table. The run is started early by what the last one took (from its start to
        its result reaching the fan-out, ``LiveQuery.rerun_lag``), so that its result is ready when
        the pass gets there instead of the fan-out standing idle for a run: a write waits at most
        about a pass for its run, then at most a pass to reach each subscriber."""
        now = time.perf_counter_ns()
        if q.released_at:  # this result is the run a pass started: how long it took to get here
            lag = now - q.released_at
            q.rerun_lag = lag if not q.rerun_lag else (q.rerun_lag * 3 + lag) >> 2
            q.released_at = 0
            self.stats.rerun_lag_ns += lag
            self.stats.rerun_lags += 1
        if q.fanning:
            # the pass in progress sends this newer result to whoever it has not reached
            q.holding = self.rerun_after > 0
            q.overtaken = True
            return
        if q.pass_ended:  # the fan-out stood idle since its last pass, waiting for the run it started
            self.stats.fanout_idle_ns += now - q.pass_ended
            q.pass_ended = 0
        q.fanning = True
        try:
            while not q.dropped:
                h = q.hash
                q.overtaken = False
                subs = list(q.subscriptions)
                n = len(subs)
                if n <= FANOUT_CHUNK:
                    self._deliver(q, subs)
                    return
                start = q.cursor % n
                ring = subs[start:] + subs[:start]
                hold = int(n * self.rerun_after)
                q.holding = hold > 0
                counted = self.telemetry is not None and self.telemetry.enabled
                started = time.time_ns() if counted else 0
                began = time.perf_counter_ns()
                data = unchanged = 0
                for i in range(0, n, FANOUT_CHUNK):
                    cpu = thread_time_ns()
                    sent, told = self._send_result(q, ring[i:i + FANOUT_CHUNK])
                    self.stats.fanout_cpu_ns += thread_time_ns() - cpu
                    data += sent
                    unchanged += told
                    done = i + FANOUT_CHUNK
                    q.cursor = (start + done) % n
                    if q.holding:
                        # the subscribers this pass reaches while a run takes its usual time (at most
                        # half the pass: a run slower than that starts at half way)
                        ahead = 0
                        if q.rerun_lag:
                            ahead = min(hold >> 1, q.rerun_lag * done // max(1, time.perf_counter_ns() - began))
                        if done + ahead >= hold:
                            q.holding = False
                            if q.dirty:
                                q.released_at = time.perf_counter_ns()
                                self._schedule(q)
                    await asyncio.sleep(0)
                    if q.hash != h or q.dropped:
                        break
                self.stats.fanout_passes += 1
                self.stats.fanout_wall_ns += time.perf_counter_ns() - began
                if counted:
                    self._record_push(q, started, data, unchanged, None)
                if q.hash == h:
                    if q.overtaken:
                        # a run ended during the pass with the result it sent: those who subscribed
                        # meanwhile waited for that run and are not among the pass's subscribers
                        q.overtaken = False
                        self._send_result(q, [s for s in q.subscriptions if s.last_hash != h or not s.acked])
                    if q.released_at:  # the fan-out now waits for that run
                        q.pass_ended = time.perf_counter_ns()
                    return
        finally:
            q.fanning = q.holding = False

    def _deliver(self, q: LiveQuery, subs: list[Subscription]) -> None:
        """Send ``q``'s result to ``subs`` at once. Telemetry sees the fan-out as a whole: one ``rt.push``
        event per kind with its count and one ``push`` span (in the current trace) from the first
        send to the last, not one of each per subscriber (5,000 of them for a hot query)."""
        tel = self.telemetry
        counted = tel is not None and tel.enabled
        start = time.time_ns() if counted else 0
        data, unchanged = self._send_result(q, subs)
        if counted:
            self._record_push(q, start, data, unchanged, subs[0].sub_id if len(subs) == 1 else None)

    def _send_result(self, q: LiveQuery, subs: list[Subscription]) -> tuple[int, int]:
        """Push ``q``'s current result to those of ``subs`` that do not have it yet; how many got
        ``data`` and how many ``unchanged``."""
        data = unchanged = 0
        h, tail = q.hash, q.data_tail
        #: one message per distinct subscription id: subscribers with the same id (every client's
        #: first subscription, say) get the very same buffers, and a push allocates nothing
        messages: dict[bytes, Message] = {}
        last_head: bytes | None = None  # the head of the message in ``message`` (runs of one id: no lookup)
        message: Message = ()
        for sub in subs:  # the hot loop of a fan-out to thousands: kept flat
            if sub.query is not q:
                continue  # unsubscribed (or moved to another execution) since the pass began
            if sub.last_hash == h:
                if self._deliver_unchanged(q, sub):
                    unchanged += 1
                continue
            sub.acked = True
            sub.last_hash = h
            head = sub.data_head
            if head is not last_head:
                message = messages.get(head)
                if message is None:
                    message = messages[head] = (head, tail)
                last_head = head
            owner = sub.owner
            direct = owner.direct  # (``sub.query is q`` above: the owner still holds this subscription)
            if direct is None or not direct(message):
                owner.push(sub.sub_id, message, _DATA)
            data += 1
        self.stats.pushes += data
        return data, unchanged

    def _record_push(self, q: LiveQuery, start: int, data: int, unchanged: int, subscription: str | None) -> None:
        tel = self.telemetry
        if unchanged:
            tel.emit("rt.push", "unchanged", unchanged)
        if data:
            tel.emit("rt.push", "data", data)
            span = current_span()
            if span is not None:
                attrs = {"live.pushes": data, "live.hash": q.hash}
                if subscription is not None:
                    attrs["live.subscription"] = subscription
                span.record("push", "producer", start, time.time_ns(), attrs)

    def _deliver_unchanged(self, q: LiveQuery, sub: Subscription) -> bool:
        """``sub`` already has ``q``'s result: tell it so once (the answer to a subscribe that sent
        the hash it had); whether anything was sent."""
        if sub.acked:
            return False
        sub.acked = True
        self.stats.unchanged += 1
        sub.owner.push(sub.sub_id, (encode({"type": "unchanged", "id": sub.sub_id, "hash": q.hash,
                                            "position": q.position}),), _UNCHANGED)
        return True

    def _retry_later(self, q: LiveQuery) -> None:
        """The database went away under a run (PostgreSQL restarting): its subscriptions stay and
        the query runs again after a growing pause (0.2 s to 5 s) until the database answers;
        ending them would leave clients with no result and nothing telling them to resubscribe."""
        q.running, q.dirty = False, True
        q.lost_runs += 1
        asyncio.get_running_loop().call_later(min(5.0, 0.1 * 2 ** min(q.lost_runs, 6)), self._schedule, q)

    def _fail(self, q: LiveQuery, exc: ForgeError) -> None:
        subs = list(q.subscriptions)
        self._drop(q)
        for sub in subs:
            sub.query = None
            sub.owner.end(sub.sub_id, exc)

    def _split(self, q: LiveQuery) -> None:
        subs = list(q.subscriptions)
        self._drop(q)
        for sub in subs:
            sub.query = None
            self.subscribe(sub)

    def _merge(self, q: LiveQuery) -> LiveQuery | None:
        """A query that turned out not to read ``ctx.auth``: share it under the SHARED scope.
        Returns the query to finish with, or None when another execution took its subscribers."""
        shared_key = (q.key[0], q.key[1], SHARED)
        shared = self.queries.get(shared_key)
        if self.queries.get(q.key) is q:
            del self.queries[q.key]
        if shared is None or shared.dropped:
            q.key = shared_key
            self.queries[shared_key] = q
            return q
        # another execution already serves this (function, arguments): hand our subscribers over
        subs = list(q.subscriptions)
        q.subscriptions.clear()
        self._drop(q)
        for sub in subs:
            shared.subscriptions[sub] = None
            sub.query = shared
            if shared.result_json is not None and not (shared.running or shared.queued or shared.dirty):
                self._deliver(shared, [sub])
        return None
