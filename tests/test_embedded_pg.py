"""The embedded PostgreSQL: started or reused under .forge/, shared by processes, stopped by the last."""

import json
import signal
import socket
import subprocess
import sys
import threading

import asyncpg
from loguru import logger

from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.testing import free_port, wait_for


CHILD = """
import sys
from forge_kernel.embedded_pg import EmbeddedPostgres
pg = EmbeddedPostgres(__import__("pathlib").Path(sys.argv[1]))
print(pg.start(), pg.started_here, flush=True)
sys.stdin.read()
"""


async def test_start_reuse_and_stop(forge_pg_folder):
    root = forge_pg_folder / ".forge"
    pg = EmbeddedPostgres(root)
    url = pg.start()
    assert pg.initialized() and pg.started_here
    conn = await asyncpg.connect(url)
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
    # another process joins the running server instead of starting a second one
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().split() == [url, "False"]
    assert pg.release() is False  # the child still uses it
    assert pg._running_pid() is not None
    child.stdin.close()
    child.wait(30)
    # the last user leaves: stopped
    last = EmbeddedPostgres(root)
    assert last.start() == url and not last.started_here
    assert last.release() is True
    assert last._running_pid() is None
    # data and port survive a restart
    again = EmbeddedPostgres(root)
    assert again.start() == url and again.started_here
    # restart in place returns (a pg_ctl without a log file never did) and serves on the same port
    before = again._running_pid()
    again.restart()
    assert again._running_pid() not in (None, before)
    conn = await asyncpg.connect(url)
    assert await conn.fetchval("SELECT 1") == 1
    await conn.close()
    again.release()


def test_forge_node_start_in_an_empty_folder(forge_pg_folder):
    """`forge-node start` with no config: embedded PostgreSQL, example app, psql URL printed,
    database stopped on exit."""
    tmp_path = forge_pg_folder
    env_kw = dict(cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import os

    port = free_port()
    env = {**os.environ, "FORGE_LOG__LEVEL": "INFO", "FORGE_DISABLE_PLUGIN_AUTOLOAD": "1",
           "FORGE_READY_FILE": str(tmp_path / "ready.json"), "FORGE_DATABASE__EMBEDDED_PORT": str(port)}
    env.pop("FORGE_TEST_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "forge_kernel.cli", "start"], env=env, **env_kw)
    try:
        wait_for(lambda: (tmp_path / "ready.json").exists() or proc.poll() is not None, 120, what="node ready")
        assert proc.poll() is None, proc.stdout.read()
        info = json.loads((tmp_path / "ready.json").read_text())
        assert info["pid"] == proc.pid
        pidfile = tmp_path / ".forge" / "pgdata" / "postmaster.pid"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "embedded PostgreSQL initialised and started" in out
    # the URL names the socket folder and the password file, never the password
    url = out.split("connect with: psql '")[1].split("'")[0]
    sock_dir = tmp_path / ".forge" / "run"
    assert url == f"postgresql://postgres@/postgres?host={sock_dir}&port={port}&passfile={tmp_path / '.forge' / 'pgpass'}"
    assert f"also on 127.0.0.1:{port} (password in" in out  # [database] embedded_port
    assert (tmp_path / ".forge" / "pgpass").read_text().split(":")[-1].strip() not in out
    assert "applied" in out and "example/0001_todos" in out
    # the server is stopped with the last node that used it
    wait_for(lambda: not pidfile.exists(), 30, what="embedded PostgreSQL to stop")
    assert not (sock_dir / f".s.PGSQL.{port}").exists(), "embedded PostgreSQL still has its socket"
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "embedded PostgreSQL still accepts connections"


JOINER = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1], server_settings={"application_name": "joined-node"})
    print("connected", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    print(await conn.fetchval("SELECT 41 + 1"), flush=True)
    if sys.argv[2] == "leave":
        await conn.close()
    else:
        await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_the_owner_waits_for_nodes_that_joined_through_its_url(forge_pg_folder):
    """Issue 11 item 10: stopping the node that owns the embedded server does not pull the database
    out from under a process that joined through the printed URL: it warns, naming it, and waits
    (up to the drain timeout) for it to leave; one that never leaves is warned about again."""
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    pg = EmbeddedPostgres(forge_pg_folder / ".forge")
    url = pg.start()
    joiner = subprocess.Popen([sys.executable, "-c", JOINER, url, "leave"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert joiner.stdout.readline().strip() == "connected"
        releasing = threading.Thread(target=pg.release, kwargs={"wait": 120})
        releasing.start()
        wait_for(lambda: any("joined-node" in w for w in warnings), 30, what="the warning naming the joined node")
        # the owner is stopping, yet the joined node still has its database
        joiner.stdin.write("go\n")
        joiner.stdin.flush()
        assert joiner.stdout.readline().strip() == "42"
        releasing.join(60)
        assert not releasing.is_alive() and pg._running_pid() is None
        assert joiner.wait(30) == 0
        # a joined node that stays is warned about once the wait is over, then the server stops
        pg.start()
        stubborn = subprocess.Popen([sys.executable, "-c", JOINER, url, "stay"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert stubborn.stdout.readline().strip() == "connected"
            assert pg.release(wait=0.5) is True
            assert any("still attached" in w for w in warnings), warnings
        finally:
            stubborn.kill()
            stubborn.wait(10)
    finally:
        joiner.kill()
        logger.remove(sink)
        pg.release(wait=0)
