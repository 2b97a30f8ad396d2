"""Leader election: a PostgreSQL session advisory lock held on a dedicated connection.

The node that holds the lock leads. PostgreSQL releases a session lock when the session ends,
so a leader that dies (SIGKILL, crash, lost host) loses the lock as soon as its backend sees
the connection close - at once for a killed process, within the TCP keepalive time for a
vanished host. Followers retry ``pg_try_advisory_lock`` every ``election_interval`` seconds,
which bounds the takeover time.

Every takeover bumps ``forge_leaders.term``. Leader actions check leadership first
(:meth:`LeaderElection.check`: the lock is still granted on our session) and writes that
matter also fence on ``(node_id, term)`` inside their own transaction, so a leader that lost
its lock without noticing cannot act after a successor has taken over.

Row locks on ``forge_leaders`` are chosen so that a fenced transaction (``FOR KEY SHARE``)
holds up a takeover (``FOR UPDATE``) but never the leader's own renewal (a plain ``UPDATE``
of a non-key column, which takes ``FOR NO KEY UPDATE``): a decision that runs longer than
``check_timeout`` must not make its own leader's renewal time out and end the term.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
from typing import Any, Awaitable, Callable, Sequence

import asyncpg
import attrs
from loguru import logger

from .settings import SchedulerConfig

#: two-int advisory lock key ("Forg", "Schd"); a separate key space from one-bigint locks
LOCK_KEYS = (0x466F7267, 0x53636864)
ELECTION = "scheduler"
#: errors that mean "the leader connection is gone or unusable"
CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                     asyncpg.exceptions.ConnectionDoesNotExistError)

_LOCK_HELD = """
SELECT EXISTS (SELECT 1 FROM pg_locks
               WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
                 AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 2)
"""


class NotLeader(Exception):
    """This node does not (or no longer) lead; the action was not taken."""


@attrs.frozen
class Leadership:
    node_id: str
    term: int
    since: dt.datetime


def enable_keepalive(conn: asyncpg.Connection, config: SchedulerConfig) -> bool:
    """Client-side TCP keepalive on ``conn``'s socket (asyncpg has no option for it).
    Returns False for a Unix-domain socket, where keepalive does not apply."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", config.keepalive_idle), ("TCP_KEEPINTVL", config.keepalive_interval),
                       ("TCP_KEEPCNT", config.keepalive_count)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        # unacknowledged writes fail after the same budget, so a dead peer is noticed while sending too
        budget_ms = 1000 * (config.keepalive_idle + config.keepalive_interval * config.keepalive_count)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, budget_ms)
    return True


async def connect_leader(connect: Callable[..., Awaitable[asyncpg.Connection]], node_id: str,
                         config: SchedulerConfig) -> asyncpg.Connection:
    """A dedicated connection with keepalive on both ends: the client notices a dead server,
    and the server notices a dead leader host and ends its session (releasing the lock)."""
    conn = await connect(timeout=config.check_timeout * 5, server_settings={
        "application_name": f"forge-leader:{node_id}"[:63],
        "tcp_keepalives_idle": str(config.keepalive_idle),
        "tcp_keepalives_interval": str(config.keepalive_interval),
        "tcp_keepalives_count": str(config.keepalive_count),
    })
    enable_keepalive(conn, config)
    return conn


class LeaderElection:
    """Campaigns for leadership and, while leading, runs ``workers`` (coroutine factories
    taking the :class:`Leadership`). Run :meth:`run` as a supervised task; cancel it to stop.

    A worker that raises :class:`NotLeader` ends the term (the node campaigns again); any
    other exception is logged and the worker restarted after a pause.
    """

    def __init__(self, node_id: str, connect: Callable[..., Awaitable[asyncpg.Connection]],
                 config: SchedulerConfig, workers: Sequence[Callable[[Leadership], Awaitable[Any]]] = (),
                 *, name: str = ELECTION) -> None:
        self.node_id = node_id
        self.connect = connect
        self.config = config
        self.workers = list(workers)
        self.name = name
        self.leadership: Leadership | None = None
        self.terms_won = 0
        self._conn: asyncpg.Connection | None = None
        self._conn_lock = asyncio.Lock()
        self._lost = asyncio.Event()
        self.elected = asyncio.Event()

    @property
    def is_leader(self) -> bool:
        return self.leadership is not None

    async def run(self) -> None:
        while True:
            try:
                self._conn = await connect_leader(self.connect, self.node_id, self.config)
                await self._campaign()
                await self._lead()
            except asyncio.CancelledError:
                await self._release()
                raise
            except (NotLeader, *CONNECTION_ERRORS) as exc:
                if self.leadership is not None:
                    logger.warning(f"scheduler leadership lost (term {self.leadership.term}): {type(exc).__name__}: {exc}")
                else:
                    logger.debug(f"leader election: {type(exc).__name__}: {exc}")
            finally:
                self._step_down()
                await self._drop_connection()
            await asyncio.sleep(self.config.election_interval)

    async def _campaign(self) -> None:
        while True:
            async with self._conn_lock:
                # one statement per attempt: take the lock, or learn whether the leader went stale
                row = await self._conn.fetchrow(
                    """SELECT pg_try_advisory_lock($1, $2) AS got,
                              EXISTS (SELECT 1 FROM forge_leaders WHERE name = $3 AND node_id IS NOT NULL
                                      AND renewed_at < clock_timestamp() - make_interval(secs => $4)) AS stale""",
                    *LOCK_KEYS, self.name, self.config.leader_lease, timeout=self.config.check_timeout)
                if row["got"]:
                    return
                if row["stale"]:
                    await self._depose_stale_leader()
            await asyncio.sleep(self.config.election_interval)

    async def _depose_stale_leader(self) -> None:
        """A leader whose process is frozen (or whose connection is half-open) keeps its session
        and its lock, and keepalive cannot tell: the OS still answers. If it has not renewed
        within ``leader_lease``, end its session so the lock frees up. Only the session of the
        node the stale row names is ended, never a newer leader's."""
        row = await self._conn.fetchrow(
            """SELECT l.node_id, a.pid, extract(epoch FROM clock_timestamp() - l.renewed_at) AS age
               FROM forge_leaders l
               JOIN pg_locks k ON k.locktype = 'advisory' AND k.granted AND k.objsubid = 2
                    AND k.classid = $2::bigint::oid AND k.objid = $3::bigint::oid
               JOIN pg_stat_activity a ON a.pid = k.pid AND a.application_name = left('forge-leader:' || l.node_id, 63)
               WHERE l.name = $1 AND l.node_id IS NOT NULL
                 AND l.renewed_at < clock_timestamp() - make_interval(secs => $4)""",
            self.name, *LOCK_KEYS, self.config.leader_lease, timeout=self.config.check_timeout)
        if row is None:
            return
        ended = await self._conn.fetchval("SELECT pg_terminate_backend($1)", row["pid"], timeout=self.config.check_timeout)
        if ended:
            logger.warning(f"leader {row['node_id']} has not renewed for {row['age']:.1f}s "
                           f"(leader_lease {self.config.leader_lease:g}s); ended its session to take over")

    async def _lead(self) -> None:
        async with self._conn_lock, self._conn.transaction():
            # FOR UPDATE waits for fenced transactions of the previous term (FOR KEY SHARE) to end;
            # the upsert alone would not (it changes no key column)
            await self._conn.execute("SELECT 1 FROM forge_leaders WHERE name = $1 FOR UPDATE", self.name,
                                     timeout=self.config.check_timeout)
            row = await self._conn.fetchrow(
                """INSERT INTO forge_leaders (name, node_id, term, since, renewed_at)
                   VALUES ($1, $2, 1, clock_timestamp(), clock_timestamp())
                   ON CONFLICT (name) DO UPDATE SET node_id = EXCLUDED.node_id, term = forge_leaders.term + 1,
                       since = EXCLUDED.since, renewed_at = EXCLUDED.renewed_at
                   RETURNING term, since""", self.name, self.node_id, timeout=self.config.check_timeout)
        self.leadership = Leadership(self.node_id, row["term"], row["since"])
        self.terms_won += 1
        self._lost.clear()
        self.elected.set()
        logger.info(f"node {self.node_id} leads the scheduler (term {row['term']})")
        tasks = [asyncio.create_task(self._keep(w), name=f"forge:leader-worker-{i}") for i, w in enumerate(self.workers)]
        try:
            while not self._lost.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), self.config.renew_interval)
                if not self._lost.is_set():
                    await self._renew()
            raise NotLeader("a leader action found the lock gone")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep(self, worker: Callable[[Leadership], Awaitable[Any]]) -> None:
        pause = 0.2
        while True:
            leadership = self.leadership
            if leadership is None:
                return
            try:
                await worker(leadership)
                return
            except NotLeader:
                self._lost.set()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken chore must not end leadership; retry it
                logger.opt(exception=exc).error(f"leader task {getattr(worker, '__name__', worker)!r} failed; "
                                                f"retrying in {pause:.1f}s")
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)

    async def _renew(self) -> None:
        """One statement: the lock is still ours and the row still names our term, then renew."""
        ld = self.leadership
        async with self._conn_lock:
            row = await self._conn.fetchrow(
                f"""WITH held AS ({_LOCK_HELD.strip()})
                    UPDATE forge_leaders SET renewed_at = clock_timestamp()
                    WHERE name = $3 AND node_id = $4 AND term = $5 AND (SELECT exists FROM held)
                    RETURNING (SELECT exists FROM held) AS held""",
                *LOCK_KEYS, self.name, ld.node_id, ld.term, timeout=self.config.check_timeout)
        if row is None:
            raise NotLeader(f"lock lost, or forge_leaders names another leader than {ld.node_id} term {ld.term}")

    async def check(self) -> Leadership:
        """Confirm this node still leads (its session still holds the lock); call before
        every leader action. Raises :class:`NotLeader` otherwise."""
        ld = self.leadership
        if ld is None or self._conn is None or self._lost.is_set():
            raise NotLeader(f"node {self.node_id} is not the leader")
        try:
            async with self._conn_lock:
                held = await self._conn.fetchval(_LOCK_HELD, *LOCK_KEYS, timeout=self.config.check_timeout)
        except CONNECTION_ERRORS as exc:
            self._lost.set()
            raise NotLeader(f"leadership check failed: {type(exc).__name__}: {exc}") from None
        if not held or self.leadership is not ld:
            self._lost.set()
            raise NotLeader(f"node {self.node_id} no longer holds the leader lock")
        return ld

    def _step_down(self) -> None:
        self.leadership = None
        self.elected.clear()

    async def _release(self) -> None:
        """Graceful stop: clear our name from forge_leaders and free the lock at once."""
        ld, conn = self.leadership, self._conn
        if ld is None or conn is None or conn.is_closed():
            return
        with contextlib.suppress(*CONNECTION_ERRORS, asyncio.CancelledError):
            await asyncio.wait_for(self._release_on(conn, ld), self.config.check_timeout)

    async def _release_on(self, conn: asyncpg.Connection, ld: Leadership) -> None:
        await conn.execute("UPDATE forge_leaders SET node_id = NULL, renewed_at = clock_timestamp() "
                           "WHERE name = $1 AND node_id = $2 AND term = $3", self.name, ld.node_id, ld.term)
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", *LOCK_KEYS)
        logger.info(f"node {self.node_id} released scheduler leadership (term {ld.term})")

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2)
            except asyncio.CancelledError:
                # the node is stopping: drop the session and stop too (swallowing this kept a
                # cancelled election running - and leading - for ever)
                conn.terminate()
                raise
            except Exception:  # noqa: BLE001 - a hung close must not keep the lock alive
                conn.terminate()


async def fence(conn: asyncpg.Connection, leadership: Leadership, name: str = ELECTION) -> None:
    """Inside a transaction: proceed only if ``forge_leaders`` still names this term. The row
    lock (FOR KEY SHARE) makes a successor's takeover (FOR UPDATE) wait until this transaction
    ends, while this leader's renewals (FOR NO KEY UPDATE) go on."""
    ok = await conn.fetchval(
        "SELECT true FROM forge_leaders WHERE name = $1 AND node_id = $2 AND term = $3 FOR KEY SHARE",
        name, leadership.node_id, leadership.term)
    if not ok:
        raise NotLeader(f"term {leadership.term} of {leadership.node_id} has ended")


async def current_leader(conn: asyncpg.Connection, name: str = ELECTION) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT name, node_id, term, since, renewed_at, "
                              "extract(epoch FROM clock_timestamp() - renewed_at)::float8 AS renewed_age "
                              "FROM forge_leaders WHERE name = $1", name)
    return dict(row) if row else None
