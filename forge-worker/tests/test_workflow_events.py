"""Events are a mailbox: 10,000 trials of the real wait/send statements racing each other (the
event sent before the wait begins, while it begins, or after the run went to sleep) lose no
event and deliver none twice; and a run never sleeps on an event already sent."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import pytest

from forge_kernel.migrations import migrate
from forge_kernel.db import create_pool
from forge_worker.config import WorkflowConfig
from forge_worker.hooks import forge_migrations
from forge_worker.workflows import store
from forge_worker.workflows.context import Park, Suspended, WorkflowContext, new_scope
from forge_worker.workflows.runtime import WRITERS, Execution, WorkflowRuntime, Writer
from forge_worker.workflows.store import WorkflowEngine


TRIALS = 10_000
PARALLEL = 40


class _Runtime:
    """What an Execution needs of the runtime, without claim loops."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.config = WorkflowConfig()
        self.node_id = "events-test"
        self.writer = Writer(pool, self.config.lease, self.node_id, "on")
        self.stats = {"checkpoints": 0, "suspended": 0}

    def suspended(self, run_at) -> None:
        self.stats["suspended"] += 1

    resolve = WorkflowRuntime.resolve


CLAIM_ONE = """UPDATE forge_workflow_runs SET status = 'running', claims = claims + 1, node_id = 'events-test',
                      lease_until = now() + interval '30 seconds', wait = NULL, wait_events = NULL
               WHERE id = $1 AND status IN ('pending', 'waiting') AND run_at <= now()
               RETURNING id, name, version, args::text AS args, claims, steps_done, compensating, cancel_requested,
                         caller, error"""


async def _wait_once(rt: _Runtime, row, history) -> object:
    """One execution of a run whose code is ``await ctx.wait_for_event("go")``, parked as the
    runtime parks it (asleep, or handed back due at once when an event arrived meanwhile)."""
    new_scope()
    x = Execution.from_row(rt, row)
    ctx = WorkflowContext(x, history)
    try:
        return await ctx.wait_for_event("go")
    except Park as park:
        await x.suspend(park.until, park.wait, park.events, park.seen)  # raises Suspended when asleep
        assert await x.fenced(store.RELEASE + " RETURNING id")
        raise Suspended() from None


async def _history(pool, run_id):
    from forge_worker.workflows.context import Record

    rows = await pool.fetch(store.HISTORY, run_id)
    return {r["key"]: Record(r["key"], r["name"], r["kind"], r["status"], store.loads(r["result"]), r["error"],
                             r["attempts"]) for r in rows}


async def _trial(rt: _Runtime, pool, engine: WorkflowEngine, rng: random.Random) -> str:
    (run_id,) = await engine.start(pool, [_req()])
    rid = uuid.UUID(run_id)
    row = await pool.fetchrow(CLAIM_ONE, rid)
    mode = rng.choice(["before", "during", "after"])

    async def send() -> None:
        if mode == "during":
            await asyncio.sleep(rng.random() * 0.004)
        await engine.send_event(pool, run_id, "go", {"n": run_id})

    async def wait() -> object:
        current = row
        for _ in range(50):
            try:
                return await _wait_once(rt, current, await _history(pool, rid) if current["claims"] > 1 else {})
            except Suspended:
                pass
            # asleep: only an event makes it due (no timeout); claim it as a worker would once woken
            for _ in range(2000):
                current = await pool.fetchrow(CLAIM_ONE, rid)
                if current is not None:
                    break
                if mode == "after" and not sent.done():
                    sent_now.set()
                await asyncio.sleep(0.001)
            else:
                raise AssertionError(f"run {rid} ({mode}) sleeps although its event was sent: lost wake-up")
        raise AssertionError("too many rounds")

    sent_now = asyncio.Event()
    if mode == "before":
        await send()
        sent = asyncio.get_running_loop().create_future()
        sent.set_result(None)
        got = await wait()
    elif mode == "during":
        sent = asyncio.ensure_future(send())
        got = await wait()
        await sent
    else:
        async def send_after() -> None:
            await sent_now.wait()
            await send()

        sent = asyncio.ensure_future(send_after())
        got = await wait()
        await sent
    assert got is not None and got.payload == {"n": run_id}, (mode, got)
    return mode


def _req():
    from forge_kernel.executor import WorkflowRequest

    return WorkflowRequest(name="mailbox", args={})


@pytest.mark.timeout(600)
async def test_10000_send_and_wait_races_lose_no_event_and_deliver_none_twice(forge_db_url):
    conn = await asyncpg.connect(forge_db_url)
    try:
        from forge_kernel.kernel_plugin import forge_migrations as kernel_migrations

        await migrate(conn, list(kernel_migrations()) + list(forge_migrations()))
    finally:
        await conn.close()
    pool = await create_pool(forge_db_url, min_size=PARALLEL, max_size=PARALLEL + 10)
    writers: list = []
    try:
        rt, engine, rng = _Runtime(pool), WorkflowEngine(), random.Random(12)
        writers = [asyncio.ensure_future(rt.writer.loop()) for _ in range(WRITERS)]
        modes: dict[str, int] = {}
        left = TRIALS

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                mode = await _trial(rt, pool, engine, rng)
                modes[mode] = modes.get(mode, 0) + 1

        await asyncio.gather(*(worker() for _ in range(PARALLEL)))
        events = await pool.fetchrow(
            """SELECT count(*) AS sent, count(consumed_key) AS consumed, count(DISTINCT run_id) AS runs
               FROM forge_workflow_events""")
        waits = await pool.fetchrow(
            """SELECT count(*) FILTER (WHERE status = 'succeeded') AS delivered,
                      count(*) FILTER (WHERE status = 'waiting') AS waiting FROM forge_workflow_steps""")
        print(f"\nmailbox: {TRIALS} trials {modes}; events sent {events['sent']}, consumed {events['consumed']}; "
              f"waits delivered {waits['delivered']}; runs that slept first {rt.stats['suspended']}")
        assert events["sent"] == events["consumed"] == events["runs"] == TRIALS
        assert waits["delivered"] == TRIALS and waits["waiting"] == 0
        assert all(modes.get(m) for m in ("before", "during", "after"))
    finally:
        for w in writers:
            w.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        await pool.close()
