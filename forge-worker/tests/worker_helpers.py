"""Shared helpers for the forge-worker tests."""

from __future__ import annotations

from typing import Any

from forge_kernel.testing import eventually  # noqa: F401  (re-exported for the tests)

FAST = {"heartbeat_interval": 0.1, "poll_interval": 0.2, "rescue_interval": 0.5, "backoff_base": 0.01,
        "backoff_max": 0.05, "shutdown_timeout": 2.0}


def worker_config(**worker: Any) -> dict[str, dict[str, Any]]:
    return {"node": {"roles": ["worker"], "heartbeat_interval": 0.2},
            "worker": {**FAST, **worker}}


async def log_rows(pool, **where: Any) -> list[Any]:
    cond = " AND ".join(f"{k} = ${i + 1}" for i, k in enumerate(where)) or "true"
    return await pool.fetch(f"SELECT * FROM job_log WHERE {cond} ORDER BY seq", *where.values())


WF_FAST = {"heartbeat_interval": 0.2, "poll_interval": 0.2, "rescue_interval": 0.5, "step_backoff": 0.01,
           "step_backoff_max": 0.05, "suspend_after": 0.3}


def workflow_config(**workflows: Any) -> dict[str, dict[str, Any]]:
    cfg = worker_config()
    cfg["workflows"] = {**WF_FAST, **workflows}
    return cfg
