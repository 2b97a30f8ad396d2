"""Calling functions for HTTP callers: rate limits in front of the kernel executor, and JSON-RPC 2.0.

Nothing here knows about Litestar; the HTTP layer (``app.py``) passes in what it read from
the request (caller, client address, request id) and turns results into responses.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any, Awaitable, Mapping

import attrs

from forge_kernel import Auth, ForgeError
from forge_kernel.app import FunctionDef
from forge_kernel.errors import InvalidArgument, NotFound

from .ratelimit import CallLimits

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
_getrandbits = random.getrandbits


def request_id_from(header: str | None) -> str:
    """The caller's ``X-Request-Id`` when it is a sane token, else a fresh one (random, not secret:
    a caller may choose its own, so nothing may rely on it being unguessable)."""
    if header and _REQUEST_ID.match(header):
        return header
    return f"{_getrandbits(64):016x}"


class FunctionCaller:
    """``call(name, args, auth, ...)``: lookup, auth, rate limit, then ``node.executor.call``."""

    def __init__(self, executor: Any, limits: CallLimits | None) -> None:
        self.executor = executor
        self.limits = limits

    def lookup(self, name: str) -> FunctionDef:
        return self.executor.lookup(name)

    def call(self, name: str, args: Any, auth: Auth, *, client: str, request_id: str,
             defn: FunctionDef | None = None) -> Awaitable[Any]:
        """The call to await (not a coroutine itself: one frame less on the hot path); an unknown
        ``name`` raises ``NotFound`` here."""
        defn = defn or self.executor.lookup(name)
        if defn.rate_limit is not None and self.limits is not None:
            return self._limited(defn, args, auth, client, request_id)
        return self.executor.call(defn, args, auth, request_id=request_id)

    async def _limited(self, defn: FunctionDef, args: Any, auth: Auth, client: str, request_id: str) -> Any:
        # authorise first: an unauthenticated caller must not spend a user's tokens
        self.executor.authorize(defn, auth)
        await self.limits.admit(defn, auth, client)
        return await self.executor.call(defn, args, auth, request_id=request_id)


# --- JSON-RPC 2.0 -------------------------------------------------------------------------
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: FORGE code -> JSON-RPC code for errors the standard codes do not cover (server range -32000..-32099)
FORGE_TO_JSONRPC = {
    "INVALID_ARGUMENT": INVALID_PARAMS,
    "UNAUTHENTICATED": -32001,
    "FORBIDDEN": -32003,
    "NOT_FOUND": -32004,
    "TIMEOUT": -32008,
    "CONFLICT": -32009,
    "PAYLOAD_TOO_LARGE": -32013,
    "RATE_LIMITED": -32029,
    "UNAVAILABLE": -32053,
    "INTERNAL": INTERNAL_ERROR,
}
_ALLOWED_MEMBERS = frozenset({"jsonrpc", "method", "params", "id"})


@attrs.frozen
class RpcReply:
    """One JSON-RPC response object (``None`` body for a notification) and the FORGE error, if any."""

    body: dict[str, Any] | None
    error: ForgeError | None = None


def rpc_error(rpc_id: Any, code: int, message: str, forge_code: str, details: Any = None) -> dict[str, Any]:
    data: dict[str, Any] = {"code": forge_code}
    if details is not None:
        data["details"] = details
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message, "data": data}, "id": rpc_id}


def _valid_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _named(defn: FunctionDef, params: list[Any]) -> dict[str, Any]:
    if len(params) > len(defn.params):
        raise InvalidArgument(f"{defn.name} takes {len(defn.params)} argument(s), {len(params)} positional params given",
                              details=[{"argument": f"[{len(defn.params)}]", "message": "too many positional params"}])
    return {p.name: v for p, v in zip(defn.params, params)}


class JsonRpc:
    def __init__(self, caller: FunctionCaller, *, max_batch: int) -> None:
        self.caller = caller
        self.max_batch = max_batch

    async def handle(self, payload: Any, auth: Auth | ForgeError, *, client: str, request_id: str) -> tuple[Any, ForgeError | None]:
        """Answer a decoded request body. Returns (response body or ``None`` when nothing is due,
        the error of a single call so the HTTP layer can pick the status)."""
        if isinstance(payload, list):
            if not payload:
                return rpc_error(None, INVALID_REQUEST, "Invalid Request: empty batch", "INVALID_ARGUMENT"), \
                    InvalidArgument("empty JSON-RPC batch")
            if len(payload) > self.max_batch:
                msg = f"Invalid Request: batch of {len(payload)} calls is above the limit of {self.max_batch}"
                return rpc_error(None, INVALID_REQUEST, msg, "INVALID_ARGUMENT"), InvalidArgument(msg)
            replies = await asyncio.gather(*(
                self.one(item, auth, client=client, request_id=f"{request_id}.{i}") for i, item in enumerate(payload)))
            bodies = [r.body for r in replies if r.body is not None]
            return (bodies or None), None
        reply = await self.one(payload, auth, client=client, request_id=request_id)
        return reply.body, reply.error

    async def one(self, item: Any, auth: Auth | ForgeError, *, client: str, request_id: str) -> RpcReply:
        if not isinstance(item, dict):
            msg = f"Invalid Request: expected an object, got {_json_type(item)}"
            return RpcReply(rpc_error(None, INVALID_REQUEST, msg, "INVALID_ARGUMENT"), InvalidArgument(msg))
        rpc_id = item.get("id")
        if not _valid_id(rpc_id):
            msg = f"Invalid Request: id must be a string, number or null, got {_json_type(rpc_id)}"
            return RpcReply(rpc_error(None, INVALID_REQUEST, msg, "INVALID_ARGUMENT"), InvalidArgument(msg))
        problem = None
        if item.get("jsonrpc") != "2.0":
            problem = 'member "jsonrpc" must be exactly "2.0"'
        elif not isinstance(item.get("method"), str):
            problem = 'member "method" must be a string'
        elif "params" in item and not isinstance(item["params"], (dict, list)):
            problem = f'member "params" must be an object or an array, got {_json_type(item["params"])}'
        elif not _ALLOWED_MEMBERS.issuperset(item):
            problem = f"unknown member(s): {', '.join(sorted(set(item) - _ALLOWED_MEMBERS))}"
        if problem:
            msg = f"Invalid Request: {problem}"
            return RpcReply(rpc_error(rpc_id, INVALID_REQUEST, msg, "INVALID_ARGUMENT"), InvalidArgument(msg))
        notification = "id" not in item
        method = item["method"]
        try:
            if isinstance(auth, ForgeError):
                raise auth
            try:
                defn = self.caller.lookup(method)
            except NotFound as exc:
                return self._reply(notification, rpc_error(rpc_id, METHOD_NOT_FOUND, f"Method not found: {exc.message}",
                                                           "NOT_FOUND"), exc)
            params = item.get("params", {})
            args = _named(defn, params) if isinstance(params, list) else params
            result = await self.caller.call(method, args, auth, client=client, request_id=request_id, defn=defn)
        except ForgeError as exc:
            return self._reply(notification, rpc_error(rpc_id, FORGE_TO_JSONRPC.get(exc.code, INTERNAL_ERROR),
                                                       exc.message, exc.code, exc.details), exc)
        return self._reply(notification, {"jsonrpc": "2.0", "result": result, "id": rpc_id}, None)

    @staticmethod
    def _reply(notification: bool, body: dict[str, Any], error: ForgeError | None) -> RpcReply:
        # notifications get no answer, not even an error (JSON-RPC 2.0 §4.1)
        return RpcReply(None if notification else body, error)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__
