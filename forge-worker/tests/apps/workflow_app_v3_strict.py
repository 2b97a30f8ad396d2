"""``booking`` version 3 without the old code kept: version 2 runs that reach it are blocked."""

from __future__ import annotations

from forge_kernel import workflow

from workflow_app import effect, undo


@workflow(name="booking", version="3")
async def booking(ctx, fail_at: int = 0, sleep: float = 0.0, steps: int = 3) -> list[str]:
    await ctx.step(effect, run=ctx.run_id, step="charge", compensate=undo, name="charge")
    return [await ctx.step(effect, run=ctx.run_id, step="book", compensate=undo)]
