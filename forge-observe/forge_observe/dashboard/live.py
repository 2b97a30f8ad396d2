"""Live pages: one snapshot statement per node and tick, shared by every open page.

Each open page (an SSE stream) subscribes to its :class:`~.views.Query`; equal queries share one
entry. Every ``live_interval`` seconds, if anything is watched, the hub runs all watched queries
as the columns of ONE statement, renders each changed result once and hands the fragment to
that query's subscribers. So 20 tabs on one node cost one query per tick, whatever they show.
A subscriber keeps only the newest fragment (a slow client never piles up memory). Browsers close
their stream while the tab is hidden and open it again when it shows (static/app.js).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from typing import Any, Callable

import asyncpg
from loguru import logger

from forge_kernel.errors import ForgeError

from . import queries
from .views import Query


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
        settings = {"application_name": "forge-dashboard", "statement_timeout": str(int(statement_timeout * 1000))}
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


class Hub:
    def __init__(self, pools: Pools, interval: float) -> None:
        self.pools = pools
        self.interval = interval
        self.watched: dict[str, _Watched] = {}
        self.wake = asyncio.Event()
        self.stopping = False
        #: statements run and ticks made (the live test reads them through /_forge/api/live)
        self.statements = 0
        self.ticks = 0

    def subscribe(self, query: Query, render: Callable[[Query, Any], str]) -> asyncio.Queue:
        w = self.watched.get(query.key)
        if w is None:
            w = self.watched[query.key] = _Watched(query, render)
            self.wake.set()  # a new view: fetch it now rather than at the next tick
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

    def poke(self) -> None:
        """Refresh now (after an action changed something)."""
        self.wake.set()

    @property
    def subscribers(self) -> int:
        return sum(len(w.subscribers) for w in self.watched.values())

    async def run(self) -> None:
        next_at = time.monotonic()
        while not self.stopping:
            timeout = max(0.0, next_at - time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)
            if self.stopping:
                break
            self.wake.clear()
            now = time.monotonic()
            if not self.watched:
                next_at = now + self.interval
                continue
            if now < next_at and not self._new_views():
                # a poke between ticks: at most one statement per interval stays the rule
                next_at_wait = next_at - now
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.sleep(next_at_wait), next_at_wait + 1)
            next_at = time.monotonic() + self.interval
            try:
                await self.tick()
            except Exception as exc:  # never let one bad tick end live updates
                logger.warning(f"dashboard live snapshot failed: {type(exc).__name__}: {exc}")

    def _new_views(self) -> bool:
        return any(w.fragment is None for w in self.watched.values())

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
        for w in list(self.watched.values()):
            for queue in list(w.subscribers):
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)  # ends the stream
