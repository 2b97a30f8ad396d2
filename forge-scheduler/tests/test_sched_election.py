"""Leader election on real connections: one leader, takeover, fencing, keepalive."""

import asyncio
import contextlib
import socket

import asyncpg
import pytest
from sched_helpers import eventually

from forge_kernel.db import connect
from forge_scheduler.election import LeaderElection, NotLeader, current_leader, fence
from forge_scheduler.settings import SchedulerConfig

# a generous check timeout: on a loaded machine a slow renewal would end the term mid-test
CFG = SchedulerConfig(election_interval=0.05, renew_interval=0.1, check_timeout=10.0)


@contextlib.asynccontextmanager
async def elections(url, ids, workers=None):
    async def connector(**kw):
        return await connect(url, **kw)

    els = {i: LeaderElection(i, connector, CFG, (workers or {}).get(i, ())) for i in ids}
    tasks = {i: asyncio.create_task(e.run()) for i, e in els.items()}
    try:
        yield els, tasks
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)


def leaders(els):
    return [i for i, e in els.items() if e.is_leader]


async def test_exactly_one_leader_and_takeover_when_its_session_dies(sched_db):
    admin = await asyncpg.connect(sched_db)
    try:
        async with elections(sched_db, ["a", "b", "c"]) as (els, _):
            first = (await eventually(lambda: _v(leaders(els)), what="a leader"))[0]
            await asyncio.sleep(0.5)  # followers keep campaigning meanwhile
            assert leaders(els) == [first]
            row = await current_leader(admin)
            assert row["node_id"] == first and row["term"] == 1 and row["since"] is not None
            # the leader's backend dies (as when its process is killed): someone else leads
            killed = await admin.fetchval(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                f"forge-leader:{first}")
            assert killed

            async def new_leader():
                r = await current_leader(admin)
                return r if r["node_id"] != first and r["term"] == 2 else None

            row2 = await eventually(new_leader, what="a new leader")
            assert row2["since"] > row["since"]
            await eventually(lambda: _v(leaders(els) == [row2["node_id"]]), what="one leader in process")
            await asyncio.sleep(0.5)
            assert leaders(els) == [row2["node_id"]]  # the old leader campaigns again but does not lead
    finally:
        await admin.close()


async def test_graceful_stop_clears_the_row_and_hands_over(sched_db):
    admin = await asyncpg.connect(sched_db)
    try:
        async with elections(sched_db, ["a", "b"]) as (els, tasks):
            first = (await eventually(lambda: _v(leaders(els)), what="a leader"))[0]
            tasks[first].cancel()
            await asyncio.gather(tasks[first], return_exceptions=True)
            other = "b" if first == "a" else "a"
            await eventually(lambda: _v(els[other].is_leader), what="hand-over")
            row = await current_leader(admin)
            assert row["node_id"] == other and row["term"] == 2
    finally:
        await admin.close()


async def test_workers_run_only_while_leading_and_not_leader_ends_the_term(sched_db):
    calls = []

    async def worker(leadership):
        calls.append(leadership.term)
        if leadership.term == 1:
            raise NotLeader("pretend the lock was lost")
        await asyncio.Event().wait()

    async with elections(sched_db, ["a"], workers={"a": [worker]}) as (els, _):
        await eventually(lambda: _v(calls[-1:] == [2]), what="second term")
    assert calls == [1, 2]


async def test_check_and_fence_refuse_a_deposed_leader(sched_db):
    admin = await asyncpg.connect(sched_db)
    try:
        async with elections(sched_db, ["a"]) as (els, _):
            await eventually(lambda: _v(els["a"].is_leader), what="leadership")
            ld = await els["a"].check()
            async with admin.transaction():
                await fence(admin, ld)  # the current term passes
            # a successor took over (its term is newer): the old term's writes are refused
            await admin.execute("UPDATE forge_leaders SET node_id = 'b', term = term + 1")
            with pytest.raises(NotLeader):
                async with admin.transaction():
                    await fence(admin, ld)
            # and the old leader notices at its next renewal and stops leading
            await eventually(lambda: _v(not els["a"].is_leader or els["a"].leadership.term != ld.term),
                             what="step down")
    finally:
        await admin.close()


async def test_a_cancel_while_the_session_closes_stops_the_election(sched_db):
    """Before: a cancel that arrived while the election closed its session after losing the lead
    (NotLeader -> finally) was swallowed with the close's errors, and the election went on - and
    led again - for ever; a stopping node (or test) waited on it until killed."""
    async def connector(**kw):
        return await connect(sched_db, **kw)

    election = LeaderElection("x", connector, CFG)
    election._conn = await connector()
    closing = asyncio.create_task(election._drop_connection())
    await asyncio.sleep(0)  # inside conn.close()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert election._conn is None


async def test_check_raises_when_not_leading(sched_db):
    async def connector(**kw):
        return await connect(sched_db, **kw)

    with pytest.raises(NotLeader):
        await LeaderElection("x", connector, CFG).check()


def _over_tcp(url: str) -> str:
    """``url`` through 127.0.0.1 when it names a unix socket folder (the embedded test server also
    listens on TCP, at the same port number)."""
    base, _, query = url.partition("?")
    params = dict(p.split("=", 1) for p in query.split("&") if p)
    if params.get("host", "").startswith("/"):
        params["host"] = "127.0.0.1"
    return base + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")


async def test_leader_connection_has_keepalive_on_both_ends(sched_db):
    async with elections(_over_tcp(sched_db), ["a"]) as (els, _):
        await eventually(lambda: _v(els["a"].is_leader), what="leadership")
        conn = els["a"]._conn
        sock = conn._transport.get_extra_info("socket")
        assert sock.family in (socket.AF_INET, socket.AF_INET6)  # the test server listens on TCP
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == CFG.keepalive_idle
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == CFG.keepalive_count
        async with els["a"]._conn_lock:
            assert await conn.fetchval("SHOW tcp_keepalives_idle") == str(CFG.keepalive_idle)
            assert await conn.fetchval("SHOW tcp_keepalives_count") == str(CFG.keepalive_count)


async def _v(value):
    return value
