"""Queries and live-query re-runs on a streaming replica, with read-your-writes.

A primary and a hot standby of this module's own, from the embedded server's binaries
(``pg_basebackup -R``). The standby's replay is paused and resumed (``pg_wal_replay_pause()``)
to make it lag as long as a test needs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any

import asyncpg
import pytest
import websockets

from forge_kernel import ANONYMOUS
from forge_kernel.testing import eventually, free_port
from forge_kernel.testing.servers import PgServer, embedded_bin_dir, give, private_folder


class Pair:
    def __init__(self, primary: PgServer, standby: PgServer) -> None:
        self.primary, self.standby = primary, standby


@pytest.fixture(scope="module")
def pair() -> Any:
    root = private_folder("forge-replica-")
    primary = PgServer(embedded_bin_dir(), root / "primary", settings={"fsync": "off", "full_page_writes": "off"})
    standby = None
    try:
        for sub in ("primary", "standby"):
            (root / sub).mkdir()
            give(root / sub)
        primary.initdb().start()
        standby = primary.standby(root / "standby").start()
        yield Pair(primary, standby)
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def database(pair: Pair) -> Any:
    async with pair.primary.fresh_database("replica_") as name:
        async def replicated() -> bool:
            try:
                conn = await asyncpg.connect(pair.standby.url(name))
            except asyncpg.InvalidCatalogNameError:
                return False
            await conn.close()
            return True

        await eventually(replicated, 30, "the database on the standby")
        yield name


@pytest.fixture
async def standby_admin(pair: Pair) -> Any:
    conn = await asyncpg.connect(pair.standby.url())
    try:
        yield conn
    finally:
        if await conn.fetchval("SELECT pg_is_wal_replay_paused()"):
            await conn.execute("SELECT pg_wal_replay_resume()")
        await conn.close()


def config(pair: Pair, db: str, *, read_wait: float = 0.3, roles: tuple[str, ...] = ("function",), **extra: Any) -> dict:
    return {"database": {"url": pair.primary.url(db), "read_url": pair.standby.url(db), "read_wait": read_wait},
            "node": {"roles": list(roles)}, **extra}


async def test_queries_read_the_replica_when_it_has_what_they_must_see(pair, database, forge_node):
    node = await forge_node(modules=["pooled_app"], config=config(pair, database))
    assert await node.executor.call("where", {}, ANONYMOUS) == {"replica": True, "read_only": True}
    await node.executor.call("place_order", {"owner": "a", "item": "one"}, ANONYMOUS)
    # read-your-writes: the replica replays the mutation's commit before the query reads it
    assert await node.executor.call("orders_where", {"owner": "a"}, ANONYMOUS) == {"replica": True, "items": ["one"]}
    assert node.reads.stats.replica == 2


async def test_a_lagging_replica_is_waited_for(pair, database, forge_node, standby_admin):
    node = await forge_node(modules=["pooled_app"], config=config(pair, database, read_wait=30))
    await standby_admin.execute("SELECT pg_wal_replay_pause()")
    await node.executor.call("place_order", {"owner": "b", "item": "late"}, ANONYMOUS)
    reading = asyncio.create_task(node.executor.call("orders_where", {"owner": "b"}, ANONYMOUS))
    await eventually(lambda: asyncio.sleep(0, node.reads.stats.checks >= 2), 10, "the query to wait")
    assert not reading.done()
    await standby_admin.execute("SELECT pg_wal_replay_resume()")
    assert await reading == {"replica": True, "items": ["late"]}


async def test_past_read_wait_queries_read_the_primary(pair, database, forge_node, standby_admin):
    """Before: a query right after a mutation read a replica that had not replayed it."""
    node = await forge_node(modules=["pooled_app"], config=config(pair, database, read_wait=0.2))
    await standby_admin.execute("SELECT pg_wal_replay_pause()")
    await node.executor.call("place_order", {"owner": "c", "item": "fresh"}, ANONYMOUS)
    assert await node.executor.call("orders_where", {"owner": "c"}, ANONYMOUS) == {"replica": False, "items": ["fresh"]}
    assert node.reads.stats.lagged == 1
    await standby_admin.execute("SELECT pg_wal_replay_resume()")
    assert await node.executor.call("orders_where", {"owner": "c"}, ANONYMOUS) == {"replica": True, "items": ["fresh"]}


async def test_a_new_nodes_queries_wait_for_the_replica_to_have_its_tables(pair, database, forge_node, standby_admin):
    """Before: a node that had just created its tables on the primary sent its first queries to a
    replica that had not replayed them yet: 'relation "pa_orders" does not exist', INTERNAL."""
    await standby_admin.execute("SELECT pg_wal_replay_pause()")
    node = await forge_node(modules=["pooled_app"], config=config(pair, database, read_wait=0.2))
    assert await node.executor.call("orders_of", {"owner": "x"}, ANONYMOUS) == []
    assert node.reads.stats.lagged >= 1
    await standby_admin.execute("SELECT pg_wal_replay_resume()")
    # Once replay resumes, reads go back to the replica; under load the replica may need longer
    # than read_wait (0.2 s) to catch up, and until then the primary answers (correctly).
    async def from_the_replica() -> bool:
        return (await node.executor.call("where", {}, ANONYMOUS)) == {"replica": True, "read_only": True}

    await eventually(from_the_replica, 30, "reads to go back to the replica")


async def test_an_unreachable_replica_sends_queries_to_the_primary(pair, database, forge_node):
    cfg = config(pair, database)
    cfg["database"]["read_url"] = f"postgresql://postgres@127.0.0.1:{free_port()}/{database}"
    node = await forge_node(modules=["pooled_app"], config=cfg)
    assert await node.executor.call("where", {}, ANONYMOUS) == {"replica": False, "read_only": True}
    assert node.reads.stats.unreachable >= 1


async def test_live_query_reruns_see_what_the_change_reader_saw(pair, database, forge_node, standby_admin):
    """A write from elsewhere (not this node's executor) reaches a subscriber although the replica
    has not replayed it: the re-run waits for the change reader's WAL position, then reads the
    primary. Before: it read the paused replica, found the old result and pushed nothing."""
    node = await forge_node(modules=["pooled_app"], config=config(
        pair, database, roles=("gateway", "function", "realtime"), gateway={"port": 0},
        realtime={"fallback_poll": 0.05}))
    writer = await asyncpg.connect(pair.primary.url(database))
    try:
        async with websockets.connect(f"ws://127.0.0.1:{node.ports['http']}/ws") as ws:
            async def recv() -> dict:
                return json.loads(await asyncio.wait_for(ws.recv(), 30))

            await ws.send(json.dumps({"type": "auth", "token": None}))
            assert (await recv())["type"] == "ready"
            await ws.send(json.dumps({"type": "subscribe", "id": "s", "function": "orders_of", "args": {"owner": "d"}}))
            assert (await recv())["data"] == []
            await standby_admin.execute("SELECT pg_wal_replay_pause()")
            await writer.execute("INSERT INTO pa_orders (owner, item) VALUES ('d', 'elsewhere')")
            assert [o["item"] for o in (await recv())["data"]] == ["elsewhere"]
            await standby_admin.execute("SELECT pg_wal_replay_resume()")
            await writer.execute("INSERT INTO pa_orders (owner, item) VALUES ('d', 'later')")
            assert [o["item"] for o in (await recv())["data"]] == ["elsewhere", "later"]
    finally:
        await writer.close()
