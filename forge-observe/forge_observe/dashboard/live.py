"""Live pages: one snapshot statement per node at a time, shared by every open page, run when
something changed.

Each open page (an SSE stream) subscribes to its :class:`~.views.Query`; equal queries share one
entry. A refresh runs all watched queries as the columns of ONE statement, renders each changed
result once and hands the fragment to that query's subscribers. So 20 tabs on one node cost one
statement per refresh, whatever they show, and refreshes are at least ``live_interval`` apart: at
most one statement a second per node, however many tabs and hints there are.

When to refresh (:class:`Pacer`): on a hint, at once if the last refresh is older than
``live_interval``, otherwise when it is; without hints every ``live_poll`` seconds (changes no one
announces: rows edited by hand, time passing). Hints are NOTIFYs on a dedicated connection the hub
holds while anything is watched (:data:`HINT_CHANNELS`). A subscriber keeps only the newest fragment
(a slow client never piles up memory). Browsers close their stream while the tab is hidden and open
it again when it shows (static/app.js).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from typing import Any, Awaitable, Callable

import asyncpg
import attrs
from loguru import logger

from forge_kernel.errors import ForgeError

from ..writer import ACTIVITY_CHANNEL
from . import queries
from .views import Query

#: NOTIFY channels that mean "a page may show something new", and the kind of change each announces
#: (a page refreshes only for the kinds it shows: ``Query.hints``). Besides forge-observe's own
#: activity hint (its payload names the kinds: a node stored logs, spans or metrics, or saw its jobs,
#: crons or workflows move), the worker's wake-ups, part of forge-worker's public contract like its
#: tables (queries.py): a job or workflow run stored while a worker sleeps, a retry, a resumed
#: queue, a cancel request.
HINT_CHANNELS = {ACTIVITY_CHANNEL: None, "forge_jobs": "jobs", "forge_jobs_cancel": "jobs",
                 "forge_workflows": "workflows", "forge_workflows_cancel": "workflows"}
#: seconds the hint connection stays open after the last page closed (a click to another page reopens none)
LISTEN_LINGER = 30.0


async def _codecs(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Pools:
    """The dashboard's own connections, every statement under ``statement_timeout``: ``read``
    (read-only sessions) for pages, ``write`` for actions, sessions and the audit trail. Small,
    so a busy dashboard never takes the app's pool connections."""

    def __init__(self) -> None:
        self.read: asyncpg.Pool | None = None
        self.write: asyncpg.Pool | None = None

    async def open(self, url: str, statement_timeout: float) -> None:
        # custom plans always: a page's statement is prepared once per connection and re-run with other
        # values (a log search's stretches, the live snapshot every second); a generic plan cannot bound
        # a scan by a time it does not know (measured: 190 ms stretches reading whole partitions, not 10 ms)
        settings = {"application_name": "forge-dashboard", "statement_timeout": str(int(statement_timeout * 1000)),
                    "plan_cache_mode": "force_custom_plan"}
        self.read = await asyncpg.create_pool(url, min_size=0, max_size=4, init=_codecs,
                                              server_settings={**settings, "default_transaction_read_only": "on"})
        self.write = await asyncpg.create_pool(url, min_size=0, max_size=2, init=_codecs, server_settings=settings)

    async def close(self) -> None:
        for pool in (self.read, self.write):
            if pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pool.close(), 5)


class _Watched:
    __slots__ = ("query", "subscribers", "fragment", "digest", "render")

    def __init__(self, query: Query, render: Callable[[Query, Any], str]) -> None:
        self.query = query
        self.render = render
        self.subscribers: set[asyncio.Queue] = set()
        self.fragment: str | None = None
        self.digest = b""


def hinted_kinds(channel: str, payload: str) -> frozenset[str] | None:
    """The kinds of change a NOTIFY announces (None: any)."""
    kind = HINT_CHANNELS.get(channel)
    if kind is not None:
        return frozenset((kind,))
    kinds, at, _node = payload.partition("@")
    return frozenset(k for k in kinds.split(",") if k) if at else None


@attrs.define
class Pacer:
    """When the next refresh is due (monotonic seconds): refreshes are at least ``spacing`` apart; a
    hint makes one due as soon as that allows; with no hint, one is due ``poll`` after the last (a
    change no one announced; the rare hint that came before the commit it announces - a job's end is
    recorded as an event a moment before its row is written - is caught up with then)."""

    spacing: float
    poll: float
    last: float = -math.inf
    hinted: bool = False

    def hint(self) -> None:
        self.hinted = True

    def due(self) -> float:
        return self.last + (self.spacing if self.hinted else self.poll)

    def refreshed(self, at: float) -> None:
        self.hinted, self.last = False, at


class Hub:
    def __init__(self, pools: Pools, interval: float, poll: float | None = None,
                 connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None) -> None:
        self.pools = pools
        self.interval = interval
        self.pacer = Pacer(interval, max(interval, poll if poll is not None else interval))
        #: opens the connection that LISTENs for hints (None: poll only)
        self.connect = connect
        self.watched: dict[str, _Watched] = {}
        self.wake = asyncio.Event()
        self.watching = asyncio.Event()
        self.stopping = False
        #: statements run, refreshes made, hints heard (the live tests read them through /_forge/api/live)
        self.statements = 0
        self.ticks = 0
        self.hints = 0
        self.listening = False
        self._listener: asyncpg.Connection | None = None

    def subscribe(self, query: Query, render: Callable[[Query, Any], str]) -> asyncio.Queue:
        w = self.watched.get(query.key)
        if w is None:
            w = self.watched[query.key] = _Watched(query, render)
            self.pacer.hint()  # a new view: fetch it as soon as the spacing allows
            self.wake.set()
        self.watching.set()
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        w.subscribers.add(queue)
        if w.fragment is not None:
            queue.put_nowait(w.fragment)
        return queue

    def unsubscribe(self, query: Query, queue: asyncio.Queue) -> None:
        w = self.watched.get(query.key)
        if w is not None:
            w.subscribers.discard(queue)
            if not w.subscribers:
                del self.watched[query.key]
        if not self.watched:
            self.watching.clear()

    def poke(self, kinds: frozenset[str] | None = None) -> None:
        """Refresh as soon as the spacing allows if a watched page shows one of ``kinds`` of change
        (None: any; an action changed something)."""
        if any(kinds is None or w.query.hints is None or not kinds.isdisjoint(w.query.hints)
               for w in self.watched.values()):
            self.pacer.hint()
            self.wake.set()

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.hints += 1
        self.poke(hinted_kinds(channel, payload))

    @property
    def subscribers(self) -> int:
        return sum(len(w.subscribers) for w in self.watched.values())

    async def run(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            due = self.pacer.due() if self.watched else math.inf
            if due > now:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), min(due - now, 60.0))
                self.wake.clear()
                continue
            self.pacer.refreshed(now)
            try:
                await self.tick()
            except Exception as exc:  # never let one bad tick end live updates
                logger.warning(f"dashboard live snapshot failed: {type(exc).__name__}: {exc}")

    async def listen(self) -> None:
        """Hold a connection LISTENing on :data:`HINT_CHANNELS` while anything is watched (and
        ``LISTEN_LINGER`` seconds after); polls alone keep pages current while it is down."""
        while not self.stopping and self.connect is not None:
            await self.watching.wait()
            if self.stopping:
                return
            conn = None
            try:
                conn = self._listener = await self.connect()
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _c: closed.set())
                for channel in HINT_CHANNELS:  # (the keys)
                    await conn.add_listener(channel, self._notified)
                self.listening = True
                self.poke()  # what changed while nobody listened
                idle_since: float | None = None
                while not closed.is_set() and not self.stopping:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(closed.wait(), 15)
                    if self.watched:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since >= LISTEN_LINGER:
                        break
                    if not closed.is_set() and not self.stopping:
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), 10)  # a dead socket shows here
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
                logger.warning(f"dashboard live hints lost the database ({type(exc).__name__}: {exc}); "
                               f"pages refresh every {self.pacer.poll:g}s until it is back")
                await asyncio.sleep(1.0)
            finally:
                self.listening = False
                self._listener = None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()

    async def tick(self) -> None:
        views = list(self.watched.values())
        if not views:
            return
        self.ticks += 1
        sql, args = queries.compose([(w.query.sql, w.query.args) for w in views])
        try:
            self.statements += 1
            row = await self.pools.read.fetchrow(sql, *args)
            results = [row[f"v{i}"] for i in range(len(views))]
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            if len(views) == 1:
                results = [exc]
            else:
                # one view failed the statement (a timeout, say): find it; the others still update
                results = []
                for w in views:
                    try:
                        self.statements += 1
                        results.append(await self.pools.read.fetchval(w.query.sql, *w.query.args))
                    except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as one:
                        results.append(one)
        for w, raw in zip(views, results):
            try:
                fragment = w.render(w.query, raw)
            except ForgeError as exc:
                fragment = w.render(w.query, exc)
            digest = hashlib.sha256(fragment.encode()).digest()
            if digest == w.digest:
                continue
            w.digest, w.fragment = digest, fragment
            for queue in list(w.subscribers):
                if queue.full():
                    with contextlib.suppress(asyncio.QueueEmpty):
                        queue.get_nowait()
                queue.put_nowait(fragment)

    async def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.watching.set()
        if self._listener is not None:
            self._listener.terminate()  # ends listen() now
        for w in list(self.watched.values()):
            for queue in list(w.subscribers):
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)  # ends the stream
