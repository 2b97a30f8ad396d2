"""The HTTP server of a gateway node: uvicorn embedded in the node's event loop.

Why uvicorn and not granian: granian runs its own Rust event loop and worker processes and
cannot be embedded in an asyncio loop the node already owns, so functions could no longer
share the node's asyncpg pool and supervisor. uvicorn's ``Server`` can, with httptools as
the HTTP parser. The node owns signals, so uvicorn's signal capture is switched off, and
the gateway binds the socket itself so a port in use is a clear start-up error (uvicorn
would call ``sys.exit``) and port 0 reports the port actually bound.

What uvicorn leaves open at the connection level is closed here: the HTTP protocol is
:class:`forge_gateway.protocol.EdgeProtocol` (header size and time limits, a connection cap),
uvicorn's proxy-header rewriting is off (it believed ``X-Forwarded-For`` from any loopback
peer; the gateway reads it itself, see ``clients.py``), WebSocket messages are bounded by the
frame parser (``ws_max_message_bytes``), and TLS comes from :mod:`forge_gateway.tls`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from typing import Any, AsyncIterator

import uvicorn
from loguru import logger

from forge_kernel.errors import StartupError
from forge_kernel.listen import tcp_listener

from .config import GatewayConfig
from .protocol import ConnectionGate, EdgeLimits, EdgeProtocol
from .tls import ReloadingTls
from .websocket import WebSocketProtocol


class _ToLoguru(logging.Handler):
    """uvicorn logs through the standard library; the node logs through loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.log(level, f"http: {record.getMessage()}")


@contextlib.contextmanager
def _uvicorn_logs(access_log: bool):
    handler = _ToLoguru()
    wired = [("uvicorn.error", logging.WARNING)] + ([("uvicorn.access", logging.INFO)] if access_log else [])
    for name, level in wired:
        log = logging.getLogger(name)
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False
    try:
        yield
    finally:
        for name, _ in wired:
            logging.getLogger(name).removeHandler(handler)


class EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the node handles SIGTERM/SIGINT and drains us through the lifespan
        yield


def bind(host: str, port: int) -> socket.socket:
    sock = tcp_listener(host, port, section="gateway", backlog=2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Any, cfg: GatewayConfig) -> tuple[uvicorn.Config, ReloadingTls | None]:
    """uvicorn's settings for ``cfg``, loaded, with the TLS context (if any) in place."""
    gate = ConnectionGate(EdgeLimits(cfg.max_header_line_bytes, cfg.max_header_bytes, cfg.header_timeout,
                                     cfg.max_connections))
    tls = ReloadingTls(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
    headers = [("strict-transport-security", f"max-age={cfg.hsts_max_age}")] if tls and cfg.hsts_max_age else []
    # our WebSocket protocol is uvicorn's plus write_now (forge_kernel.websocket): fan-out without a task per message
    config = uvicorn.Config(app, interface="asgi3", lifespan="on", http=functools.partial(EdgeProtocol, gate=gate), ws=WebSocketProtocol,
                            ws_max_size=cfg.ws_max_message_bytes, proxy_headers=False, headers=headers,
                            access_log=cfg.access_log, log_config=None, log_level=logging.WARNING,
                            timeout_graceful_shutdown=cfg.shutdown_timeout, server_header=False, date_header=True)
    config.load()
    if tls is not None:
        config.ssl = tls.listener  # uvicorn only builds contexts from paths; ours swaps certificates
    return config, tls


@contextlib.asynccontextmanager
async def serve(app: Any, cfg: GatewayConfig) -> AsyncIterator[int]:
    """Serve ``app`` as ``cfg`` says until the block exits; yields the bound port once the server
    accepts connections."""
    config, tls = uvicorn_config(app, cfg)
    host, shutdown_timeout = cfg.host, cfg.shutdown_timeout
    sock = bind(host, cfg.port)
    bound_port = sock.getsockname()[1]
    server = EmbeddedServer(config)
    logs = _uvicorn_logs(cfg.access_log)
    logs.__enter__()
    task = asyncio.create_task(_run(server, sock), name="forge:gateway-http")
    try:
        while not server.started:
            if task.done():
                exc = task.exception()
                raise StartupError(f"HTTP server on {host}:{bound_port} did not start: {exc!r}")
            await asyncio.sleep(0.01)
        logger.info(f"gateway listening on {'https' if tls else 'http'}://{host}:{bound_port}")
        yield bound_port
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), shutdown_timeout + 2)
        except asyncio.TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        except BaseException:  # noqa: BLE001 - the server failed earlier; its error was logged
            pass
        sock.close()
        logs.__exit__(None, None, None)


async def _run(server: EmbeddedServer, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits the process on lifespan failure; turn it into an error
        raise RuntimeError(f"uvicorn stopped during start-up (exit {exc.code})") from None
