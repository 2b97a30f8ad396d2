"""What a production install gets: no test-only dependency (hypothesis comes with the ``testing``
extra), and a kernel, CLI, node and pytest plugin that work without it; FORGE's fixtures in
pytest-asyncio's default strict mode."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import signal
import subprocess
import sys
import textwrap

from packaging.requirements import Requirement

from forge_kernel.testing import free_port, wait_for

# run first in a child: the import system then refuses hypothesis, as on a node without the extra
NO_HYPOTHESIS = textwrap.dedent("""
    import sys

    class NoHypothesis:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("hypothesis", "_hypothesis_pytestplugin"):
                raise ImportError(f"No module named {name!r} (not installed here)")

    sys.meta_path.insert(0, NoHypothesis())
    """)


def test_hypothesis_is_only_in_the_testing_extra():
    reqs = [Requirement(r) for r in md.requires("forge-kernel") or []]
    plain = {r.name for r in reqs if r.marker is None}
    testing = {r.name for r in reqs if r.marker is not None and r.marker.evaluate({"extra": "testing"})}
    assert "hypothesis" not in plain, plain
    assert {"hypothesis", "pytest", "pytest-asyncio"} <= testing, testing


def test_kernel_cli_and_contracts_without_hypothesis(tmp_path):
    code = NO_HYPOTHESIS + textwrap.dedent("""
        import forge_kernel, forge_kernel.testing, forge_kernel.testing.fixtures, forge_kernel.cli
        from forge_kernel.plugins import PluginLoader
        loader = PluginLoader().load()
        print(sorted(i.name for i in loader.loaded()))
        try:
            import forge_kernel.testing.contracts
        except ImportError as exc:
            print(exc)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    loaded, error = out.stdout.splitlines()
    assert {"gateway", "worker", "scheduler", "realtime"} <= set(eval(loaded))
    assert "pip install 'forge-kernel[testing]'" in error


def test_a_node_starts_without_hypothesis(tmp_path, forge_db_url):
    ready, port = tmp_path / "ready.json", free_port()
    env = {**os.environ, "FORGE_DATABASE__URL": forge_db_url, "FORGE_GATEWAY__PORT": str(port),
           "FORGE_READY_FILE": str(ready)}
    proc = subprocess.Popen([sys.executable, "-c", NO_HYPOTHESIS + "from forge_kernel.cli import main\n"
                             "sys.exit(main(['start']))"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 90, what="node ready")
        assert proc.poll() is None, proc.stdout.read()
        assert "worker" in json.loads(ready.read_text())["roles"]
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out


def test_fixtures_in_strict_mode_and_without_hypothesis(tmp_path, forge_database_url):
    """A user's own project: no pytest configuration (so pytest-asyncio's strict mode), the
    pytest11 plugin loaded by itself, hypothesis not installed."""
    (tmp_path / "test_mine.py").write_text(textwrap.dedent("""
        import asyncpg
        import pytest

        @pytest.mark.asyncio
        async def test_fresh_database(forge_db_url):
            conn = await asyncpg.connect(forge_db_url)
            try:
                assert await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
            finally:
                await conn.close()
        """))
    # hypothesis's own pytest plugin and schemathesis' (which needs hypothesis) are not there either
    code = NO_HYPOTHESIS + ("import pytest\nsys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
                            "'-p', 'no:hypothesispytest', '-p', 'no:schemathesis', 'test_mine.py']))")
    env = {**os.environ, "FORGE_TEST_DATABASE_URL": forge_database_url}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr
