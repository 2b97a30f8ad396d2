"""The pytest plugin (forge_kernel.testing.fixtures) cleans up after a session that is told to stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

INNER = textwrap.dedent('''
    import asyncio, os, time
    import asyncpg

    def test_holds_the_embedded_server(forge_database_url):
        async def data_directory():
            conn = await asyncpg.connect(forge_database_url)
            try:
                return await conn.fetchval("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
            finally:
                await conn.close()
        folder = asyncio.run(data_directory())
        with open(os.path.join(folder, "postmaster.pid")) as fh:
            pid = fh.readline().strip()
        with open(os.environ["FORGE_PIDFILE"], "w") as fh:
            fh.write(pid)
        time.sleep(600)
''')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_sigtermed_session_stops_the_embedded_postgresql_it_started(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    pidfile = tmp_path / "postmaster.pid"
    env = {k: v for k, v in os.environ.items() if k != "FORGE_TEST_DATABASE_URL"}  # its own embedded server
    env["FORGE_PIDFILE"] = str(pidfile)
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    postmaster = None
    try:
        deadline = time.monotonic() + 120
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            assert session.poll() is None, session.stdout.read().decode()
            time.sleep(0.1)
        postmaster = int(pidfile.read_text())
        assert _alive(postmaster)
        session.send_signal(signal.SIGTERM)
        session.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _alive(postmaster) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(postmaster), "the embedded PostgreSQL outlived the SIGTERMed session"
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
        if postmaster is not None and _alive(postmaster):
            os.kill(postmaster, signal.SIGKILL)
