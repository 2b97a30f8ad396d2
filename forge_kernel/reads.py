"""Where queries read: the primary, or a streaming replica with read-your-writes.

A query runs in a read-only transaction, on one of:

* a pool whose sessions are read-only by default (``db.create_pool(read_only=True)``): each
  statement is its own read-only transaction, no BEGIN/COMMIT round trips (direct connections);
* any pool, inside ``BEGIN READ ONLY ... COMMIT`` (through a transaction pooler, where startup
  parameters and session state do not reach the server).

With a replica (``[database] read_url``) queries read it once it has replayed everything its
callers may have seen committed: the *floor*, a WAL position (LSN) on the primary that only
grows. The node raises it after each mutation it commits (:meth:`QueryReads.committed`) and
whenever something else shows it a commit (the realtime change reader, :meth:`note`). A query
waits up to ``[database] read_wait`` seconds for the replica to replay the floor
(``pg_last_wal_replay_lsn()``), then reads the primary instead; a replica that cannot be
reached sends queries to the primary for a few seconds before it is tried again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import attrs
from loguru import logger

from .db import SESSION_UNTOUCHED

#: what reading a WAL position or reaching the replica may run into
_DB_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

#: the WAL position after every commit this session has seen: the insert position, not the
#: write or flush position - a commit made with synchronous_commit = off is visible before its
#: WAL is written, and its record ends at or before the insert position
PRIMARY_POSITION = "SELECT pg_current_wal_insert_lsn()"
#: how far a standby has replayed; NULL on a server that is not in recovery
REPLAYED = "SELECT pg_last_wal_replay_lsn()"


@attrs.define
class ReadPool:
    pool: asyncpg.Pool
    #: sessions are read-only by default (startup parameter): statements need no BEGIN READ ONLY
    readonly_sessions: bool = False


@attrs.define
class ReadStats:
    replica: int = 0
    primary: int = 0
    #: queries that read the primary because the replica had not replayed the floor in time
    lagged: int = 0
    #: queries that read the primary because the replica could not be reached
    unreachable: int = 0
    #: checks of the replica's replay position
    checks: int = 0


class QueryReads:
    """Hands queries a connection in a read-only transaction, on the replica when it is current."""

    def __init__(self, primary: ReadPool, replica: ReadPool | None = None, *, wait: float = 0.5,
                 retry_after: float = 5.0) -> None:
        self.primary = primary
        self.replica = replica
        self.wait = wait
        #: seconds an unreachable replica is left alone
        self.retry_after = retry_after
        #: the primary LSN a replica must have replayed before queries may read it
        self.floor = 0
        #: the replica's replay position last seen (only grows)
        self.replayed = 0
        self.stats = ReadStats()
        self._primary_only_until = 0.0
        self._warned_not_standby = False

    def note(self, lsn: int | None) -> None:
        """Raise the floor: callers have seen a commit at primary position ``lsn``."""
        if lsn is not None and lsn > self.floor:
            self.floor = lsn

    async def committed(self, conn: asyncpg.Connection) -> None:
        """After a commit on ``conn`` (the primary): raise the floor to cover it. One round trip,
        only when queries read a replica. Never raises: the commit has happened; when its position
        cannot be read, queries read the primary for ``retry_after`` seconds instead."""
        if self.replica is None:
            return
        try:
            self.note(await conn.fetchval(PRIMARY_POSITION))
        except _DB_ERRORS as exc:
            self._primary_only_until = time.monotonic() + self.retry_after
            logger.warning(f"could not read the primary's WAL position after a commit ({type(exc).__name__}: "
                           f"{exc}); queries read the primary for {self.retry_after:g}s")

    def connection(self, transaction: bool = False) -> "QueryConnection":
        """``async with reads.connection() as conn``: a connection inside a read-only transaction,
        released (and the transaction ended) on exit. ``transaction``: an explicit ``BEGIN READ
        ONLY`` even on read-only sessions (for transaction-local settings such as the caller's)."""
        return QueryConnection(self, transaction)

    async def _replica_conn(self) -> asyncpg.Connection | None:
        """A replica connection that has replayed the floor, or None (read the primary)."""
        if time.monotonic() < self._primary_only_until:
            self.stats.unreachable += 1
            return None
        pool = self.replica.pool
        try:
            conn = await pool.acquire(timeout=max(self.wait, 1.0))
        except _DB_ERRORS as exc:
            self.unreachable(exc)
            return None
        try:
            if await self._caught_up(conn):
                self.stats.replica += 1
                return conn
            self.stats.lagged += 1
        except _DB_ERRORS as exc:
            self.unreachable(exc)
        await pool.release(conn)
        return None

    async def _caught_up(self, conn: asyncpg.Connection) -> bool:
        floor = self.floor
        if floor <= self.replayed:
            return True
        deadline = time.monotonic() + self.wait
        pause = 0.001
        while True:
            self.stats.checks += 1
            replayed = await conn.fetchval(REPLAYED)
            if replayed is None:  # not in recovery: a promoted replica or a primary has every commit
                if not self._warned_not_standby:
                    self._warned_not_standby = True
                    logger.warning("[database] read_url is not a standby (pg_last_wal_replay_lsn() is NULL); "
                                   "queries read it as if it were current")
                return True
            self.replayed = max(self.replayed, replayed)
            if self.replayed >= floor:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.02)

    def unreachable(self, exc: BaseException) -> None:
        """The replica failed: queries read the primary for ``retry_after`` seconds."""
        self.stats.unreachable += 1
        self._primary_only_until = time.monotonic() + self.retry_after
        logger.warning(f"replica at [database] read_url unreachable ({type(exc).__name__}: {exc}); "
                       f"queries read the primary for {self.retry_after:g}s")


class QueryConnection:
    """What :meth:`QueryReads.connection` returns (a class, not a generator: it is on every
    query's path)."""

    __slots__ = ("reads", "target", "conn", "transaction", "explicit", "untouched")

    def __init__(self, reads: QueryReads, explicit: bool = False) -> None:
        self.reads = reads
        self.explicit = explicit
        self.target: ReadPool | None = None
        self.conn: asyncpg.Connection | None = None
        self.transaction: Any = None
        #: set by the caller when only the model helpers ran (``Database.untouched``): the pool
        #: returns the connection without its session reset (``db.SESSION_UNTOUCHED``)
        self.untouched = False

    async def __aenter__(self) -> asyncpg.Connection:
        reads = self.reads
        if reads.replica is not None:
            self.conn = await reads._replica_conn()
            if self.conn is not None:
                self.target = reads.replica
            else:
                reads.stats.primary += 1
        if self.conn is None:
            self.target = reads.primary
            self.conn = await reads.primary.pool.acquire()
        if self.explicit or not self.target.readonly_sessions:
            self.transaction = self.conn.transaction(readonly=True)
            try:
                await self.transaction.start()
            except BaseException:
                await self.target.pool.release(self.conn)
                raise
        return self.conn

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self.transaction is not None:
                if exc_type is None:
                    await self.transaction.commit()
                else:
                    await self.transaction.rollback()
        finally:
            if self.untouched and exc_type is None:
                token = SESSION_UNTOUCHED.set(True)
                try:
                    await self.target.pool.release(self.conn)
                finally:
                    SESSION_UNTOUCHED.reset(token)
            else:
                await self.target.pool.release(self.conn)
