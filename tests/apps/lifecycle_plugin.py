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
        if name == "c":  # the first to stop: the node must already show as draining
            conn = await node.connect()  # not the pool: another test holds all of it
            try:
                status = await conn.fetchval("SELECT status FROM forge_nodes WHERE id = $1", node.id)
            finally:
                await conn.close()
            _event(f"status while stopping {status}")
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

    @contextlib.asynccontextmanager
    async def hang_lifespan(node):
        _event("start hang")
        yield
        _event("hang stopping")
        await asyncio.Event().wait()  # never stops: the drain timeout must cut it off

    @contextlib.asynccontextmanager
    async def hog_lifespan(node):
        # once the node runs, take every pooled connection: the heartbeat must not need one
        held = []

        async def take_all():
            while node.status != "running":
                await asyncio.sleep(0.05)
            for _ in range(node.pool.get_max_size()):
                held.append(await node.pool.acquire())
            _event("pool exhausted")

        task = asyncio.get_running_loop().create_task(take_all())
        yield
        task.cancel()
        for conn in held:
            await node.pool.release(conn)

    hang = [Service("hang", hang_lifespan, role="lifecycle")] if os.environ.get("FORGE_TEST_HANG") else []
    hang += [Service("hog", hog_lifespan, role="lifecycle")] if os.environ.get("FORGE_TEST_HOG") else []
    # declared out of order on purpose: the kernel sorts by `after`
    return hang + [
        Service("c", _svc("c"), role="lifecycle", after=("b",)),
        Service("a", _svc("a"), role="lifecycle"),
        Service("b", _svc("b"), role="lifecycle", after=("a",)),
        Service("flaky", flaky_lifespan, role="lifecycle"),
        Service("never", _svc("never"), role="not-run-here"),
    ]
