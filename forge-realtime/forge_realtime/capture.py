"""Change capture: statement-level triggers that append to ``forge_changes``.

Each captured table gets its own trigger function, generated from the catalog, that writes
one change-log row per statement with the old/new images (primary key plus the columns
some subscription filters on) of every affected row, read from the transition tables.
Growing the set of columns only replaces the function, never the triggers, so it takes no
table lock; installing the triggers the first time waits for in-flight writers (and is
followed by a re-run of the query that asked for it, so nothing written in between is lost).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Awaitable, Callable, Iterable

import asyncpg
import attrs

from forge_kernel.db import quote_ident

_LOCK_CLASS = 7217301  # advisory lock namespace of forge-realtime's DDL (xact locks only)
_HINT_LOCK_CLASS = 7217302  # the wake-up hint gate


class CaptureError(Exception):
    """A table cannot be captured (it does not exist, or its name is not plain)."""


def _qualified(table: str) -> str:
    return ".".join(quote_ident(p) for p in table.split("."))


def function_name(table: str) -> str:
    base = "forge_rt_cap_" + table.replace(".", "__")
    if len(base) > 60:  # PostgreSQL truncates identifiers at 63 bytes
        base = "forge_rt_cap_" + hashlib.sha1(table.encode()).hexdigest()[:20]
    return base


def _image(alias: str, columns: Iterable[str]) -> str:
    pairs = ", ".join(f"'{c}', {alias}.{quote_ident(c)}" for c in columns)
    return f"jsonb_build_object({pairs})"


def capture_function_sql(table: str, columns: Iterable[str]) -> str:
    """``CREATE OR REPLACE FUNCTION`` for ``table``'s capture trigger with images of ``columns``."""
    cols = sorted(set(columns))
    for c in cols:
        quote_ident(c)  # raises on anything that is not a plain identifier
    _qualified(table)
    lit = "'" + table + "'"  # plain identifiers only (checked above), so no quoting is needed
    new_img, old_img = _image("n", cols), _image("o", cols)
    return f"""
CREATE OR REPLACE FUNCTION {quote_ident(function_name(table))}() RETURNS trigger
LANGUAGE plpgsql AS $forge$
DECLARE
    written bigint := 0;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO forge_changes (tbl, op, new_rows)
            SELECT {lit}, 'INSERT', jsonb_agg({new_img}) FROM forge_rt_new n HAVING count(*) > 0;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO forge_changes (tbl, op, old_rows, new_rows)
            SELECT {lit}, 'UPDATE', (SELECT jsonb_agg({old_img}) FROM forge_rt_old o), jsonb_agg({new_img})
            FROM forge_rt_new n HAVING count(*) > 0;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO forge_changes (tbl, op, old_rows)
            SELECT {lit}, 'DELETE', jsonb_agg({old_img}) FROM forge_rt_old o HAVING count(*) > 0;
    ELSE
        INSERT INTO forge_changes (tbl, op) VALUES ({lit}, 'TRUNCATE');
    END IF;
    GET DIAGNOSTICS written = ROW_COUNT;
    -- the wake-up hint, at most one in flight: only the transaction holding the advisory
    -- lock notifies; the others commit without NOTIFY's global commit lock and are read by
    -- the poll the hint triggers (or the short fallback poll)
    IF written > 0 AND pg_try_advisory_xact_lock({_HINT_LOCK_CLASS}, 0) THEN
        PERFORM pg_notify('forge_changes', '');
    END IF;
    RETURN NULL;
END
$forge$"""


def trigger_sql(table: str) -> list[str]:
    t, fn = _qualified(table), quote_ident(function_name(table))
    return [
        f"CREATE OR REPLACE TRIGGER forge_rt_insert AFTER INSERT ON {t} REFERENCING NEW TABLE AS forge_rt_new "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {fn}()",
        f"CREATE OR REPLACE TRIGGER forge_rt_update AFTER UPDATE ON {t} "
        f"REFERENCING OLD TABLE AS forge_rt_old NEW TABLE AS forge_rt_new FOR EACH STATEMENT EXECUTE FUNCTION {fn}()",
        f"CREATE OR REPLACE TRIGGER forge_rt_delete AFTER DELETE ON {t} REFERENCING OLD TABLE AS forge_rt_old "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {fn}()",
        f"CREATE OR REPLACE TRIGGER forge_rt_truncate AFTER TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {fn}()",
    ]


async def table_columns(conn: asyncpg.Connection, table: str) -> tuple[list[str], list[str]]:
    """(all columns, primary-key columns) of ``table``; raises CaptureError if it does not exist."""
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", _qualified(table))
    if oid is None:
        raise CaptureError(f"cannot capture changes of {table!r}: no such table")
    cols = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum", oid)
    pk = await conn.fetch(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = $1 AND i.indisprimary ORDER BY a.attnum", oid)
    return [r[0] for r in cols], [r[0] for r in pk]


async def install_capture(conn: asyncpg.Connection, table: str, columns: Iterable[str] = ()) -> tuple[frozenset[str], bool]:
    """Make ``table`` captured with images holding at least ``columns`` (plus its primary key).

    Idempotent and safe to race from several nodes (serialised by an advisory lock per
    table). Returns (the captured columns, whether anything changed).
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _LOCK_CLASS, table)
        row = await conn.fetchrow("SELECT key_columns, columns FROM forge_realtime_captures WHERE tbl = $1", table)
        have = frozenset(row["columns"]) if row else frozenset()
        all_cols, pk = await table_columns(conn, table)
        wanted = (have | frozenset(columns) | frozenset(pk)) & frozenset(all_cols)
        if row is not None and wanted <= have:
            return have, False
        await conn.execute(capture_function_sql(table, wanted))
        if row is None:
            for stmt in trigger_sql(table):
                await conn.execute(stmt)
        await conn.execute(
            "INSERT INTO forge_realtime_captures (tbl, key_columns, columns) VALUES ($1, $2, $3) "
            "ON CONFLICT (tbl) DO UPDATE SET columns = EXCLUDED.columns, key_columns = EXCLUDED.key_columns, updated_at = now()",
            table, list(pk), sorted(wanted))
        return frozenset(wanted), True


async def remove_capture(conn: asyncpg.Connection, table: str) -> None:
    """Drop ``table``'s capture triggers and function (benchmarks and tests use it)."""
    t = _qualified(table)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _LOCK_CLASS, table)
        for name in ("forge_rt_insert", "forge_rt_update", "forge_rt_delete", "forge_rt_truncate"):
            await conn.execute(f"DROP TRIGGER IF EXISTS {name} ON {t}")
        await conn.execute(f"DROP FUNCTION IF EXISTS {quote_ident(function_name(table))}()")
        await conn.execute("DELETE FROM forge_realtime_captures WHERE tbl = $1", table)


@attrs.define
class CaptureManager:
    """What this node knows is captured; extends the capture when a read set needs more."""

    pool: asyncpg.Pool
    #: called with the connection after each install: queries that read a replica must see it
    after_install: Callable[[asyncpg.Connection], Awaitable[None]] | None = None
    captured: dict[str, frozenset[str]] = attrs.field(factory=dict)
    #: table -> when (monotonic) this node last installed or learned its capture
    changed_at: dict[str, float] = attrs.field(factory=dict)
    _lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)

    def covers(self, table: str, columns: Iterable[str]) -> bool:
        have = self.captured.get(table)
        return have is not None and set(columns) <= have

    def changed_since(self, tables: Iterable[str], since: float) -> bool:
        """Whether the capture of one of ``tables`` changed at or after ``since`` (see :meth:`ensure`)."""
        changed_at = self.changed_at
        return any(changed_at.get(t, -1.0) >= since for t in tables)

    async def ensure(self, needs: dict[str, set[str]], since: float | None = None) -> bool:
        """Capture every table in ``needs`` with images of its columns. Returns True when
        some trigger or image changed just now, or after ``since`` (a ``time.monotonic()``
        taken before the caller's query started): the caller re-runs its query then, since
        writes between its snapshot and the change were not captured. ``since`` matters when
        another query on this node installed the capture while this one ran."""
        if all(self.covers(table, cols) for table, cols in needs.items()):
            # everything is captured already (every re-run of a live query): no lock to take. An
            # install in progress elsewhere can only be extending a table this caller has all it
            # needs of (its trigger stays in place meanwhile), so there is nothing to wait for
            return since is not None and self.changed_since(needs, since)
        changed = False
        async with self._lock:
            for table, cols in needs.items():
                if self.covers(table, cols):
                    if since is not None and self.changed_since((table,), since):
                        changed = True
                    continue
                async with self.pool.acquire() as conn:
                    have, _ = await install_capture(conn, table, cols)
                    if self.after_install is not None:
                        await self.after_install(conn)
                # a column the table lacks can never be captured; remember it as covered
                # so we do not retry forever (its filter then matches conservatively)
                self.captured[table] = have | frozenset(cols)
                self.changed_at[table] = time.monotonic()
                # even when another node installed it (did=False) it may have done so after
                # our query's snapshot: writes in between were not captured, so re-run
                changed = True
        return changed
