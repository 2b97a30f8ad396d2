"""A later deploy of ``booking``: version 3 charges before it books. Runs started on version 2
keep running version 2's code (``previous``)."""

from __future__ import annotations

from forge_kernel import workflow

import workflow_app
from workflow_app import effect, undo


@workflow(name="booking", version="3", previous={"2": workflow_app.booking})
async def booking(ctx, fail_at: int = 0, sleep: float = 0.0, steps: int = 3) -> list[str]:
    await ctx.step(effect, run=ctx.run_id, step="charge", compensate=undo, name="charge")
    return [await ctx.step(effect, run=ctx.run_id, step="book", compensate=undo)]
