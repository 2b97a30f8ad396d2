"""``forge-node crons ...`` as a user runs it (a real subprocess against the test database)."""

import json
import os
import subprocess
import sys

import pytest
from sched_helpers import ISOLATED, eventually

from forge_kernel.testing.procs import write_config
from forge_scheduler import scheduler_of


@pytest.fixture
def crons_cli(tmp_path, forge_db_url):
    cfg = write_config(tmp_path / "forge.toml", {"database": {"url": forge_db_url},
                                                 "app": {"modules": ["sched_app"], "example": False}})
    env = {**os.environ, **ISOLATED, "FORGE_CONFIG": str(cfg)}

    def run(*args):
        p = subprocess.run([sys.executable, "-m", "forge_kernel.cli", "crons", *args], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout + p.stderr

    return run


async def test_crons_cli_without_tables_says_to_migrate(crons_cli):
    code, out = crons_cli("list")
    assert code == 2 and "forge-node migrate" in out


async def test_crons_cli_against_a_running_leader(sched_node, crons_cli, forge_db_url):
    node = await sched_node(scheduler={"tick_interval": 0.1})
    await eventually(lambda: _v(scheduler_of(node).election.is_leader), what="leadership")
    # The crons CLI runs as a blocking subprocess, which stops this node's loop while it runs: wait
    # for the leader's first tick (it marks the crons it defines) before asking, or `list` may
    # read the state between taking the lead and that tick, when `defined` is rightly unknown.
    await eventually(lambda: node.pool.fetchval("SELECT defined FROM forge_cron_state WHERE cron = 'morning'"),
                     what="the leader's first tick marking its crons")

    code, out = crons_cli("leader")
    assert code == 0 and f"leader {node.id} term 1" in out

    code, out = crons_cli("list", "--json")
    listed = {c["name"]: c for c in json.loads(out[out.index("["):])}
    assert code == 0 and set(listed) == {"every_second", "morning"}
    assert listed["morning"]["timezone"] == "Europe/Berlin" and listed["morning"]["next_slot"]

    code, out = crons_cli("pause", "morning")
    assert code == 0 and "paused" in out
    code, out = crons_cli("trigger", "morning")
    assert code == 0 and "run requested" in out

    async def manual_run():
        return await node.pool.fetchrow("SELECT * FROM forge_cron_runs WHERE cron = 'morning' AND kind = 'manual'")

    run = await eventually(manual_run, what="the triggered run")
    assert run["status"] == "queued" and run["job_id"] is not None

    code, out = crons_cli("history", "morning")
    assert code == 0 and "manual" in out and "queued" in out.lower()
    await node.pool.execute("UPDATE forge_cron_runs SET status = 'succeeded', duration_ms = 1234.56789 "
                            "WHERE id = $1", run["id"])
    code, out = crons_cli("history", "morning")
    assert code == 0 and " 1235 " in out and "1234.5" not in out  # rounded for reading
    code, out = crons_cli("history", "morning", "--json")
    assert code == 0 and json.loads(out)[0]["duration_ms"] == 1234.56789

    code, out = crons_cli("leader", "--json")
    leader = json.loads(out)
    assert code == 0 and leader["node_id"] == node.id and leader["term"] == 1
    assert isinstance(leader["renewed_age"], float) and leader["since"].startswith("20")
    code, out = crons_cli("resume", "morning")
    assert code == 0 and "resumed" in out
    assert await node.pool.fetchval("SELECT paused FROM forge_cron_state WHERE cron = 'morning'") is False

    code, out = crons_cli("trigger", "nope")
    assert code == 1 and "no cron named 'nope'" in out and "every_second" in out
    code, out = crons_cli("history", "nope")
    assert code == 1 and "no cron named 'nope'" in out
    assert listed["morning"]["defined"] is True  # the running leader defines it


async def _v(value):
    return value
