"""The app the forge-observe tests run: functions that log, fail, dispatch a job and write a table."""

from __future__ import annotations

import asyncio

from forge_kernel import action, job, mutation, query
from forge_kernel.migrations import Migration
from forge_kernel.telemetry import current_span

MIGRATIONS = [Migration("obs_app", 1, "notes", "CREATE TABLE obs_notes (id bigserial PRIMARY KEY, body text NOT NULL)")]


@query(public=True)
async def ping(ctx) -> str:
    return "pong"


@query(public=True)
async def notes(ctx) -> list[str]:
    return [r["body"] for r in await ctx.db.fetch("SELECT body FROM obs_notes ORDER BY id")]


@mutation(public=True)
async def add_note(ctx, body: str) -> int:
    ctx.log.info(f"adding note {body}")
    note_id = await ctx.db.fetchval("INSERT INTO obs_notes (body) VALUES ($1) RETURNING id", body)
    await ctx.dispatch(note_job, note_id=note_id)
    return note_id


@job(max_attempts=1)
async def note_job(ctx, note_id: int) -> None:
    ctx.log.info(f"job for note {note_id}")
    await ctx.db.execute("UPDATE obs_notes SET body = body || '!' WHERE id = $1", note_id)


@action(public=True)
async def boom(ctx) -> None:
    ctx.log.error("about to fail")
    raise RuntimeError("boom")


@action(public=True)
async def sleepy(ctx, seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@action(public=True)
async def shout(ctx, size: int, letter: str = "x") -> int:
    ctx.log.info(letter * size)
    return size


@mutation(public=True)
async def add_failing(ctx) -> int:
    return await ctx.dispatch(failing_job)


@job(max_attempts=1)
async def failing_job(ctx) -> None:
    raise RuntimeError("failing on purpose")


#: the current span each peek_job saw when it ran (None: none), in the order they ran
SEEN_SPANS: list = []


@job(max_attempts=1)
async def peek_job(ctx) -> None:
    SEEN_SPANS.append(current_span())


@job(max_attempts=1)
async def span_left_open_job(ctx) -> None:
    """Opens a span and never ends it (an app's slip): it stays current in this job's context."""
    ctx.node.telemetry.start_span("left open")


@action(public=True)
async def leaky(ctx) -> None:
    session_secret = "local-" + "z" * 24  # a local variable a traceback with locals would show
    try:
        raise RuntimeError(f"lookup failed for {len(session_secret)} bytes")
    except RuntimeError:
        ctx.log.opt(exception=True).error("retrying with password=hunter2hunter2 and Bearer abcdefghijklmnop")
