"""Migrations: applied once under an advisory lock, one transaction each, drift detected."""

import asyncio
import subprocess
import sys

import asyncpg
import pytest

from forge_kernel import migrations as mig
from forge_kernel.db import connect

M1 = mig.Migration("demo", 1, "create_a", "CREATE TABLE demo_a (id int PRIMARY KEY)")
M2 = mig.Migration("demo", 2, "add_b", "ALTER TABLE demo_a ADD COLUMN b text")


async def test_apply_status_and_idempotence(forge_db_url):
    conn = await connect(forge_db_url)
    try:
        assert [s.state for s in await mig.status(conn, [M1, M2])] == ["pending", "pending"]
        assert await mig.migrate(conn, [M1, M2]) == [M1, M2]
        assert await mig.migrate(conn, [M1, M2]) == []
        states = await mig.status(conn, [M1, M2])
        assert [s.state for s in states] == ["applied", "applied"]
        assert await mig.is_current(conn, [M1, M2])
        assert await conn.fetchval("SELECT count(*) FROM forge_migrations WHERE namespace = 'demo'") == 2
    finally:
        await conn.close()


async def test_drift_is_an_error(forge_db_url):
    conn = await connect(forge_db_url)
    try:
        await mig.migrate(conn, [M1])
        edited = mig.Migration("demo", 1, "create_a", "CREATE TABLE demo_a (id bigint PRIMARY KEY)")
        assert [s.state for s in await mig.status(conn, [edited])] == ["drift"]
        with pytest.raises(mig.DriftError, match="demo 0001_create_a changed after it was applied"):
            await mig.migrate(conn, [edited, M2])
        # nothing after the drift was applied
        assert await conn.fetchval("SELECT count(*) FROM forge_migrations WHERE namespace = 'demo'") == 1
    finally:
        await conn.close()


async def test_failed_migration_leaves_nothing_half_written(forge_db_url):
    bad = mig.Migration("demo", 2, "broken", "CREATE TABLE demo_b (id int); SELECT * FROM no_such_table")
    conn = await connect(forge_db_url)
    try:
        with pytest.raises(mig.MigrationError, match="demo 0002_broken failed"):
            await mig.migrate(conn, [M1, bad])
        assert await conn.fetchval("SELECT to_regclass('demo_b')") is None
        assert await conn.fetchval("SELECT max(version) FROM forge_migrations WHERE namespace='demo'") == 1
    finally:
        await conn.close()


async def test_concurrent_runners_apply_each_migration_once(forge_db_url):
    migs = [mig.Migration("demo", i, f"t{i}", f"CREATE TABLE demo_t{i} (id int)") for i in range(1, 8)]
    conns = [await connect(forge_db_url) for _ in range(6)]
    try:
        results = await asyncio.gather(*(mig.migrate(c, migs) for c in conns))
        assert sorted(m.version for r in results for m in r) == list(range(1, 8))
    finally:
        for c in conns:
            await c.close()


async def test_waiting_for_another_nodes_migrations_outlasts_a_statement_timeout(forge_db_url):
    """Managed servers set statement_timeout; a node waiting for another node's long migrations
    must not be cancelled by it. Before: pg_advisory_lock waited in one statement and failed with
    'canceling statement due to statement timeout'."""
    holder, waiter = await connect(forge_db_url), await connect(forge_db_url)
    try:
        await waiter.execute("SET statement_timeout = '200ms'")
        await holder.execute("SELECT pg_advisory_lock($1)", mig.LOCK_KEY)  # another node migrating
        waiting = asyncio.create_task(mig.migrate(waiter, [M1]))
        await asyncio.sleep(1.0)  # five statement timeouts
        assert not waiting.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", mig.LOCK_KEY)
        assert await asyncio.wait_for(waiting, 30) == [M1]
    finally:
        await holder.close()
        await waiter.close()


def test_cli_migrate_and_status(tmp_path, forge_db_url):
    (tmp_path / "forge.toml").write_text(f'[database]\nurl = "{forge_db_url}"\n')
    run = lambda *a: subprocess.run([sys.executable, "-m", "forge_kernel.cli", *a], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=60)
    status = run("migrate", "--status")
    assert status.returncode == 1 and "pending" in status.stdout
    applied = run("migrate")
    assert applied.returncode == 0 and "kernel 0001_nodes" in applied.stdout, applied.stderr
    status = run("migrate", "--status")
    assert status.returncode == 0 and "applied" in status.stdout and "pending" not in status.stdout


async def test_a_migration_of_only_comments_is_recorded_not_a_crash(forge_db_url):
    # a placeholder migration ("-- nothing yet", or every statement commented out) is valid SQL for
    # psql; asyncpg's simple-query path fails on the server's empty-query answer
    empty = mig.Migration("demo_empty", 1, "placeholder", "-- nothing to do yet\n/* later */\n")
    then = mig.Migration("demo_empty", 2, "real", "CREATE TABLE demo_after_empty (id int)")
    conn = await connect(forge_db_url)
    try:
        assert await mig.migrate(conn, [empty, then]) == [empty, then]
        assert [s.state for s in await mig.status(conn, [empty, then])] == ["applied", "applied"]
        assert await conn.fetchval("SELECT to_regclass('demo_after_empty')") is not None
    finally:
        await conn.close()
