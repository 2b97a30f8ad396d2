"""/ws at the edge (issue 19, items 3, 8 and 9): frames bounded by the server before they are
buffered, strict JSON in and out, absurd tokens, and subscribes that spend the functions' rate
limits shared with /rpc. Real sockets against a node serving /ws."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time

import httpx
import jwt
import pytest
import websockets

from rt_helpers import JWT_SECRET, WsClient, ws_url
from rt_helpers import rt_node  # noqa: F401 - pytest fixtures


def strict(text: str | bytes) -> dict:
    """Parse as RFC 8259 JSON: NaN, Infinity and lone surrogates are not JSON."""
    def refuse(name: str):
        raise AssertionError(f"reply is not valid JSON ({name}): {text!r}")

    if isinstance(text, bytes):
        text = text.decode("utf-8")
    doc = json.loads(text, parse_constant=refuse)
    text.encode("utf-8")  # a lone surrogate in the reply would fail here
    assert isinstance(doc, dict), text
    return doc


async def recv_strict(ws, timeout: float = 10.0) -> dict:
    return strict(await asyncio.wait_for(ws.recv(), timeout))


@pytest.fixture
async def node(rt_node):
    return await rt_node()


async def test_non_standard_json_gets_a_documented_protocol_error(node):
    deep = "[" * 20_000 + "]" * 20_000  # 40 KB: under the 64 KiB message limit
    cases = [
        ('{"type": "ping", "id": NaN}', "not valid JSON"),
        ('{"type": "ping", "id": Infinity}', "not valid JSON"),
        ('{"type": "ping", "id": -Infinity}', "not valid JSON"),
        ('{"type": "ping", "id": 1e400}', "not valid JSON"),
        ('{"type": "ping", "id": "\\ud800"}', "not valid JSON"),  # a lone surrogate escape
        ('{"type": "ping", "id": "\\udc00\\ud800"}', "not valid JSON"),
        ('{"type": "ping", "id": ' + deep + "}", "nested too deeply"),
        (deep, "nested too deeply"),
    ]
    async with websockets.connect(ws_url(node)) as ws:
        for raw, needle in cases:
            await ws.send(raw)
            msg = await recv_strict(ws)
            assert (msg["type"], msg["code"], msg["id"]) == ("error", "INVALID_ARGUMENT", None), (raw[:60], msg)
            assert needle in msg["message"], msg
        # the socket stays open and a valid surrogate pair is fine
        await ws.send('{"type": "ping", "id": "\\ud83d\\ude00"}')
        assert await recv_strict(ws) == {"type": "pong", "id": "\U0001F600"}


async def test_results_json_cannot_carry_arrive_as_null(node):
    async with websockets.connect(ws_url(node)) as ws:
        await ws.send(json.dumps({"type": "subscribe", "id": "n", "function": "not_a_number"}))
        msg = await recv_strict(ws)
        assert msg["type"] == "data" and msg["data"] == {"nan": None, "inf": [None, 1.5]}, msg


def _handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_frame_above_the_limit_is_refused_on_its_header(node):
    """A text frame announcing 16 MiB, of which we send only 1 KB: the server closes with 1009 at
    once. Without the server-side limit it waited to buffer all 16 MiB (uvicorn's default) before
    realtime's own check could run."""
    def attack() -> bytes:
        sock = _handshake(node.ports["http"])
        try:
            mask = os.urandom(4)
            sock.sendall(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 16 * 1024 * 1024) + mask + b"x" * 1024)
            data = b""
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(4096)
                except socket.timeout:
                    break
                if not chunk:
                    break
                data += chunk
                if len(data) >= 4 and data[0] == 0x88:
                    break
            return data
        finally:
            sock.close()

    data = await asyncio.to_thread(attack)
    assert data[:1] == b"\x88", f"no close frame: {data[:40]!r}"
    assert struct.unpack("!H", data[2:4])[0] == 1009


async def test_a_signed_token_with_an_absurd_expiry_is_unauthenticated_not_a_crash(node):
    now = int(time.time())
    async with websockets.connect(ws_url(node)) as ws:
        c = WsClient(ws)
        for claims in ({"sub": "alice", "exp": now + 10**12}, {"sub": "alice", "exp": now + 60, "iat": 10**30},
                       {"sub": "alice", "exp": now + 60, "nbf": float("inf")}):
            await c.send({"type": "auth", "token": jwt.encode(claims, JWT_SECRET, algorithm="HS256")})
            msg = await recv_strict(ws)
            assert (msg["type"], msg["code"], msg["id"]) == ("error", "UNAUTHENTICATED", None), msg
        await c.send({"type": "ping", "id": 1})
        assert await recv_strict(ws) == {"type": "pong", "id": 1}


async def test_subscribes_spend_the_same_rate_limit_as_rpc(node):
    """limited_count allows 3 calls per hour per address: one over /rpc and two subscribes use
    them up; the next subscribe (any connection) and the next /rpc call are refused."""
    base = f"http://127.0.0.1:{node.ports['http']}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        assert (await http.post("/rpc/limited_count")).status_code == 200
        async with websockets.connect(ws_url(node)) as ws, websockets.connect(ws_url(node)) as other:
            for sub_id in ("a", "b"):
                await ws.send(json.dumps({"type": "subscribe", "id": sub_id, "function": "limited_count"}))
                assert (await recv_strict(ws))["type"] == "data"
            for sock in (ws, other):
                await sock.send(json.dumps({"type": "subscribe", "id": "c", "function": "limited_count"}))
                err = await recv_strict(sock)
                assert (err["type"], err["code"], err["id"]) == ("error", "RATE_LIMITED", "c"), err
                assert err["details"]["retry_after"] >= 1 and err["details"]["limit"] == 3
        r = await http.post("/rpc/limited_count")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
