"""The workflow of tests/test_pooler.py's cluster flow, beside ``pooled_app`` (whose ``pa_log`` it
writes to): ``wf_order``'s ``wf_hold`` step waits on its first run (its worker is SIGKILLed
mid-step) and returns at once when the run is resumed elsewhere. A module of its own: a worker
node with a workflow registered holds more pool connections (the workflow runtime's writers and
loops) than the small pools of the other pooler tests have.
"""

from __future__ import annotations

import asyncio

from forge_kernel import action, mutation, workflow
from pooled_app import _log


# its steps log each time their function really runs
@mutation(public=True)
async def wf_note(ctx, run: str, event: str) -> int:
    """Log ``event`` for the run; how often it has been logged for the run, this time included."""
    await _log(ctx, event, run)
    return await ctx.db.fetchval("SELECT count(*) FROM pa_log WHERE event = $1 AND ref = $2", event, run)


@mutation(public=True)
async def wf_reserve(ctx, run: str, item: str) -> str:
    await _log(ctx, "wf-reserve", run)
    return f"reserved {item}"


@action(public=True, timeout=600)
async def wf_hold(ctx, run: str) -> str:
    """Waits on its first run (without a transaction open): its worker is killed meanwhile."""
    if await ctx.mutation(wf_note, run=run, event="wf-hold") == 1:
        await asyncio.sleep(600)
    return "held"


@mutation(public=True)
async def wf_ship(ctx, run: str, item: str) -> str:
    await _log(ctx, "wf-ship", run)
    return f"shipped {item}"


@workflow
async def wf_order(ctx, item: str) -> list[str]:
    run = str(ctx.run_id)
    reserved = await ctx.step(wf_reserve, run=run, item=item)
    held = await ctx.step(wf_hold, run=run, retries=0)
    return [reserved, held, await ctx.step(wf_ship, run=run, item=item)]


@mutation(public=True)
async def start_order_workflow(ctx, item: str) -> str:
    return await ctx.start_workflow(wf_order, item=item, idempotency_key=f"order-{item}")
