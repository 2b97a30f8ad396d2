"""Turning cron slots into jobs, exactly once per slot, and recording how runs ended.

The leader's loop reads ``forge_cron_state`` (one small row per cron) and, for each cron with
a due slot or a "run now" request, opens one transaction that

1. fences on the leader's term (a deposed leader writes nothing),
2. locks the cron's state row and decides every slot up to ``now`` (database clock):
   on-time slots run, missed slots follow the cron's ``catch_up`` policy,
3. inserts one ``forge_cron_runs`` row per slot (unique per ``(cron, slot)``) and hands the
   jobs to the job store's dispatcher on the same connection,
4. moves ``decided_until`` to ``now``.

Run rows and jobs therefore commit together or not at all, and a slot once decided is never
decided again - through any number of leader changes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, Callable, Mapping

import asyncpg
import attrs
from loguru import logger

from forge_kernel.executor import JobOutcome, job_request

from .election import Leadership, LeaderElection, NotLeader, fence
from .settings import CronSettings

#: counting dropped slots stops here (a per-second cron down for days would take long to count)
DROP_COUNT_CAP = 10_000
#: seconds of backlog still planned on the event loop; longer ones go to a thread
OUTAGE_PLANNED_INLINE = 60.0
OPEN = ("queued", "retrying")
FINAL = ("succeeded", "failed", "cancelled")
#: JobOutcome.status -> run status
OUTCOME_STATUS = {"succeeded": "succeeded", "failed": "retrying", "dead": "failed",
                  "cancelled": "cancelled", "retry_later": "queued"}


@attrs.frozen
class SlotPlan:
    """What to do with the slots in ``(decided_until, now]``."""

    run: list[dt.datetime]
    #: missed slots dropped by the catch-up policy (counted up to DROP_COUNT_CAP)
    dropped: int
    missed: int
    #: counting stopped at DROP_COUNT_CAP: more slots than ``dropped`` were dropped
    capped: bool = False


def plan_slots(cron: CronSettings, decided_until: dt.datetime, now: dt.datetime) -> SlotPlan:
    """On-time slots (at most ``grace`` seconds late) always run; of the missed ones, the
    ``catch_up`` most recent run and the rest are dropped."""
    sched = cron.schedule
    # a slot exactly ``grace`` late is still on time; slots are whole seconds, so 1 µs separates
    cutoff = now - dt.timedelta(seconds=cron.grace) - dt.timedelta(microseconds=1)
    on_time = sched.between(max(decided_until, cutoff), now)
    missed_run: list[dt.datetime] = []
    missed = 0
    cap = DROP_COUNT_CAP + cron.catch_up
    if decided_until < cutoff:
        missed = sched.count_between(decided_until, cutoff, cap=cap)
        if missed:
            missed_run = sched.latest(decided_until, cutoff, cron.catch_up) if cron.catch_up else []
    return SlotPlan(missed_run + on_time, max(0, missed - len(missed_run)), missed, capped=missed >= cap)


async def plan_due(cron: CronSettings, decided_until: dt.datetime, now: dt.datetime) -> SlotPlan:
    """:func:`plan_slots`, in a thread after an outage: counting thousands of missed slots
    takes CPU time that must not stall this node's event loop (heartbeat, renewals, requests)."""
    if (now - decided_until).total_seconds() <= OUTAGE_PLANNED_INLINE:
        return plan_slots(cron, decided_until, now)
    return await asyncio.to_thread(plan_slots, cron, decided_until, now)


@attrs.frozen
class Decision:
    cron: str
    enqueued: list[dt.datetime]
    skipped: list[dt.datetime]
    triggered: int
    dropped: int


class CronEngine:
    """The leader's cron loop. ``dispatcher`` returns the job store's dispatcher."""

    def __init__(self, pool: asyncpg.Pool, crons: Mapping[str, CronSettings], dispatcher: Callable[[], Any],
                 *, tick_interval: float = 0.5, telemetry: Any = None) -> None:
        self.pool = pool
        self.crons = dict(crons)
        self.dispatcher = dispatcher
        self.tick_interval = tick_interval
        #: the node's telemetry (``node.telemetry``): slots dropped by the catch-up policy are ``cron.missed``
        self.telemetry = telemetry
        self._next_cache: dict[tuple[str, dt.datetime], dt.datetime] = {}
        self.decisions = 0
        #: failed decisions per cron (each is retried on the next tick)
        self.failures: dict[str, int] = {}

    async def register(self, conn: asyncpg.Connection) -> None:
        """Create state rows for new crons (their first slot is the first one after now) and
        record the current schedule of known ones. Which crons this deployment defines is
        marked by every :meth:`tick`."""
        if not self.crons:
            return
        await conn.executemany(
            """INSERT INTO forge_cron_state (cron, schedule, timezone, decided_until, registered_at)
               VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp())
               ON CONFLICT (cron) DO UPDATE SET schedule = EXCLUDED.schedule, timezone = EXCLUDED.timezone
               WHERE forge_cron_state.schedule IS DISTINCT FROM EXCLUDED.schedule
                  OR forge_cron_state.timezone IS DISTINCT FROM EXCLUDED.timezone""",
            [(c.name, c.schedule.expression, c.schedule.timezone) for c in self.crons.values()])

    async def _mark_defined(self, conn: asyncpg.Connection, rows: list[Any], term: int) -> None:
        """Set ``forge_cron_state.defined`` (true for our crons, false for the others: one
        leader serves the database, so those run nowhere) where this term has not set it yet,
        e.g. at the term's first tick or on rows the API wrote for a name only its caller knew."""
        ours = [r["cron"] for r in rows if r["cron"] in self.crons and (r["defined"] is not True or r["defined_term"] != term)]
        gone = [r["cron"] for r in rows if r["cron"] not in self.crons
                and (r["defined"] is not False or r["defined_term"] != term)]
        for names, value in ((ours, True), (gone, False)):
            if names:
                await conn.execute("UPDATE forge_cron_state SET defined = $2, defined_term = $3 WHERE cron = ANY($1::text[])",
                                   names, value, term)
        if gone:
            logger.warning(f"cron(s) {', '.join(sorted(gone))} in forge_cron_state are not defined by this "
                           f"deployment: they do not run, and trigger/pause/resume refuse them")

    def _next(self, name: str, after: dt.datetime) -> dt.datetime:
        key = (name, after)
        nxt = self._next_cache.get(key)
        if nxt is None:
            if len(self._next_cache) > 4 * len(self.crons) + 64:
                self._next_cache.clear()
            nxt = self._next_cache[key] = self.crons[name].schedule.next_after(after)
        return nxt

    async def run(self, election: LeaderElection, leadership: Leadership) -> None:
        """Loop while leading: check leadership, decide what is due, sleep until the next slot."""
        await election.check()
        async with self.pool.acquire() as conn:
            await self.register(conn)
        while True:
            await election.check()
            wait = await self.tick(leadership)
            await asyncio.sleep(wait)

    async def tick(self, leadership: Leadership) -> float:
        """Decide every due cron once; returns seconds until the next due slot (capped)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT s.cron, s.decided_until, s.paused, s.defined, s.defined_term, clock_timestamp() AS now,
                          EXISTS (SELECT 1 FROM forge_cron_triggers t WHERE t.cron = s.cron) AS triggered
                   FROM forge_cron_state s""")
            await self._mark_defined(conn, rows, leadership.term)
        if not rows:
            return self.tick_interval
        now = rows[0]["now"]
        wait = self.tick_interval
        for r in rows:
            name = r["cron"]
            if name not in self.crons:
                continue  # not defined by this deployment (marked above): it runs nowhere
            due = not r["paused"] and self._next(name, r["decided_until"]) <= now
            if due or r["triggered"]:
                try:
                    await self.decide(name, leadership)
                except NotLeader:
                    raise
                except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
                    raise  # the database is unreachable: the whole loop backs off
                except Exception as exc:  # one broken cron must not hold up the others; retried next tick
                    self.failures[name] = self.failures.get(name, 0) + 1
                    logger.opt(exception=exc).error(f"cron {name}: could not enqueue due slots "
                                                    f"({self.failures[name]} failure(s)); retrying")
            elif not r["paused"]:
                wait = min(wait, (self._next(name, r["decided_until"]) - now).total_seconds())
        return max(0.0, wait)

    async def decide(self, name: str, leadership: Leadership) -> Decision:
        """One transaction: fence, decide due slots and triggers, enqueue their jobs."""
        cron = self.crons[name]
        async with self.pool.acquire() as conn, conn.transaction():
            # a leader frozen inside this transaction must not hold the fence row (and thus a
            # successor's takeover) for longer than a few seconds
            await conn.execute("SET LOCAL idle_in_transaction_session_timeout = 10000")
            await fence(conn, leadership)
            st = await conn.fetchrow(
                "SELECT decided_until, paused, clock_timestamp() AS now FROM forge_cron_state WHERE cron = $1 FOR UPDATE",
                name)
            if st is None:
                raise LookupError(f"no forge_cron_state row for cron {name!r}")
            now = st["now"]
            triggers = await conn.fetch(
                "DELETE FROM forge_cron_triggers WHERE cron = $1 RETURNING id, requested_at, requested_by", name)
            plan = SlotPlan([], 0, 0) if st["paused"] else await plan_due(cron, st["decided_until"], now)
            enqueued: list[dt.datetime] = []
            skipped: list[dt.datetime] = []
            runs: list[tuple[int, str, dt.datetime]] = []
            for slot in plan.run:
                if cron.overlap == "skip" and (runs or await conn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM forge_cron_runs WHERE cron = $1 AND status = ANY($2::text[]) "
                        "AND enqueued_at > clock_timestamp() - make_interval(secs => $3))",
                        name, list(OPEN), cron.overlap_timeout)):
                    await conn.execute(
                        """INSERT INTO forge_cron_runs (cron, slot, kind, status, leader, leader_term, finished_at, error)
                           VALUES ($1, $2, 'scheduled', 'skipped', $3, $4, clock_timestamp(),
                                   'overlap: the previous run was still queued or running')
                           ON CONFLICT (cron, slot) WHERE kind = 'scheduled' DO NOTHING""",
                        name, slot, leadership.node_id, leadership.term)
                    skipped.append(slot)
                    continue
                rid = await conn.fetchval(
                    """INSERT INTO forge_cron_runs (cron, slot, kind, status, leader, leader_term)
                       VALUES ($1, $2, 'scheduled', 'queued', $3, $4)
                       ON CONFLICT (cron, slot) WHERE kind = 'scheduled' DO NOTHING RETURNING id""",
                    name, slot, leadership.node_id, leadership.term)
                if rid is not None:  # None: decided before (state rewound by hand); never twice
                    runs.append((rid, "scheduled", slot))
                    enqueued.append(slot)
            for t in triggers:
                rid = await conn.fetchval(
                    """INSERT INTO forge_cron_runs (cron, slot, kind, status, leader, leader_term, node_id)
                       VALUES ($1, $2, 'manual', 'queued', $3, $4, NULL) RETURNING id""",
                    name, t["requested_at"], leadership.node_id, leadership.term)
                runs.append((rid, "manual", t["requested_at"]))
            if runs:
                requests = [self._request(cron, rid, kind, slot) for rid, kind, slot in runs]
                job_ids = await self.dispatcher().dispatch(conn, requests)
                if job_ids:
                    await conn.executemany("UPDATE forge_cron_runs SET job_id = $2 WHERE id = $1",
                                           [(rid, jid) for (rid, _, _), jid in zip(runs, job_ids)])
            await conn.execute(
                """UPDATE forge_cron_state SET decided_until = GREATEST(decided_until, $2),
                       dropped_total = dropped_total + $3,
                       last_dropped = CASE WHEN $3 > 0 THEN $3 ELSE last_dropped END,
                       updated_at = clock_timestamp()
                   WHERE cron = $1""", name, now if not st["paused"] else st["decided_until"], plan.dropped)
        self.decisions += 1
        if plan.dropped:
            if self.telemetry is not None:
                self.telemetry.emit("cron.missed", name, plan.dropped)
            more = "at least " if plan.capped else ""
            logger.warning(f"cron {name}: {more}{plan.missed} slot(s) missed while no leader ran; ran the "
                           f"{plan.missed - plan.dropped} most recent (catch_up={cron.catch_up}), "
                           f"dropped {more}{plan.dropped}")
        return Decision(name, enqueued, skipped, len(triggers), plan.dropped)

    @staticmethod
    def _request(cron: CronSettings, run_id: int, kind: str, slot: dt.datetime):
        req = job_request(cron.defn, {}, caller="scheduler")
        return attrs.evolve(req, options={**req.options, "cron": cron.name, "cron_run": run_id,
                                          "slot": slot.isoformat(), "trigger": kind})


def count_run(telemetry: Any, outcome: JobOutcome) -> None:
    """A ``cron.run`` event (cron, status, lag from the slot to the run's start) for whoever observes
    the node (``node.telemetry``; free when nothing does)."""
    if telemetry is None or not telemetry.enabled:
        return
    opts = outcome.options or {}
    lag, slot, started = None, opts.get("slot"), outcome.started_at
    if started is not None and isinstance(slot, str):
        try:
            lag = max(0.0, (started - dt.datetime.fromisoformat(slot)).total_seconds())
        except (ValueError, TypeError):
            lag = None
    telemetry.emit("cron.run", opts.get("cron"), outcome.status, lag)


async def record_outcome(pool: asyncpg.Pool, outcome: JobOutcome) -> bool:
    """Update the run behind a cron job with how an attempt ended (``forge_job_finished``).
    A final status is never replaced by an open one (a late duplicate cannot reopen a run)."""
    run_id = (outcome.options or {}).get("cron_run")
    if not isinstance(run_id, int) or isinstance(run_id, bool):
        return False
    # a lost report would leave the run open until reconcile_runs finds it; ride out a short blip
    for attempt in range(3):
        try:
            return await record_run(pool, run_id, outcome)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
            if attempt == 2:
                raise
            await asyncio.sleep(0.2 * 2 ** attempt)
    return False


async def record_run(db: asyncpg.Pool | asyncpg.Connection, run_id: int, outcome: JobOutcome,
                     *, only_open: bool = False) -> bool:
    """Write ``outcome`` into run ``run_id``; False when the status is unknown or the run is
    already final and the outcome is not (with ``only_open``: when the run is final at all)."""
    status = OUTCOME_STATUS.get(outcome.status)
    if status is None:
        logger.warning(f"cron run {run_id}: unknown job outcome status {outcome.status!r}; not recorded")
        return False
    started = outcome.started_at
    duration_ms = None if started is None else (outcome.finished_at - started).total_seconds() * 1000.0
    return bool(await db.fetchval(_RECORD_OPEN if only_open else _RECORD, run_id, status, outcome.attempt, started,
                                  outcome.finished_at, duration_ms, outcome.node_id, list(FINAL), outcome.error))


_SET_OUTCOME = """UPDATE forge_cron_runs SET status = $2::text, attempts = GREATEST(attempts, $3::int),
        started_at = COALESCE(started_at, $4::timestamptz),
        finished_at = CASE WHEN $2 = ANY($8::text[]) THEN $5::timestamptz ELSE NULL END,
        duration_ms = $6, node_id = $7, error = $9
    WHERE id = $1 AND """
#: a final status is never replaced by an open one
_RECORD = _SET_OUTCOME + "NOT (status = ANY($8::text[]) AND NOT ($2 = ANY($8::text[]))) RETURNING true"
_RECORD_OPEN = _SET_OUTCOME + "status IN ('queued', 'retrying') RETURNING true"

#: open runs looked at per batch, and batches per reconcile pass
RECONCILE_BATCH = 500
RECONCILE_BATCHES = 4


class RunReconciler:
    """Closes open runs whose job has ended although no ``forge_job_finished`` said so (a job
    cancelled before it ran, dead-lettered by the lease rescue after its worker died, or whose
    worker died between finishing and reporting). Asks the job store (``ended``, see the
    ``forge_job_dispatcher`` hook spec); a store without it cannot tell, and nothing changes.

    Pages through open runs by id across passes, so runs that are legitimately still waiting
    (a backlog, a queue no worker serves) never hide newer ones that have ended."""

    def __init__(self, older_than: float) -> None:
        self.older_than = older_than
        self.after_id = 0

    async def run(self, conn: asyncpg.Connection, dispatcher: Any) -> int:
        """One pass; returns how many runs were closed."""
        ended = getattr(dispatcher, "ended", None)
        if ended is None:
            return 0
        closed = 0
        for _ in range(RECONCILE_BATCHES):
            rows = await conn.fetch(
                """SELECT id, job_id FROM forge_cron_runs
                   WHERE status = ANY($1::text[]) AND job_id IS NOT NULL AND id > $4
                     AND enqueued_at < clock_timestamp() - make_interval(secs => $2)
                   ORDER BY id LIMIT $3""", list(OPEN), self.older_than, RECONCILE_BATCH, self.after_id)
            self.after_id = rows[-1]["id"] if len(rows) == RECONCILE_BATCH else 0
            if rows:
                closed += await self._close(conn, rows, await ended(conn, [r["job_id"] for r in rows]))
            if not self.after_id:
                break
        if closed:
            logger.info(f"closed {closed} cron run(s) whose job ended without a report from a worker")
        return closed

    @staticmethod
    async def _close(conn: asyncpg.Connection, rows: list[Any], outcomes: Mapping[int, Any]) -> int:
        closed = 0
        for r in rows:
            if r["job_id"] not in outcomes:
                continue  # still waiting or running
            outcome = outcomes[r["job_id"]]
            # only_open: a worker's report may have closed the run since it was read (a retried
            # dead letter that then succeeded); what the job store said earlier must not overwrite it
            if outcome is None:
                done = await conn.fetchval(
                    """UPDATE forge_cron_runs SET status = 'failed', finished_at = clock_timestamp(),
                           error = format('job %s is no longer in the job store (purged or removed); how it ended is unknown', job_id)
                       WHERE id = $1 AND status = ANY($2::text[]) RETURNING true""", r["id"], list(OPEN))
            else:
                done = await record_run(conn, r["id"], outcome, only_open=True)
            closed += bool(done)
        return closed
