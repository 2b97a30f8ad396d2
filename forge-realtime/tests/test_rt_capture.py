"""Change capture and the change-log cursor, straight against PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from forge_kernel import db as dbmod
from forge_realtime.capture import CaptureError, install_capture, remove_capture
from forge_kernel.testing.procs import eventually
from forge_realtime.changes import CHANNEL, ChangeReader, LogCursor, poll, start_cursor
from forge_realtime.trim import trim_change_log
from rt_helpers import rt_db  # noqa: F401 - pytest fixtures


async def test_statement_trigger_logs_images_of_captured_columns(rt_db):
    cols, changed = await install_capture(rt_db, "things", ["owner"])
    assert changed and cols == {"id", "owner"}
    cursor = await start_cursor(rt_db)
    await rt_db.execute("INSERT INTO things (owner, n) SELECT 'o' || (i % 2), i FROM generate_series(1, 3) i")
    await rt_db.execute("UPDATE things SET owner = 'moved' WHERE owner = 'o1'")
    await rt_db.execute("DELETE FROM things WHERE owner = 'o0'")
    await rt_db.execute("UPDATE things SET n = n WHERE false")  # touches nothing: logs nothing
    changes = await poll(rt_db, cursor)
    assert [c.op for c in changes] == ["INSERT", "UPDATE", "DELETE"]
    ins, upd, dele = changes
    # one log row per statement, images hold the primary key and the filtered column only
    assert sorted((r["id"], r["owner"]) for r in ins.new_rows) == [(1, "o1"), (2, "o0"), (3, "o1")]
    assert all(set(r) == {"id", "owner"} for r in ins.new_rows)
    assert sorted(r["owner"] for r in upd.old_rows) == ["o1", "o1"]
    assert sorted(r["owner"] for r in upd.new_rows) == ["moved", "moved"]
    assert [r["id"] for r in dele.old_rows] == [2] and dele.new_rows == ()
    assert await poll(rt_db, cursor) == []


async def test_capture_is_idempotent_and_grows_columns_without_new_triggers(rt_db):
    await install_capture(rt_db, "things", ["owner"])
    assert (await install_capture(rt_db, "things", ["owner"]))[1] is False
    cols, changed = await install_capture(rt_db, "things", ["n", "no_such_column"])
    assert changed and cols == {"id", "owner", "n"}
    triggers = await rt_db.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'things'::regclass AND NOT tgisinternal")
    assert triggers == 4
    cursor = await start_cursor(rt_db)
    await rt_db.execute("INSERT INTO things (owner, n) VALUES ('a', 5)")
    [change] = await poll(rt_db, cursor)
    assert change.new_rows == ({"id": 1, "owner": "a", "n": 5},)
    await rt_db.execute("TRUNCATE things")
    [trunc] = await poll(rt_db, cursor)
    assert trunc.op == "TRUNCATE"


async def test_unknown_table_is_a_clear_error(rt_db):
    with pytest.raises(CaptureError, match="no such table"):
        await install_capture(rt_db, "nope", [])
    with pytest.raises(ValueError, match="not a plain SQL identifier"):
        await install_capture(rt_db, "things; drop table x", [])


async def test_remove_capture_stops_logging(rt_db):
    await install_capture(rt_db, "things", [])
    await remove_capture(rt_db, "things")
    cursor = await start_cursor(rt_db)
    await rt_db.execute("INSERT INTO things (owner) VALUES ('a')")
    assert await poll(rt_db, cursor) == []
    assert await rt_db.fetchval("SELECT count(*) FROM forge_realtime_captures") == 0


async def test_cursor_does_not_skip_a_late_committing_transaction(rt_db, forge_db_url):
    """The sequence (id) order and the commit order differ: a cursor on ids would lose the
    early-id transaction that commits last."""
    await install_capture(rt_db, "things", [])
    cursor = await start_cursor(rt_db)
    slow = await dbmod.connect(forge_db_url)
    fast = await dbmod.connect(forge_db_url)
    try:
        slow_tx = slow.transaction()
        await slow_tx.start()
        await slow.execute("INSERT INTO things (owner) VALUES ('slow')")  # takes the lower log id
        await fast.execute("INSERT INTO things (owner) VALUES ('fast')")  # commits first
        first = await poll(rt_db, cursor)
        assert [c.new_rows[0]["id"] for c in first] == [2]
        await slow_tx.commit()
        second = await poll(rt_db, cursor)
        assert [c.new_rows[0]["id"] for c in second] == [1]
        assert await poll(rt_db, cursor) == []
        # the cursor only remembers transactions above the horizon, so it stays small
        assert cursor.seen == set() or all(x >= cursor.horizon for x in cursor.seen)
    finally:
        await slow.close()
        await fast.close()


async def test_rolled_back_writes_are_never_delivered(rt_db, forge_db_url):
    await install_capture(rt_db, "things", [])
    cursor = await start_cursor(rt_db)
    other = await dbmod.connect(forge_db_url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("INSERT INTO things (owner) VALUES ('ghost')")
        await tx.rollback()
        assert await poll(rt_db, cursor) == []
    finally:
        await other.close()


async def test_every_change_is_delivered_exactly_once_under_concurrent_writers(rt_db, forge_db_url):
    await install_capture(rt_db, "things", ["owner"])
    cursor = await start_cursor(rt_db)
    pool = await dbmod.create_pool(forge_db_url, min_size=8, max_size=8)
    seen: list[int] = []
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        for i in range(40):
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute("INSERT INTO things (owner) VALUES ($1)", f"w{w}")
                    if i % 3 == 0:
                        await asyncio.sleep(0.003)  # hold the transaction open: commits reorder

    async def reader() -> None:
        while not stop.is_set():
            for c in await poll(rt_db, cursor):
                seen.extend(r["id"] for r in c.new_rows)
            await asyncio.sleep(0.001)

    try:
        r = asyncio.create_task(reader())
        await asyncio.gather(*(writer(w) for w in range(8)))
        stop.set()
        await r
        for c in await poll(rt_db, cursor):
            seen.extend(r["id"] for r in c.new_rows)
    finally:
        await pool.close()
    assert sorted(seen) == list(range(1, 321))


async def test_one_hint_per_batch_of_concurrent_writers(rt_db, forge_db_url):
    await install_capture(rt_db, "things", [])
    hints: list[str] = []
    listener = await dbmod.connect(forge_db_url)
    await listener.add_listener(CHANNEL, lambda *a: hints.append(a[-1]))
    try:
        await rt_db.execute("INSERT INTO things (owner) VALUES ('a')")
        # a transaction writing many statements still sends one hint (NOTIFY dedupes in a transaction)
        async with rt_db.transaction():
            for _ in range(5):
                await rt_db.execute("INSERT INTO things (owner) VALUES ('b')")
        for _ in range(100):
            if len(hints) >= 2:
                break
            await asyncio.sleep(0.02)
        assert hints == ["", ""]
        # while another transaction holds the hint gate, a writer commits without NOTIFY
        other = await dbmod.connect(forge_db_url)
        try:
            tx = other.transaction()
            await tx.start()
            await other.execute("INSERT INTO things (owner) VALUES ('gate')")
            await rt_db.execute("INSERT INTO things (owner) VALUES ('no hint')")
            await asyncio.sleep(0.2)
            assert len(hints) == 2
            await tx.commit()
        finally:
            await other.close()
        for _ in range(100):
            if len(hints) >= 3:
                break
            await asyncio.sleep(0.02)
        assert len(hints) == 3
    finally:
        await listener.close()


async def test_reader_follows_a_stream_of_changes_without_hints_and_listens_again_after_it(rt_db, forge_db_url):
    """During a sustained stream the reader stops listening and polls on its cadence (no hint per
    write, no poll per hint); when the stream ends it listens again, so a lone write is read on
    its hint, not after the (here one-minute) fallback poll."""
    await install_capture(rt_db, "things", [])
    seen: list[int] = []
    reader = ChangeReader(lambda: dbmod.connect(forge_db_url),
                          lambda changes, position: seen.extend(r["id"] for c in changes for r in c.new_rows),
                          lambda position: None, fallback_poll=60.0, stream_after=3)
    task = asyncio.create_task(reader.run())
    pool = await dbmod.create_pool(forge_db_url, min_size=4, max_size=4)
    written: list[int] = []
    try:
        await asyncio.wait_for(reader.ready.wait(), 30)
        assert reader.listening

        async def writer() -> None:  # single-row transactions until the reader saw a stream (bounded)
            while not reader.streams and len(written) < 20_000:
                written.append(await pool.fetchval("INSERT INTO things (owner) VALUES ('w') RETURNING id"))

        await asyncio.wait_for(asyncio.gather(*(writer() for _ in range(4))), 120)
        assert reader.streams >= 1, "a stream of writes never stopped the reader listening"

        async def all_seen() -> bool:
            return sorted(seen) == sorted(written) and reader.listening

        await eventually(all_seen, 30, "every streamed write read once, and the reader listening again")
        hints = reader.hints
        lone = await pool.fetchval("INSERT INTO things (owner) VALUES ('lone') RETURNING id")

        async def lone_seen() -> bool:
            return lone in seen

        # the fallback poll is a minute away: only the hint can bring the lone write this soon
        await eventually(lone_seen, 30, "the write after the stream, read on its hint")
        assert reader.hints > hints and sorted(seen) == sorted(written + [lone])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.close()


async def test_trim_deletes_only_old_rows(rt_db):
    await install_capture(rt_db, "things", [])
    await rt_db.execute("INSERT INTO things (owner) VALUES ('old')")
    await rt_db.execute("UPDATE forge_changes SET at = now() - interval '1 hour'")
    await rt_db.execute("INSERT INTO things (owner) VALUES ('new')")
    assert await trim_change_log(rt_db, 60, batch=1) == 1
    assert await rt_db.fetchval("SELECT count(*) FROM forge_changes") == 1


def test_log_cursor_prunes_seen_to_the_horizon():
    c = LogCursor(horizon=10, seen={11, 12}, position=13)
    c.advance(12, 20, {15})
    assert c.horizon == 12 and c.seen == {12, 15} and c.position == 20
    c.advance(11, 19, set())  # a horizon never moves back
    assert c.horizon == 12 and c.position == 20
