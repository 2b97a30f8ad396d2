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
from typing import Any, Iterable

import msgspec
from litestar import Litestar, Request, Response, asgi, get
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException
from litestar.response.base import ASGIResponse
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


# The /rpc handlers return finished ASGI responses (annotated ASGIApp): the body is already JSON
# bytes, so Litestar's Response -> ASGIResponse conversion would only cost time (bench/rpc).
def json_asgi(content: bytes, status: int = 200, headers: dict[str, str] | None = None) -> ASGIResponse:
    return ASGIResponse(body=content, status_code=status, media_type=JSON, headers=headers)


def error_asgi(exc: ForgeError, request_id: str) -> ASGIResponse:
    return json_asgi(_encode({"error": exc.to_dict()}), exc.status, _error_headers(exc, request_id))


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


async def _read_body(receive: Any, limit: int) -> bytes:
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
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class _Disconnected(Exception):
    """The client went away while sending its body: nobody is left to answer."""


@asgi("/rpc", is_mount=True, copy_scope=False)
async def rpc_routes(scope: Any, receive: Any, send: Any) -> None:
    """``POST /rpc/{function}`` and ``POST /rpc`` (JSON-RPC), the hot path: a plain ASGI handler
    mounted in Litestar (routing, CORS and the exception middleware still apply) that reads the few
    headers it needs straight from the scope. Measured in bench/rpc: Litestar's request/response
    modelling cost more per call than the function executor itself."""
    gw: Gateway = scope["app"].state.gateway
    wanted = gw.header_names
    headers: dict[str, str] = {}
    repeated: bytes | None = None
    for name, value in scope["headers"]:
        if name in wanted:
            key = name.decode("latin-1")
            if key in headers:
                if name == b"x-forwarded-for":  # several headers are one list (RFC 9110 5.3)
                    headers[key] += "," + value.decode("latin-1")
                    continue
                if name in gw.credential_headers:
                    repeated = name
            headers[key] = value.decode("latin-1")
    request_id = request_id_from(headers.get("x-request-id"))
    raw_path = scope.get("raw_path") or scope["path"].encode()
    # Litestar's mount routing cut the prefix off scope["path"]; put the request's path back so
    # the access log (which reads this scope) shows what the client asked for
    scope["path"] = raw_path.decode("latin-1")
    rest = scope["path"][len(RPC_PREFIX):]
    if rest and not rest.startswith("/"):  # the mount also matches /rpcanything
        err = ForgeError(f"no route {scope['method']} {scope['path']}", code="NOT_FOUND")
        await error_asgi(err, request_id)(scope, receive, send)
        return
    function = rest.strip("/")
    if scope["method"] != "POST":
        err = ForgeError(f"method {scope['method']} not allowed on {RPC_PREFIX}/{function}; use POST".replace("//", "/"),
                         code="INVALID_ARGUMENT")
        response = json_asgi(_encode({"error": err.to_dict()}), 405, {"x-request-id": request_id, "allow": "POST"})
        await response(scope, receive, send)
        return
    if repeated is not None:
        # two credentials, one request: answering for either would let a proxy's or a client's
        # header win depending on order, so neither is used
        err = InvalidArgument(f"the {gw.credential_headers[repeated]} header is sent more than once; "
                              "send exactly one credential")
        await error_asgi(err, request_id)(scope, receive, send)
        return
    client = scope["client"][0] if scope.get("client") else None
    forwarded = headers.get("x-forwarded-for")
    client = gw.clients.of(client, [forwarded]) if forwarded is not None else (client or "unknown")
    tel = gw.telemetry
    if not tel.enabled:
        try:
            response = await (_call_function(gw, function, headers, receive, client, request_id) if function
                              else _json_rpc(gw, headers, receive, client, request_id))
        except _Disconnected:
            return
        await response(scope, receive, send)
        return
    # the request's span continues the caller's W3C traceparent
    remote = headers.get("traceparent")
    attrs = {"request.id": request_id, "http.status_code": 0}
    span = tel.start_span(f"POST {RPC_PREFIX}/{function}" if function else f"POST {RPC_PREFIX}", "server",
                          remote=remote, attrs=attrs)
    try:
        try:
            response = await (_call_function(gw, function, headers, receive, client, request_id) if function
                              else _json_rpc(gw, headers, receive, client, request_id))
        except _Disconnected:
            return
        status = attrs["http.status_code"] = response.status_code
        # The reply names its trace when that is of use: the caller traces, or the trace is stored
        # for sure (head-sampled, or a server error). Every other reply has only x-request-id, which
        # a stored root span also records: formatting and sending the header on every reply cost
        # 15k CPU instructions per request, half the overhead budget (bench/rpc/README.md).
        if remote is not None or status >= 500 or span.sampled:
            # the raw header list (MutableScopeHeaders.headers): its add() lower-cases and encodes again
            response.headers.headers.append((b"traceparent", span.traceparent().encode("latin-1")))
        await response(scope, receive, send)
    finally:
        status = attrs["http.status_code"]
        tel.end_span(span, f"HTTP {status}" if status >= 500 else None)


RPC_PREFIX = "/rpc"


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
        await error_asgi(ForgeError(f"no route {scope['method']} {path}", code="NOT_FOUND"), request_id)(scope, receive, send)
        return
    err = ForgeError(f"node {node.id} does not run functions (its roles: {', '.join(node.roles) or 'none'}); "
                     f"/rpc is served by nodes running the 'function' role (forge-gateway){await _function_nodes(gw)}",
                     code="UNAVAILABLE", details={"role": "function", "node": node.id})
    await error_asgi(err, request_id)(scope, receive, send)


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


async def _caller(gw: Gateway, headers: dict[str, str]) -> Auth:
    authorization, api_key = headers.get("authorization"), headers.get(gw.api_key_header)
    if authorization is None and api_key is None:
        return ANONYMOUS
    return await gw.verifier.from_headers(authorization, api_key)


async def _body(gw: Gateway, headers: dict[str, str], receive: Any) -> bytes:
    limit = gw.config.max_body_bytes
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(int(length), limit)
    return await _read_body(receive, limit)


async def _call_function(gw: Gateway, function: str, headers: dict[str, str], receive: Any, client: str,
                         request_id: str) -> ASGIResponse:
    try:
        auth = await _caller(gw, headers)
        body = await _body(gw, headers, receive)
        args = decode_json(body) if body.strip() else {}
        result = await _unless_disconnected(gw, receive, gw.caller.call(function, args, auth, client=client,
                                                                        request_id=request_id))
        return json_asgi(encode_or_internal({"data": result}, request_id, function), 200, {"x-request-id": request_id})
    except ForgeError as exc:
        return error_asgi(exc, request_id)


async def _json_rpc(gw: Gateway, headers: dict[str, str], receive: Any, client: str, request_id: str) -> ASGIResponse:
    out_headers = {"x-request-id": request_id}
    try:
        auth: Auth | ForgeError = await _caller(gw, headers)
    except ForgeError as exc:  # each call reports it; a batch still gets one answer per call
        auth = exc
    try:
        payload = decode_json(await _body(gw, headers, receive))
    except ForgeError as exc:
        code = PARSE_ERROR if exc.code == "INVALID_ARGUMENT" else -32013
        content = _encode(rpc_error(None, code, f"Parse error: {exc.message}" if code == PARSE_ERROR else exc.message,
                                    exc.code, exc.details))
        return json_asgi(content, exc.status, out_headers)
    reply, error = await _unless_disconnected(gw, receive, gw.rpc.handle(payload, auth, client=client,
                                                                         request_id=request_id))
    if reply is None:
        return ASGIResponse(body=b"", status_code=204, headers=out_headers)
    status = 200
    if error is not None and isinstance(reply, dict):  # a single reply (a batch answers 200)
        status = error.status
        retry = getattr(error, "retry_after", None)
        if retry is not None:
            out_headers["retry-after"] = str(retry)
    try:
        return json_asgi(encode_or_internal(reply, request_id, "JSON-RPC"), status, out_headers)
    except ForgeError as exc:
        return error_asgi(exc, request_id)


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


def build_app(gateway: Gateway, extra_routes: Iterable[Any] = ()) -> Litestar:
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
    return app
