"""The other ways in: HTTP (the forge.workflows.* functions need an authenticated admin) and the
forge-node workflows CLI, against a real node process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx

from forge_kernel.testing.procs import write_config
from forge_worker import WorkflowClient

from worker_helpers import WF_FAST

APPS = str(Path(__file__).parent / "apps")
ENV = {"PYTHONPATH": APPS + os.pathsep + os.environ.get("PYTHONPATH", ""), "FORGE_LOG__LEVEL": "WARNING"}
ADMIN, USER = "admin-key-0123456789", "user-key-0123456789"


def _key(name: str, secret: str, roles: list[str]) -> dict:
    return {"name": name, "sha256": hashlib.sha256(secret.encode()).hexdigest(), "roles": roles}


async def test_http_needs_an_admin_and_the_cli_manages_runs(forge_processes, tmp_path):
    node = forge_processes({"node": {"roles": ["gateway", "function", "worker"]},
                            "app": {"modules": ["workflow_app"], "example": False},
                            "gateway": {"api_keys": [_key("ops", ADMIN, ["admin"]), _key("app", USER, [])]},
                            "workflows": WF_FAST}, env=ENV)
    base = f"http://127.0.0.1:{node.ready_info()['ports']['http']}"
    start = {"workflow": "approval", "args": json.dumps({"timeout": 60}), "idempotency_key": "http-1",
             "correlation_key": "o-9"}
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        r = await http.post("/rpc/forge.workflows.start", json=start)
        assert r.status_code == 401, r.text
        r = await http.post("/rpc/forge.workflows.start", json=start, headers={"X-API-Key": USER})
        assert r.status_code == 403 and "admin" in r.json()["error"]["message"], r.text
        r = await http.post("/rpc/forge.workflows.start", json=start, headers={"X-API-Key": ADMIN})
        assert r.status_code == 200, r.text
        run_id = r.json()["data"]
        again = await http.post("/rpc/forge.workflows.start", json=start, headers={"X-API-Key": ADMIN})
        assert again.json()["data"] == run_id
        bad = await http.post("/rpc/forge.workflows.start", json={"workflow": "nope"}, headers={"X-API-Key": ADMIN})
        assert bad.status_code == 400 and "no workflow named 'nope'" in bad.json()["error"]["message"]
        r = await http.post("/rpc/forge.workflows.send_event", json={"target": "o-9", "name": "approved",
                                                                   "payload": json.dumps({"ok": True})},
                            headers={"X-API-Key": ADMIN})
        assert r.json() == {"data": 1}, r.text
        r = await http.post("/rpc/forge.workflows.get", json={"run_id": run_id}, headers={"X-API-Key": ADMIN})
        assert r.json()["data"]["name"] == "approval" and r.json()["data"]["correlation_key"] == "o-9", r.text
    pool = await asyncpg.create_pool(forge_processes.db_url, min_size=1, max_size=2)
    try:
        info = await WorkflowClient(pool).wait(run_id, timeout=30)
        assert info.result == {"name": "approved", "payload": {"ok": True}}
        cfg = write_config(tmp_path / "cli.toml", {"database": {"url": forge_processes.db_url},
                                                   "app": {"modules": ["workflow_app"], "example": False}})
        env = {**os.environ, **ENV, "FORGE_CONFIG": str(cfg)}

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "forge_kernel.cli", "workflows", *args], env=env,
                                  capture_output=True, text=True, timeout=120)

        out = cli("start", "booking", "--args", json.dumps({"sleep": 30}), "--idempotency-key", "cli-1")
        assert out.returncode == 0, out.stdout + out.stderr
        booked = out.stdout.strip()
        out = cli("show", booked)
        assert json.loads(out.stdout)["name"] == "booking"
        out = cli("cancel", booked)
        assert out.returncode == 0 and "cancel requested" in out.stdout, out.stdout
        info = await WorkflowClient(pool).wait(booked, timeout=30)
        assert info.status == "cancelled"
        out = cli("list", "--status", "cancelled")
        assert booked in out.stdout and "cancelled" in out.stdout
        out = cli("steps", booked)
        assert "c:1" in out.stdout and "compensation" in out.stdout, out.stdout
        out = cli("send", "no-such-run", "approved")
        assert out.returncode == 1 and "no live workflow run" in out.stdout
        out = cli("check")
        assert out.returncode == 0 and "0 problem(s)" in out.stdout, out.stdout
    finally:
        await pool.close()
