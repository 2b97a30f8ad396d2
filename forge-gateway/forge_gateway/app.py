"""The Litestar application a gateway node serves.

Routes: ``GET /health``, ``GET /ready``, ``GET /openapi.json``, ``POST /rpc`` (JSON-RPC 2.0) and
``POST /rpc/{function}``, plus whatever other plugins return from ``forge_gateway_routes``.
Every error leaves as ``{"error": {"code", "message", "details"}}`` with the status the kernel's
``ERROR_STATUS`` gives its code, and every response carries ``X-Request-Id``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterable

import msgspec
from litestar import Litestar, Request, Response, get, post
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
from .ratelimit import RateLimiter

JSON = "application/json"
_STATUS_CODE = {status: code for code, status in ERROR_STATUS.items()}
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Gateway:
    """What the route handlers share: config, caller verification, function calls, the node."""

    def __init__(self, node: Any, config: GatewayConfig, verifier: Verifier, limiter: RateLimiter | None) -> None:
        self.node = node
        self.config = config
        self.verifier = verifier
        self.caller = FunctionCaller(node.executor, limiter)
        self.rpc = JsonRpc(self.caller, max_batch=config.max_batch)
        self.api_key_header = config.api_key_header.lower()
        self.serves_functions = node.runs("function")
        self.openapi = _encode(build_document(
            node.registry.functions.values(), title=f"FORGE app ({', '.join(node.registry.modules) or 'no modules'})",
            version=node.version, include_rpc=self.serves_functions, api_key_header=config.api_key_header))

    # --- request helpers -------------------------------------------------------------
    def client(self, request: Request) -> str:
        if self.config.trust_forwarded_for:
            forwarded = request.headers.get("x-forwarded-for")
            if forwarded:
                return forwarded.split(",")[0].strip()
        client = request.client
        return client.host if client else "unknown"

    async def caller_of(self, request: Request) -> Auth:
        headers = request.headers
        authorization = headers.get("authorization")
        api_key = headers.get(self.api_key_header)
        if authorization is None and api_key is None:
            return ANONYMOUS
        return await self.verifier.from_headers(authorization, api_key)

    async def body_of(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
            raise _too_large(int(length), self.config.max_body_bytes)
        try:
            return await request.body()
        except HTTPException as exc:
            if exc.status_code == 413:
                raise _too_large(None, self.config.max_body_bytes) from None
            raise


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


def error_response(exc: ForgeError, request_id: str) -> Response:
    headers = {"x-request-id": request_id}
    retry = getattr(exc, "retry_after", None)
    if retry is not None:
        headers["retry-after"] = str(retry)
    return Response(_encode({"error": exc.to_dict()}), status_code=exc.status, media_type=JSON, headers=headers)


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
        except (Exception, asyncio.TimeoutError) as exc:  # any failure to reach the database means not ready
            reason = f"database unreachable: {type(exc).__name__}: {exc}"
    if reason is None:
        return Response(_encode({"status": "ready", "node": node.id}), media_type=JSON)
    return Response(_encode({"status": "not ready", "node": node.id, "reason": reason}), status_code=503, media_type=JSON)


@get("/openapi.json")
async def openapi(request: Request) -> Response:
    return Response(_gateway(request).openapi, media_type=JSON)


@post("/rpc/{function:str}", status_code=200)
async def call_function(request: Request, function: str) -> Response:
    gw = _gateway(request)
    request_id = request_id_from(request.headers.get("x-request-id"))
    try:
        auth = await gw.caller_of(request)
        body = await gw.body_of(request)
        args = decode_json(body) if body.strip() else {}
        result = await gw.caller.call(function, args, auth, client=gw.client(request), request_id=request_id)
        content = encode_or_internal({"data": result}, request_id, function)
    except ForgeError as exc:
        return error_response(exc, request_id)
    return Response(content, media_type=JSON, headers={"x-request-id": request_id})


@post("/rpc", status_code=200)
async def json_rpc(request: Request) -> Response:
    gw = _gateway(request)
    request_id = request_id_from(request.headers.get("x-request-id"))
    headers = {"x-request-id": request_id}
    try:
        auth: Auth | ForgeError = await gw.caller_of(request)
    except ForgeError as exc:  # each call reports it; a batch still gets one answer per call
        auth = exc
    try:
        body = await gw.body_of(request)
        payload = decode_json(body)
    except ForgeError as exc:
        code = PARSE_ERROR if exc.code == "INVALID_ARGUMENT" else -32013
        content = _encode(rpc_error(None, code, f"Parse error: {exc.message}" if code == PARSE_ERROR else exc.message,
                                    exc.code, exc.details))
        return Response(content, status_code=exc.status, media_type=JSON, headers=headers)
    reply, error = await gw.rpc.handle(payload, auth, client=gw.client(request), request_id=request_id)
    if reply is None:
        return Response(b"", status_code=204, headers=headers)
    status = 200
    if error is not None and isinstance(reply, dict):  # a single reply (a batch answers 200)
        status = error.status
        retry = getattr(error, "retry_after", None)
        if retry is not None:
            headers["retry-after"] = str(retry)
    try:
        content = encode_or_internal(reply, request_id, "JSON-RPC")
    except ForgeError as exc:
        return error_response(exc, request_id)
    return Response(content, status_code=status, media_type=JSON, headers=headers)


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
    if gateway.serves_functions:
        routes += [json_rpc, call_function]
    routes += list(extra_routes)
    cors = None
    if cfg.cors_origins:
        cors = CORSConfig(allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                          allow_headers=["authorization", "content-type", "x-request-id", cfg.api_key_header.lower()],
                          expose_headers=["x-request-id", "retry-after"], allow_credentials=cfg.cors_allow_credentials)
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
