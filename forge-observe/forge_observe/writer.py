"""Storing telemetry in PostgreSQL: bounded in-memory queues, one COPY writer on its own connection.

The app never waits for telemetry: ``add`` appends to a bounded deque (the oldest record goes
when it is full, counted in ``forge_observe_dropped_total{reason="queue_full"}``); a single task
writes batches with COPY on a dedicated connection (never a pool connection: a slow or dead
database must not take connections from functions). A lost connection is re-opened with
backoff; the batch in flight is retried a few times, then dropped and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import random
import re
import time
from typing import Any, Awaitable, Callable

import asyncpg
import msgspec
from loguru import logger

from forge_kernel.telemetry import Trace

from .metrics import NodeMetrics

TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "logs": ("forge_obs_logs", ("at", "node_id", "level", "logger", "message", "trace_id", "span_id", "call_id",
                                "job_id", "cron_run_id", "workflow_run_id", "extra")),
    "spans": ("forge_obs_spans", ("trace_id", "span_id", "parent_id", "name", "kind", "node_id", "start_at",
                                  "duration_ms", "error", "attrs")),
    "metrics": ("forge_obs_metrics", ("at", "node_id", "name", "labels", "value", "sum", "bounds", "buckets")),
}
#: which column of each row holds its time (decides the partition)
_TIME_COLUMN = {"logs": 0, "spans": 6, "metrics": 0}
BATCH = 5000
RETRIES = 3
#: NOTIFY channel of the activity hint: "this node just stored telemetry or saw jobs, crons or
#: workflows move". The payload is ``<kinds>@<node id>``, kinds a comma-separated subset of
#: :data:`ACTIVITY_KINDS`. The dashboard's live pages LISTEN to refresh at once instead of at their
#: next poll (only the pages showing one of the kinds). Sent by the writer on its own connection at
#: most once per write cycle (about twice a second while the node is busy, never while it is idle).
ACTIVITY_CHANNEL = "forge_observe_activity"
ACTIVITY_KINDS = ("jobs", "crons", "workflows", "logs", "spans", "metrics")

# InternalClientError: the connection's protocol state is confused (an operation cut off mid-way): drop it
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
              asyncio.TimeoutError, ConnectionError)


def truncate(text: str, limit: int) -> str:
    """``text`` as a text column takes it (``pg_text``), cut to at most ``limit`` UTF-8 bytes,
    ending in a marker saying how much went."""
    text = pg_text(text)
    if len(text) * 4 <= limit:  # no character takes more than 4 bytes: short enough without encoding it
        return text
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    marker_room = 40
    kept = data[:max(0, limit - marker_room)].decode("utf-8", "ignore")
    return f"{kept}…[truncated {len(data) - len(kept.encode('utf-8'))} bytes]"


def pg_text(text: str) -> str:
    """``text`` as PostgreSQL's text type takes it: a NUL character, which it cannot hold, as U+FFFD.
    One NUL in one record failed its whole COPY batch three times and dropped every record in it."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


#: a NUL character escaped in JSON text (after an even run of backslashes: an odd one escapes the ``\``)
_JSON_NUL = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def jsonb_text(data: bytes) -> str:
    """JSON text as jsonb takes it: ``\\u0000``, which jsonb refuses (PostgreSQL's text holds no NUL),
    as ``\\ufffd``."""
    if b"\\u0000" in data:
        data = _JSON_NUL.sub(rb"\1\\ufffd", data)
    return data.decode()


def _json_value(value: Any, limit: int) -> Any:
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return truncate(value if isinstance(value, str) else str(value), limit)


#: JSON text of a span's attributes, encoded in C: the json module's dumps cost ~18k CPU instructions
#: per small dict (its encoder is rebuilt on every call), msgspec's ~1.7k (bench/rpc/README.md). NaN
#: and infinities become null, which jsonb accepts (json.dumps wrote NaN, and the COPY failed).
_encode_json = msgspec.json.Encoder().encode
_SCALARS = frozenset({str, int, float, bool, type(None)})


def attrs_json(attrs: dict[Any, Any], limit: int) -> str:
    """A span's attributes as JSON text: keys cut to 200 characters, values that are not numbers,
    booleans or None as text cut to ``limit`` bytes (``truncate``)."""
    try:
        text = _encode_json(attrs)
    except TypeError:  # a value or key msgspec does not encode (an object, a tuple key)
        text = None
    # the usual case, as it is: scalars, and all of it shorter than the shortest cut (so every key and value is)
    if text is not None and len(text) <= min(200, limit) and _SCALARS.issuperset(map(type, attrs.values())):
        return jsonb_text(text)
    return jsonb_text(_encode_json({str(k)[:200]: _json_value(v, limit) for k, v in attrs.items()}))


def span_rows(trace: Trace, node_id: str, attr_limit: int) -> list[tuple]:
    rows = []
    trace_hex = "%032x" % trace.trace_id  # every span of a local trace has its trace id
    utc, when = dt.timezone.utc, dt.datetime.fromtimestamp
    for s in trace.spans:
        name, error, attrs = s.name, s.error, s.attrs
        if len(name) * 4 > attr_limit or "\x00" in name:
            name = truncate(name, attr_limit)
        if error is not None and (len(error) * 4 > attr_limit or "\x00" in error):
            error = truncate(error, attr_limit)
        rows.append((trace_hex, "%016x" % s.span_id, "%016x" % s.parent_id if s.parent_id else None, name, s.kind,
                     node_id, when(s.start_ns / 1e9, utc), max(0, s.end_ns - s.start_ns) / 1e6, error or None,
                     attrs_json(attrs, attr_limit) if attrs else None))
    return rows


class Writer:
    """The node's telemetry writer. ``add(kind, record)`` from anywhere on the loop; ``run()`` as a task."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], node_id: str, metrics: NodeMetrics, *,
                 queue_size: int = 20_000, interval: float = 0.5, attr_limit: int = 1024, partitions_ahead: int = 2) -> None:
        self._connect = connect
        self.node_id = node_id
        self.metrics = metrics
        self.queue_size = queue_size
        self.interval = interval
        self.attr_limit = attr_limit
        self.partitions_ahead = partitions_ahead
        self.queues: dict[str, collections.deque] = {k: collections.deque() for k in TABLES}
        self.conn: asyncpg.Connection | None = None
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.reconnects = 0
        self._partitions_for: dt.date | None = None
        self._retry: dict[str, tuple[list[tuple], int]] = {}
        self._lock = asyncio.Lock()
        #: what happened since the last activity hint (see ``hint``): kinds of ACTIVITY_KINDS
        self.hint_due: set[str] = set()
        self.hints_sent = 0
        #: close() has begun (run() stops) / has finished (nothing connects again)
        self._closing = False
        self._closed = False

    # --- producers ---------------------------------------------------------------------------
    def add(self, kind: str, record: Any) -> None:
        q = self.queues[kind]
        if len(q) >= self.queue_size:
            old = q.popleft()
            self.metrics.drop(kind, "queue_full", len(old.spans) if isinstance(old, Trace) else 1)
        q.append(record)

    def hint(self, kinds: set[str]) -> None:
        """Send an activity hint soon (``kinds``: jobs, crons or workflows moved on this node): wakes
        the writer, which sends it after writing what is queued."""
        self.hint_due |= kinds
        self.wake.set()

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values()) + sum(len(b) for b, _ in self._retry.values())

    # --- the writing task ----------------------------------------------------------------------
    async def run(self) -> None:
        backoff = 0.2
        while not self._closing:  # close() writes the rest itself, on the same lock
            try:
                await self.write_pending()
                if self.hint_due:
                    await self._send_hint()
                backoff = 0.2
            except _DB_ERRORS as exc:
                self._lost(exc)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(5.0, backoff * 2)
                continue
            self.idle.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.interval)
            self.wake.clear()
            self.idle.clear()

    async def _send_hint(self) -> None:
        # after the COPYs committed: a reader woken by it sees the rows
        kinds, self.hint_due = self.hint_due, set()
        # the connection is shared with open() and write_pending(): one statement at a time on it
        async with self._lock:
            if self._closed:
                return
            conn = await self._ensure_conn()
            await conn.execute("SELECT pg_notify($1, $2)", ACTIVITY_CHANNEL, f"{','.join(sorted(kinds))}@{self.node_id}")
        self.hints_sent += 1

    def _lost(self, exc: BaseException) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.terminate()
            self.reconnects += 1
            self.metrics.reconnects.inc()
        logger.warning(f"observe: telemetry writer lost the database ({type(exc).__name__}: {exc}); "
                       f"reconnecting, {self.pending()} record(s) buffered")

    async def open(self, timeout: float) -> bool:
        """Connect (and make today's partitions) now, while the node starts, rather than at the first
        write in the middle of its work; False (logged) when the database is not reachable yet: the
        writer then connects on its first write, as after any lost connection."""
        try:
            async with self._lock:
                await asyncio.wait_for(self._ensure_conn(), timeout)
            return True
        except (*_DB_ERRORS, asyncio.TimeoutError) as exc:
            self._lost(exc)
            return False

    async def _ensure_conn(self) -> asyncpg.Connection:
        if self.conn is not None and self.conn.is_closed():  # closed under us while idle (terminated, restarted)
            self._lost(ConnectionError("connection closed"))
        if self.conn is None:
            self.conn = await self._connect()
            self._partitions_for = None
        today = dt.datetime.now(dt.timezone.utc).date()
        if self._partitions_for != today:
            await ensure_partitions(self.conn, today - dt.timedelta(days=1), today + dt.timedelta(days=self.partitions_ahead))
            self._partitions_for = today
        return self.conn

    async def write_pending(self) -> int:
        """Write everything queued now; raises on a database error (the batch is kept for a retry)."""
        async with self._lock:
            written = 0
            if self._closed:  # records added during shutdown, after the last write: not reconnecting for them
                return written
            for kind in TABLES:
                while True:
                    batch, tries = self._retry.pop(kind, (None, 0))
                    if batch is None:
                        batch = self._take(kind)
                    if not batch:
                        break
                    conn = await self._ensure_conn()
                    try:
                        await self._copy(conn, kind, batch)
                    except _DB_ERRORS:
                        if tries + 1 >= RETRIES:
                            self.metrics.drop(kind, "write_failed", len(batch))
                        else:
                            self._retry[kind] = (batch, tries + 1)
                        raise
                    self.metrics.written.labels(kind).inc(len(batch))
                    self.hint_due.add(kind)
                    written += len(batch)
            return written

    def _take(self, kind: str) -> list[tuple]:
        q = self.queues[kind]
        if not q:
            return []
        out: list[tuple] = []
        pop = q.popleft
        if kind == "spans":
            while q and len(out) < BATCH:
                out.extend(span_rows(pop(), self.node_id, self.attr_limit))
        else:
            while q and len(out) < BATCH:
                out.append(pop())
        return out

    async def _copy(self, conn: asyncpg.Connection, kind: str, rows: list[tuple]) -> None:
        table, columns = TABLES[kind]
        try:
            await conn.copy_records_to_table(table, records=rows, columns=columns, timeout=30)
        except asyncpg.CheckViolationError:
            # a row for a day without a partition (clock skew, a batch across midnight): make it, once
            days = [r[_TIME_COLUMN[kind]].astimezone(dt.timezone.utc).date() for r in rows]
            await ensure_partitions(conn, min(days), max(days))
            await conn.copy_records_to_table(table, records=rows, columns=columns, timeout=30)

    async def close(self, timeout: float) -> None:
        """Write what is buffered (within ``timeout``) and close the connection."""
        deadline = time.monotonic() + timeout
        self._closing = True
        self.wake.set()
        while self.pending() and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.write_pending(), max(0.1, deadline - time.monotonic()))
            except (*_DB_ERRORS, asyncio.TimeoutError) as exc:
                self._lost(exc)
                await asyncio.sleep(0.2)
        left = self.pending()
        if left:
            logger.warning(f"observe: {left} telemetry record(s) not written before shutdown")
        async with self._lock:  # after a write or hint run() may still be sending
            self._closed = True
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.conn.close(), 2)
                self.conn = None


async def ensure_partitions(conn: Any, first: dt.date, last: dt.date) -> int:
    return await conn.fetchval("SELECT forge_obs_ensure_partitions($1::text[], $2::date, $3::date)",
                               [t for t, _ in TABLES.values()], first, last)


async def drop_partitions(conn: Any, retention_days: dict[str, int], today: dt.date | None = None) -> list[str]:
    """Detach and drop each kind's partitions older than its retention (whole days)."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    dropped: list[str] = []
    for kind, days in retention_days.items():
        table = TABLES[kind][0]
        rows = await conn.fetch("SELECT forge_obs_drop_partitions($1, $2::date)", table,
                                today - dt.timedelta(days=days))
        dropped.extend(r[0] for r in rows)
    return dropped
