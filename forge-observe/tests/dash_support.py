"""Helpers shared by the dashboard tests: a node with the dashboard app, HTTP, seeded rows."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import asyncpg
import httpx

APPS = str(Path(__file__).parent / "apps")
ENV = {"PYTHONPATH": APPS + os.pathsep + os.environ.get("PYTHONPATH", ""), "FORGE_LOG__LEVEL": "WARNING"}
ADMIN_KEY = "dash-admin-key-0123456789abcdef"
READ_KEY = "dash-read-key-0123456789abcdef"
JWT_SECRET = "dash-jwt-secret-which-must-never-show-0123456789"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config(*, secured: bool, **dashboard: Any) -> dict[str, dict[str, Any]]:
    """A node running every role with the dashboard app; ``secured`` sets admin and read-only API keys."""
    cfg: dict[str, dict[str, Any]] = {
        "app": {"modules": ["dash_app"], "example": False},
        "observe": {"flush_interval": 0.5, "write_interval": 0.05, "sample_rate": 1.0, "cluster_interval": 1.0},
        "worker": {"poll_interval": 0.2},
        "workflows": {"poll_interval": 0.2, "heartbeat_interval": 0.2, "suspend_after": 0.2, "step_backoff": 0.01},
        "dashboard": dict(dashboard),
    }
    if secured:
        cfg["gateway"] = {"api_keys": [{"name": "ops", "sha256": sha(ADMIN_KEY), "roles": ["forge-admin"]},
                                       {"name": "viewer", "sha256": sha(READ_KEY), "roles": ["forge-read"]}],
                          "jwt_secret": JWT_SECRET}
        cfg["dashboard"].setdefault("admin_roles", ["forge-admin"])
        cfg["dashboard"].setdefault("read_roles", ["forge-read"])
    return cfg


def base_url(proc: Any) -> str:
    return f"http://127.0.0.1:{proc.ready_info()['ports']['http']}"


def client(proc: Any, key: str | None = None) -> httpx.AsyncClient:
    headers = {"X-API-Key": key} if key else {}
    return httpx.AsyncClient(base_url=base_url(proc), headers=headers, timeout=30, follow_redirects=False)


async def db(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url)
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    return conn


async def seed_jobs(conn: asyncpg.Connection) -> dict[str, list[int]]:
    """Jobs in every live state and a few finished ones, written as the worker's tables hold them."""
    out: dict[str, list[int]] = {}
    for status, name, queue, n in (("dead", "flaky_mail", "mail", 3), ("scheduled", "ship_order", "shipping", 2),
                                   ("pending", "slow_report", "paused-later", 2)):
        rows = await conn.fetch(
            """INSERT INTO forge_jobs (name, queue, args, status, run_at, attempt, max_attempts, last_error)
               SELECT $1, $2, CASE WHEN $1 = 'flaky_mail' THEN jsonb_build_object('to', 'user' || g || '@example.com') WHEN $1 = 'ship_order' THEN jsonb_build_object('item', 'book ' || g) ELSE jsonb_build_object('n', 30 + g) END, $3,
                      CASE WHEN $3 = 'scheduled' THEN now() + interval '1 day' ELSE now() END,
                      CASE WHEN $3 = 'dead' THEN 1 ELSE 0 END, 1,
                      CASE WHEN $3 = 'dead' THEN 'RuntimeError: mail server refused' END
               FROM generate_series(1, $4) g RETURNING id""", name, queue, status, n)
        out[status] = [r["id"] for r in rows]
    return out
