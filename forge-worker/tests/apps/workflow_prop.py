"""A workflow that runs a generated step graph (the property tests). Side effects are counted
in memory: the property tests run it in their own process."""

from __future__ import annotations

from collections import Counter

from forge_kernel import workflow

import workflow_app

#: (tag, step) -> times the step's function ran; (tag, step) -> times its compensation ran
RAN: Counter = Counter()
UNDONE: Counter = Counter()
UNDO_ORDER: dict[str, list[str]] = {}


def prop_step(tag: str, name: str, fail_times: int) -> str:
    RAN[(tag, name)] += 1
    if RAN[(tag, name)] <= fail_times:
        raise RuntimeError(f"{name} fails (attempt {RAN[(tag, name)]})")
    return name.upper()


def prop_undo(tag: str, name: str) -> None:
    UNDONE[(tag, name)] += 1
    UNDO_ORDER.setdefault(tag, []).append(name)


async def _ops(ctx, ops: list, tag: str) -> list:
    out = []
    for op in ops:
        kind = op[0]
        if kind == "step":
            out.append(await ctx.step(prop_step, tag, op[1], op[2], name=op[1], retries=1, backoff=0.001,
                                      compensate=prop_undo, compensate_args=(tag, op[1])))
        elif kind == "par":
            out.append(await ctx.gather(*(_ops(ctx, branch, tag) for branch in op[1])))
        elif kind == "sleep":
            await ctx.sleep(op[1])
            out.append("slept")
        elif kind == "event":
            ev = await ctx.wait_for_event(op[1], timeout=30)
            out.append(ev.payload if ev else "timeout")
        elif kind == "child":
            out.append(await ctx.child(workflow_app.three_steps, n=op[1]))
    return out


@workflow
async def graph(ctx, spec: list, tag: str) -> list:
    return await _ops(ctx, spec, tag)
