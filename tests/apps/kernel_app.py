"""App functions exercising the executor's rules."""

import asyncio
import uuid

import attrs

from forge_kernel import Service, action, hookimpl, job, model, mutation, query
from forge_kernel.errors import Conflict
from forge_kernel.migrations import Migration

MIGRATIONS = [Migration("kernel_app", 1, "notes", """
CREATE TABLE notes (id uuid PRIMARY KEY, owner text NOT NULL, body text NOT NULL);
CREATE TABLE test_jobs (id bigserial PRIMARY KEY, name text NOT NULL, args jsonb NOT NULL, caller text, run_at timestamptz);
""")]


@model(table="notes")
class Note:
    id: uuid.UUID
    owner: str
    body: str


@attrs.frozen
class Filter:
    owner: str
    tags: list[str] = []


@query(public=True)
async def notes_of(ctx, owner: str) -> list[Note]:
    return await ctx.db.select(Note, owner=owner)


@query(public=True)
async def raw_count(ctx) -> int:
    return await ctx.db.fetchval("SELECT count(*) FROM notes n JOIN test_jobs j ON true")


@query(public=True)
async def sneaky_write(ctx) -> None:
    await ctx.db.execute("INSERT INTO notes VALUES (gen_random_uuid(), 'x', 'y')")


@query(public=True)
async def typed(ctx, n: int, id: uuid.UUID, f: Filter, flag: bool = False) -> dict:
    return {"n": n, "id": id, "owner": f.owner, "tags": f.tags, "flag": flag}


@query
async def whoami(ctx) -> dict:
    return {"user": ctx.auth.user_id, "roles": sorted(ctx.auth.roles)}


@query(roles=["admin"])
async def admin_only(ctx) -> str:
    return "secret"


@query(public=True, timeout=0.2)
async def slow(ctx) -> None:
    await asyncio.sleep(5)


@query(public=True)
async def sleeps_in_db(ctx, seconds: float) -> None:
    await ctx.db.execute("SELECT pg_sleep($1)", seconds)


@query(public=True)
async def boom(ctx) -> None:
    raise RuntimeError("secret internal detail")


@mutation(public=True)
async def add_note(ctx, owner: str, body: str, fail: bool = False) -> Note:
    note = await ctx.db.insert(Note(id=uuid.uuid4(), owner=owner, body=body))
    await ctx.dispatch(remember, note_id=note.id)
    if fail:
        raise Conflict("refused after writing")
    return note


@action(public=True)
async def add_two(ctx, owner: str) -> int:
    await ctx.mutation(add_note, owner=owner, body="1")
    await ctx.mutation(add_note, owner=owner, body="2")
    return len(await ctx.query(notes_of, owner=owner))


@job
async def remember(ctx, note_id: uuid.UUID) -> None:
    pass


class TableDispatcher:
    """Test job store: writes JobRequests into test_jobs on the caller's connection."""

    async def dispatch(self, conn, requests):
        return [await conn.fetchval("INSERT INTO test_jobs (name, args, caller, run_at) VALUES ($1, $2, $3, $4) RETURNING id",
                                    r.name, dict(r.args), r.caller, r.run_at) for r in requests]


class DispatcherPlugin:
    @hookimpl
    def forge_job_dispatcher(self, node):
        return TableDispatcher()


_REFUSED_SQL = {
    "numeric": "SELECT $1::text::smallint",
    "datetime": "SELECT $1::text::timestamptz",
    "truncation": "INSERT INTO refused_child (v, p) VALUES ($1, NULL)",
    "not_null": "INSERT INTO refused_child (v, p) VALUES (NULLIF($1, $1), NULL)",
    "foreign_key": "INSERT INTO refused_child (v, p) VALUES ('ok', length($1))",
    "nul": "SELECT $1::text",
    "int32": "SELECT $1::int",
}


@mutation
async def refused(ctx, kind: str, value: str) -> int:
    """Runs SQL the database refuses for the caller's ``value`` (tests/test_db_errors.py)."""
    await ctx.db.execute("CREATE TEMP TABLE refused_parent (id int PRIMARY KEY) ON COMMIT DROP")
    await ctx.db.execute("CREATE TEMP TABLE refused_child (v varchar(3) NOT NULL, p int REFERENCES refused_parent) "
                         "ON COMMIT DROP")
    await ctx.db.execute(_REFUSED_SQL[kind], int(value) if kind == "int32" else value)
    return 1
