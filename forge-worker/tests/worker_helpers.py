"""Shared helpers for the forge-worker tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

FAST = {"heartbeat_interval": 0.1, "poll_interval": 0.2, "rescue_interval": 0.5, "backoff_base": 0.01,
        "backoff_max": 0.05, "shutdown_timeout": 2.0}


def worker_config(**worker: Any) -> dict[str, dict[str, Any]]:
    return {"node": {"roles": ["worker"], "heartbeat_interval": 0.2},
            "worker": {**FAST, **worker}}


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


async def log_rows(pool, **where: Any) -> list[Any]:
    cond = " AND ".join(f"{k} = ${i + 1}" for i, k in enumerate(where)) or "true"
    return await pool.fetch(f"SELECT * FROM job_log WHERE {cond} ORDER BY seq", *where.values())
