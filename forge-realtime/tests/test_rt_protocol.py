"""The /ws protocol: every malformed or refused message gets its documented error or close code."""

from __future__ import annotations

import asyncio
import time

import pytest
import websockets

from rt_helpers import token, ws_connect, ws_url
from rt_helpers import rt_node  # noqa: F401 - pytest fixtures


@pytest.fixture
async def node(rt_node):
    return await rt_node(max_subscriptions=3, subscribe_rate=1000, max_message_bytes=2048)


async def test_malformed_messages_get_invalid_argument_and_keep_the_socket(node):
    async with ws_connect(ws_url(node)) as c:
        for raw, needle in [("not json", "not valid JSON"), ("[1, 2]", 'string "type"'), ('{"no": "type"}', 'string "type"'),
                            ('{"type": "dance"}', "unknown message type 'dance'")]:
            await c.ws.send(raw)
            msg = await c.recv()
            assert msg["type"] == "error" and msg["code"] == "INVALID_ARGUMENT" and msg["id"] is None
            assert needle in msg["message"]
        await c.send({"type": "ping", "id": 7})
        assert await c.recv() == {"type": "pong", "id": 7}


async def test_subscribe_errors_name_the_problem(node):
    async with ws_connect(ws_url(node), token("alice")) as c:
        cases = [
            ({"type": "subscribe", "id": "", "function": "count_items"}, None, "INVALID_ARGUMENT", "id must be"),
            ({"type": "subscribe", "id": "x" * 200, "function": "count_items"}, None, "INVALID_ARGUMENT", "id must be"),
            ({"type": "subscribe", "id": "u", "function": "nope"}, "u", "NOT_FOUND", "no function named 'nope'"),
            ({"type": "subscribe", "id": "m", "function": "add_item"}, "m", "INVALID_ARGUMENT", "is a mutation"),
            ({"type": "subscribe", "id": "a", "function": "items_of", "args": {"owner": 5}}, "a", "INVALID_ARGUMENT", "owner"),
            ({"type": "subscribe", "id": "b", "function": "items_of"}, "b", "INVALID_ARGUMENT", "required"),
            ({"type": "subscribe", "id": "c", "function": "items_of", "args": [1]}, "c", "INVALID_ARGUMENT", "must be an object"),
            ({"type": "subscribe", "id": "d", "function": "count_items", "extra": 1}, "d", "INVALID_ARGUMENT", "unknown field"),
            ({"type": "subscribe", "id": "e", "function": "count_items", "hash": 5}, "e", "INVALID_ARGUMENT", "hash must"),
        ]
        for msg, sub_id, code, needle in cases:
            await c.send(msg)
            err = await c.recv()
            assert err["type"] == "error" and err["code"] == code and err["id"] == sub_id, (msg, err)
            assert needle in err["message"], (needle, err)
        bad_args = cases[4]
        await c.send(bad_args[0])
        details = (await c.recv())["details"]
        assert details and details[0]["argument"] == "owner"


async def test_duplicate_ids_and_too_many_subscriptions(node):
    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "1", "function": "count_items"})
        assert (await c.recv())["type"] == "data"
        await c.send({"type": "subscribe", "id": "1", "function": "count_items"})
        err = await c.recv()
        assert (err["type"], err["code"], err["id"]) == ("error", "CONFLICT", "1")
        for i in (2, 3):
            await c.send({"type": "subscribe", "id": str(i), "function": "items_of", "args": {"owner": str(i)}})
            assert (await c.recv())["type"] == "data"
        await c.send({"type": "subscribe", "id": "4", "function": "count_items"})
        err = await c.recv()
        assert err["code"] == "RATE_LIMITED" and err["details"] == {"limit": 3}
        # unsubscribing frees a slot; unknown ids are NOT_FOUND
        await c.send({"type": "unsubscribe", "id": "2"})
        assert await c.recv() == {"type": "unsubscribed", "id": "2"}
        await c.send({"type": "unsubscribe", "id": "2"})
        err = await c.recv()
        assert (err["code"], err["id"]) == ("NOT_FOUND", "2")
        await c.send({"type": "subscribe", "id": "4", "function": "count_items"})
        assert (await c.recv())["type"] == "data"


async def test_unsubscribed_queries_are_dropped(node):
    from rt_helpers import realtime

    async with ws_connect(ws_url(node)) as c:
        await c.send({"type": "subscribe", "id": "1", "function": "count_items"})
        await c.recv()
        assert len(realtime(node).engine.queries) == 1
    for _ in range(100):  # the socket closed: its subscriptions go with it
        if not realtime(node).engine.queries:
            break
        await asyncio.sleep(0.02)
    assert realtime(node).engine.queries == {}


async def test_subscribe_rate_limit(rt_node):
    node = await rt_node(subscribe_rate=2)
    async with ws_connect(ws_url(node)) as c:
        codes = []
        for i in range(4):
            await c.send({"type": "subscribe", "id": str(i), "function": "items_of", "args": {"owner": str(i)}})
            msg = await c.recv()
            codes.append(msg.get("code", msg["type"]))
        assert codes[:2] == ["data", "data"] and "RATE_LIMITED" in codes[2:]


async def test_oversized_and_binary_messages_close_the_socket(node):
    async with websockets.connect(ws_url(node)) as ws:
        await ws.send('{"type": "ping", "pad": "' + "x" * 4096 + '"}')
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
        assert info.value.rcvd.code == 1009
    async with websockets.connect(ws_url(node)) as ws:
        await ws.send(b"\x00\x01")
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
        assert info.value.rcvd.code == 1003


async def test_auth_errors(node):
    async with websockets.connect(ws_url(node)) as ws:
        from rt_helpers import WsClient

        c = WsClient(ws)
        await c.send({"type": "auth", "token": "garbage"})
        err = await c.recv()
        assert (err["type"], err["code"], err["id"]) == ("error", "UNAUTHENTICATED", None)
        await c.send({"type": "auth", "token": token("alice", ttl=-10)})
        err = await c.recv()
        assert err["code"] == "UNAUTHENTICATED" and "expired" in err["message"]
        # still anonymous: a query that needs a caller is refused
        await c.send({"type": "subscribe", "id": "m", "function": "my_items"})
        err = await c.recv()
        assert (err["code"], err["id"]) == ("UNAUTHENTICATED", "m")
        await c.send({"type": "auth", "token": token("alice")})
        ready = await c.recv()
        assert ready["type"] == "ready" and ready["user_id"] == "alice" and ready["expires_at"]


async def test_token_expiry_ends_subscriptions_unless_refreshed(node):
    async with ws_connect(ws_url(node), token("alice", ttl=2)) as c:
        await c.send({"type": "subscribe", "id": "m", "function": "my_items"})
        assert (await c.recv())["type"] == "data"
        err = await c.recv(timeout=10)
        assert (err["type"], err["code"], err["id"]) == ("error", "UNAUTHENTICATED", "m")
        assert "expired" in err["message"]
    async with ws_connect(ws_url(node), token("alice", ttl=2)) as c:
        await c.send({"type": "subscribe", "id": "m", "function": "my_items"})
        assert (await c.recv())["type"] == "data"
        await c.send({"type": "auth", "token": token("alice", ttl=3600)})
        assert (await c.recv())["type"] == "ready"
        await asyncio.sleep(2.5 - 0)  # past the first token's expiry
        await node.executor.call("add_item", {"owner": "alice", "title": "still live"})
        msg = await c.recv()
        assert msg["type"] == "data" and msg["data"][0]["title"] == "still live"


async def test_switching_caller_on_a_socket_ends_its_subscriptions(node):
    async with ws_connect(ws_url(node), token("alice")) as c:
        await c.send({"type": "subscribe", "id": "m", "function": "my_items"})
        await c.recv()
        await c.send({"type": "auth", "token": token("mallory")})
        msgs = [await c.recv(), await c.recv()]
        err = next(m for m in msgs if m["type"] == "error")
        assert (err["code"], err["id"]) == ("UNAUTHENTICATED", "m")
        assert any(m["type"] == "ready" and m["user_id"] == "mallory" for m in msgs)


async def test_refreshed_token_without_the_role_ends_the_subscription(node):
    async with ws_connect(ws_url(node), token("alice", roles=["admin"])) as c:
        await c.send({"type": "subscribe", "id": "adm", "function": "admin_count"})
        assert (await c.recv())["data"] == 0
        await c.send({"type": "subscribe", "id": "pub", "function": "count_items"})
        assert (await c.recv())["data"] == 0
        await c.send({"type": "auth", "token": token("alice")})
        msgs = [await c.recv(), await c.recv()]
        err = next(m for m in msgs if m["type"] == "error")
        assert (err["code"], err["id"]) == ("FORBIDDEN", "adm")
        await node.executor.call("add_item", {"owner": "x", "title": "y"})
        msg = await c.recv()
        assert (msg["type"], msg["id"], msg["data"]) == ("data", "pub", 1)
