"""Python API for crons: list, history, trigger now, pause, resume, who leads.

Every function takes an asyncpg connection (or pool) of the cluster's database, so it works
from a node (``node.pool``), the CLI or a test. "Trigger now" writes a request that the leader
turns into exactly one run on its next tick; pause and resume take effect on the leader's
next tick too. Names are checked against the crons the cluster knows (``forge_cron_state``)
plus ``known`` (e.g. the crons of a registry that no leader has registered yet); a cron the
current leader does not define (its row is left from an earlier deployment) is refused, since
a trigger for it would never run.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable

import attrs

from forge_kernel.errors import InvalidArgument, NotFound

from .election import ELECTION, current_leader
from .settings import CronSettings


@attrs.frozen
class CronInfo:
    name: str
    schedule: str
    timezone: str
    paused: bool
    decided_until: dt.datetime | None
    next_slot: dt.datetime | None
    dropped_total: int
    last_status: str | None
    last_slot: dt.datetime | None
    runs: int
    #: the current scheduler leader defines it (False: left from an earlier deployment, runs
    #: nowhere; None: the leader has not said - none leads, or it runs code older than the flag)
    defined: bool | None = None


@attrs.frozen
class RunInfo:
    id: int
    cron: str
    slot: dt.datetime
    kind: str
    status: str
    job_id: int | None
    enqueued_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    duration_ms: float | None
    attempts: int
    node_id: str | None
    error: str | None


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument(f"cron name must be a non-empty string, got {name!r}")
    return name


async def _known(conn: Any, name: str, known: Iterable[CronSettings]) -> CronSettings | None:
    """The registered settings for ``name``, or None when only the cluster's state knows it;
    raises NotFound when nobody knows it, or when the current leader does not define it."""
    extra = {c.name: c for c in known}
    states = await _states(conn)
    if states.get(name) is False:
        where = ("this app defines it, but the running scheduler leader does not (deploy it first)"
                 if name in extra else "it is left from an earlier deployment; its history is kept")
        raise NotFound(f"cron {name!r} is not defined by the running cluster, so it would never run: {where}; "
                       f"defined crons: {', '.join(_defined_names(states, extra)) or '(none)'}")
    if name in states or name in extra:
        return extra.get(name)
    raise _no_such_cron(name, states, extra)


#: whether the current leader defines a cron; NULL when it has not said (none leads, or it runs
#: code older than the flag), since a value of an earlier term says nothing
_DEFINED = "CASE WHEN s.defined_term = ld.term AND ld.node_id IS NOT NULL THEN s.defined END AS defined"
#: joins the leader row (bind ``ELECTION`` as ``$1``)
_LEADER_JOIN = "LEFT JOIN forge_leaders ld ON ld.name = $1"


async def _states(conn: Any) -> dict[str, bool | None]:
    """Every cron in ``forge_cron_state`` -> whether the current leader defines it."""
    return {r["cron"]: r["defined"]
            for r in await conn.fetch(f"SELECT s.cron, {_DEFINED} FROM forge_cron_state s {_LEADER_JOIN}", ELECTION)}


def _defined_names(states: dict[str, bool | None], extra: dict[str, CronSettings]) -> list[str]:
    return sorted({n for n, d in states.items() if d is not False} | set(extra))


def _no_such_cron(name: str, states: dict[str, bool | None], extra: dict[str, CronSettings]) -> NotFound:
    return NotFound(f"no cron named {name!r}; known crons: {', '.join(_defined_names(states, extra)) or '(none)'}")


async def _ensure_state(conn: Any, cron: CronSettings | None) -> None:
    if cron is not None:
        await conn.execute(
            """INSERT INTO forge_cron_state (cron, schedule, timezone, decided_until)
               VALUES ($1, $2, $3, clock_timestamp()) ON CONFLICT (cron) DO NOTHING""",
            cron.name, cron.schedule.expression, cron.schedule.timezone)


async def trigger(conn: Any, name: str, *, requested_by: str | None = None, known: Iterable[CronSettings] = ()) -> int:
    """Ask for one run of ``name`` now (also when paused). Returns the request id."""
    name = _check_name(name)
    cron = await _known(conn, name, known)
    await _ensure_state(conn, cron)
    return await conn.fetchval("INSERT INTO forge_cron_triggers (cron, requested_by) VALUES ($1, $2) RETURNING id",
                               name, requested_by)


async def pause(conn: Any, name: str, *, known: Iterable[CronSettings] = ()) -> bool:
    """Stop scheduling ``name``; slots while paused never run. False if it was already paused."""
    name = _check_name(name)
    cron = await _known(conn, name, known)
    await _ensure_state(conn, cron)
    return bool(await conn.fetchval(
        "UPDATE forge_cron_state SET paused = true, paused_at = clock_timestamp(), updated_at = clock_timestamp() "
        "WHERE cron = $1 AND NOT paused RETURNING true", name))


async def resume(conn: Any, name: str, *, known: Iterable[CronSettings] = ()) -> bool:
    """Schedule ``name`` again from now on (slots of the pause are not caught up).
    False if it was not paused."""
    name = _check_name(name)
    cron = await _known(conn, name, known)
    await _ensure_state(conn, cron)
    return bool(await conn.fetchval(
        "UPDATE forge_cron_state SET paused = false, paused_at = NULL, decided_until = clock_timestamp(), "
        "updated_at = clock_timestamp() WHERE cron = $1 AND paused RETURNING true", name))


async def history(conn: Any, name: str | None = None, *, limit: int = 20,
                  known: Iterable[CronSettings] = ()) -> list[RunInfo]:
    """Newest runs first, of one cron or of all. Raises NotFound for a name that is neither in
    the cluster's state, nor in ``known``, nor in the run history."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise InvalidArgument(f"limit must be a whole number between 1 and 10000, got {limit!r}")
    if name is not None:
        _check_name(name)
        extra = {c.name: c for c in known}
        states = await _states(conn)
        if name not in extra and name not in states and not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM forge_cron_runs WHERE cron = $1)", name):
            raise _no_such_cron(name, states, extra)
    rows = await conn.fetch(
        """SELECT id, cron, slot, kind, status, job_id, enqueued_at, started_at, finished_at, duration_ms,
                  attempts, node_id, error
           FROM forge_cron_runs WHERE $1::text IS NULL OR cron = $1 ORDER BY id DESC LIMIT $2""", name, limit)
    return [RunInfo(**dict(r)) for r in rows]


async def list_crons(conn: Any, known: Iterable[CronSettings] = ()) -> list[CronInfo]:
    """Every cron of the cluster (and of ``known``) with its state, next slot and last run."""
    rows = await conn.fetch(
        f"""SELECT s.cron, s.schedule, s.timezone, s.paused, s.decided_until, s.dropped_total, {_DEFINED},
                  (SELECT count(*) FROM forge_cron_runs r WHERE r.cron = s.cron) AS runs,
                  l.status AS last_status, l.slot AS last_slot
           FROM forge_cron_state s {_LEADER_JOIN}
           LEFT JOIN LATERAL (SELECT status, slot FROM forge_cron_runs r WHERE r.cron = s.cron
                              ORDER BY id DESC LIMIT 1) l ON true
           ORDER BY s.cron""", ELECTION)
    registered = {c.name: c for c in known}
    out: list[CronInfo] = []
    now = dt.datetime.now(dt.timezone.utc)
    for r in rows:
        cron = registered.pop(r["cron"], None)
        nxt = None
        if cron is not None and not r["paused"]:
            nxt = cron.schedule.next_after(max(r["decided_until"], now))
        if r["defined"] is False:
            nxt = None  # it runs nowhere
        out.append(CronInfo(r["cron"], r["schedule"], r["timezone"], r["paused"], r["decided_until"], nxt,
                            r["dropped_total"], r["last_status"], r["last_slot"], r["runs"], r["defined"]))
    for cron in registered.values():
        out.append(CronInfo(cron.name, cron.schedule.expression, cron.schedule.timezone, False, None,
                            cron.schedule.next_after(now), 0, None, None, 0))
    return sorted(out, key=lambda c: c.name)


async def leader(conn: Any, name: str = ELECTION) -> dict[str, Any] | None:
    """The ``forge_leaders`` row: ``node_id`` (None when nobody leads), ``term``, ``since``."""
    return await current_leader(conn, name)


class Crons:
    """The API bound to a pool and a registry's crons: ``Crons(node.pool, crons_of(node.registry))``."""

    def __init__(self, pool: Any, known: Iterable[CronSettings] = ()) -> None:
        self.pool = pool
        self.known = list(known)

    async def trigger(self, name: str, *, requested_by: str | None = None) -> int:
        async with self.pool.acquire() as conn:
            return await trigger(conn, name, requested_by=requested_by, known=self.known)

    async def pause(self, name: str) -> bool:
        async with self.pool.acquire() as conn:
            return await pause(conn, name, known=self.known)

    async def resume(self, name: str) -> bool:
        async with self.pool.acquire() as conn:
            return await resume(conn, name, known=self.known)

    async def history(self, name: str | None = None, *, limit: int = 20) -> list[RunInfo]:
        async with self.pool.acquire() as conn:
            return await history(conn, name, limit=limit, known=self.known)

    async def list(self) -> list[CronInfo]:
        async with self.pool.acquire() as conn:
            return await list_crons(conn, self.known)

    async def leader(self) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn:
            return await leader(conn)
