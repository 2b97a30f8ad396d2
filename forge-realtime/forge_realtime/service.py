"""The realtime service of one node: change reader + live-query engine + WebSocket sessions."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

from litestar import WebSocket, websocket
from loguru import logger

from forge_kernel.db import TableRead
from forge_kernel.websocket import write_now

from .capture import CaptureError, CaptureManager
from .changes import ChangeReader
from .config import RealtimeConfig
from .engine import LiveQueryEngine, capture_needs, encode
from .session import CLOSE_GOING_AWAY, Session

SERVICE_NAME = "realtime"
_ATTR = "_forge_realtime"


class Realtime:
    """Everything realtime for one node. Created lazily per node (see :func:`for_node`)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.config: RealtimeConfig = node.config["realtime"]
        self.capture: CaptureManager | None = None
        self.engine: LiveQueryEngine | None = None
        self.reader: ChangeReader | None = None
        self.sessions: set[Session] = set()
        #: the functions' rate limits, from the gateway through ``forge_rate_limiter`` (None: no limiter)
        self.limits: Any = None
        self.accepting = False
        self.draining = False
        self.started = asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(self, node: Any) -> AsyncIterator["Realtime"]:
        # live queries may read a replica: their re-runs must see what the reader and the capture saw
        reads = node.executor.reads
        self.capture = CaptureManager(node.pool, after_install=reads.committed)
        self.reader = ChangeReader(node.connect, self._on_changes, self._on_resync,
                                   fallback_poll=self.config.fallback_poll,
                                   resync_after=self.config.retention / 2, on_lsn=reads.note)
        self.engine = LiveQueryEngine(node.executor, self.capture, max_concurrent_runs=self.config.max_concurrent_runs,
                                      batch_runs=self.config.batch_runs, rerun_after=self.config.rerun_after_pass,
                                      position=lambda: self.reader.position)
        self.limits = node.loader.hook.forge_rate_limiter(node=node)
        await self._capture_declared()
        node.supervisor.spawn("realtime-changes", self.reader.run, service=SERVICE_NAME)
        await asyncio.wait_for(self.reader.ready.wait(), 30)
        self.engine.start()
        tel = node.telemetry
        tel.gauge("forge_realtime_connections", "Open WebSocket connections", lambda: len(self.sessions))
        tel.gauge("forge_realtime_subscriptions", "Live-query subscriptions",
                  lambda: sum(len(s.subscriptions) for s in self.sessions))
        tel.gauge("forge_realtime_live_queries", "Distinct live-query executions (shared by subscribers)",
                  lambda: len(self.engine.queries))
        self.accepting = True
        self.started.set()
        try:
            yield self
        finally:
            self.accepting, self.draining = False, True
            # draining: clients reconnect to another node and resubscribe with their hashes
            await asyncio.gather(*(s.close(CLOSE_GOING_AWAY, "node draining") for s in list(self.sessions)),
                                 return_exceptions=True)
            await self.engine.stop()

    async def _capture_declared(self) -> None:
        """Tables that queries declare with ``@query(reads=[...])`` are captured at start-up."""
        reads = [TableRead(t) for d in self.node.registry.of_kind("query") for t in d.reads]
        needs = capture_needs(reads)
        for table in needs:
            try:
                await self.capture.ensure({table: needs[table]})
            except CaptureError as exc:
                logger.warning(f"realtime: {exc} (declared in @query(reads=...))")

    def _on_changes(self, changes: list, position: int) -> None:
        self.engine.on_changes(changes, position)

    def _on_resync(self, position: int) -> None:
        logger.warning("realtime: change reader reconnected; re-running every live query")
        self.engine.on_resync(position)

    async def reloaded(self, registry: Any) -> None:
        """``forge_registry_reloaded``: capture newly declared tables, re-run every live query."""
        if not self.accepting:
            return
        await self._capture_declared()
        self.engine.reevaluate(registry)

    def broadcast(self, message: dict[str, Any]) -> None:
        """Send ``message`` to every open connection (``forge_dev_notice``)."""
        if not self.accepting:
            return
        encoded = (encode(message),)
        for session in list(self.sessions):
            session.notify(encoded)

    def verifier(self) -> Any:
        return self.node.loader.hook.forge_auth_verifier(node=self.node)

    async def serve(self, transport: Any, scope: Any = None, traceparent: str | None = None) -> Session | None:
        """Run one connection (whose ASGI scope is ``scope``) to its end. ``traceparent``: the trace
        its messages' spans continue."""
        client = "unknown"
        if self.limits is not None and scope is not None:
            client = self.limits.client_address(scope)
        session = Session(self.engine, self.verifier(), self.config, transport, limits=self.limits, client=client)
        session.telemetry, session.traceparent = self.node.telemetry, traceparent
        self.sessions.add(session)
        try:
            await session.serve()
        finally:
            self.sessions.discard(session)
        return session


def for_node(node: Any) -> Realtime:
    rt = getattr(node, _ATTR, None)
    if rt is None:
        rt = Realtime(node)
        setattr(node, _ATTR, rt)
    return rt


class LitestarTransport:
    def __init__(self, socket: WebSocket) -> None:
        self.socket = socket
        #: the server's direct write (forge_kernel.websocket), when it offers one
        self.write_now = write_now(socket.scope)

    async def receive(self) -> str | bytes | None:
        event = await self.socket.receive()
        if event["type"] == "websocket.disconnect":
            return None
        text = event.get("text")
        return text if text is not None else (event.get("bytes") or b"")

    async def send_text(self, text: str) -> None:
        await self.socket.send_text(text)

    async def close(self, code: int, reason: str) -> None:
        await self.socket.close(code=code, reason=reason)


def websocket_handler(node: Any, path: str = "/ws") -> Any:
    """The Litestar handler serving the live-query protocol at ``path`` for ``node``."""
    rt = for_node(node)

    @websocket(path)
    async def forge_realtime_socket(socket: WebSocket) -> None:
        tel = node.telemetry
        # a span for the handshake only (a connection lasts hours): it continues the client's
        # traceparent, and each message's span continues it in turn, so a connection is one trace
        span = tel.start_span(f"WS {path}", "server", remote=socket.headers.get("traceparent") or "",
                              attrs={"ws.path": path}) if tel.enabled else None
        try:
            await socket.accept()
            if not rt.accepting and not rt.draining:
                # the gateway may come up a moment before this service: wait instead of bouncing clients
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(rt.started.wait(), 10)
            if not rt.accepting:
                await socket.close(code=CLOSE_GOING_AWAY, reason="realtime is not running on this node")
                tel.end_span(span, "UNAVAILABLE")
                return
        finally:
            tel.end_span(span)
        await rt.serve(LitestarTransport(socket), socket.scope, span.traceparent() if span is not None else None)

    return forge_realtime_socket
