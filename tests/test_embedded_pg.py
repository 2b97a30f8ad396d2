"""The embedded PostgreSQL: started or reused under .forge/, shared by processes, stopped by the last."""

import json
import signal
import subprocess
import sys

import asyncpg

from forge_kernel.embedded_pg import EmbeddedPostgres
from forge_kernel.testing import wait_for


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

    env = {**os.environ, "FORGE_LOG__LEVEL": "INFO", "FORGE_DISABLE_PLUGIN_AUTOLOAD": "1",
           "FORGE_READY_FILE": str(tmp_path / "ready.json")}
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
    assert url == f"postgresql://postgres@/postgres?host={sock_dir}&port=5432&passfile={tmp_path / '.forge' / 'pgpass'}"
    assert (tmp_path / ".forge" / "pgpass").read_text().split(":")[-1].strip() not in out
    assert "applied" in out and "example/0001_todos" in out
    # the server is stopped with the last node that used it
    wait_for(lambda: not pidfile.exists(), 30, what="embedded PostgreSQL to stop")
    assert not (sock_dir / ".s.PGSQL.5432").exists(), "embedded PostgreSQL still has its socket"
