"""The Litestar application a gateway node serves.

Routes: ``GET /health``, ``GET /ready``, ``GET /openapi.json``, ``POST /rpc`` (JSON-RPC 2.0) and
``POST /rpc/{function}``, plus whatever other plugins return from ``forge_gateway_routes``.
Every error leaves as ``{"error": {"code", "message", "details"}}`` with the status the kernel's
``ERROR_STATUS`` gives its code, and every response carries ``X-Request-Id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Awaitable, Iterable

import msgspec
from litestar import Litestar, Request, Response, asgi, get
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException
from loguru import logger

from forge_kernel import ANONYMOUS, Auth, ForgeError
from forge_kernel import migrations as migmod
from forge_kernel.errors import ERROR_STATUS, InvalidArgument, PayloadTooLarge
from forge_kernel.node import all_migrations

from .auth import Verifier
from .calls import PARSE_ERROR, FunctionCaller, JsonRpc, request_id_from, rpc_error
from .config import GatewayConfig
from .openapi import build_document
from .ratelimit import CallLimits

JSON = "application/json"
_STATUS_CODE = {status: code for code, status in ERROR_STATUS.items()}
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Gateway:
    """What the route handlers share: config, caller verification, function calls, the node."""

    def __init__(self, node: Any, config: GatewayConfig, verifier: Verifier, limits: CallLimits) -> None:
        self.node = node
        self.config = config
        self.verifier = verifier
        self.clients = limits.clients
        self.caller = FunctionCaller(node.executor, limits)
        self.rpc = JsonRpc(self.caller, max_batch=config.max_batch)
        self.api_key_header = config.api_key_header.lower()
        self.api_key_name = self.api_key_header.encode("latin-1")
        #: headers that carry a credential: a request must not send one of them twice
        self.credential_headers = {b"authorization": "Authorization",
                                   self.api_key_header.encode("latin-1"): config.api_key_header}
        #: request headers the /rpc/{function} handler reads (raw, lower-case as ASGI gives them)
        self.header_names = frozenset({b"x-request-id", b"content-length", b"traceparent", *self.credential_headers}
                                      | ({b"x-forwarded-for"} if self.clients.reads_forwarded else set()))
        self.telemetry = node.telemetry
        #: this node does not run functions but sends /rpc calls to nodes that do (forge_call_forwarder)
        self.forwards = not node.runs("function") and getattr(node.executor, "forwarder", None) is not None
        self.serves_functions = node.runs("function") or self.forwards
        self.openapi = b""
        self.describe(node.registry)

    def describe(self, registry: Any) -> None:
        """(Re)build the OpenAPI document of ``registry``'s functions (at start and after a reload)."""
        #: the span name of a request to each function, made once (a request's name is formatted
        #: only for a function that is not registered)
        self.span_names = {"": f"POST {RPC_PREFIX}", **{f: f"POST {RPC_PREFIX}/{f}" for f in registry.functions}}
        self.openapi = _encode(build_document(
            registry.functions.values(), title=f"FORGE app ({', '.join(registry.modules) or 'no modules'})",
            version=self.node.version, include_rpc=self.serves_functions, api_key_header=self.config.api_key_header))


def _too_large(size: int | None, limit: int) -> PayloadTooLarge:
    got = f"{size} bytes" if size is not None else "more"
    return PayloadTooLarge(f"request body is too large: {got}, the limit is {limit} bytes ([gateway] max_body_bytes)",
                           details={"limit": limit})


def decode_json(body: bytes) -> Any:
    try:
        return _decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument("malformed JSON: nested too deeply") from None


def _error_headers(exc: ForgeError, request_id: str) -> dict[str, str]:
    headers = {"x-request-id": request_id}
    retry = getattr(exc, "retry_after", None)
    if retry is not None:
        headers["retry-after"] = str(retry)
    return headers


def error_response(exc: ForgeError, request_id: str) -> Response:
    return Response(_encode({"error": exc.to_dict()}), status_code=exc.status, media_type=JSON,
                    headers=_error_headers(exc, request_id))


def encode_or_internal(body: Any, request_id: str, what: str) -> bytes:
    try:
        return _encode(body)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        logger.bind(request_id=request_id).error(f"{what}: result is not JSON-serialisable: {exc}")
        raise ForgeError(f"internal error (request {request_id})", details={"request_id": request_id}) from None


# --- route handlers ----------------------------------------------------------------------
def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


@get("/health")
async def health(request: Request) -> Response:
    gw = _gateway(request)
    return Response(_encode({"status": "ok", "node": gw.node.id}), media_type=JSON)


@get("/ready")
async def ready(request: Request) -> Response:
    gw = _gateway(request)
    node = gw.node
    reason = None
    if node.status not in ("running", "starting"):
        reason = f"node is {node.status}"
    else:
        try:
            async with asyncio.timeout(3):
                async with node.pool.acquire() as conn:
                    if not await migmod.is_current(conn, all_migrations(node.loader, node.registry)):
                        reason = "migrations pending: run 'forge-node migrate'"
            if reason is None and gw.forwards:
                reason = node.executor.forwarder.problem()
        except (Exception, asyncio.TimeoutError) as exc:  # any failure to reach the database means not ready
            reason = f"database unreachable: {type(exc).__name__}: {exc}"
    if reason is None:
        return Response(_encode({"status": "ready", "node": node.id}), media_type=JSON)
    return Response(_encode({"status": "not ready", "node": node.id, "reason": reason}), status_code=503, media_type=JSON)


@get("/openapi.json")
async def openapi(request: Request) -> Response:
    return Response(_gateway(request).openapi, media_type=JSON)


class _Disconnected(Exception):
    """The client went away while sending its body: nobody is left to answer."""


#: what an /rpc handler answers: status, JSON body (empty for 204), response headers (raw ASGI pairs;
#: content-type and content-length are added when it is sent)
Reply = tuple[int, bytes, list[tuple[bytes, bytes]]]
_JSON_TYPE = (b"content-type", b"application/json")
_ALLOW_POST = (b"allow", b"POST")
RPC_PREFIX = "/rpc"


def _reply_headers(request_id: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-request-id", request_id.encode("latin-1"))]


def _error_reply(exc: ForgeError, request_id: str, status: int | None = None) -> Reply:
    headers = _reply_headers(request_id)
    retry = getattr(exc, "retry_after", None)
    if retry is not None:
        headers.append((b"retry-after", str(retry).encode("latin-1")))
    return status or exc.status, _encode({"error": exc.to_dict()}), headers


async def _send_reply(send: Any, reply: Reply) -> None:
    status, body, headers = reply
    if status != 204:
        headers.append(_JSON_TYPE)
        headers.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GatewayApp:
    """The ASGI app the node serves: ``/rpc`` and ``/rpc/...`` go straight to :func:`serve_rpc`,
    everything else to the Litestar app. Measured in bench/rpc: Litestar's routing, exception
    middleware and response objects cost more per call than the function executor. With
    ``[gateway] cors_origins`` set, ``/rpc`` goes through Litestar too (its CORS middleware answers
    preflights and adds the headers), to the same handler."""

    __slots__ = ("gateway", "litestar", "fast_rpc")

    def __init__(self, gateway: Gateway, litestar: Litestar, fast_rpc: bool) -> None:
        self.gateway = gateway
        self.litestar = litestar
        self.fast_rpc = fast_rpc

    # not async: it hands over the coroutine to await (one coroutine less on every call's stack;
    # uvicorn is told the interface is ASGI 3, see server.py)
    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        if self.fast_rpc and scope["type"] == "http":
            path = scope["path"]
            if path.startswith(RPC_PREFIX) and (len(path) == 4 or path[4] == "/"):
                return serve_rpc(self.gateway, scope, receive, send)
        return self.litestar(scope, receive, send)


@asgi("/rpc", is_mount=True, copy_scope=False)
async def rpc_routes(scope: Any, receive: Any, send: Any) -> None:
    """``/rpc`` inside Litestar (when CORS is on, see :class:`GatewayApp`)."""
    # Litestar's mount routing cut the prefix off scope["path"]; put the request's path back so
    # the access log (which reads this scope) shows what the client asked for
    scope["path"] = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    await serve_rpc(scope["app"].state.gateway, scope, receive, send)


async def serve_rpc(gw: Gateway, scope: Any, receive: Any, send: Any) -> None:
    """``POST /rpc/{function}`` and ``POST /rpc`` (JSON-RPC), the hot path: a plain ASGI handler that
    reads the few headers it needs straight from the scope and sends its answer as two ASGI
    messages. Any error becomes a JSON answer; an unexpected one is logged and answered INTERNAL
    naming the request id, never with a traceback."""
    wanted = gw.header_names
    headers: dict[bytes, str] = {}
    repeated: bytes | None = None
    for name, value in scope["headers"]:
        if name in wanted:
            if name in headers:
                if name == b"x-forwarded-for":  # several headers are one list (RFC 9110 5.3)
                    headers[name] += "," + value.decode("latin-1")
                    continue
                if name in gw.credential_headers:
                    repeated = name
            headers[name] = value.decode("latin-1")
    request_id = request_id_from(headers.get(b"x-request-id"))
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else scope["path"]
    rest = path[len(RPC_PREFIX):]
    function = rest.strip("/")
    reply: Reply | None = None
    if rest and not rest.startswith("/"):  # the Litestar mount also matches /rpcanything
        reply = _error_reply(ForgeError(f"no route {scope['method']} {path}", code="NOT_FOUND"), request_id)
    elif scope["method"] != "POST":
        err = ForgeError(f"method {scope['method']} not allowed on {RPC_PREFIX}/{function}; use POST".replace("//", "/"),
                         code="INVALID_ARGUMENT")
        reply = _error_reply(err, request_id, 405)
        reply[2].append(_ALLOW_POST)
    elif repeated is not None:
        # two credentials, one request: answering for either would let a proxy's or a client's
        # header win depending on order, so neither is used
        reply = _error_reply(InvalidArgument(f"the {gw.credential_headers[repeated]} header is sent more than once; "
                                             "send exactly one credential"), request_id)
    if reply is not None:
        await _send_reply(send, reply)
        return
    client = scope.get("client")
    client = client[0] if client else None
    forwarded = headers.get(b"x-forwarded-for")
    client = gw.clients.of(client, [forwarded]) if forwarded is not None else (client or "unknown")
    tel = gw.telemetry
    span = remote = None
    if tel.enabled:  # the request's span continues the caller's W3C traceparent
        remote = headers.get(b"traceparent")
        span = tel.start_request(gw.span_names.get(function) or f"POST {RPC_PREFIX}/{function}", remote)
    status = 0
    try:
        try:
            reply = await (_call_function(gw, function, headers, receive, client, request_id) if function
                           else _json_rpc(gw, headers, receive, client, request_id))
        except _Disconnected:
            return
        except Exception as exc:  # a defect of ours: logged with the request id, answered without a trace
            logger.bind(request_id=request_id).opt(exception=exc).error(
                f"unhandled error in POST {path} (request {request_id})")
            reply = _error_reply(ForgeError(f"internal error (request {request_id})",
                                            details={"request_id": request_id}), request_id)
        status = reply[0]
        # The reply names its trace when that is of use: the caller traces, or the trace is stored
        # for sure (head-sampled, or a server error). Every other reply has only x-request-id, which
        # a stored root span also records: formatting and sending the header on every reply cost
        # 15k CPU instructions per request, half the overhead budget (bench/rpc/README.md).
        if span is not None and (remote is not None or status >= 500 or span.sampled):
            reply[2].append((b"traceparent", span.traceparent().encode("latin-1")))
        await _send_reply(send, reply)
    finally:
        if span is not None:
            tel.end_request(span, status, request_id)


async def _unless_disconnected(gw: Gateway, receive: Any, work: Any) -> Any:
    """Await ``work``; on a node that forwards calls, a client that goes away first cancels it (and so
    the call on the node running it). Raises ``_Disconnected`` then. Only after the body was read."""
    if not gw.forwards:
        return await work
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise _Disconnected


async def _disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@asgi("/rpc", is_mount=True, copy_scope=False)
async def rpc_elsewhere(scope: Any, receive: Any, send: Any) -> None:
    """``/rpc`` on a node that does not run the ``function`` role: UNAVAILABLE (503), naming the
    role and the live nodes that run it, instead of a bare 404."""
    gw: Gateway = scope["app"].state.gateway
    request_id = request_id_from(dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1") or None)
    node = gw.node
    path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    if path[len(RPC_PREFIX):][:1] not in ("", "/"):  # the mount also matches /rpcanything
        await _send_reply(send, _error_reply(ForgeError(f"no route {scope['method']} {path}", code="NOT_FOUND"),
                                             request_id))
        return
    err = ForgeError(f"node {node.id} does not run functions (its roles: {', '.join(node.roles) or 'none'}); "
                     f"/rpc is served by nodes running the 'function' role (forge-gateway){await _function_nodes(gw)}",
                     code="UNAVAILABLE", details={"role": "function", "node": node.id})
    await _send_reply(send, _error_reply(err, request_id))


async def _function_nodes(gw: Gateway) -> str:
    """``; nodes running it now: ...`` from forge_nodes, looked up at most every 5 s (a flood of
    misdirected calls must not become a flood of queries); empty when the database cannot say."""
    cached = getattr(gw, "_function_nodes", None)
    if cached is not None and time.monotonic() - cached[0] < 5:
        return cached[1]
    text = ""
    try:
        async with asyncio.timeout(2):
            rows = await gw.node.pool.fetch(
                """SELECT id, host, ports->>'http' AS port FROM forge_nodes
                   WHERE 'function' = ANY(roles) AND status IN ('starting', 'running')
                     AND last_heartbeat > now() - make_interval(secs => $1) ORDER BY id LIMIT 5""",
                float(gw.node.config.node.dead_after))
        text = "; nodes running it now: " + (", ".join(
            f"{r['id']} ({r['host']}:{r['port']})" if r["port"] else r["id"] for r in rows) or "none")
    except (Exception, asyncio.TimeoutError):  # the hint is a courtesy; the answer stands without it
        pass
    gw._function_nodes = (time.monotonic(), text)  # type: ignore[attr-defined]
    return text


def _caller(gw: Gateway, headers: dict[bytes, str]) -> Awaitable[Auth] | Auth:
    """The caller: ANONYMOUS without a credential, else what the verifier makes of it (to await)."""
    authorization, api_key = headers.get(b"authorization"), headers.get(gw.api_key_name)
    if authorization is None and api_key is None:
        return ANONYMOUS
    return gw.verifier.from_headers(authorization, api_key)


async def _body(gw: Gateway, headers: dict[bytes, str], receive: Any) -> bytes:
    limit = gw.config.max_body_bytes
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(int(length), limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(None, limit)
        if not message.get("more_body", False):
            return b"".join(chunks) + chunk if chunks else chunk
        chunks.append(chunk)


async def _call_function(gw: Gateway, function: str, headers: dict[bytes, str], receive: Any, client: str,
                         request_id: str) -> Reply:
    try:
        auth = _caller(gw, headers)
        if auth is not ANONYMOUS:
            auth = await auth
        body = await _body(gw, headers, receive)
        args = decode_json(body) if body.strip() else {}
        work = gw.caller.call(function, args, auth, client=client, request_id=request_id)
        result = await (_unless_disconnected(gw, receive, work) if gw.forwards else work)
        return 200, encode_or_internal({"data": result}, request_id, function), _reply_headers(request_id)
    except ForgeError as exc:
        return _error_reply(exc, request_id)


async def _json_rpc(gw: Gateway, headers: dict[bytes, str], receive: Any, client: str, request_id: str) -> Reply:
    out_headers = _reply_headers(request_id)
    try:
        auth: Auth | ForgeError = _caller(gw, headers)
        if auth is not ANONYMOUS:
            auth = await auth
    except ForgeError as exc:  # each call reports it; a batch still gets one answer per call
        auth = exc
    try:
        payload = decode_json(await _body(gw, headers, receive))
    except ForgeError as exc:
        code = PARSE_ERROR if exc.code == "INVALID_ARGUMENT" else -32013
        content = _encode(rpc_error(None, code, f"Parse error: {exc.message}" if code == PARSE_ERROR else exc.message,
                                    exc.code, exc.details))
        return exc.status, content, out_headers
    reply, error = await _unless_disconnected(gw, receive, gw.rpc.handle(payload, auth, client=client,
                                                                         request_id=request_id))
    if reply is None:
        return 204, b"", out_headers
    status = 200
    if error is not None and isinstance(reply, dict):  # a single reply (a batch answers 200)
        status = error.status
        retry = getattr(error, "retry_after", None)
        if retry is not None:
            out_headers.append((b"retry-after", str(retry).encode("latin-1")))
    try:
        return status, encode_or_internal(reply, request_id, "JSON-RPC"), out_headers
    except ForgeError as exc:
        return _error_reply(exc, request_id)


# --- errors raised outside the handlers (unknown path, wrong method, framework limits) -------------
def _http_exception(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    code = _STATUS_CODE.get(status) or ("INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if status == 404:
        detail = f"no route {request.method} {request.url.path}"
    request_id = request_id_from(request.headers.get("x-request-id"))
    return Response(_encode({"error": {"code": code, "message": detail, "details": None}}), status_code=status,
                    media_type=JSON, headers={"x-request-id": request_id, **(exc.headers or {})})


def _unexpected(request: Request, exc: Exception) -> Response:
    request_id = request_id_from(request.headers.get("x-request-id"))
    logger.bind(request_id=request_id).opt(exception=exc).error(
        f"unhandled error in {request.method} {request.url.path} (request {request_id})")
    err = ForgeError(f"internal error (request {request_id})", details={"request_id": request_id})
    return error_response(err, request_id)


def _forge_error(request: Request, exc: ForgeError) -> Response:
    return error_response(exc, request_id_from(request.headers.get("x-request-id")))


def build_app(gateway: Gateway, extra_routes: Iterable[Any] = ()) -> GatewayApp:
    cfg = gateway.config
    routes: list[Any] = [health, ready, openapi]
    routes += [rpc_routes if gateway.serves_functions else rpc_elsewhere]
    routes += list(extra_routes)
    cors = None
    if cfg.cors_origins:
        cors = CORSConfig(allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                          allow_headers=["authorization", "content-type", "x-request-id", "traceparent", cfg.api_key_header.lower()],
                          expose_headers=["x-request-id", "retry-after", "traceparent"], allow_credentials=cfg.cors_allow_credentials)
    app = Litestar(
        route_handlers=routes,
        cors_config=cors,
        openapi_config=None,  # the gateway writes its own document from the function registry
        request_max_body_size=cfg.max_body_bytes,
        exception_handlers={ForgeError: _forge_error, HTTPException: _http_exception, Exception: _unexpected},
        debug=False,
        logging_config=None,
    )
    app.state.gateway = gateway
    return GatewayApp(gateway, app, fast_rpc=gateway.serves_functions and cors is None)
