"""The example todo app that ``forge-node start`` serves when no app is configured.

Owners see only their own todos; ``list_todos`` is a live query (subscribe to it over
``/ws``), ``add_todo`` dispatches a reminder job in the same transaction, and a cron
counts open todos every minute. The todos table has a row-level security policy
(migration 0002): ``recent_todos`` has no owner filter and still returns only the
caller's rows, wherever the node connects as a role policies bind (not a superuser).
"""

from __future__ import annotations

import datetime as dt
import uuid

import attrs

from forge_kernel import action, cron, field, job, model, mutation, query
from forge_kernel.errors import Forbidden, NotFound
from forge_kernel.migrations import from_package

MIGRATIONS = from_package("forge_example.migrations", namespace="example")


@model(table="todos", indexes=[("owner", "created_at")])
class Todo:
    id: uuid.UUID
    owner: str
    title: str = field(check="length(title) <= 500")
    done: bool = False
    # None on insert: the database fills it in
    created_at: dt.datetime | None = field(default=None, server_default="clock_timestamp()", nullable=False)


@query
async def list_todos(ctx) -> list[Todo]:
    """The caller's todos, oldest first."""
    return await ctx.db.select(Todo, owner=ctx.auth.user_id, order_by="created_at")


@query
async def recent_todos(ctx, limit: int = 20) -> list[Todo]:
    """The caller's latest todos. No owner filter: the table's policy keeps other owners' rows out."""
    return await ctx.db.select(Todo, order_by="-created_at", limit=max(1, min(limit, 100)))


@query(public=True)
async def count_open(ctx) -> int:
    """How many todos are open (public; under the table's policy, those the caller may see)."""
    return await ctx.db.fetchval("SELECT count(*) FROM todos WHERE NOT done")


@mutation
async def add_todo(ctx, title: str) -> Todo:
    title = title.strip()
    if not title:
        from forge_kernel.errors import InvalidArgument

        raise InvalidArgument("title must not be empty", details=[{"argument": "title", "message": "empty"}])
    todo = await ctx.db.insert(Todo(id=uuid.uuid4(), owner=ctx.auth.user_id, title=title))
    await ctx.dispatch(send_reminder, todo_id=todo.id, delay=dt.timedelta(hours=1))
    return todo


@mutation
async def complete_todo(ctx, id: uuid.UUID) -> Todo:
    todo = await ctx.db.get(Todo, id)
    if todo is None:
        raise NotFound(f"no todo {id}")
    if todo.owner != ctx.auth.user_id:
        raise Forbidden("not your todo")
    return await ctx.db.update(attrs.evolve(todo, done=True))


@action
async def add_many(ctx, titles: list[str]) -> int:
    """An action: calls the mutation once per title."""
    for t in titles:
        await ctx.mutation(add_todo, title=t)
    return len(titles)


@job(max_attempts=3, priority=5)
async def send_reminder(ctx, todo_id: uuid.UUID) -> None:
    ctx.log.info(f"reminder for todo {todo_id}")


@cron("* * * * *", timezone="UTC")
async def count_open_todos(ctx) -> None:
    n = await ctx.db.fetchval("SELECT count(*) FROM todos WHERE NOT done")
    ctx.log.info(f"{n} open todos")
