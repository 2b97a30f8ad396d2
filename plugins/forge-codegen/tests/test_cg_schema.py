"""Models are the schema: the generated migration makes the catalog match the models (hypothesis, random
model sets and edits, on a real PostgreSQL), destructive changes are held back, and the command writes
the next versioned file for the owning module."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge_codegen import schema
from forge_kernel import field, model
from forge_kernel.app import model_def

CLI = [sys.executable, "-m", "forge_kernel.cli"]
TYPES = {"int": int, "float": float, "decimal": decimal.Decimal, "text": str, "bool": bool, "uuid": uuid.UUID,
         "ts": dt.datetime, "json": dict[str, int]}
#: type edits stay among types PostgreSQL can cast between
CASTABLE = ("int", "float", "decimal", "text")
PK = {"t0": "uuid", "t1": "int", "t2": "uuid", "t3": "int"}
DEFAULTS = {"int": st.integers(-5, 5), "float": st.sampled_from([0.5, -1.25, 3.0]),
            "decimal": st.sampled_from([decimal.Decimal("1.25"), decimal.Decimal("0")]),
            "text": st.text(alphabet="ab' ", max_size=3), "bool": st.booleans()}


@attrs.frozen
class Col:
    name: str
    kind: str
    optional: bool = False
    default: object = None
    index: bool = False
    unique: bool = False
    check: bool = False
    ref: str | None = None


@attrs.frozen
class Table:
    name: str
    cols: tuple[Col, ...]
    multi: tuple[str, ...] = ()


def build(tables: list[Table]) -> list:
    """Real @model classes for the specs (references resolved to the referenced model class)."""
    classes: dict[str, type] = {}
    for t in tables:
        fields = {"id": field(type=TYPES[PK[t.name]])}
        for c in t.cols:
            tp = TYPES[c.kind] | None if c.optional else TYPES[c.kind]
            kw = {}
            if c.default is not None:
                kw["default"] = c.default
            elif c.optional:
                kw["default"] = None
            fields[c.name] = field(type=tp, index=c.index, unique=c.unique, references=classes.get(c.ref),
                                   check=f"length({c.name}::text) < 100" if c.check else None, **kw)
        cls = attrs.make_class(t.name.upper(), fields, kw_only=True)
        classes[t.name] = model(table=t.name, indexes=[t.multi] if t.multi else ())(cls)
    return [model_def(c) for c in classes.values()]


@st.composite
def columns(draw, table: str, earlier: list[str], names=("a", "b", "c", "d")) -> tuple[Col, ...]:
    out = []
    for name in draw(st.lists(st.sampled_from(names), unique=True, max_size=4)):
        ref = draw(st.sampled_from([None, *earlier]))
        kind = PK[ref] if ref else draw(st.sampled_from(sorted(TYPES)))
        out.append(draw(column(name, kind, ref)))
    return tuple(out)


@st.composite
def column(draw, name: str, kind: str, ref: str | None = None) -> Col:
    default = draw(st.none() | DEFAULTS[kind]) if kind in DEFAULTS and not ref else None
    return Col(name, kind, optional=draw(st.booleans()), default=default, index=draw(st.booleans()),
               unique=draw(st.booleans()) and kind != "json", check=draw(st.booleans()), ref=ref)


@st.composite
def model_sets(draw) -> list[Table]:
    names = ["t0", "t1", "t2", "t3"][: draw(st.integers(1, 4))]
    out = []
    for i, name in enumerate(names):
        cols = draw(columns(name, names[:i]))
        multi = tuple(c.name for c in cols[:2]) if len(cols) >= 2 and draw(st.booleans()) else ()
        out.append(Table(name, cols, multi))
    return out


@st.composite
def edits(draw, tables: list[Table]) -> list[Table]:
    """Each column kept, dropped, or changed (nullability, default, index, uniqueness, check, a castable
    type); new columns and a new table may appear."""
    out = []
    for t in tables:
        cols = []
        for c in t.cols:
            action = draw(st.sampled_from(["keep", "drop", "change"]))
            if action == "drop":
                continue
            if action == "change":
                kind = c.kind
                if c.kind in CASTABLE and not c.ref and draw(st.booleans()):
                    kind = draw(st.sampled_from(CASTABLE))
                c = attrs.evolve(draw(column(c.name, kind, c.ref)), ref=c.ref)
            cols.append(c)
        taken = {c.name for c in cols}
        new = draw(columns(t.name, [x.name for x in out], names=("e", "f")))
        cols += [c for c in new if c.name not in taken]
        multi = t.multi if all(n in {c.name for c in cols} for n in t.multi) and draw(st.booleans()) else ()
        out.append(Table(t.name, tuple(cols), multi))
    if len(out) < 4 and draw(st.booleans()):
        name = ["t0", "t1", "t2", "t3"][len(out)]
        out.append(Table(name, draw(columns(name, [x.name for x in out]))))
    return out


async def _apply(conn, schema_name: str, changes: list[schema.Change], *, allow_destructive: bool) -> None:
    if not changes:
        return
    sql = schema.render(changes, allow_destructive=allow_destructive, title="test")
    async with conn.transaction():
        await conn.execute(f"SET LOCAL search_path = {schema.q(schema_name)}")
        await conn.execute(sql)


async def _converge(url: str, before: list[Table], after: list[Table], allow_destructive: bool) -> None:
    conn = await asyncpg.connect(url)
    name = f"t_{uuid.uuid4().hex[:10]}"
    await conn.execute(f"CREATE SCHEMA {name}")
    try:
        for i, tables in enumerate((before, after)):
            models = build(tables)
            desired = await schema.desired_tables(conn, models)
            changes = schema.diff(await schema.current_tables(conn, desired, name), desired)
            await _apply(conn, name, changes, allow_destructive=allow_destructive or i == 0)
            left = schema.diff(await schema.current_tables(conn, desired, name), desired)
            if not (allow_destructive or i == 0):
                # held back: exactly the destructive changes, nothing else; applying them later converges
                assert all(c.destructive for c in left), [c.what for c in left if not c.destructive]
                assert sorted(c.what for c in left) == sorted(c.what for c in changes if c.destructive)
                await _apply(conn, name, left, allow_destructive=True)
            # the catalog itself, compared without the diff: every column, type, nullability, default,
            # primary key, index, check and foreign key as PostgreSQL reports them
            assert await schema.current_tables(conn, desired, name) == desired, (
                f"after the migration:\n{schema.render(changes, allow_destructive=True, title='')}")
    finally:
        await conn.execute(f"DROP SCHEMA {name} CASCADE")
        await conn.close()


def test_generated_migrations_make_the_catalog_match_the_models(forge_database_url):
    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def converge(data):
        before = data.draw(model_sets(), label="models")
        after = data.draw(edits(before), label="edited")
        asyncio.run(_converge(forge_database_url, before, after, data.draw(st.booleans(), label="allow_destructive")))

    converge()


def test_destructive_changes_are_commented_out_with_a_warning():
    before = {"t": schema.TableState("t", {"id": schema.ColumnState("id", "bigint", False, None),
                                           "old": schema.ColumnState("old", "text", True, None),
                                           "n": schema.ColumnState("n", "text", True, None)}, ("id",))}
    after = {"t": schema.TableState("t", {"id": schema.ColumnState("id", "bigint", False, None),
                                          "new": schema.ColumnState("new", "text", True, None),
                                          "n": schema.ColumnState("n", "bigint", True, None)}, ("id",))}
    changes = schema.diff(before, after)
    held = schema.render(changes, allow_destructive=False, title="x")
    assert '-- ALTER TABLE "t" DROP COLUMN "old";' in held
    assert '-- ALTER TABLE "t" ALTER COLUMN "n" TYPE bigint USING "n"::bigint;' in held
    assert "WARNING: destructive, not applied" in held
    assert 'ALTER TABLE "t" RENAME COLUMN "old" TO "new"' in held  # a hint, never a guess
    assert '\nALTER TABLE "t" ADD COLUMN "new" text;' in held
    applied = schema.render(changes, allow_destructive=True, title="x")
    assert '\nALTER TABLE "t" DROP COLUMN "old";' in applied


def test_widening_is_applied_narrowing_is_held():
    def table(tp: str) -> dict:
        return {"t": schema.TableState("t", {"id": schema.ColumnState("id", "bigint", False, None),
                                             "v": schema.ColumnState("v", tp, False, None)}, ("id",))}

    assert [c.destructive for c in schema.diff(table("integer"), table("bigint"))] == [False]
    assert [c.destructive for c in schema.diff(table("character varying(10)"), table("text"))] == [False]
    assert [c.destructive for c in schema.diff(table("bigint"), table("integer"))] == [True]
    assert [c.destructive for c in schema.diff(table("text"), table("character varying(10)"))] == [True]


def test_a_model_postgresql_refuses_names_the_statement(forge_database_url):
    @model(table="bad_things")
    class Bad:
        id: int
        n: int = field(check="no_such_function(n)")

    async def go():
        conn = await asyncpg.connect(forge_database_url)
        try:
            with pytest.raises(schema.SchemaError, match="no_such_function"):
                await schema.desired_tables(conn, [model_def(Bad)])
        finally:
            await conn.close()

    asyncio.run(go())


# --- the command -------------------------------------------------------------------------------------
def _project(tmp_path: Path, db_url: str) -> tuple[Path, dict[str, str]]:
    proc = subprocess.run([*CLI, "new", "notes"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "notes"
    env = {**os.environ, "FORGE_DATABASE__URL": db_url, "PYTHONPATH": str(root)}
    return root, env


def _run(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_generate_migration_writes_the_next_version_for_the_owning_module(forge_db_url, tmp_path):
    root, env = _project(tmp_path, forge_db_url)
    assert _run(root, env, "migrate").returncode == 0
    same = _run(root, env, "generate", "migration", "nothing")
    assert same.returncode == 0 and "the models match the database" in same.stdout, same.stdout + same.stderr

    app = root / "notes" / "app.py"
    app.write_text(app.read_text().replace(
        '    done: bool = field(default=False)\n',
        '    priority: int = field(default=0, index=True)\n    done: bool = field(default=False)\n'))
    pending = root / "notes" / "migrations" / "0002_priority.sql"
    first = _run(root, env, "generate", "migration", "priority")
    assert first.returncode == 0, first.stderr
    assert f"wrote {pending}" in first.stdout
    text = pending.read_text()
    assert 'ALTER TABLE "tasks" ADD COLUMN "priority" bigint NOT NULL DEFAULT 0;' in text
    assert 'CREATE INDEX "tasks_priority_idx" ON "tasks" ("priority");' in text
    # not applied yet: a second run refuses instead of writing the same change again
    again = _run(root, env, "generate", "migration", "again")
    assert again.returncode == 1 and "0002_priority" in again.stderr
    assert _run(root, env, "migrate").returncode == 0
    assert "the models match" in _run(root, env, "generate", "migration", "none").stdout

    # a removed field: held back, commented out
    app.write_text(app.read_text().replace("    priority: int = field(default=0, index=True)\n", ""))
    held = _run(root, env, "generate", "migration", "drop_priority")
    assert held.returncode == 0 and "1 destructive one(s) commented out" in held.stdout, held.stdout
    text = (root / "notes" / "migrations" / "0003_drop_priority.sql").read_text()
    assert '-- ALTER TABLE "tasks" DROP COLUMN "priority";' in text


def test_generate_migration_rejects_a_bad_name(forge_db_url, tmp_path):
    root, env = _project(tmp_path, forge_db_url)
    proc = _run(root, env, "generate", "migration", "drop table")
    assert proc.returncode == 2 and "use letters, digits" in proc.stderr


def test_the_example_apps_models_match_their_hand_written_migration(forge_db_url):
    """@model without options keeps working, and the example's models describe its SQL exactly."""
    import forge_example
    from forge_kernel.app import Registry
    from forge_kernel.migrations import migrate

    async def go():
        conn = await asyncpg.connect(forge_db_url)
        try:
            await migrate(conn, forge_example.MIGRATIONS)
            registry = Registry.from_modules(["forge_example"])
            assert [c.what for c in await schema.compare(conn, registry)] == []
        finally:
            await conn.close()

    asyncio.run(go())


def test_generate_migration_says_where_a_models_migrations_should_go(forge_db_url, tmp_path):
    (tmp_path / "loneapp.py").write_text("import uuid\nfrom forge_kernel import model\n\n"
                                         "@model(table='lone')\nclass Lone:\n    id: uuid.UUID\n")
    (tmp_path / "forge.toml").write_text('[app]\nmodules = ["loneapp"]\nexample = false\n')
    env = {**os.environ, "FORGE_DATABASE__URL": forge_db_url}
    proc = _run(tmp_path, env, "generate", "migration", "first")
    assert proc.returncode == 1
    assert "model Lone (table lone) has nowhere to put its migration" in proc.stderr, proc.stderr
    assert "MIGRATIONS = from_package" in proc.stderr
