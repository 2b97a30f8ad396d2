"""Helpers shared by the scheduler tests (a unique module name: every package's tests share sys.path)."""

import asyncio
import time

#: in-process nodes load only the scheduler and the test job store, whatever else is installed
ISOLATED = {"FORGE_DISABLE_PLUGIN_AUTOLOAD": "1", "FORGE_PLUGINS": "forge_scheduler.hooks,sched_fake_store"}
FAST = {"election_interval": 0.1, "renew_interval": 0.2, "tick_interval": 0.1, "check_timeout": 10.0}


async def eventually(predicate, timeout=15.0, interval=0.05, what="condition"):
    """Poll an async predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
