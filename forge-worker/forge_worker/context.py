"""What a job function receives as ``ctx``: the action surface plus job controls."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from typing import Any, AsyncIterator, Mapping

import asyncpg
import attrs
from loguru import logger

from forge_kernel.db import Database
from forge_kernel.executor import ActionContext, Auth, Call, set_caller
from forge_kernel.telemetry import job_wait


class RetryLater(Exception):
    """Raised by ``ctx.retry_later(...)``: run the job again after ``delay`` seconds without
    counting this attempt against ``max_attempts``."""

    def __init__(self, delay: float, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay:g}s")
        self.delay = delay
        self.reason = reason


class JobCancelled(Exception):
    """Raised by ``ctx.cancel(...)``: stop now, never retry; recorded as ``cancelled``."""


@attrs.frozen
class RunningJob:
    """``ctx.job``: the running attempt."""

    id: int
    name: str
    queue: str
    attempt: int
    max_attempts: int
    priority: int
    run_at: dt.datetime
    created_at: dt.datetime
    started_at: dt.datetime
    unique_key: str | None
    options: Mapping[str, Any]


class LazyDatabase:
    """``ctx.db`` for jobs: takes a pool connection only on first use (most jobs never touch
    the database, and a pool round trip per job would cap throughput), released after the job.
    Statements run in autocommit; use ``async with ctx.db.transaction():`` for a transaction
    (with row security on, only statements inside one carry the job's caller to the policies)."""

    def __init__(self, pool: asyncpg.Pool, caller: Auth | None = None) -> None:
        self._pool = pool
        #: with row security on, the job's identity, put into each ``transaction()`` it opens
        self.caller = caller
        self._conn: Any = None
        self._db: Database | None = None

    async def _get(self) -> Database:
        if self._db is None:
            self._conn = await self._pool.acquire()
            self._db = Database(self._conn)
        return self._db

    @property
    def conn(self) -> Any:
        if self._conn is None:
            raise RuntimeError("ctx.db.conn is available after the first query; use await ctx.db.connection()")
        return self._conn

    async def connection(self) -> asyncpg.Connection:
        return (await self._get()).conn

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await (await self._get()).fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await (await self._get()).fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await (await self._get()).fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> str:
        return await (await self._get()).execute(sql, *args)

    async def executemany(self, sql: str, args: Any) -> None:
        await (await self._get()).executemany(sql, args)

    async def insert(self, obj: Any) -> Any:
        return await (await self._get()).insert(obj)

    async def get(self, cls: type, pk: Any) -> Any:
        return await (await self._get()).get(cls, pk)

    async def select(self, cls: type, **kw: Any) -> list[Any]:
        return await (await self._get()).select(cls, **kw)

    async def update(self, obj: Any) -> Any:
        return await (await self._get()).update(obj)

    async def delete(self, cls: type, pk: Any) -> bool:
        return await (await self._get()).delete(cls, pk)

    @contextlib.asynccontextmanager
    async def transaction(self, **kw: Any) -> AsyncIterator[Database]:
        db = await self._get()
        async with db.conn.transaction(**kw):
            if self.caller is not None:
                await set_caller(db.conn, self.caller)
            yield db

    @property
    def taken(self) -> bool:
        """A pool connection was taken (and must be released)."""
        return self._conn is not None

    async def release(self) -> None:
        if self._conn is not None:
            conn, self._conn, self._db = self._conn, None, None
            await self._pool.release(conn)


class JobContext(ActionContext):
    """``ctx`` of a job: ``db``, ``auth`` (the caller that dispatched it), ``query``,
    ``mutation``, ``dispatch``, ``log``, plus ``job``, ``progress()``, ``retry_later()``,
    ``cancel()`` and ``cancelled``."""

    # Context.__init__ binds a logger per call; jobs bind theirs only when a job logs (most never do)
    def __init__(self, executor: Any, call: Call, db: LazyDatabase, row: Any, attempt_state: Any) -> None:
        self._executor = executor
        self._call = call
        self.db = db  # type: ignore[assignment]
        self.request_id = call.request_id
        self._row = row
        self._job: RunningJob | None = None
        self._state = attempt_state
        self._log: Any = None

    @property
    def job(self) -> RunningJob:
        """The running attempt (built on first use)."""
        if self._job is None:
            r = self._row
            self._job = RunningJob(id=r["id"], name=r["name"], queue=r["queue"], attempt=r["attempt"],
                                max_attempts=r["max_attempts"], priority=r["priority"], run_at=r["run_at"],
                                created_at=r["created_at"], started_at=self._state.started_at(), unique_key=r["unique_key"],
                                options=r["options"] or {})
        return self._job

    @property
    def log(self) -> Any:
        if self._log is None:
            job_span(self._executor.telemetry, self._row, self._state)  # its lines name the trace
            self._log = logger.bind(request_id=self.request_id, function=self._call.defn.name,
                                    job_id=self._row["id"], attempt=self._row["attempt"])
        return self._log

    # what the job hands on (calls, jobs) joins its trace, so it gets its span first
    async def query(self, fn: Any, /, **args: Any) -> Any:
        job_span(self._executor.telemetry, self._row, self._state)
        return await super().query(fn, **args)

    async def mutation(self, fn: Any, /, **args: Any) -> Any:
        job_span(self._executor.telemetry, self._row, self._state)
        return await super().mutation(fn, **args)

    async def dispatch(self, job: Any, /, **kw: Any) -> int:
        job_span(self._executor.telemetry, self._row, self._state)
        return await super().dispatch(job, **kw)

    def progress(self, percent: float, message: str | None = None) -> None:
        """Record progress (0-100). Cheap to call in a tight loop: only the latest value is
        written, with the next lease renewal."""
        if not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
            raise ValueError(f"progress percent must be a number between 0 and 100, got {percent!r}")
        if message is not None and not isinstance(message, str):
            raise ValueError(f"progress message must be a string, got {type(message).__name__}")
        self._state.progress = (float(percent), message)

    def retry_later(self, delay: float | dt.timedelta, reason: str = "") -> RetryLater:
        """``raise ctx.retry_later(30)``: run again in 30 s; this attempt does not count."""
        seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else delay
        if not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"retry_later delay must be >= 0 seconds, got {delay!r}")
        return RetryLater(float(seconds), reason)

    def cancel(self, reason: str = "cancelled by the job") -> JobCancelled:
        """``raise ctx.cancel("no longer needed")``: stop for good (no retry)."""
        return JobCancelled(reason)

    @property
    def cancelled(self) -> bool:
        """True once someone asked to cancel this job (the task is also cancelled)."""
        return self._state.cancel_reason == "cancel"


def job_options(row: Any) -> dict:
    opts = row["options"]
    return opts if isinstance(opts, dict) else {}


def job_span(tel: Any, row: Any, attempt: Any, sampled: bool = False) -> Any:
    """The attempt's span, opened now (dated from when the attempt started) if it has none yet,
    continuing the trace of whoever dispatched the job (its ``traceparent``). A job gets one when
    it needs one: at once in a head-sampled trace (``sampled``: the worker's head decision, which a
    job without a valid ``traceparent`` starts its fresh trace with), when it logs, calls or
    dispatches, or at its end when it failed or ran slow (not head-sampled: ``sampled`` False). An
    unsampled job that does none of these, the common case, costs its entry in its job type's batch
    and no span. ``None`` when nothing observes."""
    if attempt.span is None and attempt.t0:
        opts = job_options(row)
        attrs = {"job.id": attempt.id, "job.attempt": attempt.attempt, "job.queue": row["queue"],
                 "job.queue_wait_s": job_wait(row["run_at"], attempt.started_at())}
        ids = {"job": attempt.id}
        if "cron_run" in opts:
            ids["cron_run"] = opts["cron_run"]
            attrs["cron.name"] = opts.get("cron")
        attempt.span = tel.start_span(f"job {row['name']}", "consumer", remote=opts.get("traceparent") or "",
                                      attrs=attrs, ids=ids, start_ns=time.time_ns() - int((time.monotonic() - attempt.t0) * 1e9),
                                      sampled=sampled)
    return attempt.span
