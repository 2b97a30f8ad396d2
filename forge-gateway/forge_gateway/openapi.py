"""The OpenAPI 3.1 document: every callable function with argument and result schemas from its type hints.

The schemas describe what the kernel's strict converter accepts and produces (``int`` is
not ``"5"``, unknown keys are rejected, ``timedelta`` is seconds, ``Decimal`` a string).
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import inspect
import types
import typing
import uuid
from typing import Any, Iterable

import attrs

from forge_kernel.app import FunctionDef
from forge_kernel.errors import ERROR_STATUS

CALLABLE_KINDS = ("query", "mutation", "action")
REF = "#/components/schemas/"

_NONE_TYPES = (type(None), None)
_SIMPLE: dict[Any, dict[str, Any]] = {
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    bytes: {"type": "string", "contentEncoding": "base64"},
    uuid.UUID: {"type": "string", "format": "uuid"},
    dt.datetime: {"type": "string", "format": "date-time"},
    dt.date: {"type": "string", "format": "date"},
    dt.time: {"type": "string", "format": "time"},
    decimal.Decimal: {"type": "string", "format": "decimal"},
    dt.timedelta: {"type": "number", "description": "seconds"},
}


class SchemaBuilder:
    """Python type hints to JSON Schema (2020-12, as OpenAPI 3.1 uses), named classes as components."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Any]] = {}
        self._names: dict[Any, str] = {}

    def _component(self, tp: type, build: Any) -> dict[str, Any]:
        name = self._names.get(tp)
        if name is None:
            base = getattr(tp, "__name__", "Model")
            name, n = base, 2
            while name in self.components:
                name, n = f"{base}{n}", n + 1
            self._names[tp] = name
            self.components[name] = {}  # placeholder first: recursive types refer to themselves
            try:
                self.components[name] = build()
            except Exception as exc:  # noqa: BLE001 - e.g. unresolvable forward references
                self.components[name] = {"description": f"{name} (no JSON schema: {type(exc).__name__}: {exc})"}
        return {"$ref": REF + name}

    def schema(self, tp: Any) -> dict[str, Any]:
        """JSON Schema of ``tp``; a type that cannot be described (unresolvable hints, exotic
        generics) is documented as such instead of stopping the gateway."""
        try:
            return self._schema(tp)
        except Exception as exc:  # noqa: BLE001 - a doc gap must not take the API down
            return {"description": f"{getattr(tp, '__name__', repr(tp))} (no JSON schema: {type(exc).__name__}: {exc})"}

    def _schema(self, tp: Any) -> dict[str, Any]:
        if tp is Any or tp is inspect.Parameter.empty or tp is object:
            return {}
        if tp in _NONE_TYPES:
            return {"type": "null"}
        if tp in _SIMPLE:
            return dict(_SIMPLE[tp])
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            return self.schema(args[0])
        if origin in (typing.Union, types.UnionType):
            return {"anyOf": [self.schema(a) for a in args]}
        if origin is typing.Literal:
            return {"enum": list(args)}
        if origin in (list, set, frozenset) or tp in (list, set, frozenset):
            out: dict[str, Any] = {"type": "array", "items": self.schema(args[0]) if args else {}}
            if origin in (set, frozenset):
                out["uniqueItems"] = True
            return out
        if origin is tuple or tp is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return {"type": "array", "items": self.schema(args[0])}
            if args:
                return {"type": "array", "prefixItems": [self.schema(a) for a in args], "items": False,
                        "minItems": len(args), "maxItems": len(args)}
            return {"type": "array"}
        if origin is dict or tp is dict:
            return {"type": "object", "additionalProperties": self.schema(args[1]) if len(args) == 2 else {}}
        if origin is not None and getattr(origin, "__module__", "") == "collections.abc" and origin.__name__ in ("Mapping", "MutableMapping"):
            return {"type": "object", "additionalProperties": self.schema(args[1]) if len(args) == 2 else {}}
        if origin is not None and getattr(origin, "__module__", "") == "collections.abc" and origin.__name__ in ("Sequence", "Iterable", "Set"):
            return {"type": "array", "items": self.schema(args[0]) if args else {}}
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self._component(tp, lambda: {"title": tp.__name__, "enum": [m.value for m in tp]})
        if isinstance(tp, type) and attrs.has(tp):
            return self._component(tp, lambda: self._attrs_object(tp))
        if isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__annotations__") and hasattr(tp, "__total__"):
            return self._component(tp, lambda: self._typed_dict(tp))
        # a type the converter handles through a custom hook: say nothing rather than something false
        return {"description": f"{getattr(tp, '__name__', repr(tp))} (no JSON schema known)"}

    def _attrs_object(self, cls: type) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        props: dict[str, Any] = {}
        required: list[str] = []
        for a in attrs.fields(cls):
            if not a.init:
                continue
            name = a.alias or a.name
            props[name] = self.schema(hints.get(a.name, a.type))
            if a.default is attrs.NOTHING:
                required.append(name)
        out: dict[str, Any] = {"title": cls.__name__, "type": "object", "properties": props,
                               "additionalProperties": False}
        if required:
            out["required"] = required
        return out

    def _typed_dict(self, cls: type) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        out: dict[str, Any] = {"title": cls.__name__, "type": "object",
                               "properties": {k: self.schema(v) for k, v in hints.items()}}
        req = sorted(getattr(cls, "__required_keys__", ()))
        if req:
            out["required"] = req
        return out

    def arguments(self, defn: FunctionDef) -> dict[str, Any]:
        props = {p.name: self.schema(p.type) for p in defn.params}
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        required = [p.name for p in defn.params if p.required]
        if required:
            out["required"] = required
        return out


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": sorted(ERROR_STATUS)},
                "message": {"type": "string"},
                "details": {},
            },
        }
    },
}

_ERROR_DESCRIPTIONS = {
    "INVALID_ARGUMENT": "malformed JSON or arguments that do not match the function's signature",
    "UNAUTHENTICATED": "no, bad or expired credential for a function that needs one",
    "FORBIDDEN": "the caller lacks a required role",
    "NOT_FOUND": "no such function, or the function reported a missing thing",
    "CONFLICT": "a unique constraint or the function reported a conflict",
    "PAYLOAD_TOO_LARGE": "request body above [gateway] max_body_bytes",
    "RATE_LIMITED": "the function's rate limit is used up; see Retry-After",
    "INTERNAL": "the function failed; details carry the request id to look up in the server log",
    "UNAVAILABLE": "this node cannot run it now (it does not run the needed role, or a needed package is missing)",
    "TIMEOUT": "the function did not finish within its timeout",
}


def _error_responses() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code, status in sorted(ERROR_STATUS.items(), key=lambda kv: kv[1]):
        resp: dict[str, Any] = {"description": f"{code}: {_ERROR_DESCRIPTIONS.get(code, code)}",
                                "content": {"application/json": {"schema": {"$ref": REF + "Error"}}}}
        if code == "RATE_LIMITED":
            resp["headers"] = {"Retry-After": {"description": "seconds until the limit resets",
                                               "schema": {"type": "integer"}}}
        out[str(status)] = resp
    return out


def _jsonrpc_schemas() -> dict[str, Any]:
    rpc_id = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]}
    request = {
        "type": "object", "required": ["jsonrpc", "method"],
        "properties": {"jsonrpc": {"const": "2.0"}, "method": {"type": "string"},
                       "params": {"anyOf": [{"type": "object"}, {"type": "array"}]}, "id": rpc_id},
    }
    response = {
        "type": "object", "required": ["jsonrpc", "id"],
        "properties": {
            "jsonrpc": {"const": "2.0"}, "id": rpc_id, "result": {},
            "error": {"type": "object", "required": ["code", "message"],
                      "properties": {"code": {"type": "integer"}, "message": {"type": "string"},
                                     "data": {"type": "object", "properties": {"code": {"type": "string"}, "details": {}}}}},
        },
    }
    return {"JsonRpcRequest": request, "JsonRpcResponse": response}


def build_document(functions: Iterable[FunctionDef], *, title: str = "FORGE app", version: str = "0",
                   include_rpc: bool = True, api_key_header: str = "X-API-Key") -> dict[str, Any]:
    builder = SchemaBuilder()
    paths: dict[str, Any] = {}
    errors = _error_responses()
    if include_rpc:
        for defn in sorted((d for d in functions if d.kind in CALLABLE_KINDS), key=lambda d: d.name):
            arg_schema = builder.arguments(defn)
            summary, _, description = (defn.doc or f"{defn.kind} {defn.name}").partition("\n")
            op: dict[str, Any] = {
                "operationId": defn.name,
                "summary": summary.strip(),
                "tags": [defn.kind],
                "requestBody": {
                    "required": any(p.required for p in defn.params),
                    "content": {"application/json": {"schema": arg_schema}},
                },
                "responses": {
                    "200": {"description": "the function's result",
                            "content": {"application/json": {"schema": {
                                "type": "object", "required": ["data"],
                                "properties": {"data": builder.schema(defn.returns)},
                                "additionalProperties": False}}}},
                    **errors,
                },
                "security": [] if defn.public else [{"bearer": []}, {"apiKey": []}],
                "x-forge-kind": defn.kind,
            }
            if description.strip():
                op["description"] = description.strip()
            if defn.roles:
                op["x-forge-roles"] = list(defn.roles)
            if defn.rate_limit is not None:
                rl = defn.rate_limit
                op["x-forge-rate-limit"] = {"requests": rl.requests, "per": rl.per, "key": rl.key}
            if defn.timeout is not None:
                op["x-forge-timeout"] = defn.timeout
            paths[f"/rpc/{defn.name}"] = {"post": op}
        paths["/rpc"] = {"post": {
            "operationId": "jsonrpc",
            "summary": "JSON-RPC 2.0: one call, a batch of calls, or notifications",
            "tags": ["rpc"],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "anyOf": [{"$ref": REF + "JsonRpcRequest"},
                          {"type": "array", "items": {"$ref": REF + "JsonRpcRequest"}}]}}}},
            "responses": {
                "200": {"description": "the response (or, for a batch, the responses)",
                        "content": {"application/json": {"schema": {"anyOf": [
                            {"$ref": REF + "JsonRpcResponse"},
                            {"type": "array", "items": {"$ref": REF + "JsonRpcResponse"}}]}}}},
                "204": {"description": "only notifications were sent: no body"},
                **{status: {"description": resp["description"],
                            "content": {"application/json": {"schema": {"$ref": REF + "JsonRpcResponse"}}},
                            **({"headers": resp["headers"]} if "headers" in resp else {})}
                   for status, resp in errors.items()},
            },
            "security": [{}, {"bearer": []}, {"apiKey": []}],
        }}
    status_schema = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    paths["/health"] = {"get": {"operationId": "health", "summary": "the node is alive", "tags": ["node"],
                                "responses": {"200": {"description": "alive", "content": {
                                    "application/json": {"schema": status_schema}}}}, "security": []}}
    paths["/ready"] = {"get": {"operationId": "ready", "summary": "database reachable and migrations current",
                               "tags": ["node"], "security": [],
                               "responses": {
                                   "200": {"description": "ready", "content": {"application/json": {"schema": status_schema}}},
                                   "503": {"description": "not ready (reason given)",
                                           "content": {"application/json": {"schema": status_schema}}}}}}
    components = {"Error": ERROR_SCHEMA, **_jsonrpc_schemas(), **builder.components}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": api_key_header},
            },
        },
    }
