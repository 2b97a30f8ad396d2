"""Versions without surprises: a run started on version 2 either keeps running version 2's
code (kept in ``previous``) or, when the new code diverges from its recorded steps, is
blocked naming the step and both versions; ``forge-node workflows check`` finds it first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from forge_kernel.testing.procs import write_config
from forge_worker import WorkflowClient
from forge_worker.workflows.check import check_runs
from forge_worker.config import WorkflowConfig

from worker_helpers import eventually, workflow_config

import workflow_app

APPS = str(Path(__file__).parent / "apps")


async def _asleep(client, run_id):
    info = await client.get(run_id, steps=False)
    return info if info.status == "waiting" else None


async def _v2_run_asleep_after_step_a(forge_node):
    old = await forge_node(modules=["workflow_app"], config=workflow_config())
    client = WorkflowClient(old.pool, old.registry)
    run_id = await client.start(workflow_app.booking, {"sleep": 2.0, "steps": 2})
    await eventually(lambda: _asleep(client, run_id), what="the run to sleep after step a")
    await old.stop()
    return run_id


async def test_new_code_that_diverges_blocks_the_run_and_check_finds_it(forge_node, tmp_path):
    run_id = await _v2_run_asleep_after_step_a(forge_node)
    new = await forge_node(modules=["workflow_app_v3_strict"], config=workflow_config())
    client = WorkflowClient(new.pool, new.registry)
    # before anything runs: the CI check replays the history against the new code and fails
    checked, problems = await check_runs(new.pool, new.registry, WorkflowConfig())
    assert checked == 1 and len(problems) == 1
    assert "at step 1 the run (version 2) recorded step effect but the code (version 3) asks for step charge" in str(problems[0])
    cfg = write_config(tmp_path / "forge.toml", {"database": {"url": _url(new)},
                                                  "app": {"modules": ["workflow_app_v3_strict"], "example": False}})
    env = {**os.environ, "PYTHONPATH": APPS + os.pathsep + os.environ.get("PYTHONPATH", ""), "FORGE_CONFIG": str(cfg)}
    out = subprocess.run([sys.executable, "-m", "forge_kernel.cli", "workflows", "check"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"DIVERGED run {run_id} (booking): at step 1" in out.stdout and "checked 1 run(s): 1 problem(s)" in out.stdout
    # the run itself, resumed by the new code, is blocked (never guessed), saying where and why
    await new.pool.execute("UPDATE forge_workflow_runs SET run_at = now() WHERE id = $1", run_id)

    async def blocked():
        info = await client.get(run_id, steps=False)
        return info if info.status == "blocked" else None

    info = await eventually(blocked, what="the run to be blocked")
    assert info.waiting_on.startswith("blocked: at step 1 the run (version 2) recorded step effect but the code "
                                      "(version 3) asks for step charge")
    assert await new.pool.fetchval("SELECT count(*) FROM wf_log WHERE run_id = $1", run_id) == 1  # only step a ran
    # cancelling a blocked run undoes what it did
    await client.cancel(run_id)
    assert (await client.wait(run_id)).status == "cancelled"
    assert [r["event"] for r in await new.pool.fetch("SELECT event FROM wf_log WHERE run_id = $1 ORDER BY seq",
                                                     run_id)] == ["ran", "undone"]


async def test_runs_keep_the_version_they_started_with_when_it_is_kept(forge_node):
    run_id = await _v2_run_asleep_after_step_a(forge_node)
    new = await forge_node(modules=["workflow_app_v3"], config=workflow_config())
    client = WorkflowClient(new.pool, new.registry)
    assert (await check_runs(new.pool, new.registry, WorkflowConfig()))[1] == []
    await new.pool.execute("UPDATE forge_workflow_runs SET run_at = now() WHERE id = $1", run_id)
    info = await client.wait(run_id)
    assert (info.status, info.version, info.result) == ("succeeded", "2", ["a-done", "b-done"])
    fresh = await client.start("booking", {})
    info = await client.wait(fresh)
    assert (info.status, info.version, info.result) == ("succeeded", "3", ["book-done"])


def _url(node) -> str:
    return node.url
