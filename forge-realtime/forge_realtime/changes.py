"""Reading the change log: a per-node cursor that cannot skip a late-committing transaction.

Change-log ids come from a sequence, and sequence values commit out of order, so a cursor
"id > last seen" loses rows. Instead each poll reads, in one snapshot, every visible row
whose writing transaction id (``xid8``) is at or above the previous snapshot's xmin horizon,
minus the transactions already processed. Every transaction below the horizon had finished
when the previous poll's snapshot was taken, so its rows were visible to that poll; every
transaction at or above it is either already in ``seen`` or not yet read. ``seen`` is pruned
to the new horizon after each poll, so it holds only the transactions that committed while
an older one is still open.

NOTIFY is only a hint to poll now; the loop also polls every ``fallback_poll`` seconds and
re-polls shortly after a poll that found changes (a transaction that lost the hint gate to
another one commits right after it).

During a sustained stream of changes (``stream_after`` polls in a row found some) the reader
stops listening and polls every ``busy_repoll`` seconds instead: at hundreds of writes per
second nearly every write won the hint gate, and each hint woke the reader's backend and this
node and then cost a poll of its own, so a poll carried one or two changes. On its cadence a
poll carries every change of the last few milliseconds, and no hint is delivered at all. The
first poll that finds nothing ends the stream: the reader listens again and polls once more
(a hint sent before the LISTEN took effect is lost, so that poll reads whatever it announced).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Awaitable, Callable

import asyncpg
import attrs
from loguru import logger

CHANNEL = "forge_changes"

# lsn: the WAL insert position, read after the snapshot was taken - every change the poll sees
# committed before it (a replica that replayed it shows them all; see forge_kernel.reads)
_POLL_SQL = """
SELECT pg_snapshot_xmin(s.snap)::text AS xmin, pg_snapshot_xmax(s.snap)::text AS xmax, s.lsn,
       c.xid::text AS xid, c.tbl, c.op, c.old_rows, c.new_rows, c.trace
FROM (SELECT pg_current_snapshot() AS snap, pg_current_wal_insert_lsn() AS lsn) s
LEFT JOIN forge_changes c ON c.xid >= $1::text::xid8 AND NOT (c.xid = ANY($2::text[]::xid8[]))
ORDER BY c.xid
"""

_HORIZON_SQL = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, pg_snapshot_xmax(pg_current_snapshot())::text"


@attrs.frozen
class Change:
    """One captured statement: images (primary key + filtered columns) of the rows it touched."""

    table: str
    op: str
    old_rows: tuple[dict[str, Any], ...] = ()
    new_rows: tuple[dict[str, Any], ...] = ()
    xid: int = 0
    #: the W3C traceparent of the (sampled) mutation that wrote it
    trace: str | None = None

    def rows(self) -> tuple[dict[str, Any], ...]:
        return self.old_rows + self.new_rows


@attrs.define
class LogCursor:
    """The xmin-horizon cursor (pure state; the reader feeds it poll results)."""

    horizon: int = 0
    seen: set[int] = attrs.field(factory=set)
    #: the xmax of the last poll's snapshot: every transaction below it that is not in
    #: progress has been delivered. Monotonic; pushes carry it as their log position.
    position: int = 0
    #: the primary's WAL position at the last poll: every delivered change committed before it
    lsn: int = 0

    def args(self) -> tuple[str, list[str]]:
        return str(self.horizon), [str(x) for x in self.seen]

    def advance(self, xmin: int, xmax: int, xids: set[int]) -> None:
        self.seen = {x for x in self.seen | xids if x >= xmin}
        self.horizon = max(self.horizon, xmin)
        self.position = max(self.position, xmax)


async def poll(conn: asyncpg.Connection, cursor: LogCursor) -> list[Change]:
    """Read the changes ``cursor`` has not delivered yet and advance it."""
    horizon, seen = cursor.args()
    rows = await conn.fetch(_POLL_SQL, horizon, seen)
    if not rows:  # cannot happen (the LEFT JOIN keeps the snapshot row); be defensive
        return []
    changes, xids = [], set()
    for r in rows:
        if r["xid"] is None:
            continue
        xid = int(r["xid"])
        xids.add(xid)
        changes.append(Change(r["tbl"], r["op"], tuple(r["old_rows"] or ()), tuple(r["new_rows"] or ()), xid,
                              r["trace"]))
    cursor.advance(int(rows[0]["xmin"]), int(rows[0]["xmax"]), xids)
    cursor.lsn = max(cursor.lsn, rows[0]["lsn"])
    return changes


async def start_cursor(conn: asyncpg.Connection) -> LogCursor:
    """A cursor positioned at "now": only changes committed after this call are delivered."""
    cursor = LogCursor()
    xmin, xmax = await conn.fetchrow(_HORIZON_SQL)
    cursor.horizon, cursor.position = int(xmin), int(xmax)
    # transactions between xmin and xmax that already committed are "now" too
    await poll(conn, cursor)
    return cursor


class ChangeReader:
    """The per-node loop: LISTEN for hints on a dedicated connection, poll, hand changes on.

    ``on_changes(changes, position)`` is called (synchronously) for every non-empty poll;
    ``on_resync(position)`` after a reconnect, when changes may have been missed and every
    live query must be re-run. ``on_lsn(lsn)``, before either, after every poll: the primary's
    WAL position that covers every change delivered so far (queries reading a replica wait
    for it).
    """

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]],
                 on_changes: Callable[[list[Change], int], None], on_resync: Callable[[int], None], *,
                 fallback_poll: float = 0.1, busy_repoll: float = 0.003, resync_after: float = 150.0,
                 on_lsn: Callable[[int], None] = lambda lsn: None, stream_after: int = 3) -> None:
        self._connect = connect
        self._on_changes = on_changes
        self._on_resync = on_resync
        self._on_lsn = on_lsn
        self.fallback_poll = fallback_poll
        self.busy_repoll = busy_repoll
        #: a gap between polls this long means changes may have been trimmed unseen: resync
        self.resync_after = resync_after
        #: polls in a row that found changes before the reader stops listening (0: never stops)
        self.stream_after = stream_after
        #: whether the reader is LISTENing for hints now (not during a stream of changes)
        self.listening = False
        #: streams of changes the reader followed without hints (each: an UNLISTEN, later a LISTEN)
        self.streams = 0
        self.cursor: LogCursor | None = None
        self.ready = asyncio.Event()
        self.polls = 0
        self.hints = 0
        self._wake = asyncio.Event()
        self._connected_once = False

    @property
    def position(self) -> int:
        return self.cursor.position if self.cursor else 0

    def _hint(self, *_: Any) -> None:
        self.hints += 1
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        conn = await self._connect()
        self.listening = False
        try:
            await conn.add_listener(CHANNEL, self._hint)
            self.listening = True
            if self.cursor is None or not self._connected_once:
                self.cursor = await start_cursor(conn)
            else:
                # changes may have been committed (or trimmed) while we were away
                self.cursor = await start_cursor(conn)
                self._on_lsn(self.cursor.lsn)
                self._on_resync(self.cursor.position)
            self._connected_once = True
            self.ready.set()
            delay = self.fallback_poll
            last = time.monotonic()
            found = 0  # polls in a row that found changes
            polled_at = last
            while True:
                if self.listening:
                    if not self._wake.is_set():
                        # asyncio.timeout, not wait_for: no task per wait (a poll every few ms when busy)
                        with contextlib.suppress(asyncio.TimeoutError):
                            async with asyncio.timeout(delay):
                                await self._wake.wait()
                else:
                    # a stream: poll every ``delay`` from the start of the last poll, whatever wakes us (a
                    # poll slower than that, on a busy machine, is followed at once, as a hint would be)
                    await asyncio.sleep(max(0.0, delay - (time.monotonic() - polled_at)))
                self._wake.clear()
                polled_at = time.monotonic()
                changes = await poll(conn, self.cursor)
                self._on_lsn(self.cursor.lsn)
                self.polls += 1
                now = time.monotonic()
                if now - last > self.resync_after:
                    logger.warning(f"change reader stalled for {now - last:.0f}s; re-running every live query")
                    self._on_resync(self.cursor.position)
                last = now
                if changes:
                    self._on_changes(changes, self.cursor.position)
                    delay = self.busy_repoll
                    found += 1
                    if self.listening and self.stream_after and found >= self.stream_after:
                        await conn.remove_listener(CHANNEL, self._hint)  # UNLISTEN: the cadence reads the stream
                        self.listening = False
                        self.streams += 1
                elif not self.listening:
                    # the stream ended: listen again, then poll at once - a change committed between the
                    # last poll's snapshot and the LISTEN sent its hint to nobody
                    await conn.add_listener(CHANNEL, self._hint)
                    self.listening = True
                    found = 0
                    delay = 0.0
                else:
                    found = 0
                    delay = self.fallback_poll
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)
            if not conn.is_closed():
                conn.terminate()
            logger.debug("change reader connection closed")
