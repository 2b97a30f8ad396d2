"""Models are the schema: compare the app's ``@model`` classes with the database and write the SQL that
makes the database match them.

The comparison happens entirely in PostgreSQL's own terms. The models' tables are created in a
scratch schema inside a transaction that is rolled back, and both that schema and the real one are
read back from the catalog (``format_type``, ``pg_get_expr``, ``pg_get_constraintdef``), so a model's
``check="length(title) <= 200"`` and the database's ``CHECK ((length(title) <= 200))`` compare as
what they are. Names of indexes and constraints are not compared, only what they do.

Only tables of models are looked at (a plugin's tables are none of the app's business). Changes that
add (tables, columns, indexes, checks, foreign keys) or widen (a type that holds every old value, a
NOT NULL dropped, a default) are written as statements; anything that removes or narrows (a column
and its data, a type change that can fail or lose precision, an index or constraint the models do not
declare) is written commented out with a warning, unless the caller allows destructive changes.
Renames are never guessed: a column that disappears while another of the same type appears gets a
hint, not a rename.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import re
import secrets
import types
import typing
import uuid
from typing import Any, Iterable, Mapping

import asyncpg
import attrs

from forge_kernel.app import ModelDef, Registry
from forge_kernel.convert import is_struct

_CATALOG_TYPES: list[tuple[type, str]] = [
    (bool, "boolean"), (int, "bigint"), (float, "double precision"), (str, "text"), (uuid.UUID, "uuid"),
    (dt.datetime, "timestamp with time zone"), (dt.date, "date"), (dt.time, "time without time zone"),
    (decimal.Decimal, "numeric"), (bytes, "bytea"), (dt.timedelta, "interval"),
]
#: (from, to) type changes that keep every value exactly
_WIDENING = {("smallint", "integer"), ("smallint", "bigint"), ("integer", "bigint"), ("real", "double precision"),
             ("integer", "numeric"), ("bigint", "numeric"), ("smallint", "numeric")}
_ON_DELETE = {"a": "no action", "r": "restrict", "c": "cascade", "n": "set null", "d": "set default"}


class SchemaError(Exception):
    """A model cannot be turned into a table (an unknown referenced model, a type with no column type)."""


def q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- the catalog's view of a table ---------------------------------------------------------------------
@attrs.frozen
class ColumnState:
    name: str
    type: str
    nullable: bool
    default: str | None


@attrs.frozen
class IndexState:
    columns: tuple[str, ...]
    unique: bool
    #: pg_get_indexdef for expression or partial indexes (which the models never declare)
    definition: str | None = None


@attrs.frozen
class ForeignKeyState:
    columns: tuple[str, ...]
    ref_table: str
    ref_columns: tuple[str, ...]
    on_delete: str = "no action"


@attrs.frozen
class TableState:
    name: str
    columns: Mapping[str, ColumnState]
    primary_key: tuple[str, ...]
    indexes: frozenset[IndexState] = frozenset()
    checks: frozenset[str] = frozenset()
    foreign_keys: frozenset[ForeignKeyState] = frozenset()
    #: index / constraint name by what it does, to drop it by name
    names: Mapping[Any, str] = attrs.field(factory=dict, eq=False)


async def read_tables(conn: asyncpg.Connection, schema: str, tables: Iterable[str]) -> dict[str, TableState]:
    """The catalog's description of ``tables`` in ``schema`` (those that exist). Call with the
    connection's search_path set to ``schema`` so expressions print unqualified."""
    out: dict[str, TableState] = {}
    for table in tables:
        rel = await conn.fetchval("SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                  "WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')", schema, table)
        if rel is None:
            continue
        cols = await conn.fetch(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, NOT a.attnotnull AS nullable,
                      pg_get_expr(d.adbin, d.adrelid) AS def
               FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
               WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""", rel)
        names_of = {}

        async def colnames(nums: list[int]) -> tuple[str, ...]:
            rows = await conn.fetch("SELECT attnum, attname FROM pg_attribute WHERE attrelid = $1 AND attnum = ANY($2)",
                                    rel, nums)
            by = {r["attnum"]: r["attname"] for r in rows}
            return tuple(by[n] for n in nums)

        pk: tuple[str, ...] = ()
        checks, fks = set(), set()
        for c in await conn.fetch("SELECT conname, contype::text, conkey, confrelid, confkey, confdeltype::text, "
                                  "pg_get_constraintdef(oid) AS def FROM pg_constraint WHERE conrelid = $1", rel):
            if c["contype"] == "p":
                pk = await colnames(list(c["conkey"]))
                names_of["pkey"] = c["conname"]
            elif c["contype"] == "c":
                checks.add(c["def"])
                names_of[("check", c["def"])] = c["conname"]
            elif c["contype"] == "f":
                ref = await conn.fetchval("SELECT relname FROM pg_class WHERE oid = $1", c["confrelid"])
                ref_rel = c["confrelid"]
                ref_cols = await conn.fetch("SELECT attnum, attname FROM pg_attribute WHERE attrelid = $1", ref_rel)
                by = {r["attnum"]: r["attname"] for r in ref_cols}
                fk = ForeignKeyState(await colnames(list(c["conkey"])), ref, tuple(by[n] for n in c["confkey"]),
                                     _ON_DELETE.get(c["confdeltype"], "no action"))
                fks.add(fk)
                names_of[fk] = c["conname"]
        indexes = set()
        for i in await conn.fetch("""SELECT ci.relname AS name, ix.indisunique, ix.indisprimary, ix.indkey::int2[] AS keys,
                                            ix.indexprs IS NOT NULL OR ix.indpred IS NOT NULL AS special,
                                            pg_get_indexdef(ix.indexrelid) AS def
                                     FROM pg_index ix JOIN pg_class ci ON ci.oid = ix.indexrelid
                                     WHERE ix.indrelid = $1""", rel):
            if i["indisprimary"]:
                continue
            if i["special"]:  # an expression or partial index: the models never declare one
                idx = IndexState((), i["indisunique"], i["def"])
            else:
                idx = IndexState(await colnames(list(i["keys"])), i["indisunique"])
            indexes.add(idx)
            names_of[idx] = i["name"]
        out[table] = TableState(
            table, {r["attname"]: ColumnState(r["attname"], r["type"], r["nullable"], r["def"]) for r in cols},
            pk, frozenset(indexes), frozenset(checks), frozenset(fks), names_of)
    return out


# --- models as tables ---------------------------------------------------------------------------------
def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) != len(args):
            return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def column_type(tp: Any, where: str) -> str:
    """The SQL type of a field's Python type (the catalog's spelling)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        values = typing.get_args(tp)
        if all(isinstance(v, str) for v in values):
            return "text"
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return "bigint"
        raise SchemaError(f"{where}: a Literal of mixed types has no column type; give field(sql_type=...)")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        if all(isinstance(v, str) for v in values):
            return "text"
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return "bigint"
        raise SchemaError(f"{where}: enum {tp.__name__} mixes value types; give field(sql_type=...)")
    for py, sql in _CATALOG_TYPES:
        if tp is py:
            return sql
    if origin in (list, tuple, dict, set, frozenset) or tp in (list, tuple, dict) or (
            isinstance(tp, type) and (attrs.has(tp) or dataclasses.is_dataclass(tp) or is_struct(tp)
                                      or typing.is_typeddict(tp))):
        return "jsonb"
    raise SchemaError(f"{where}: no column type for {getattr(tp, '__name__', tp)!r}; give field(sql_type=...)")


def _literal(value: Any) -> str | None:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, decimal.Decimal)):
        return repr(value) if not isinstance(value, decimal.Decimal) else str(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return None


def _name(*parts: str, suffix: str) -> str:
    base = "_".join(parts)
    name = f"{base}_{suffix}"
    if len(name) > 63:  # PostgreSQL cuts identifiers at 63 bytes: keep them distinct
        name = f"{base[:50]}_{hashlib.sha1(base.encode()).hexdigest()[:6]}_{suffix}"
    return name


def model_ddl(models: list[ModelDef]) -> list[str]:
    """CREATE TABLE / INDEX / foreign key statements for ``models`` (unqualified names)."""
    by_class = {md.cls: md for md in models}
    by_table = {md.table: md for md in models}
    creates, indexes, fks = [], [], []
    for md in sorted(models, key=lambda m: m.table):
        if "." in md.table:
            raise SchemaError(f"@model {md.cls.__name__}: schema-qualified table {md.table!r} is not managed; "
                              "write its migrations by hand")
        hints = typing.get_type_hints(md.cls, include_extras=True)
        lines = []
        for a in attrs.fields(md.cls):
            col = md.column(a.name)
            where = f"@model {md.cls.__name__}.{a.name}"
            tp, optional = _strip_optional(hints.get(a.name, a.type))
            sql_type = col.sql_type or column_type(tp, where)
            nullable = (col.nullable if col.nullable is not None else optional) and a.name != md.primary_key
            default = col.server_default
            if default is None and a.default is not attrs.NOTHING and not isinstance(a.default, attrs.Factory):
                default = _literal(a.default)
            lines.append(f"    {q(a.name)} {sql_type}{'' if nullable else ' NOT NULL'}"
                         + (f" DEFAULT {default}" if default is not None else ""))
            if col.check:
                lines.append(f"    CONSTRAINT {q(_name(md.table, a.name, suffix='check'))} CHECK ({col.check})")
            if col.index or col.unique:
                kind = "UNIQUE INDEX" if col.unique else "INDEX"
                indexes.append(f"CREATE {kind} {q(_name(md.table, a.name, suffix='key' if col.unique else 'idx'))} "
                               f"ON {q(md.table)} ({q(a.name)});")
            if col.references is not None:
                ref = by_class.get(col.references) if isinstance(col.references, type) else by_table.get(col.references)
                if ref is None:
                    target = getattr(col.references, "__name__", col.references)
                    raise SchemaError(f"{where}: references {target!r}, which is not a model of this app")
                on_delete = f" ON DELETE {col.on_delete.upper()}" if col.on_delete else ""
                fks.append(f"ALTER TABLE {q(md.table)} ADD CONSTRAINT {q(_name(md.table, a.name, suffix='fkey'))} "
                           f"FOREIGN KEY ({q(a.name)}) REFERENCES {q(ref.table)} ({q(ref.primary_key)}){on_delete};")
        lines.append(f"    CONSTRAINT {q(md.table + '_pkey')} PRIMARY KEY ({q(md.primary_key)})")
        creates.append(f"CREATE TABLE {q(md.table)} (\n" + ",\n".join(lines) + "\n);")
        for unique, groups in ((False, md.indexes), (True, md.unique_together)):
            for group in groups:
                name = _name(md.table, *group, suffix="key" if unique else "idx")
                indexes.append(f"CREATE {'UNIQUE INDEX' if unique else 'INDEX'} {q(name)} ON {q(md.table)} "
                               f"({', '.join(map(q, group))});")
    return creates + indexes + fks


async def desired_tables(conn: asyncpg.Connection, models: list[ModelDef]) -> dict[str, TableState]:
    """What the catalog would say about the models' tables: created in a scratch schema, read back,
    rolled back. A model PostgreSQL refuses (a bad check, an unknown sql_type) raises SchemaError."""
    scratch = f"forge_models_{secrets.token_hex(6)}"
    tr = conn.transaction()
    await tr.start()
    try:
        await conn.execute(f"CREATE SCHEMA {q(scratch)}")
        await conn.execute(f"SET LOCAL search_path = {q(scratch)}")
        for statement in model_ddl(models):
            try:
                await conn.execute(statement)
            except asyncpg.PostgresError as exc:
                raise SchemaError(f"PostgreSQL refuses a model's table: {exc}\n  in: {statement}") from None
        return await read_tables(conn, scratch, [m.table for m in models])
    finally:
        await tr.rollback()


async def current_tables(conn: asyncpg.Connection, tables: Iterable[str], schema: str = "public") -> dict[str, TableState]:
    tr = conn.transaction()
    await tr.start()
    try:
        await conn.execute(f"SET LOCAL search_path = {q(schema)}")
        return await read_tables(conn, schema, tables)
    finally:
        await tr.rollback()


# --- the difference, as SQL ---------------------------------------------------------------------------
@attrs.frozen
class Change:
    table: str
    sql: str
    #: what it does, for people (the drift report, the migration's comments)
    what: str
    #: removes data or something the models do not declare, or can fail on existing values
    destructive: bool = False
    #: printed above the statement
    note: str | None = None
    order: int = 0


def _widens(old: str, new: str) -> bool:
    if (old, new) in _WIDENING or new == "text" and old.startswith(("character varying", "character(")):
        return True
    m_old, m_new = re.match(r"character varying\((\d+)\)", old), re.match(r"character varying\((\d+)\)", new)
    if m_old and (new == "character varying" or m_new and int(m_new.group(1)) >= int(m_old.group(1))):
        return True
    return old.startswith("numeric(") and new == "numeric"


def _index_sql(table: str, idx: IndexState) -> str:
    name = _name(table, *idx.columns, suffix="key" if idx.unique else "idx")
    return (f"CREATE {'UNIQUE INDEX' if idx.unique else 'INDEX'} {q(name)} ON {q(table)} "
            f"({', '.join(map(q, idx.columns))});")


def _fk_sql(table: str, fk: ForeignKeyState) -> str:
    name = _name(table, *fk.columns, suffix="fkey")
    on_delete = f" ON DELETE {fk.on_delete.upper()}" if fk.on_delete != "no action" else ""
    return (f"ALTER TABLE {q(table)} ADD CONSTRAINT {q(name)} FOREIGN KEY ({', '.join(map(q, fk.columns))}) "
            f"REFERENCES {q(fk.ref_table)} ({', '.join(map(q, fk.ref_columns))}){on_delete};")


def _column_sql(c: ColumnState) -> str:
    return f"{q(c.name)} {c.type}{'' if c.nullable else ' NOT NULL'}" + (f" DEFAULT {c.default}" if c.default else "")


def _check_name(table: str, definition: str, columns: Iterable[str]) -> str:
    # readable (the first column it mentions) and distinct (a hash of the whole definition)
    words = [w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", definition) if w in set(columns)]
    return _name(table, words[0] if words else "expr", hashlib.sha1(definition.encode()).hexdigest()[:6], suffix="check")


def _column_changes(name: str, h: ColumnState, w: ColumnState) -> list[Change]:
    col = f"{q(name)} ALTER COLUMN {q(w.name)}"
    what = f"{name}.{w.name}"
    if h.type != w.type:
        # the default goes first (it may not convert), and comes back after; all one change, so a held
        # (commented out) narrowing never leaves a default of the new type on a column of the old one
        safe = _widens(h.type, w.type)
        sql = [f"ALTER TABLE {col} DROP DEFAULT;"] if h.default else []
        sql.append(f"ALTER TABLE {col} TYPE {w.type}" + ("" if safe else f" USING {q(w.name)}::{w.type}") + ";")
        if h.nullable != w.nullable:
            sql.append(f"ALTER TABLE {col} {'DROP' if w.nullable else 'SET'} NOT NULL;")
        if w.default:
            sql.append(f"ALTER TABLE {col} SET DEFAULT {w.default};")
        return [Change(name, "\n".join(sql), f"{what}: type is {h.type}, the model says {w.type}", destructive=not safe,
                       note=None if safe else f"{h.type} -> {w.type} may fail or lose precision on existing values",
                       order=1)]
    out = []
    if h.nullable != w.nullable:
        out.append(Change(name, f"ALTER TABLE {col} {'DROP' if w.nullable else 'SET'} NOT NULL;",
                          f"{what}: {'nullable' if h.nullable else 'NOT NULL'} in the database, "
                          f"{'nullable' if w.nullable else 'NOT NULL'} in the model",
                          note=None if w.nullable else f"fails if {what} holds NULLs", order=1))
    if h.default != w.default:
        sql = f"ALTER TABLE {col} SET DEFAULT {w.default};" if w.default else f"ALTER TABLE {col} DROP DEFAULT;"
        out.append(Change(name, sql, f"{what}: default is {h.default or 'none'}, the model says {w.default or 'none'}",
                          order=1))
    return out


def diff(current: Mapping[str, TableState], desired: Mapping[str, TableState]) -> list[Change]:
    """The changes that turn ``current`` into ``desired`` (tables of ``desired`` only), in an order
    that applies: tables, columns, indexes and checks, then foreign keys; removals last."""
    out: list[Change] = []
    for name in sorted(desired):
        want = desired[name]
        have = current.get(name)
        t = q(name)
        if have is None:
            cols = [f"    {_column_sql(c)}" for c in want.columns.values()]
            cols += [f"    CONSTRAINT {q(_check_name(name, ch, want.columns))} {ch}" for ch in sorted(want.checks)]
            cols.append(f"    CONSTRAINT {q(name + '_pkey')} PRIMARY KEY ({', '.join(map(q, want.primary_key))})")
            out.append(Change(name, f"CREATE TABLE {t} (\n" + ",\n".join(cols) + "\n);", f"table {name} is missing", order=0))
            out += [Change(name, _index_sql(name, i), f"{name}: index on {', '.join(i.columns)} is missing", order=2)
                    for i in sorted(want.indexes, key=repr)]
            out += [Change(name, _fk_sql(name, fk), f"{name}: foreign key {', '.join(fk.columns)} -> {fk.ref_table} is missing",
                           order=3) for fk in sorted(want.foreign_keys, key=repr)]
            continue
        added = [c for n, c in want.columns.items() if n not in have.columns]
        dropped = [c for n, c in have.columns.items() if n not in want.columns]
        for c in added:
            note = None
            if not c.nullable and c.default is None:
                note = (f"{name}.{c.name} is NOT NULL without a default: this fails if {name} has rows "
                        "(give the field a default or server_default, or fill it in a separate step)")
            out.append(Change(name, f"ALTER TABLE {t} ADD COLUMN {_column_sql(c)};", f"{name}.{c.name}: column is missing",
                              note=note, order=1))
        for c in dropped:
            hint = [a.name for a in added if a.type == c.type]
            note = f"drops {name}.{c.name} and its data"
            if hint:
                note += (f". If it was renamed to {hint[0]!r}, use instead: ALTER TABLE {t} RENAME COLUMN "
                         f"{q(c.name)} TO {q(hint[0])}; (and drop the ADD COLUMN above)")
            out.append(Change(name, f"ALTER TABLE {t} DROP COLUMN {q(c.name)};", f"{name}.{c.name}: column is not in the model",
                              destructive=True, note=note, order=9))
        for n, w in want.columns.items():
            h = have.columns.get(n)
            if h is not None and h != w:
                out += _column_changes(name, h, w)
        if have.primary_key != want.primary_key:
            out.append(Change(name, f"ALTER TABLE {t} DROP CONSTRAINT {q(have.names.get('pkey', name + '_pkey'))}, "
                              f"ADD PRIMARY KEY ({', '.join(map(q, want.primary_key))});",
                              f"{name}: primary key is ({', '.join(have.primary_key)}), the model says "
                              f"({', '.join(want.primary_key)})", destructive=True, order=9))
        # a check over a column whose (narrowing) type change is held back may not apply to the old type
        narrowed = {n for n, w in want.columns.items()
                    if n in have.columns and have.columns[n].type != w.type and not _widens(have.columns[n].type, w.type)}
        for ch in sorted(want.checks - have.checks):
            needs = sorted(narrowed & set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", ch)))
            out.append(Change(name, f"ALTER TABLE {t} ADD CONSTRAINT {q(_check_name(name, ch, want.columns))} {ch};",
                              f"{name}: {ch} is missing", destructive=bool(needs),
                              note=f"needs the type change of {', '.join(needs)}" if needs else None, order=2))
        for ch in sorted(have.checks - want.checks):
            # before any type change: PostgreSQL re-checks old constraints against a column's new type
            out.append(Change(name, f"ALTER TABLE {t} DROP CONSTRAINT {q(have.names[('check', ch)])};",
                              f"{name}: {ch} is not in the model", destructive=True, order=0))
        for idx in sorted(want.indexes - have.indexes, key=repr):
            out.append(Change(name, _index_sql(name, idx), f"{name}: {'unique ' if idx.unique else ''}index on "
                                                     f"{', '.join(idx.columns)} is missing", order=2))
        gone = {c.name for c in dropped}
        for idx in sorted(have.indexes - want.indexes, key=repr):
            if idx.columns and set(idx.columns) <= gone:
                continue  # dropping its columns drops it
            what = idx.definition or f"{'unique ' if idx.unique else ''}index on {', '.join(idx.columns)}"
            out.append(Change(name, f"DROP INDEX {q(have.names[idx])};", f"{name}: {what} is not in the model",
                              destructive=True, order=8))
        for fk in sorted(want.foreign_keys - have.foreign_keys, key=repr):
            out.append(Change(name, _fk_sql(name, fk), f"{name}: foreign key {', '.join(fk.columns)} -> {fk.ref_table} "
                                                 "is missing", order=3))
        for fk in sorted(have.foreign_keys - want.foreign_keys, key=repr):
            out.append(Change(name, f"ALTER TABLE {t} DROP CONSTRAINT {q(have.names[fk])};",
                              f"{name}: foreign key {', '.join(fk.columns)} -> {fk.ref_table} is not in the model",
                              destructive=True, order=0))
    return sorted(out, key=lambda c: c.order)


def render(changes: list[Change], *, allow_destructive: bool, title: str) -> str:
    """A migration file: statements, notes as comments, destructive ones commented out unless allowed."""
    lines = [f"-- {title}", "-- Written by `forge-node generate migration` from the app's models. Review before applying.", ""]
    for c in changes:
        if c.note:
            lines += [f"-- NOTE: {c.note}"]
        if c.destructive and not allow_destructive:
            lines += [f"-- WARNING: destructive, not applied ({c.what}). Remove the leading '-- ' to apply it,",
                      "-- or generate again with --allow-destructive.",
                      *("-- " + line for line in c.sql.splitlines())]
        else:
            lines += c.sql.splitlines()
        lines.append("")
    if all(c.destructive for c in changes) and not allow_destructive:
        # a file of comments only is no statement at all, which the driver cannot run
        lines += ["SELECT 1;  -- nothing applies until a statement above is uncommented", ""]
    return "\n".join(lines)


def app_models(registry: Registry) -> list[ModelDef]:
    return sorted(registry.models.values(), key=lambda m: m.table)


async def compare(conn: asyncpg.Connection, registry: Registry) -> list[Change]:
    models = [m for m in app_models(registry) if "." not in m.table]
    desired = await desired_tables(conn, models)
    current = await current_tables(conn, desired)
    return diff(current, desired)


async def drift(node: Any, registry: Registry) -> list[str]:
    """One line per difference between ``registry``'s models and the node's database."""
    if not registry.models:
        return []
    async with node.pool.acquire() as conn:
        return [c.what + (" (destructive)" if c.destructive else "") for c in await compare(conn, registry)]

