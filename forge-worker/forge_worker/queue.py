"""Storing jobs and managing them: the dispatcher behind ``ctx.dispatch`` and the public
:class:`JobQueue` API (enqueue from plain Python with only a pool; list, retry, discard and
cancel jobs).

Every statement here is a single round trip with bind parameters, so it works on a pool, a
plain connection, or inside the caller's transaction.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import json
import re
from typing import Any, Iterable, Mapping, Sequence

import asyncpg
import attrs

from forge_kernel.app import FunctionDef, Registry, definition
from forge_kernel.errors import Conflict, InvalidArgument, NotFound
from forge_kernel.executor import JobOutcome, JobRequest, job_request

#: channel for "work is waiting" hints; the payload names the node to wake (or ``*``)
WAKE_CHANNEL = "forge_jobs"
#: channel telling the node running a job that it was cancelled; payload is the job id
CANCEL_CHANNEL = "forge_jobs_cancel"

_MAX_INT = 2_147_483_647
_MAX_BIGINT = 2**63 - 1
_MAX_FLOAT = 1.7976931348623157e308  # a larger int timeout has no float8
#: an escaped NUL in JSON text (not an escaped backslash followed by "u0000")
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

# One statement stores the whole batch: ids are drawn first so the reply maps back to the
# request order; skipped unique jobs report the live job that holds the key. NOTIFY goes only
# to sleeping workers that serve the batch's queues, at most one per stored job, so busy
# clusters send no NOTIFY at all (NOTIFY takes a global lock at commit) and idle ones do not
# all stampede for a single job.
_INSERT = """
WITH req AS (
    SELECT nextval(pg_get_serial_sequence('forge_jobs', 'id')) AS id, r.*
    FROM unnest($1::text::text[], $2::text::text[], $3::text::text[], $4::text::int[], $5::text::timestamptz[],
                $6::text::int[], $7::text::text[], $8::text::float8[], $9::text::text[], $10::text::text[],
                $11::text::text[], $15::text::text[])
         WITH ORDINALITY AS r(name, args, queue, priority, run_at, max_attempts, capability, timeout,
                              unique_key, caller, options, run_as, ord)
), ins AS (
    INSERT INTO forge_jobs (id, name, args, queue, priority, run_at, status, max_attempts, capability, timeout,
                            unique_key, caller, options, run_as)
    SELECT id, name, args::jsonb, queue, priority, coalesce(run_at, now()),
           CASE WHEN run_at > now() THEN 'scheduled' ELSE 'pending' END,
           max_attempts, capability, timeout, unique_key, caller, options::jsonb, run_as::jsonb
    FROM req ORDER BY ord
    {conflict}
    RETURNING id, unique_key
), sleepers AS (
    SELECT s.node_id FROM forge_worker_sleepers s
    WHERE cardinality(s.queues) = 0 OR s.queues && $3::text::text[]
    ORDER BY (s.capabilities @> $12::text[]) DESC, random()
    LIMIT $13
), wake AS (
    SELECT pg_notify('forge_jobs', node_id) FROM sleepers WHERE $14::boolean
)
SELECT req.ord, coalesce(ins.id, by_key.id, (SELECT j.id FROM forge_jobs j
                                            WHERE j.unique_key = req.unique_key AND j.status <> 'dead')) AS id,
       (SELECT count(*) FROM wake) AS woke, (SELECT array_agg(node_id) FROM sleepers) AS sleepers
FROM req
LEFT JOIN ins ON ins.id = req.id
-- replace keeps the existing row's id: match it by key (equality joins only, so big batches hash-join)
LEFT JOIN ins AS by_key ON by_key.unique_key = req.unique_key
ORDER BY req.ord
"""
_ON_CONFLICT_SKIP = "ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND status <> 'dead' DO NOTHING"
# replace changes a job that has not started yet; a running job is left alone (reported like skip)
_ON_CONFLICT_REPLACE = """ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND status <> 'dead' DO UPDATE SET
    name = EXCLUDED.name, args = EXCLUDED.args, queue = EXCLUDED.queue, priority = EXCLUDED.priority,
    run_at = EXCLUDED.run_at, status = EXCLUDED.status, max_attempts = EXCLUDED.max_attempts,
    capability = EXCLUDED.capability, timeout = EXCLUDED.timeout, caller = EXCLUDED.caller,
    options = EXCLUDED.options, run_as = EXCLUDED.run_as, attempt = 0, last_error = NULL
    WHERE forge_jobs.status IN ('pending', 'scheduled')"""
INSERT_SKIP = _INSERT.format(conflict=_ON_CONFLICT_SKIP)

# Batches without unique keys (the common case) skip the speculative-insert and join machinery.
# Ids of one INSERT ... SELECT ... ORDER BY are drawn in that order, so sorted ids follow the
# request order.
INSERT_PLAIN = """
WITH ins AS (
    INSERT INTO forge_jobs (name, args, queue, priority, run_at, status, max_attempts, capability, timeout,
                            caller, options, run_as)
    SELECT name, args::jsonb, queue, priority, coalesce(run_at, now()),
           CASE WHEN run_at > now() THEN 'scheduled' ELSE 'pending' END,
           max_attempts, capability, timeout, caller, options::jsonb, run_as::jsonb
    FROM unnest($1::text::text[], $2::text::text[], $3::text::text[], $4::text::int[], $5::text::timestamptz[],
                $6::text::int[], $7::text::text[], $8::text::float8[], $9::text::text[], $10::text::text[],
                $11::text::text[], $15::text::text[])
         WITH ORDINALITY AS r(name, args, queue, priority, run_at, max_attempts, capability, timeout,
                              unique_key, caller, options, run_as, ord)
    ORDER BY ord
    RETURNING id
), sleepers AS (
    SELECT s.node_id FROM forge_worker_sleepers s
    WHERE cardinality(s.queues) = 0 OR s.queues && $3::text::text[]
    ORDER BY (s.capabilities @> $12::text[]) DESC, random()
    LIMIT $13
), wake AS (
    SELECT pg_notify('forge_jobs', node_id) FROM sleepers WHERE $14::boolean
)
SELECT id, (SELECT count(*) FROM wake) AS woke, (SELECT array_agg(node_id) FROM sleepers) AS sleepers
FROM ins ORDER BY id
"""
INSERT_REPLACE = _INSERT.format(conflict=_ON_CONFLICT_REPLACE)


def _utc_in_range(value: dt.datetime) -> bool:
    try:
        value.astimezone(dt.timezone.utc)  # as _timestamp sends it
    except OverflowError:
        return False
    return True


def _check(req: JobRequest) -> None:
    problems = []
    if not isinstance(req.name, str) or not req.name:
        problems.append(f"name must be a non-empty string, got {req.name!r}")
    if type(req.args) is not dict and not isinstance(req.args, Mapping):  # a dict skips the ABC check
        problems.append(f"args must be an object, got {type(req.args).__name__}")
    if not isinstance(req.queue, str) or not req.queue:
        problems.append(f"queue must be a non-empty string, got {req.queue!r}")
    if not isinstance(req.priority, int) or not -_MAX_INT <= req.priority <= _MAX_INT:
        problems.append(f"priority must be a 32-bit integer, got {req.priority!r}")
    if not isinstance(req.max_attempts, int) or not 1 <= req.max_attempts <= _MAX_INT:
        problems.append(f"max_attempts must be an integer >= 1, got {req.max_attempts!r}")
    if req.timeout is not None and not (isinstance(req.timeout, (int, float)) and req.timeout > 0
                                        and (isinstance(req.timeout, float) or req.timeout <= _MAX_FLOAT)):
        problems.append(f"timeout must be a positive number of seconds, got {req.timeout!r}")
    if req.run_at is not None:
        if not isinstance(req.run_at, dt.datetime) or req.run_at.tzinfo is None:
            problems.append(f"run_at must be a timezone-aware datetime, got {req.run_at!r}")
        elif req.run_at.year in (1, 9999) and not _utc_in_range(req.run_at):
            problems.append(f"run_at must fall within the years 1 to 9999 in UTC, got {req.run_at!r}")
    if not (req.capability is None or isinstance(req.capability, str)):
        problems.append(f"capability must be a string or None, got {req.capability!r}")
    if not (req.unique_key is None or isinstance(req.unique_key, str)):
        problems.append(f"unique_key must be a string or None, got {req.unique_key!r}")
    if not (req.caller is None or isinstance(req.caller, str)):
        problems.append(f"caller must be a string or None, got {req.caller!r}")
    if req.on_conflict not in ("skip", "replace"):
        problems.append(f"on_conflict must be 'skip' or 'replace', got {req.on_conflict!r}")
    if problems:
        raise InvalidArgument(f"job {req.name!r}: " + "; ".join(problems))


# one encoder for every value: json.dumps with options builds a JSONEncoder per call (~0.7 us)
# (no NaN or Infinity: json writes them, jsonb rejects them)
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_ENCODE_ASCII = json.JSONEncoder(separators=(",", ":")).encode  # run_as, escaped as it always was


def _json(value: Mapping[str, Any], name: str, what: str) -> str:
    if not value:
        return "{}"  # no arguments, no options: the common job
    try:
        text = _ENCODE(value if type(value) is dict else dict(value))
        text.encode("utf-8")  # a lone surrogate cannot be stored
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"job {name!r}: {what} must be JSON-safe text: {exc}") from None
    if _NUL.search(text):
        raise InvalidArgument(f"job {name!r}: {what} contain a NUL character (\\u0000), which PostgreSQL "
                              f"jsonb cannot store")
    return text


# The batch's columns go as array literals, one text value each ($n::text::text[]...): asyncpg checks
# every element of a list it encodes against the collections.abc ABCs (~0.4 us an element, 12 columns),
# and most columns of a batch hold one value throughout (queue, priority, caller, run_as...), whose
# literal is that element's text repeated.
def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(values: list, element: Any) -> str:
    """A PostgreSQL array literal of ``values`` (``None``: NULL), each element's text by ``element``;
    values that compare equal must have the same text (datetimes do not: see _run_at)."""
    first = values[0]
    if values.count(first) == len(values):
        return "{" + ",".join(["NULL" if first is None else element(first)] * len(values)) + "}"
    return "{" + ",".join(["NULL" if v is None else element(v) for v in values]) + "}"


def _text(values: list, reqs: Sequence[JobRequest], field: str) -> str:
    """A text column's literal; a value PostgreSQL's text cannot hold (a NUL, a lone surrogate) is refused
    naming its job and field, where it would fail the statement with neither (one scan a column)."""
    literal = _literal(values, _quote)
    if "\x00" in literal or not (literal.isascii() or _utf8(literal)):
        for r, v in zip(reqs, values):
            if v is not None and ("\x00" in v or not _utf8(v)):
                what = "a NUL character" if "\x00" in v else "a lone surrogate"
                raise InvalidArgument(f"job {r.name!r}: {field} contains {what}, which PostgreSQL text cannot store")
    return literal


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int(value: int) -> str:
    return "%d" % value


def _timestamp(value: dt.datetime) -> str:
    if value.utcoffset():  # aware (checked); PostgreSQL reads offsets only within +-15:59, in whole seconds
        value = value.astimezone(dt.timezone.utc)
    return '"' + value.isoformat() + '"'  # ISO 8601, +00:00


def _run_at(values: list) -> str:
    """run_at's literal: two datetimes in one zone compare by wall time, fold ignored (equal across the
    hour a DST change repeats), so only one object throughout is a value repeated."""
    first = values[0]
    if values.count(first) == len(values) and (first is None or all(v is first for v in values)):
        return _literal(values, _timestamp)
    return _literal([None if v is None else _timestamp(v) for v in values], str)


def _columns(reqs: Sequence[JobRequest]) -> tuple:
    caps = sorted({r.capability for r in reqs if r.capability})
    return (
        _text([r.name for r in reqs], reqs, 'name'), _literal([_json(r.args, r.name, 'args') for r in reqs], _quote),
        _text([r.queue for r in reqs], reqs, 'queue'), _literal([r.priority for r in reqs], _int),
        _run_at([r.run_at for r in reqs]),
        _literal([r.max_attempts for r in reqs], _int), _text([r.capability for r in reqs], reqs, 'capability'),
        _literal([None if r.timeout is None else float(r.timeout) for r in reqs], repr),
        _text([r.unique_key for r in reqs], reqs, 'unique_key'), _text([r.caller for r in reqs], reqs, 'caller'),
        _literal([_json(r.options, r.name, 'options') for r in reqs], _quote), caps, len(reqs),
    )


def _run_as(reqs: Sequence[JobRequest]) -> str:
    """$15: the identity each job runs as (``Auth.to_job()``; NULL only for requests built by hand)."""
    return _literal([None if r.run_as is None else _ENCODE_ASCII(r.run_as if type(r.run_as) is dict else dict(r.run_as))
                     for r in reqs], _quote)


# The wake-up hint for jobs stored outside a transaction block, sent once they are committed.
# NOTIFY takes a cluster-wide lock at commit and holds it through the commit's WAL flush, so
# notifying inside every durable single-job transaction serialises them all (with fsync on, an
# offered 1,000 jobs/s backs up by seconds). This hint commits on its own, writes nothing but
# the notification and needs no flush.
HINT = """SELECT set_config('synchronous_commit', 'off', true), pg_notify('forge_jobs', node_id)
          FROM unnest($1::text[]) AS node_id"""


async def store_jobs(conn: Any, requests: Sequence[JobRequest]) -> list[int]:
    """Write ``requests`` on ``conn`` (a connection, possibly inside a transaction, or a pool).

    One round trip per ``on_conflict`` mode present (normally one), plus a wake-up hint after
    the commit when a worker is waiting and ``conn`` is not inside a transaction block (inside
    one, the hint is a NOTIFY that commits with it). Returns one id per request, in order; a
    request skipped because its ``unique_key`` is taken returns the id of the job holding the
    key (0 if that job is not visible yet).
    """
    if not requests:
        return []
    for r in requests:
        _check(r)
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as held:
            return await _store(held, requests)
    return await _store(conn, requests)


async def _store(conn: Any, requests: Sequence[JobRequest]) -> list[int]:
    inline = conn.is_in_transaction()
    sleepers: set[str] = set()
    try:
        return await _insert(conn, requests, inline, sleepers)
    finally:
        if sleepers:
            await conn.execute(HINT, sorted(sleepers))


async def _insert(conn: Any, requests: Sequence[JobRequest], inline: bool, sleepers: set[str]) -> list[int]:
    if all(r.unique_key is None for r in requests):
        rows = await conn.fetch(INSERT_PLAIN, *_columns(requests), inline, _run_as(requests))
        if rows and not inline and rows[0]["sleepers"]:
            sleepers.update(rows[0]["sleepers"])
        return [r["id"] for r in rows]
    ids = [0] * len(requests)
    for mode, sql in (("skip", INSERT_SKIP), ("replace", INSERT_REPLACE)):
        # a key may appear once per statement: skip keeps the first request, replace the last
        chosen: dict[int, int] = {}
        by_key: dict[str, int] = {}
        for i, r in enumerate(requests):
            if r.unique_key is None:
                # on_conflict means nothing without a key: all such jobs go in the first
                # statement, so their ids follow the request order
                if mode == "skip":
                    chosen[i] = i
                continue
            if r.on_conflict != mode:
                continue
            if r.unique_key is None:
                chosen[i] = i
            elif r.unique_key not in by_key or mode == "replace":
                if r.unique_key in by_key:
                    chosen.pop(by_key[r.unique_key])
                by_key[r.unique_key] = i
                chosen[i] = i
        if not chosen:
            continue
        order = sorted(chosen)
        chosen_requests = [requests[i] for i in order]
        rows = await conn.fetch(sql, *_columns(chosen_requests), inline, _run_as(chosen_requests))
        if rows and not inline and rows[0]["sleepers"]:
            sleepers.update(rows[0]["sleepers"])
        for row in rows:
            ids[order[row["ord"] - 1]] = row["id"] or 0
        # duplicates of a key within the batch report the id their key got
        for i, r in enumerate(requests):
            if r.on_conflict == mode and i not in chosen and r.unique_key in by_key:
                ids[i] = ids[by_key[r.unique_key]]
    return ids


@attrs.frozen
class Dispatcher:
    """The kernel's ``forge_job_dispatcher``: writes ``ctx.dispatch`` jobs in the caller's transaction."""

    async def dispatch(self, conn: Any, requests: Sequence[JobRequest]) -> list[int]:
        return await store_jobs(conn, requests)

    async def ended(self, conn: Any, job_ids: Sequence[int]) -> dict[int, JobOutcome | None]:
        """How each of ``job_ids`` ended, for those that have (see the hook spec): dead letters
        from the live table, succeeded, cancelled and discarded jobs from history; ``None`` for
        an id in neither (its history was purged)."""
        ids = _ids(job_ids)
        rows = await conn.fetch(_ENDED, ids)
        out: dict[int, JobOutcome | None] = {i: None for i in ids}
        for r in rows:
            if r["status"] not in ("dead", "succeeded", "cancelled", "discarded"):
                out.pop(r["id"], None)  # still scheduled, pending or running
                continue
            status, error = r["status"], r["last_error"]
            if status == "discarded":
                status, error = "dead", "discarded from the dead-letter queue" + (f": {error}" if error else "")
            elif status == "cancelled":
                error = error or "cancelled before it finished"
            options = r["options"]
            out[r["id"]] = JobOutcome(
                job_id=r["id"], name=r["name"], args={}, options=json.loads(options) if isinstance(options, str)
                else (options or {}), status=status, attempt=r["attempt"], started_at=r["started_at"],
                finished_at=r["finished_at"] or r["now"], error=error if status != "succeeded" else None,
                node_id=r["node_id"])
        return out


# live rows first: a job id is in one table at a time, but history may hold several rows of one id
_ENDED = """
SELECT DISTINCT ON (id) id, name, options, status, attempt, started_at, finished_at, last_error, node_id, now() AS now
FROM (SELECT id, name, options, status, attempt, started_at, finished_at, last_error, node_id, 0 AS rank
      FROM forge_jobs WHERE id = ANY($1::bigint[])
      UNION ALL
      SELECT id, name, options, status, attempt, started_at, finished_at, last_error, node_id, 1 AS rank
      FROM forge_job_history WHERE id = ANY($1::bigint[])) j
ORDER BY id, rank, finished_at DESC NULLS LAST
"""


# --- reading and managing jobs ------------------------------------------------------------
@attrs.frozen
class JobInfo:
    """A job as stored: live (scheduled, pending, running, dead) or finished (history)."""

    id: int
    name: str
    queue: str
    args: Mapping[str, Any]
    status: str
    priority: int
    attempt: int
    max_attempts: int
    run_at: dt.datetime
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    node_id: str | None
    last_error: str | None
    unique_key: str | None
    caller: str | None
    options: Mapping[str, Any]
    progress: float | None = None
    progress_message: str | None = None
    cancel_requested: bool = False

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "JobInfo":
        data = {a.name: row[a.name] for a in attrs.fields(cls) if a.name in row}
        for key in ("args", "options"):  # a pool without FORGE's json codecs returns text
            if isinstance(data.get(key), str):
                data[key] = json.loads(data[key])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


_LIVE_COLS = ("id, name, queue, args, status, priority, attempt, max_attempts, run_at, created_at, started_at, "
              "finished_at, node_id, last_error, unique_key, caller, options, progress, progress_message, "
              "cancel_requested")
_HIST_COLS = ("id, name, queue, args, status, priority, attempt, max_attempts, run_at, created_at, started_at, "
              "finished_at, node_id, last_error, unique_key, caller, options, NULL::real AS progress, "
              "NULL::text AS progress_message, false AS cancel_requested")

LIVE_STATUSES = ("scheduled", "pending", "running", "dead")
HISTORY_STATUSES = ("succeeded", "cancelled", "discarded")

_MOVE_TO_HISTORY = """
    INSERT INTO forge_job_history (id, name, queue, args, priority, status, attempt, max_attempts, unique_key,
        caller, options, node_id, last_error, created_at, run_at, started_at, finished_at)
    SELECT id, name, queue, args, priority, $2, attempt, max_attempts, unique_key, caller, options, node_id,
           last_error, created_at, run_at, started_at, now()
    FROM gone
"""


def _ids(ids: Iterable[int]) -> list[int]:
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 < i <= _MAX_BIGINT:
            raise InvalidArgument(f"job ids are whole numbers from 1 to {_MAX_BIGINT}, got {i!r}")
        out.append(i)
    return out


def _queues(queues: Iterable[str]) -> list[str]:
    if isinstance(queues, str):
        queues = [queues]
    out = []
    for q in queues:
        if not isinstance(q, str) or not q or len(q) > 200 or "\x00" in q:
            raise InvalidArgument(f"a queue name is a non-empty string of at most 200 characters (no NUL), got {q!r}")
        out.append(q)
    return out


class JobQueue:
    """Enqueue and manage jobs with only a pool (or a connection): no node needed.

    Example (``tests/test_docs_examples.py`` runs it)::

        queue = JobQueue(pool)
        job_id = await queue.enqueue(send_email, {"to": "a@example.com"}, delay=60)
        ids = await queue.enqueue_many([queue.request("resize", {"image": i}) for i in range(5000)])

    Arguments of the job go in one dict; keyword arguments are options (``delay``, ``priority``...).
    """

    def __init__(self, db: asyncpg.Pool | asyncpg.Connection, registry: Registry | None = None, *,
                 hook: Any = None, config: Any = None) -> None:
        self.db = db
        #: resolves job names given as strings, so their ``@job`` defaults apply
        self.registry = registry
        #: the plugin hooks and configuration (``node.loader.hook``, ``node.config``): with them a
        #: cancel also reaches the running node at once (``forge_job_cancel_requested``, forge-mesh)
        self.hook = hook
        self.config = config

    # --- enqueue ----------------------------------------------------------------------
    def request(self, job: Any, args: Mapping[str, Any] | None = None, /, **options: Any) -> JobRequest:
        """Build a :class:`JobRequest` for a ``@job`` function (arguments checked against its
        signature) or a job name (resolved through ``registry`` when given, else arguments are
        stored as given and checked when the job runs). ``options``: delay, run_at,
        priority, queue, unique_key, on_conflict, max_attempts, capability, timeout, caller (a label
        shown in listings), run_as (a ``forge_kernel.Auth`` the job runs as; default: the system)."""
        defn = definition(job)
        if isinstance(defn, str) and self.registry is not None and self.registry.get(defn) is not None:
            defn = self.registry.get(defn)
        allowed = {"delay", "run_at", "priority", "queue", "unique_key", "on_conflict", "max_attempts",
                   "capability", "timeout", "caller", "run_as"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise InvalidArgument(f"unknown job option(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
        try:
            return job_request(defn, dict(args or {}), **options)
        except (TypeError, ValueError) as exc:
            name = defn if isinstance(defn, str) else defn.name
            raise InvalidArgument(f"job {name!r}: {exc}") from None

    async def enqueue(self, job: FunctionDef | Any, args: Mapping[str, Any] | None = None, /, **options: Any) -> int:
        """Store one job; returns its id. Arguments go in ``args`` (a dict)."""
        return (await store_jobs(self.db, [self.request(job, args, **options)]))[0]

    async def enqueue_many(self, requests: Sequence[JobRequest]) -> list[int]:
        """Store many jobs in one round trip; returns their ids in order."""
        return await store_jobs(self.db, list(requests))

    # --- reading ------------------------------------------------------------------------
    async def get(self, job_id: int) -> JobInfo | None:
        (job_id,) = _ids([job_id])
        row = await self.db.fetchrow(f"SELECT {_LIVE_COLS} FROM forge_jobs WHERE id = $1", job_id)
        if row is None:
            row = await self.db.fetchrow(
                f"SELECT {_HIST_COLS} FROM forge_job_history WHERE id = $1 ORDER BY finished_at DESC LIMIT 1", job_id)
        return JobInfo.from_row(row) if row is not None else None

    async def list(self, *, status: str | None = None, name: str | None = None, queue: str | None = None,
                   limit: int = 100) -> list[JobInfo]:
        """Jobs, newest first. ``status``: scheduled, pending, running, dead (live jobs) or
        succeeded, cancelled, discarded (history); ``None`` lists live jobs."""
        if status is not None and status not in LIVE_STATUSES + HISTORY_STATUSES:
            raise InvalidArgument(f"status must be one of {', '.join(LIVE_STATUSES + HISTORY_STATUSES)}, got {status!r}")
        if not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise InvalidArgument(f"limit must be an integer between 1 and 100000, got {limit!r}")
        table, cols = ("forge_job_history", _HIST_COLS) if status in HISTORY_STATUSES else ("forge_jobs", _LIVE_COLS)
        rows = await self.db.fetch(
            f"SELECT {cols} FROM {table} WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR name = $2) "
            f"AND ($3::text IS NULL OR queue = $3) ORDER BY id DESC LIMIT $4", status, name, queue, limit)
        return [JobInfo.from_row(r) for r in rows]

    async def dead(self, limit: int = 100) -> list[JobInfo]:
        return await self.list(status="dead", limit=limit)

    async def counts(self) -> dict[str, dict[str, int]]:
        """Live jobs per queue and status: ``{"default": {"pending": 3, "dead": 1}}``."""
        rows = await self.db.fetch("SELECT queue, status, count(*) AS n FROM forge_jobs GROUP BY queue, status")
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["queue"], {})[r["status"]] = r["n"]
        return out

    # --- dead letter ----------------------------------------------------------------------
    async def retry(self, ids: Iterable[int] | None = None) -> list[int]:
        """Put dead-lettered jobs back in the queue with a fresh set of attempts (``None``: all
        dead jobs). Returns the ids that were dead and are now pending."""
        id_list = None if ids is None else _ids(ids)
        try:
            rows = await self.db.fetch(
                """WITH back AS (
                       UPDATE forge_jobs SET status = 'pending', attempt = 0, run_at = now(), finished_at = NULL,
                              node_id = NULL, lease_until = NULL, cancel_requested = false
                       WHERE status = 'dead' AND ($1::bigint[] IS NULL OR id = ANY($1::bigint[]))
                       RETURNING id, queue)
                   SELECT id, (SELECT count(pg_notify('forge_jobs', '*'))
                               FROM (SELECT 1 FROM forge_worker_sleepers LIMIT 1) s) AS woke
                   FROM back ORDER BY id""", id_list)
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(f"cannot retry: a live job already holds the same unique key ({exc.detail})") from None
        return [r["id"] for r in rows]

    async def discard(self, ids: Iterable[int] | None = None) -> list[int]:
        """Remove dead-lettered jobs (``None``: all), keeping them in history as ``discarded``."""
        id_list = None if ids is None else _ids(ids)
        rows = await self.db.fetch(
            """WITH gone AS (
                   DELETE FROM forge_jobs WHERE status = 'dead' AND ($1::bigint[] IS NULL OR id = ANY($1::bigint[]))
                   RETURNING *), hist AS (""" + _MOVE_TO_HISTORY + """ RETURNING id)
               SELECT id FROM hist ORDER BY id""", id_list, "discarded")
        return [r["id"] for r in rows]

    # --- cancellation ---------------------------------------------------------------------
    async def cancel(self, job_id: int) -> str:
        """Cancel a job. A scheduled or pending job is removed at once (``"cancelled"``); a
        running job is asked to stop and observes it within moments (``"requested"``): its task
        is cancelled and ``ctx.cancelled`` turns true. Raises ``NotFound`` for a job that is
        not live (finished, dead-lettered or unknown)."""
        (job_id,) = _ids([job_id])
        cancelled, requested = await self.cancel_many([job_id])
        if cancelled:
            return "cancelled"
        if requested or await self.db.fetchval(
                "SELECT cancel_requested FROM forge_jobs WHERE id = $1 AND status = 'running'", job_id):
            return "requested"
        raise NotFound(f"job {job_id} is not scheduled, pending or running")

    async def cancel_many(self, ids: Iterable[int]) -> tuple[list[int], list[int]]:
        """Cancel many jobs in one statement: scheduled and pending ones are removed (kept in
        history as ``cancelled``), running ones are asked to stop. Returns (removed ids, asked
        ids); jobs already asked, finished, dead-lettered or unknown are left alone."""
        rows = await self.db.fetch(
            """WITH gone AS (
                   DELETE FROM forge_jobs WHERE id = ANY($1::bigint[]) AND status IN ('scheduled', 'pending')
                   RETURNING *
               ), hist AS (""" + _MOVE_TO_HISTORY + """ RETURNING id
               ), asked AS (
                   UPDATE forge_jobs SET cancel_requested = true
                   WHERE id = ANY($1::bigint[]) AND status = 'running' AND NOT cancel_requested
                   RETURNING id, node_id, pg_notify('forge_jobs_cancel', id::text)
               )
               SELECT id, 'cancelled' AS how, NULL AS node_id FROM hist
               UNION ALL SELECT id, 'requested', node_id FROM asked ORDER BY id""",
            _ids(ids), "cancelled")
        asked = [r for r in rows if r["how"] == "requested"]
        if asked and self.hook is not None and self.config is not None:
            # the requests are recorded (running workers see them within moments); plugins may tell
            # those nodes at once as well
            await asyncio.gather(*(_tell_running_node(self.hook, self.config, self.db, r["id"], r["node_id"])
                                   for r in asked))
        return [r["id"] for r in rows if r["how"] == "cancelled"], [r["id"] for r in asked]

    # --- pausing queues -------------------------------------------------------------------
    async def pause(self, queues: Iterable[str], *, by: str | None = None) -> list[str]:
        """Stop workers from claiming jobs of ``queues`` (running jobs finish). Returns the queues
        that were not paused before."""
        rows = await self.db.fetch(
            """INSERT INTO forge_worker_queue_pauses (queue, paused_by) SELECT q, $2 FROM unnest($1::text[]) AS q
               ON CONFLICT (queue) DO NOTHING RETURNING queue""", _queues(queues), by)
        return sorted(r["queue"] for r in rows)

    async def resume(self, queues: Iterable[str]) -> list[str]:
        """Let workers claim jobs of ``queues`` again (and wake one that sleeps). Returns the
        queues that were paused."""
        rows = await self.db.fetch(
            """WITH back AS (DELETE FROM forge_worker_queue_pauses WHERE queue = ANY($1::text[]) RETURNING queue)
               SELECT queue, (SELECT count(pg_notify('forge_jobs', '*'))
                              FROM (SELECT 1 FROM forge_worker_sleepers LIMIT 1) s) AS woke
               FROM back""", _queues(queues))
        return sorted(r["queue"] for r in rows)

    async def paused(self) -> dict[str, dt.datetime]:
        """Paused queues and since when."""
        return {r["queue"]: r["paused_at"] for r in await self.db.fetch(
            "SELECT queue, paused_at FROM forge_worker_queue_pauses ORDER BY queue")}

    async def purge_history(self, older_than: float) -> int:
        """Delete history rows finished more than ``older_than`` seconds ago; returns how many."""
        if not isinstance(older_than, (int, float)) or older_than < 0:
            raise InvalidArgument(f"older_than must be a number of seconds >= 0, got {older_than!r}")
        res = await self.db.execute(
            "DELETE FROM forge_job_history WHERE finished_at < now() - make_interval(secs => $1)", float(older_than))
        return int(res.split()[-1])


async def _tell_running_node(hook: Any, config: Any, db: Any, job_id: int, node_id: str) -> None:
    results = hook.forge_job_cancel_requested(config=config, conn=db, job_id=job_id, node_id=node_id)
    pending = [r for r in results if inspect.isawaitable(r)]
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)  # the database request stays the fallback


async def enqueue(db: asyncpg.Pool | asyncpg.Connection, job: Any, args: Mapping[str, Any] | None = None, /,
                  **options: Any) -> int:
    """Store one job with only a pool or a connection: ``await enqueue(pool, send_email, {"to": a})``."""
    return await JobQueue(db).enqueue(job, args, **options)


# --- cluster gauges (forge_cluster_gauges: collected by the scheduler leader only) ----------------
async def job_counts(conn: Any) -> list[tuple[tuple[str, ...], float]]:
    """Live jobs per (queue, status)."""
    rows = await conn.fetch("SELECT queue, status, count(*) AS n FROM forge_jobs GROUP BY queue, status")
    return [((r["queue"], r["status"]), float(r["n"])) for r in rows]


async def oldest_pending(conn: Any) -> list[tuple[tuple[str, ...], float]]:
    """Per queue, how long its oldest due job has been waiting (seconds)."""
    rows = await conn.fetch("SELECT queue, extract(epoch FROM now() - min(run_at))::float8 AS age FROM forge_jobs "
                            "WHERE status = 'pending' GROUP BY queue")
    return [((r["queue"],), max(0.0, r["age"] or 0.0)) for r in rows]
