"""A test plugin: three services with dependencies that log start/stop, and a loop that crashes."""

import asyncio
import contextlib
import os

from forge_kernel import Service, hookimpl


def _event(text: str) -> None:
    with open(os.environ["FORGE_TEST_EVENTS"], "a") as fh:
        fh.write(text + "\n")


def _svc(name: str):
    @contextlib.asynccontextmanager
    async def lifespan(node):
        _event(f"start {name}")
        yield
        await asyncio.sleep(0.05)
        _event(f"stop {name}")

    return lifespan


@hookimpl
def forge_roles():
    return ["lifecycle"]


@hookimpl
def forge_services(node):
    crashes = {"n": 0}

    async def flaky():
        crashes["n"] += 1
        if crashes["n"] <= 2:
            raise RuntimeError(f"flaky crash {crashes['n']}")
        _event("flaky running")
        await asyncio.Event().wait()

    @contextlib.asynccontextmanager
    async def flaky_lifespan(node):
        node.supervisor.spawn("flaky-loop", flaky, service="flaky")
        yield

    # declared out of order on purpose: the kernel sorts by `after`
    return [
        Service("c", _svc("c"), role="lifecycle", after=("b",)),
        Service("a", _svc("a"), role="lifecycle"),
        Service("b", _svc("b"), role="lifecycle", after=("a",)),
        Service("flaky", flaky_lifespan, role="lifecycle"),
        Service("never", _svc("never"), role="not-run-here"),
    ]
