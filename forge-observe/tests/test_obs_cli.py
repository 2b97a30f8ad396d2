"""``forge-node logs``, ``traces show``, ``traces list`` and ``metrics`` as a user runs them: real
subprocesses against what a real node stored."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx

from forge_kernel.testing.procs import eventually

from obs_support import ENV, FAST, rows

APP = {"modules": ["obs_app"], "example": False}


def _cli(node, *args: str) -> tuple[int, str]:
    env = {**os.environ, **ENV, "FORGE_CONFIG": str(node.workdir / "forge.toml")}
    p = subprocess.run([sys.executable, "-m", "forge_kernel.cli", *args], env=env, cwd=node.workdir,
                       capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


async def test_logs_traces_and_metrics_commands_against_a_running_node(forge_processes, forge_db_url):
    node = forge_processes({"app": APP, "node": {"roles": ["gateway", "function"]},
                            "observe": {**FAST, "sample_rate": 0.0}}, node_id="cli-node", env=ENV)
    port = node.ready_info()["ports"]["http"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        for _ in range(3):
            assert (await http.post("/rpc/ping", json={})).status_code == 200
        failed = await http.post("/rpc/boom", json={})
        assert (await http.post("/rpc/shout", json={"size": 10})).status_code == 200
    assert failed.status_code == 500
    trace_id = failed.headers["traceparent"].split("-")[1]

    async def stored():
        return len(await rows(forge_db_url, "SELECT 1 FROM forge_obs_logs WHERE message IN ('about to fail', $1)",
                              "x" * 10)) == 2 and await rows(
            forge_db_url, "SELECT 1 FROM forge_obs_spans WHERE trace_id = $1", trace_id)

    await eventually(stored, what="the node's logs and the failed call's trace in the database")

    code, out = await asyncio.to_thread(_cli, node, "logs", "--level", "ERROR", "--json")
    errors = _json_lines(out)
    assert code == 0 and errors and {r["level"] for r in errors} <= {"ERROR", "CRITICAL"}
    assert any(r["message"] == "about to fail" and r["trace_id"] == trace_id for r in errors)
    assert not any(r["message"] == "x" * 10 for r in errors)

    code, out = await asyncio.to_thread(_cli, node, "logs", "--text", "X" * 10, "--node", "cli-node")
    assert code == 0 and "x" * 10 in out and "about to fail" not in out
    code, out = await asyncio.to_thread(_cli, node, "logs", "--node", "some-other-node", "--json")
    assert code == 0 and not _json_lines(out)
    code, out = await asyncio.to_thread(_cli, node, "logs", "--trace", trace_id, "--json")
    in_trace = _json_lines(out)  # the function's line, then the executor's report of the exception
    assert code == 0 and in_trace[0]["message"] == "about to fail" and "boom raised" in in_trace[1]["message"]
    assert {r["trace_id"] for r in in_trace} == {trace_id} and len(in_trace) == 2
    code, out = await asyncio.to_thread(_cli, node, "logs", "--since", "5 fortnights")
    assert code == 2 and "--since takes a duration" in out

    code, out = await asyncio.to_thread(_cli, node, "traces", "show", trace_id)
    lines = out.splitlines()
    root = next(i for i, line in enumerate(lines) if line.startswith("POST /rpc/boom [server] cli-node"))
    assert code == 0 and lines[root + 1].startswith("  boom [internal] cli-node") and "ERROR INTERNAL" in lines[root + 1]
    code, out = await asyncio.to_thread(_cli, node, "traces", "show", "0" * 31 + "1")
    assert code == 1 and "no stored spans" in out
    code, out = await asyncio.to_thread(_cli, node, "traces", "list", "--errors", "--json")
    listed = json.loads(out[out.index("["):])
    assert code == 0 and [t["trace_id"] for t in listed] == [trace_id]
    assert listed[0]["root"] == "POST /rpc/boom" and listed[0]["errors"] >= 1

    async def summary():
        code, out = await asyncio.to_thread(_cli, node, "metrics", "--json")
        fns = {f["function"]: f for f in json.loads(out[out.index("{"):])["functions"]} if code == 0 else {}
        return fns if fns.get("ping", {}).get("calls") == 3 else None

    fns = await eventually(summary, timeout=30, what="the metrics summary with every call")
    assert fns["boom"]["calls"] == 1 and fns["boom"]["errors"] == 1 and fns["ping"]["errors"] == 0
    code, out = await asyncio.to_thread(_cli, node, "metrics")
    assert code == 0 and "ping" in out and "FUNCTION" in out


async def test_logs_follow_prints_new_records_until_interrupted(forge_processes):
    node = forge_processes({"app": APP, "node": {"roles": ["gateway", "function"]}, "observe": FAST}, env=ENV)
    port = node.ready_info()["ports"]["http"]
    env = {**os.environ, **ENV, "FORGE_CONFIG": str(node.workdir / "forge.toml")}
    follow = subprocess.Popen([sys.executable, "-m", "forge_kernel.cli", "logs", "--follow", "--json", "--text", "y" * 12,
                               "--since", "1s", "--interval", "0.2"], env=env, cwd=node.workdir,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              # a suite started in the background (`.ci/run &`) has SIGINT ignored, and the
                              # command would inherit that and never see the interrupt below
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            await asyncio.sleep(2.0)  # the command is up and has printed what matched before
            for size in (12, 13):
                assert (await http.post("/rpc/shout", json={"size": size, "letter": "y"})).status_code == 200
        seen = []
        while len(seen) < 2:
            line = await asyncio.wait_for(asyncio.to_thread(follow.stdout.readline), 30)
            assert line, "the command ended before printing the new records"
            if line.startswith("{"):
                seen.append(json.loads(line)["message"])
        assert seen == ["y" * 12, "y" * 13]
        follow.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(follow.wait, 20) == 0
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait(10)
