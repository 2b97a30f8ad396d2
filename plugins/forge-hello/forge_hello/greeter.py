"""The work: store a greeting now and then. Plain code, testable without pluggy."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import attrs

from forge_kernel.config import in_range


@attrs.frozen
class HelloConfig:
    greeting: str = "hello"
    #: seconds between greetings
    every: float = attrs.field(default=60.0, validator=in_range(0.01, 86400))


async def greet_once(pool: Any, node_id: str, greeting: str) -> int:
    return await pool.fetchval(
        "INSERT INTO hello_greetings (node_id, greeting) VALUES ($1, $2) RETURNING id", node_id, greeting)


@contextlib.asynccontextmanager
async def greeter(node: Any):
    cfg: HelloConfig = node.config["hello"]

    async def loop() -> None:
        while True:
            await greet_once(node.pool, node.id, cfg.greeting)
            await asyncio.sleep(cfg.every)

    node.supervisor.spawn("hello-greeter", loop, service="hello")
    yield
