"""The asyncpg pool and ``ctx.db``: SQL with bind parameters, model helpers, read tracking."""

from __future__ import annotations

import json
import re
import time
import types
import typing
from contextvars import ContextVar
from typing import Any, Awaitable, Iterable, Mapping, Sequence

import asyncpg
import attrs

from .app import ModelDef, model_def
from .batch import NotBatchable
from .convert import converter
from .telemetry import current

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead, keeping its query (the embedded server's
    URL carries the socket folder and the password file there)."""
    base, _, query = url.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(url: str, **kw: Any) -> asyncpg.Connection:
    """A dedicated (non-pool) connection with FORGE's codecs, for LISTEN, locks and heartbeats.
    Give it a session URL (``[database] direct_url``), never a transaction pooler."""
    conn = await asyncpg.connect(url, **kw)
    await _init_connection(conn)
    return conn


class PoolerDetected(Exception):
    """Startup parameters do not reach the server: ``url`` is a pooler (PgBouncer) although
    ``[database] pooler`` says it is not."""


async def _init_read_only(conn: asyncpg.Connection) -> None:
    await _init_connection(conn)
    # PgBouncer told to ignore the startup parameter would silently drop the read-only guard
    if await conn.fetchval("SELECT current_setting('default_transaction_read_only')") != "on":
        raise PoolerDetected("the startup parameter default_transaction_read_only did not reach the server")


#: set while a query connection is released on which only statements that leave a session alone
#: ran (see :meth:`Database.untouched`): its read-only session cannot differ from a fresh one
SESSION_UNTOUCHED: ContextVar[bool] = ContextVar("forge_session_untouched", default=False)


async def _reset_touched_session(conn: asyncpg.Connection) -> None:
    """The reset on release of read-only (query) pools: asyncpg's own (RESET ALL - which also
    restores ``default_transaction_read_only`` - UNLISTEN *, unlock advisory locks, CLOSE ALL),
    skipped when only plain reads ran (:func:`leaves_session_alone`): a round trip per query, and
    in bench/rpc a third of PostgreSQL's CPU per call, for nothing."""
    if SESSION_UNTOUCHED.get():
        return
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


# --- statements that cannot change their session ------------------------------------------------
# What a read-only session can carry from one call to the next: settings (SET, set_config(...,
# false), SET ROLE), advisory locks, LISTEN, cursors WITH HOLD - what the reset undoes. A statement
# leaves all of that alone when it is one plain read: a SELECT (or WITH / VALUES / TABLE) whose
# every call is a keyword or a built-in function on the list below. Anything else - several
# statements, comments, dollar quotes, a function of the app's own or one that changes the session
# (set_config, pg_advisory_lock, ...) - keeps the reset. What the text cannot show - an app's view,
# operator or cast that calls such a function - is trusted as the model helpers' generated SQL
# always was.
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"(?!\s*\()")
_CALL = re.compile(r"(\"|[a-z_][a-z0-9_$]*(?:\s*\.\s*[a-z_][a-z0-9_$]*)?)\s*\(")
_WORD = re.compile(r"[a-z_][a-z0-9_$]*")
_READ_STARTS = frozenset({"select", "with", "values", "table"})
#: words that make a statement more than a read (most are refused in a read-only session anyway)
_NOT_READS = frozenset({
    "into", "insert", "update", "delete", "merge", "copy", "call", "do", "set", "reset", "listen", "unlisten",
    "notify", "declare", "prepare", "execute", "deallocate", "discard", "load", "lock", "begin", "commit", "rollback",
    "savepoint", "release", "show", "create", "alter", "drop", "grant", "revoke", "vacuum", "analyze", "explain"})
#: what may stand before "(" in a plain read: SQL keywords, type names with a modifier, built-ins
#: that only compute (no session state, no side effects)
_PLAIN_CALLS = frozenset("""
in exists any all some values array row over filter within cast and or not on using as from join lateral
select where when then else case by having is like ilike between distinct union intersect except limit offset
extract position substring trim overlay grouping rollup cube sets interval numeric decimal varchar char
character time timestamp bit float with
count sum avg min max bool_and bool_or every array_agg string_agg json_agg jsonb_agg json_object_agg
jsonb_object_agg json_build_object jsonb_build_object json_build_array jsonb_build_array to_json to_jsonb
row_to_json array_to_json json_array_length jsonb_array_length jsonb_typeof json_typeof jsonb_extract_path
jsonb_extract_path_text json_extract_path json_extract_path_text jsonb_strip_nulls jsonb_set jsonb_insert
jsonb_path_query jsonb_path_query_array jsonb_path_query_first jsonb_path_exists jsonb_path_match
jsonb_each jsonb_each_text json_each json_each_text jsonb_array_elements jsonb_array_elements_text
json_array_elements json_array_elements_text jsonb_object_keys json_object_keys jsonb_pretty
now current_date current_timestamp clock_timestamp statement_timestamp transaction_timestamp timeofday
date_trunc date_part date_bin age make_date make_time make_timestamp make_timestamptz make_interval
to_char to_date to_timestamp to_number justify_days justify_hours justify_interval isfinite
lower upper initcap length char_length octet_length bit_length concat concat_ws replace split_part left
right lpad rpad ltrim rtrim btrim reverse repeat strpos starts_with format quote_ident quote_literal
quote_nullable regexp_replace regexp_match regexp_matches regexp_split_to_array regexp_split_to_table
regexp_like regexp_count regexp_substr translate ascii chr md5 sha224 sha256 sha384 sha512 encode decode
abs round floor ceil ceiling trunc mod power sqrt cbrt exp ln log sign greatest least coalesce nullif
div width_bucket random gen_random_uuid uuidv4 uuidv7
generate_series unnest array_length array_lower array_upper array_position array_positions array_remove
array_replace array_append array_prepend array_cat array_dims array_ndims cardinality
row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value
percentile_cont percentile_disc mode stddev stddev_pop stddev_samp variance var_pop var_samp corr
to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery ts_rank ts_rank_cd ts_headline
setweight
""".split())
_PLAIN_CACHE: dict[str, bool] = {}


def leaves_session_alone(sql: str) -> bool:
    """Whether ``sql`` is one plain read, which cannot change the session it runs in (see above):
    a query that ran only such statements returns its connection without the reset."""
    known = _PLAIN_CACHE.get(sql)
    if known is None:
        known = _plain_read(sql)
        if len(_PLAIN_CACHE) < 10_000:
            _PLAIN_CACHE[sql] = known
    return known


def _plain_read(sql: str) -> bool:
    text = sql.lower()
    if "\\" in text or "$$" in text or re.search(r"\$[a-z_]", text):  # escapes, dollar quotes: not worth reading
        return False
    text = _QUOTED.sub(" ", text)  # literals and quoted names (a quoted name that is called stays)
    if ";" in text or "--" in text or "/*" in text or "'" in text:
        return False
    words = _WORD.findall(text)
    if not words or words[0] not in _READ_STARTS or not _NOT_READS.isdisjoint(words):
        return False
    return all(name in _PLAIN_CALLS for name in (re.sub(r"\s+", "", n).removeprefix("pg_catalog.")
                                                 for n in _CALL.findall(text)))


def statements_run(conn: Any) -> int | None:
    """How many statements ``conn`` (or a pool's proxy of it) has executed: asyncpg's own count,
    which its pool uses for ``max_queries``; None when this asyncpg keeps none."""
    raw = getattr(conn, "_con", conn)
    count = getattr(getattr(raw, "_protocol", None), "queries_count", None)
    return count if isinstance(count, int) else None


async def _no_session_reset(conn: asyncpg.Connection) -> None:
    """Through a transaction pooler the pool's reset on release (RESET ALL, UNLISTEN *, unlock
    advisory locks, CLOSE ALL) would run on whichever server connection the pooler picks, not
    on those our transactions used: a round trip per call that cleans nothing of ours."""


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 20, timeout: float = 10.0,
                      read_only: bool = False, pooled: bool = False) -> asyncpg.Pool:
    """An asyncpg pool with FORGE's codecs.

    ``pooled``: ``url`` is a transaction-mode pooler, where consecutive transactions of one client
    connection may run on different server connections: no named prepared statements (asyncpg's
    statement cache off), no startup parameters beyond those PgBouncer passes on, no session reset
    on release.

    ``read_only`` (never with ``pooled``): every statement runs in a read-only transaction of its
    own, without a BEGIN/COMMIT round trip each. A startup-packet setting is also what RESET ALL
    (the pool's reset on release) restores, so a query cannot leave a connection writable.
    """
    if read_only and pooled:
        raise ValueError("read-only sessions need startup parameters, which a transaction pooler does not pass on; "
                         "run queries in BEGIN READ ONLY transactions on a pooled pool instead")
    settings = {"application_name": "forge"}
    init = _init_connection
    if read_only:
        settings = {"application_name": "forge-query", "default_transaction_read_only": "on"}
        init = _init_read_only
    try:
        return await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, init=init, timeout=timeout, server_settings=settings,
            statement_cache_size=0 if pooled else 100,
            reset=_no_session_reset if pooled else _reset_touched_session if read_only else None,
        )
    except asyncpg.ProtocolViolationError as exc:
        # PgBouncer: "unsupported startup parameter: default_transaction_read_only"
        if "startup parameter" in str(exc):
            raise PoolerDetected(str(exc)) from exc
        raise


def quote_ident(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return f'"{name}"'


def _table(name: str) -> str:
    return ".".join(quote_ident(p) for p in name.split("."))


@attrs.frozen
class TableRead:
    """A query read ``table``; with ``filters`` only rows whose columns equal those values."""

    table: str
    filters: tuple[tuple[str, Any], ...] | None = None

    def matches(self, row: Mapping[str, Any] | None) -> bool:
        if self.filters is None:
            return True
        if row is None:
            return False
        return all(str(row.get(col)) == str(val) for col, val in self.filters)


# Tables a statement reads, found once per SQL text with EXPLAIN (plan-level, so views and
# CTEs resolve to their base tables). Keyed by SQL text; small and bounded.
_EXPLAIN_CACHE: dict[str, tuple[str, ...]] = {}


def _relations(plan: Any, out: set[str]) -> None:
    if isinstance(plan, dict):
        rel = plan.get("Relation Name")
        if rel:
            schema = plan.get("Schema")
            out.add(rel if schema in (None, "public") else f"{schema}.{rel}")
        for v in plan.values():
            _relations(v, out)
    elif isinstance(plan, list):
        for v in plan:
            _relations(v, out)


async def _traced(method: Any, sql: str, args: Sequence[Any]) -> Any:
    """Run one statement; inside a sampled trace it becomes a ``sql`` span (statement text only,
    never the values)."""
    span = current()
    if span is None or not span.sampled:
        return await method(sql, *args)
    t0, error = time.time_ns(), None
    try:
        return await method(sql, *args)
    except BaseException as exc:
        error = type(exc).__name__
        raise
    finally:
        span.record("sql", "client", t0, time.time_ns(), {"db.statement": sql}, error)


#: the exact types a plain field accepts as they are (the converter's hooks return such a value unchanged)
_PLAIN_TYPES = frozenset({int, str, float, bool})
#: model class -> (field, the exact value types it takes as they are) for every field, or None when
#: some field needs the converter (any other type, an alias, ``init=False``); see Database._row
_PLAIN_FIELDS: dict[type, tuple[tuple[str, frozenset[type]], ...] | None] = {}
#: not there: a model not looked at yet (_PLAIN_FIELDS), a column the row lacks
_MISSING = object()


def _plain_fields(cls: type) -> tuple[tuple[str, frozenset[type]], ...] | None:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: the converter reports it
        return None
    out = []
    for a in attrs.fields(cls):
        if not a.init or a.alias != a.name:
            return None
        tp = hints.get(a.name, a.type)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = typing.get_args(tp)
            kinds = [t for t in args if t is not type(None)]
            if len(kinds) != 1 or len(args) != 2:  # only ``X | None``: a wider union is the converter's
                return None
            accepted = frozenset((kinds[0], type(None)))
        else:
            accepted = frozenset((tp,))
        if not (accepted - {type(None)}) <= _PLAIN_TYPES:
            return None
        out.append((a.name, accepted))
    return tuple(out)


#: (model, filtered columns, order_by, limit) -> (the SELECT ``select`` sends, the model's table)
_SELECT_SQL: dict[tuple, tuple[str, str]] = {}


class Database:
    """``ctx.db``: runs SQL on the call's connection and remembers what it read."""

    __slots__ = ("conn", "readonly", "_reads", "_statements", "_helper_statements", "selects", "batch", "refused")

    def __init__(self, conn: Any, *, readonly: bool = False, batch: Any = None) -> None:
        #: inside a batch of queries (forge_kernel.batch) a stand-in that refuses every use
        self.conn = conn
        self.readonly = readonly
        self._reads: list[TableRead] = []
        self._statements: list[tuple[str, tuple]] = []
        #: statements the model helpers ran (``get``, ``select``): plain SELECTs
        self._helper_statements = 0
        #: statements ``select`` ran (the only ones a batch of queries can share)
        self.selects = 0
        #: the QueryBatch whose connection ``select`` shares, or None
        self.batch = batch
        #: inside a batch: something other than ``select`` was attempted (the call runs alone again)
        self.refused = False

    def _refuse(self, what: str) -> None:
        if self.batch is not None:
            self.refused = True
            raise NotBatchable(f"{what} inside a batch of live-query re-runs")

    # --- raw SQL (always with bind parameters: $1, $2, ...) -------------------------
    # Not coroutines themselves: each returns the connection's call to await (one coroutine
    # less per statement, on every query's path).
    def fetch(self, sql: str, *args: Any) -> Awaitable[list[asyncpg.Record]]:
        self._refuse("ctx.db.fetch")
        self._statements.append((sql, args))
        span = current()
        if span is None or not span.sampled:
            return self.conn.fetch(sql, *args)
        return _traced(self.conn.fetch, sql, args)

    def fetchrow(self, sql: str, *args: Any) -> Awaitable[asyncpg.Record | None]:
        self._refuse("ctx.db.fetchrow")
        self._statements.append((sql, args))
        span = current()
        if span is None or not span.sampled:
            return self.conn.fetchrow(sql, *args)
        return _traced(self.conn.fetchrow, sql, args)

    def fetchval(self, sql: str, *args: Any) -> Awaitable[Any]:
        self._refuse("ctx.db.fetchval")
        self._statements.append((sql, args))
        span = current()
        if span is None or not span.sampled:
            return self.conn.fetchval(sql, *args)
        return _traced(self.conn.fetchval, sql, args)

    def execute(self, sql: str, *args: Any) -> Awaitable[str]:
        self._refuse("ctx.db.execute")
        self._statements.append((sql, args))
        span = current()
        if span is None or not span.sampled:
            return self.conn.execute(sql, *args)
        return _traced(self.conn.execute, sql, args)

    async def executemany(self, sql: str, args: Iterable[Sequence[Any]]) -> None:
        self._refuse("ctx.db.executemany")
        await self.conn.executemany(sql, args)

    def transaction(self, **kw: Any):
        self._refuse("ctx.db.transaction")
        return self.conn.transaction(**kw)

    # --- models ---------------------------------------------------------------------
    def _row(self, md: ModelDef, rec: asyncpg.Record | None) -> Any:
        if rec is None:
            return None
        plain = _PLAIN_FIELDS.get(md.cls, _MISSING)
        if plain is _MISSING:
            plain = _PLAIN_FIELDS[md.cls] = _plain_fields(md.cls)
        if plain is not None:
            # every field an int, str, float or bool (or None where allowed) and every value of exactly
            # that type: the converter would hand each value over unchanged, so build the instance
            # directly (a live query's re-runs structure every row of every result: a third of the
            # call's own CPU went to the converter's dispatch). Anything else goes through the converter.
            kw = {}
            for name, accepted in plain:
                value = rec.get(name, _MISSING)
                if value is _MISSING:
                    continue  # a model may leave columns of its table out (created_at with a default)
                if type(value) not in accepted:
                    break
                kw[name] = value
            else:
                try:
                    return md.cls(**kw)
                except Exception:  # a missing required field, a validator: the converter says it its way
                    pass
        # a model may leave columns of its table out (created_at with a default, audit columns)
        return converter.structure({c: rec[c] for c in md.columns if c in rec}, md.cls)

    def _values(self, md: ModelDef, obj: Any) -> dict[str, Any]:
        return {a.name: getattr(obj, a.name) for a in attrs.fields(md.cls)}

    async def insert(self, obj: Any) -> Any:
        self._refuse("ctx.db.insert")
        md = model_def(type(obj))
        vals = self._values(md, obj)
        # None means "let the column default decide" (serial ids, created_at DEFAULT now())
        cols = [c for c in md.columns if vals[c] is not None]
        sql = (f"INSERT INTO {_table(md.table)} ({', '.join(map(quote_ident, cols))}) "
               f"VALUES ({', '.join(f'${i + 1}' for i in range(len(cols)))}) RETURNING *")
        return self._row(md, await _traced(self.conn.fetchrow, sql, [vals[c] for c in cols]))

    async def get(self, cls: type, pk: Any) -> Any:
        self._refuse("ctx.db.get")
        md = model_def(cls)
        self._helper_statements += 1
        self._reads.append(TableRead(md.table, ((md.primary_key, pk),)))
        rec = await _traced(self.conn.fetchrow, f"SELECT * FROM {_table(md.table)} WHERE {quote_ident(md.primary_key)} = $1",
                            (pk,))
        return self._row(md, rec)

    async def select(self, cls: type, *, order_by: str | None = None, limit: int | None = None, **where: Any) -> list[Any]:
        """Rows of ``cls`` whose columns equal ``where``; recorded as a filtered read."""
        md = model_def(cls)
        self._helper_statements += 1
        # the statement depends on the filtered columns, not their values: built once (live-query re-runs)
        key = (cls, tuple(where), order_by, limit)
        found = _SELECT_SQL.get(key)
        if found is None:
            found = self._select_sql(md, tuple(where), order_by, limit)
            if len(_SELECT_SQL) < 10_000:
                _SELECT_SQL[key] = found
        sql, table = found
        self._reads.append(TableRead(table, tuple(sorted(where.items())) or None))
        self.selects += 1
        if self.batch is not None:
            return [self._row(md, r) for r in await self.batch.fetch(sql, list(where.values()))]
        return [self._row(md, r) for r in await _traced(self.conn.fetch, sql, list(where.values()))]

    @staticmethod
    def _select_sql(md: ModelDef, where: tuple[str, ...], order_by: str | None, limit: int | None) -> tuple[str, str]:
        for col in where:
            if col not in md.columns:
                raise ValueError(f"{md.cls.__name__} has no column {col!r}")
        sql = f"SELECT * FROM {_table(md.table)}"
        if where:
            sql += " WHERE " + " AND ".join(f"{quote_ident(c)} = ${i + 1}" for i, c in enumerate(where))
        if order_by:
            desc = order_by.startswith("-")
            col = order_by.lstrip("-")
            if col not in md.columns:
                raise ValueError(f"{md.cls.__name__} has no column {col!r} to order by")
            sql += f" ORDER BY {quote_ident(col)}{' DESC' if desc else ''}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql, md.table

    async def update(self, obj: Any) -> Any:
        self._refuse("ctx.db.update")
        md = model_def(type(obj))
        vals = self._values(md, obj)
        cols = [c for c in md.columns if c != md.primary_key]
        sets = ", ".join(f"{quote_ident(c)} = ${i + 2}" for i, c in enumerate(cols))
        sql = f"UPDATE {_table(md.table)} SET {sets} WHERE {quote_ident(md.primary_key)} = $1 RETURNING *"
        return self._row(md, await _traced(self.conn.fetchrow, sql, [vals[md.primary_key], *(vals[c] for c in cols)]))

    async def delete(self, cls: type, pk: Any) -> bool:
        self._refuse("ctx.db.delete")
        md = model_def(cls)
        res = await _traced(self.conn.execute, f"DELETE FROM {_table(md.table)} WHERE {quote_ident(md.primary_key)} = $1",
                            (pk,))
        return res != "DELETE 0"

    def untouched(self, ran: int | None) -> bool:
        """Whether the ``ran`` statements executed on the connection since this Database was made
        (:func:`statements_run`) were all the model helpers' and plain reads
        (:func:`leaves_session_alone`): nothing else, nothing through ``conn`` directly, so the
        session holds nothing a reset would undo."""
        if ran is None or ran != self._helper_statements + len(self._statements):
            return False
        for sql, _ in self._statements:
            if not leaves_session_alone(sql):
                return False
        return True

    # --- what was read --------------------------------------------------------------
    def declare_read(self, table: str, **filters: Any) -> None:
        """Declare a read the SQL cannot show (e.g. a function reading another service)."""
        self._reads.append(TableRead(table, tuple(sorted(filters.items())) or None))

    async def read_set(self) -> list[TableRead]:
        """Tables (with equality filters where known) this call read. Raw SQL counts as a
        whole-table read of every relation in its plan."""
        reads = list(self._reads)
        for sql, args in self._statements:
            tables = _EXPLAIN_CACHE.get(sql)
            if tables is None:
                found: set[str] = set()
                try:
                    plan = await self.conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
                    _relations(json.loads(plan) if isinstance(plan, str) else plan, found)
                except asyncpg.PostgresError:
                    pass
                tables = tuple(sorted(found))
                if len(_EXPLAIN_CACHE) < 10_000:
                    _EXPLAIN_CACHE[sql] = tables
            reads.extend(TableRead(t) for t in tables)
        return list(dict.fromkeys(reads))
