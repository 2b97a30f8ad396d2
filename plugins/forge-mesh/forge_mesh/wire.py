"""Between kernel objects and protocol messages: callers, errors, read sets, JSON payloads."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

from forge_kernel import SYSTEM, Auth
from forge_kernel.db import TableRead
from forge_kernel.errors import ERROR_STATUS, ForgeError

from .protocol import mesh_pb2 as pb

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
#: read-set filter values are compared as text (TableRead.matches), so any value may go as its str()
_encode_text = msgspec.json.Encoder(enc_hook=str).encode

#: gRPC method paths (generic handlers: no generated service stubs are needed)
SERVICE = "forge.mesh.v1.Mesh"
CALL = f"/{SERVICE}/Call"
PING = f"/{SERVICE}/Ping"
STATUS = f"/{SERVICE}/Status"
LOGS = f"/{SERVICE}/Logs"
DRAIN = f"/{SERVICE}/Drain"
CANCEL_JOB = f"/{SERVICE}/CancelJob"
CALLS = f"/{SERVICE}/Calls"
BATCHES = f"/{SERVICE}/Batches"


class ProtocolError(Exception):
    """A peer sent something this node cannot read; the message names the field."""


def encode_json(value: Any) -> bytes:
    return _encode(value)


def decode_json(data: bytes, what: str) -> Any:
    try:
        return _decode(data) if data else None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None


def encode_result(result: Any) -> bytes:
    """A function's unstructured result as JSON; ForgeError(INTERNAL) when it is not JSON-safe."""
    try:
        return _encode(result)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise ForgeError(f"internal error: the result is not JSON-serialisable ({type(exc).__name__})") from None


# --- callers ------------------------------------------------------------------------------
def caller_message(auth: Auth) -> pb.Caller:
    msg = pb.Caller(roles=sorted(auth.roles), kind=auth.kind, claims_json=_encode(dict(auth.claims)) if auth.claims else b"",
                    expires_at=auth.expires_at.timestamp() if auth.expires_at else 0.0)
    if auth.user_id is not None:
        msg.user_id = auth.user_id
    return msg


def caller_auth(msg: pb.Caller) -> Auth:
    if msg.kind not in ("anonymous", "user", "service", "system"):
        raise ProtocolError(f"Caller.kind must be anonymous, user, service or system, got {msg.kind!r}")
    if msg.kind == "system":
        return SYSTEM
    claims = decode_json(msg.claims_json, "Caller.claims_json") or {}
    if not isinstance(claims, dict):
        raise ProtocolError("Caller.claims_json must be a JSON object")
    expires = dt.datetime.fromtimestamp(msg.expires_at, dt.timezone.utc) if msg.expires_at else None
    return Auth(user_id=msg.user_id if msg.HasField("user_id") else None, roles=frozenset(msg.roles),
                claims=claims, kind=msg.kind, expires_at=expires)


# --- errors --------------------------------------------------------------------------------
def error_message(exc: ForgeError, *, not_started: bool = False) -> pb.CallError:
    details = b""
    if exc.details is not None:
        try:
            details = _encode(exc.details)
        except (TypeError, ValueError, OverflowError, RecursionError):
            details = b""
    return pb.CallError(code=exc.code, message=exc.message, details_json=details, not_started=not_started)


def error_from(msg: pb.CallError) -> ForgeError:
    code = msg.code if msg.code in ERROR_STATUS else "INTERNAL"
    try:
        details = decode_json(msg.details_json, "CallError.details_json")
    except ProtocolError:
        details = None
    return ForgeError(msg.message, code=code, details=details)


# --- read sets -----------------------------------------------------------------------------
def read_messages(reads: list[TableRead]) -> list[pb.TableRead]:
    out = []
    for r in reads:
        if r.filters is None:
            out.append(pb.TableRead(table=r.table))
        else:
            out.append(pb.TableRead(table=r.table, filters_json=_encode_text([[c, v] for c, v in r.filters]), has_filters=True))
    return out


def reads_from(msgs: Any) -> list[TableRead]:
    out = []
    for m in msgs:
        if not m.has_filters:
            out.append(TableRead(m.table))
            continue
        pairs = decode_json(m.filters_json, "TableRead.filters_json")
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                  for p in pairs):
            raise ProtocolError("TableRead.filters_json must be a list of [column, value] pairs")
        out.append(TableRead(m.table, tuple((c, v) for c, v in pairs)))
    return out
