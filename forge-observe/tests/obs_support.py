"""Helpers shared by the forge-observe tests."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg

APPS = str(Path(__file__).parent / "apps")
ENV = {"PYTHONPATH": APPS + os.pathsep + os.environ.get("PYTHONPATH", ""), "FORGE_LOG__LEVEL": "WARNING"}
#: fast flushes so tests see stored rows within moments
FAST = {"flush_interval": 0.5, "write_interval": 0.05}


async def rows(url: str, sql: str, *args):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()
