"""ForgeClient against a real node: results, updates, errors, reconnect with last hashes."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from rt_helpers import realtime, token, ws_url
from forge_kernel.testing import free_port
from forge_realtime import ForgeClient, SubscriptionError
from rt_helpers import rt_node  # noqa: F401 - pytest fixtures


async def test_client_yields_result_then_updates(rt_node):
    node = await rt_node()
    async with ForgeClient(ws_url(node), token=token("alice")) as client:
        updates = client.subscribe("my_items")
        assert await anext(updates) == []
        await node.executor.call("add_item", {"owner": "alice", "title": "one"})
        assert [i["title"] for i in await anext(updates)] == ["one"]
        await updates.aclose()


async def test_client_raises_subscription_errors(rt_node):
    node = await rt_node()
    async with ForgeClient(ws_url(node)) as client:
        with pytest.raises(SubscriptionError) as info:
            await anext(client.subscribe("my_items"))
        assert info.value.code == "UNAUTHENTICATED"
        with pytest.raises(SubscriptionError) as info:
            await anext(client.subscribe("items_of", owner=3))
        assert info.value.code == "INVALID_ARGUMENT"


async def test_client_rejects_a_bad_token(rt_node):
    node = await rt_node()
    with pytest.raises(SubscriptionError) as info:
        async with ForgeClient(ws_url(node), token="nonsense"):
            pass
    assert info.value.code == "UNAUTHENTICATED"


async def test_client_reconnects_after_drain_and_resubscribes_with_its_hash(rt_node, forge_db_url):
    port = free_port()
    node = await rt_node()
    await node.stop()  # the fixture's first node only prepared the database; serve on a fixed port
    from rt_helpers import GATEWAY

    async def start():
        from forge_kernel.config import load_config
        from forge_kernel.node import Node
        from forge_kernel.plugins import PluginLoader

        loader = PluginLoader().load()
        cfg = load_config(loader.config_sections(), data={
            "database": {"url": forge_db_url, "pool_min": 1, "pool_max": 5},
            "app": {"modules": ["forge_rt_testapp"], "example": False},
            "node": {"roles": ["gateway", "function", "realtime"]},
            "gateway": {**GATEWAY, "port": port}, "realtime": {"fallback_poll": 0.05}}, env={})
        n = Node(cfg, loader)
        await n.start()
        return n

    first = await start()
    try:
        async with ForgeClient(f"ws://127.0.0.1:{port}/ws", min_backoff=0.05, max_backoff=0.5) as client:
            counts = client.subscribe("count_items")
            assert await anext(counts) == 0
            await first.stop()  # drain: the client is closed with 1001 and starts reconnecting
            first = None
            await asyncio.sleep(0.3)
            assert client.last_close_code == 1001
            second = await start()
            try:
                # nothing changed: the resubscribe carries the last hash and is answered "unchanged"
                for _ in range(200):
                    if realtime(second).engine.stats.unchanged:
                        break
                    await asyncio.sleep(0.02)
                assert realtime(second).engine.stats.unchanged == 1 and client.connects >= 2
                conn = await asyncpg.connect(forge_db_url)
                try:
                    await conn.execute("INSERT INTO rt_items (owner, title) VALUES ('x', 'while away')")
                finally:
                    await conn.close()
                assert await asyncio.wait_for(anext(counts), 10) == 1
            finally:
                await second.stop()
    finally:
        if first is not None:
            await first.stop()


async def test_client_keeps_an_idle_subscription_alive(rt_node):
    node = await rt_node(idle_timeout=1)
    async with ForgeClient(ws_url(node), keepalive=0.3) as client:
        counts = client.subscribe("count_items")
        assert await anext(counts) == 0
        await asyncio.sleep(2.5)  # longer than idle_timeout: only the keepalive pings hold it open
        await node.executor.call("add_item", {"owner": "x", "title": "y"})
        assert await asyncio.wait_for(anext(counts), 10) == 1
        assert client.connects == 1


async def test_client_retries_subscribes_refused_by_the_rate_limit(rt_node):
    node = await rt_node(subscribe_rate=2)
    async with ForgeClient(ws_url(node)) as client:
        streams = [client.subscribe("items_of", owner=str(i)) for i in range(5)]
        firsts = await asyncio.wait_for(asyncio.gather(*(anext(s) for s in streams)), 30)
        assert firsts == [[] for _ in range(5)]
