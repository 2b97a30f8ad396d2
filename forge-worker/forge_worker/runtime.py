"""The worker: claims jobs in batches, runs them, reports results in batches, keeps leases.

Loops (each holds one pool connection for its lifetime, so no per-statement pool reset):

* **claim** - promotes due delayed jobs, claims up to the free capacity with
  ``FOR UPDATE SKIP LOCKED`` (limited queues/types under an advisory lock so limits hold
  cluster-wide), then sleeps until a NOTIFY, a free slot, the next delayed job or the poll
  interval;
* **claim lane** (``claim_lanes = 2``) - under a backlog, a second connection that sends the
  claim loop's statement (results + claims) while the loop's own waits for its commit
  (Worker._second_lane);
* **report** - writes finished attempts in one statement per batch (move to history or delete,
  reschedule with backoff, dead letter), fenced by node and attempt;
* **lease** - every heartbeat renews the leases past half their length, writes coalesced progress,
  notices cancellations and lost leases of every row held; every ``rescue_interval`` re-queues jobs
  whose lease expired anywhere;
* **listen** - a dedicated connection LISTENing for wake-ups and cancellations.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import inspect
import json
import random
import time
import traceback
from typing import Any, Callable

import asyncpg
import attrs
from loguru import logger

from forge_kernel.executor import Auth, Call, JobOutcome, bind_arguments
from forge_kernel.errors import ForgeError
from forge_kernel.telemetry import MAX_JOB_BATCH

from .config import WorkerConfig
from .context import JobCancelled, JobContext, LazyDatabase, RetryLater, job_span
from .deadlines import Deadlines
from .queue import CANCEL_CHANNEL, WAKE_CHANNEL

# InternalClientError: asyncpg's answer on a connection a lost server left mid-operation
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
              asyncio.TimeoutError, ConnectionError)

# run_as as text: a node sees few distinct identities, decoded once each (Worker._auth); options
# NULL when empty, the common case (readers take NULL as {}): two JSON decodes per job saved. args
# NULL when empty too (a job without arguments: 6.5 % of a no-op job's instructions went to the
# codec's json.loads of '{}')
_RETURNING = """RETURNING j.id, j.name, j.queue, NULLIF(j.args, '{}'::jsonb) AS args, j.attempt, j.max_attempts,
                          j.timeout, j.caller, j.run_as::text AS run_as, NULLIF(j.options, '{}'::jsonb) AS options,
                          j.priority, j.run_at, j.created_at, j.started_at, j.unique_key"""
# statement_timestamp(), not now(): a limited claim runs in a transaction that first waits for
# advisory locks, and now() (its start) would date the start and the lease before that wait
# started_at is NULL for a job claimed ahead (prefetched: it waits on the node for a slot); the node
# writes it once the job has started (with the next lease renewal, RENEW, or with its result; for a
# last attempt before it starts), and the rescue reads NULL as "not known to have started". The
# attempt is counted at the claim either way (see RESCUE).
_CLAIMED_ON = """SET status = 'running', node_id = {node}, attempt = j.attempt + 1, started_at = {started},
                  lease_until = statement_timestamp() + make_interval(secs => {lease}), cancel_requested = false,
                  progress = NULL, progress_message = NULL"""
_CLAIMED = _CLAIMED_ON.format(node="$1", lease="$2", started="statement_timestamp()")

# Jobs of one limited queue ($8) or one limited type ($9), run after taking the advisory locks of
# every limit involved, so counting running jobs and claiming is serialised cluster-wide.
# Per-type limits ($10, {name: limit}) are applied inside a limited queue too.
CLAIM_LIMITED = f"""
WITH run_q AS (
    SELECT count(*) AS n FROM forge_jobs WHERE status = 'running' AND queue = $8
), run_n AS (
    SELECT name, count(*) AS n FROM forge_jobs
    WHERE status = 'running' AND name IN (SELECT jsonb_object_keys($10::jsonb))
    GROUP BY name
), cand AS (
    SELECT id, name, priority FROM forge_jobs
    WHERE status = 'pending'
      AND (cardinality($3::text[]) = 0 OR queue = ANY($3::text[]))
      AND (capability IS NULL OR capability = ANY($4::text[]))
      AND ($8::text IS NULL OR queue = $8)
      AND ($9::text IS NULL OR (name = $9 AND NOT (queue = ANY($6::text[]))))
      AND queue <> ALL (ARRAY(SELECT queue FROM forge_worker_queue_pauses))
    ORDER BY priority DESC, id
    LIMIT $5::int * 4 + 16
), ranked AS (
    SELECT c.id, c.priority, c.name,
           row_number() OVER (PARTITION BY c.name ORDER BY c.priority DESC, c.id) AS rn
    FROM cand c
), ok AS (
    SELECT r.id FROM ranked r LEFT JOIN run_n ON run_n.name = r.name
    WHERE r.rn <= coalesce(($10::jsonb ->> r.name)::int - coalesce(run_n.n, 0), 2147483647)
    ORDER BY r.priority DESC, r.id
    LIMIT GREATEST(0, LEAST($7::int, coalesce($11::int - (SELECT n FROM run_q), 2147483647)))
)
UPDATE forge_jobs j {_CLAIMED}
FROM ok WHERE j.id = ok.id AND j.status = 'pending'
{_RETURNING}
"""

# Make due delayed jobs claimable; also say when the next one is due (seconds from now).
PROMOTE = """
WITH due AS (
    SELECT id FROM forge_jobs WHERE status = 'scheduled' AND run_at <= now()
    ORDER BY run_at LIMIT 10000 FOR UPDATE SKIP LOCKED
), p AS (
    UPDATE forge_jobs j SET status = 'pending' FROM due WHERE j.id = due.id RETURNING 1
)
SELECT (SELECT count(*) FROM p) AS promoted,
       (SELECT extract(epoch FROM min(run_at) - now()) FROM forge_jobs
        WHERE status = 'scheduled' AND run_at > now()) AS next_in
"""

# Every finished attempt of a batch, fenced by (id, attempt, node): a job whose lease was lost
# and re-claimed elsewhere is not touched. Each result row finds its job through the primary
# key (a nested loop over the batch; no `id = ANY(...)` beside it, which made every probe scan
# the whole list: quadratic for a drain's thousands of results).
#
# `status = ${running}` (the text 'running' as a bind parameter, not a literal): a statement that
# joins an array of ids to running rows must not use the partial index forge_jobs_running, whose
# predicate a literal would match. The cached generic plan estimates one running row of this node
# (node_id = $n, most rows' node_id NULL) and 10 array elements, so with that index it drove the
# join from the running rows and scanned the whole batch once per running row: quadratic (bound
# mode, 250 rows held and 150 results: 37,350 rows compared, 11 of a statement's 17 ms). The
# planner cannot prove a parameter implies an index predicate (PostgreSQL docs, Partial Indexes),
# so each result probes the primary key, whatever the statistics say. A parameter alone is not
# enough: a prepared statement's first five executions (and any later one PostgreSQL judges
# cheaper so) get a custom plan, made with the values, where `status = $n` reads `status =
# 'running'` again - EXPLAIN ANALYZE in a drain: 100 running rows x 51 results, 5,049 rows removed
# by the join filter, 0.8-1.7 ms of a 2.3 ms statement. So the rows compare their status with a
# column of the results (r.running, the parameter's value), which no index predicate matches.
#
# The arrays of a batch ($1-$5 and the start times) arrive as array literals in one text value each
# (see _array): asyncpg checks every element of a list it encodes against the collections.abc ABCs
# (isinstance(elem, Iterable), Sized...), ~0.4 us per element, 6 per result: 9 % of a node's CPU
# instructions per no-op job (callgrind, bench/jobs/instructions.py); a joined string is a third of
# that and PostgreSQL parses it in C. Start times go as epoch microseconds: an int's text costs a
# quarter of a float's shortest repr.
_RESULTS = """
r AS (
    SELECT id, attempt, outcome, delay, error, started_us / 1e6 AS started, ${running}::text AS running
    FROM unnest($1::text::bigint[], $2::text::int[], $3::text::text[], $4::text::float8[], $5::text::text[],
                ${started}::text::float8[])
        AS r(id, attempt, outcome, delay, error, started_us)
), done AS (
    -- a job asked to cancel that ended otherwise (failed, released...) is cancelled, not retried
    DELETE FROM forge_jobs j USING r
    WHERE j.id = r.id AND j.attempt = r.attempt AND j.node_id = $6
      AND j.status = r.running AND (r.outcome IN ('succeeded', 'cancelled') OR j.cancel_requested)
    RETURNING j.*, r.started AS started_epoch,
              CASE WHEN r.outcome = 'succeeded' THEN 'succeeded' ELSE 'cancelled' END AS outcome,
              CASE WHEN r.outcome IN ('succeeded', 'cancelled') THEN r.error
                   ELSE 'cancelled on request' END AS outcome_error
), hist AS (
    INSERT INTO forge_job_history (id, name, queue, args, priority, status, attempt, max_attempts, unique_key,
        caller, options, node_id, last_error, created_at, run_at, started_at, finished_at)
    SELECT id, name, queue, args, priority, outcome, attempt, max_attempts, unique_key, caller, options, node_id,
           coalesce(outcome_error, last_error), created_at, run_at,
           coalesce(started_at, to_timestamp(started_epoch)), now()
    FROM done WHERE $7::boolean
    RETURNING 1
), upd AS (
    UPDATE forge_jobs j SET
        status = CASE WHEN r.outcome = 'dead' THEN 'dead'
                      WHEN r.delay > 0 THEN 'scheduled' ELSE 'pending' END,
        run_at = CASE WHEN r.outcome = 'dead' THEN j.run_at ELSE now() + make_interval(secs => r.delay) END,
        -- retry-later and release do not use up an attempt
        attempt = CASE WHEN r.outcome IN ('retry_later', 'released') THEN j.attempt - 1 ELSE j.attempt END,
        last_error = coalesce(r.error, j.last_error),
        started_at = coalesce(j.started_at, to_timestamp(r.started)),
        finished_at = CASE WHEN r.outcome = 'dead' THEN now() END,
        node_id = CASE WHEN r.outcome = 'dead' THEN j.node_id END,
        lease_until = NULL, cancel_requested = false
    FROM r
    WHERE j.id = r.id AND j.attempt = r.attempt AND j.node_id = $6
      AND j.status = r.running AND NOT j.cancel_requested
      AND r.outcome IN ('failed', 'dead', 'retry_later', 'released')
    RETURNING j.id
)"""

# Results alone (while stopping: no claims), committed without waiting for the flush unless
# durable_results (ASYNC_COMMIT on the connection).
REPORT = f"""
WITH {_RESULTS.replace("${started}", "$8").replace("${running}", "$9")}
SELECT (SELECT count(*) FROM done) + (SELECT count(*) FROM upd) AS written, (SELECT count(*) FROM hist) AS kept
"""

# Pending jobs of unlimited queues and types a claim takes: ${0} queues (empty: all), ${1}
# capabilities, ${2} limited types, ${3} limited queues, ${4} how many; paused queues are skipped.
_PENDING = """
    SELECT id, priority FROM forge_jobs
    WHERE status = 'pending'
      AND (cardinality(${0}::text[]) = 0 OR queue = ANY(${0}::text[]))
      AND (capability IS NULL OR capability = ANY(${1}::text[]))
      AND NOT (name = ANY(${2}::text[])) AND NOT (queue = ANY(${3}::text[]))
      AND queue <> ALL (ARRAY(SELECT queue FROM forge_worker_queue_pauses))
    ORDER BY priority DESC, id
    LIMIT ${4}
    FOR UPDATE SKIP LOCKED"""

# The first ${0} jobs of a claim (in claim order) start at once; the rest are claimed ahead.
_RANKED = """c AS (
    SELECT id, row_number() OVER (ORDER BY priority DESC, id) <= ${0} AS now FROM p
)"""
_STARTED = "CASE WHEN c.now THEN statement_timestamp() END"

# Jobs of unlimited queues and types, when no result or start waits to be written.
CLAIM = f"""
WITH p AS ({_PENDING.format(3, 4, 5, 6, 7)}
), {_RANKED.format(8)}
UPDATE forge_jobs j {_CLAIMED_ON.format(node="$1", lease="$2", started=_STARTED)}
FROM c WHERE j.id = c.id
{_RETURNING}
"""

# The hot path, one round trip per batch: write the finished attempts ($1-$7) and claim up to $13
# jobs of unlimited queues and types into the slots they held (and the free ones). Results and
# claims commit together, so the rows leased to this node never outnumber its slots, with no
# second statement (or connection) for results. The rows it writes are running, the rows it
# claims pending: no row is touched twice. A claim must commit durably (a claim lost in a crash
# could hand a running job to a second worker); a statement that claimed nothing commits
# without waiting for the flush (results may: see durable_results, $14).
#
# It also records the start of jobs claimed ahead on their last attempt before they start ($16-$18:
# id, attempt, epoch seconds; rows running here, not among the results, so no row is written
# twice; other starts are written by the lease renewal, RENEW), and starts the first $19 jobs it
# claims at once (the rest are claimed ahead).
WRITE_AND_CLAIM = f"""
WITH {_RESULTS.replace("${started}", "$15").replace("${running}", "$20")}, p AS ({_PENDING.format(9, 10, 11, 12, 13)}
), {_RANKED.format(19)}, claimed AS (
    UPDATE forge_jobs j {_CLAIMED_ON.format(node="$6", lease="$8", started=_STARTED)}
    FROM c WHERE j.id = c.id
    {_RETURNING}
), m AS MATERIALIZED (
    SELECT id, attempt, t, $20::text AS running
    FROM unnest($16::text::bigint[], $17::text::int[], $18::text::float8[]) AS m(id, attempt, t)
), marked AS (
    -- the status compared with a column of the starts (a CTE the planner keeps: a subquery is pulled
    -- up and its column read as the literal again), as in _RESULTS: with `j.status = $20` a custom
    -- plan drove the join from forge_jobs_running, visiting every row leased to this node
    -- (hundreds with a grown reserve) in every statement, most of which write no start at all
    UPDATE forge_jobs j SET started_at = to_timestamp(m.t / 1e6)
    FROM m
    WHERE j.id = m.id AND j.attempt = m.attempt AND j.node_id = $6 AND j.status = m.running
    RETURNING 1
)
SELECT claimed.* FROM (
    SELECT set_config('synchronous_commit',
                      CASE WHEN $14::boolean OR EXISTS (SELECT 1 FROM claimed)
                           THEN current_setting('synchronous_commit') ELSE 'off' END, true)
) durability LEFT JOIN claimed ON true
"""

# Renew leases, write the latest progress, learn about cancellations and lost leases, for the rows
# that need a write (Worker._renew: a lease past half its length, progress, a start unwritten for a
# heartbeat). Also records when jobs claimed ahead started ($7, epoch seconds; NULL: not started,
# dated by their claim or written before).
RENEW = """
UPDATE forge_jobs j SET lease_until = now() + make_interval(secs => $3),
       progress = coalesce(p.progress, j.progress), progress_message = coalesce(p.message, j.progress_message),
       started_at = coalesce(j.started_at, to_timestamp(p.started))
FROM unnest($1::bigint[], $2::int[], $4::real[], $5::text[], $7::float8[]) AS p(id, attempt, progress, message, started)
WHERE j.id = p.id AND j.attempt = p.attempt AND j.node_id = $6 AND j.status = $8
RETURNING j.id, j.cancel_requested
"""

# The rows held that need no write this heartbeat: still leased here, and asked to cancel? A read
# (no row lock, no WAL), so it runs beside the result-and-claim statements. The status is compared
# with a column of a materialized CTE, as in WRITE_AND_CLAIM's starts, so that no plan drives the
# join from forge_jobs_running (every running row of the cluster) instead of the primary key.
CHECK_LEASES = """
WITH m AS MATERIALIZED (
    SELECT id, attempt, $4::text AS running FROM unnest($1::text::bigint[], $2::text::int[]) AS m(id, attempt)
)
SELECT j.id, j.cancel_requested FROM m JOIN forge_jobs j ON j.id = m.id
WHERE j.attempt = m.attempt AND j.node_id = $3 AND j.status = m.running
"""

# Re-queue running jobs whose lease expired or whose node is gone; the last attempt goes to
# dead letter instead (a job that kills its worker must not loop forever).
RESCUE = """
WITH lost AS (
    SELECT j.id FROM forge_jobs j
    WHERE j.status = 'running'
      AND (j.lease_until < now()
           OR j.node_id IN (SELECT n.id FROM forge_nodes n
                            WHERE n.status IN ('stopped', 'dead')
                               OR n.last_heartbeat < now() - make_interval(secs => $1)))
    FOR UPDATE SKIP LOCKED
), gone AS (
    -- a cancellation its dead worker never saw still holds
    DELETE FROM forge_jobs j USING lost WHERE j.id = lost.id AND j.cancel_requested
    RETURNING j.*
), hist AS (
    INSERT INTO forge_job_history (id, name, queue, args, priority, status, attempt, max_attempts, unique_key,
        caller, options, node_id, last_error, created_at, run_at, started_at, finished_at)
    SELECT id, name, queue, args, priority, 'cancelled', attempt, max_attempts, unique_key, caller, options,
           node_id, 'cancelled on request (its worker stopped before it saw the request)', created_at, run_at,
           started_at, now()
    FROM gone
    RETURNING id
), requeued AS (
    -- started_at NULL: claimed ahead and not known to have started. Its attempt stays counted (it
    -- may have started a moment before its node died, its start not yet written: a job that kills
    -- its worker must not loop), except the last one: a job on its last attempt starts only after
    -- its start is written (Worker._fill), so without one it never ran - it gets the attempt back
    -- and is never dead-lettered for a run it did not have.
    UPDATE forge_jobs j SET
        status = CASE WHEN j.attempt >= j.max_attempts AND j.started_at IS NOT NULL THEN 'dead' ELSE 'pending' END,
        attempt = CASE WHEN j.attempt >= j.max_attempts AND j.started_at IS NULL THEN j.attempt - 1
                       ELSE j.attempt END,
        last_error = CASE WHEN j.started_at IS NULL
            THEN format('worker %s stopped heartbeating holding attempt %s, claimed ahead, not known to have started',
                        j.node_id, j.attempt)
            ELSE format('worker %s stopped heartbeating during attempt %s (lease expired)', j.node_id, j.attempt) END,
        finished_at = CASE WHEN j.attempt >= j.max_attempts AND j.started_at IS NOT NULL THEN now() END,
        node_id = NULL, lease_until = NULL
    FROM lost WHERE j.id = lost.id AND NOT j.cancel_requested
    RETURNING j.id, j.status
)
SELECT id, status FROM requeued UNION ALL SELECT id, 'cancelled' FROM hist
"""

RETENTION = "DELETE FROM forge_job_history WHERE finished_at < now() - make_interval(secs => $1)"

SLEEP = """INSERT INTO forge_worker_sleepers (node_id, queues, capabilities) VALUES ($1, $2, $3)
           ON CONFLICT (node_id) DO UPDATE SET queues = EXCLUDED.queues, capabilities = EXCLUDED.capabilities,
                                               since = now()"""
WAKE = "DELETE FROM forge_worker_sleepers WHERE node_id = $1"

# Queue tables change faster than statistics: right after a bulk insert the planner believes the
# pending set is tiny and picks bitmap scan + sort over every pending row for each claim (~5 ms
# per claim at 20k rows instead of ~0.3 ms). Every worker statement has an index path that
# matches its ORDER BY, so the worker's own connections simply rule out the other plans.
PLANNER_SETTINGS = "SET enable_bitmapscan = off; SET enable_seqscan = off"
# Results may commit without waiting for the WAL flush: if PostgreSQL crashes before the flush,
# the job is still leased to us, we no longer renew it, and it is re-run after its lease expires -
# the at-least-once contract, never a second run while the first is alive. Claims stay
# synchronous: a lost claim could let a second worker start a job the first is still running.
ASYNC_COMMIT = "SET synchronous_commit = off"
#: [worker] prefetch when unset, times concurrency
DEFAULT_PREFETCH_FACTOR = 2
#: [worker] prefetch_max when it and prefetch are unset, times concurrency: the reserve a backlog may
#: grow to (bench/jobs, 2 CPUs with two CPU burners: prefetch 400 at concurrency 50 drained 0.88x
#: graphile-worker's best, the default 150 0.52x; graphile holds up to 500 jobs per process).
#: 16, not 8 (session 9, worker-bound, same runs): 800 carried ~360 jobs a statement against ~195 and
#: ran 1.07x (load 4-5) and 1.09x (load 7-10) the throughput of 400. 32, not 16 (session 10), once a
#: heartbeat no longer rewrites every held row: 1600 carried ~633 jobs a statement against ~356 and ran
#: 1.087x the throughput of 800 (worker-bound, 3 rounds, load 1.6-3.9), for up to 1,650 rows held
DEFAULT_PREFETCH_MAX_FACTOR = 32
#: seconds a finished job's result may wait for others to be written with it while the node has
#: jobs claimed ahead to run (without them every result is written with the next statement at once)
RESULTS_WAIT = 0.01


@contextlib.asynccontextmanager
async def _local_settings(conn: asyncpg.Connection, settings: str) -> Any:
    """A transaction with ``settings`` as SET LOCAL. Through a transaction pooler a session SET
    stays behind on whichever server connection ran it (and reaches other clients, not our next
    statement), so there the settings are made per transaction."""
    async with conn.transaction():
        await conn.execute(settings.replace("SET ", "SET LOCAL "))
        yield


async def rescue_expired(conn: Any, dead_after: float) -> list[tuple[int, str]]:
    """Re-queue (or dead-letter) jobs whose worker stopped heartbeating. Safe to run anywhere,
    any number of times: rows are locked with SKIP LOCKED and re-checked."""
    rows = await conn.fetch(RESCUE, float(dead_after))
    return [(r["id"], r["status"]) for r in rows]


async def apply_retention(conn: Any, retention: float, dead_after: float = 15.0) -> int:
    res = await conn.execute(RETENTION, float(retention))
    # sleepers of nodes that died without cleaning up would only attract useless wake-ups
    await conn.execute("""DELETE FROM forge_worker_sleepers s
                          WHERE NOT EXISTS (SELECT 1 FROM forge_nodes n WHERE n.id = s.node_id
                                            AND n.status IN ('starting', 'running', 'draining')
                                            AND n.last_heartbeat > now() - make_interval(secs => $1))""",
                       float(dead_after))
    return int(res.split()[-1])


def backoff_delay(attempt: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter: ``min(cap, base * 2**(attempt-1))`` scaled to 50-100 %."""
    raw = min(cap, base * 2 ** min(max(attempt - 1, 0), 62))
    return raw * (0.5 + rng() / 2)


def _array(values: Any) -> str:
    """A PostgreSQL array literal of numbers (``None``: NULL), for a ``$n::text::bigint[]`` parameter."""
    return "{" + ",".join(["NULL" if v is None else repr(v) for v in values]) + "}"


def _micros(epochs: Any) -> list[int | None]:
    """Epoch seconds as whole microseconds (``None`` stays)."""
    return [None if t is None else int(t * 1e6) for t in epochs]


def _text_array(values: Any) -> str:
    """A PostgreSQL array literal of text (``None``: NULL), every element quoted and escaped."""
    return "{" + ",".join(["NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                           for v in values]) + "}"


def reserve_waited(ready_sent: int, ready_now: int) -> bool:
    """At least half of the ``ready_sent`` jobs claimed ahead when a statement was sent still wait
    (``ready_now``) when it comes back: long jobs, or a node short of CPU."""
    return ready_sent > 0 and 2 * ready_now >= ready_sent


def jobs_outlast(ready_sent: int, ready_now: int, runs: int, run_seconds: float, round_trip: float,
                 concurrency: int) -> bool:
    """The jobs claimed ahead outlast a round trip: the reserve waited (:func:`reserve_waited`), and
    the ``runs`` jobs that finished during it ran long enough (``run_seconds`` in all) that
    ``ready_sent`` of them through ``concurrency`` slots take the round trip or longer; with none
    finished every slot stayed busy throughout."""
    if not reserve_waited(ready_sent, ready_now):
        return False
    return not runs or ready_sent * run_seconds / runs >= concurrency * round_trip


def _ready_order(a: Attempt) -> tuple[int, int]:
    return a.row["priority"], -a.id


def _by_id(a: Attempt) -> int:
    return a.id


#: the status of leased rows, as a bind parameter in statements that join arrays of ids to them (see _RESULTS)
_RUNNING = "running"
#: characters of a job's error text stored (last_error, history): a runaway exception message is cut
MAX_ERROR_TEXT = 16_384


def storable_error(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """A job's error text as its row takes it: a NUL character, which PostgreSQL's text cannot hold
    (the statement writing the whole batch of results failed, again on every try), as U+FFFD; cut
    to ``limit`` characters with a marker saying how much went."""
    text = text.replace("\x00", "\ufffd")
    if len(text) > limit:
        text = f"{text[:limit]}…[cut {len(text) - limit} characters]"
    return text


#: outcomes that are no failure (a span of the attempt ends without an error)
_WENT_WELL = frozenset({"succeeded", "retry_later"})
_random = random.random
_monotonic = time.monotonic
#: forge_job_finished's arguments in the spec's order
_NODE_OUTCOME = ("node", "outcome")


@attrs.define
class Attempt:
    """A claimed job on this node."""

    id: int
    attempt: int
    row: Any
    task: asyncio.Task | None = None
    progress: tuple[float, str | None] | None = None
    written_progress: tuple[float, str | None] | None = None
    #: why the task was cancelled from outside: cancel | lease_lost | shutdown | timeout
    cancel_reason: str | None = None
    #: its time limit in seconds (None: none)
    timeout: float | None = None
    #: the attempt has ended; only its result remains to be written
    finished: bool = False
    #: when observed (forge-observe): when it started (time.monotonic, the worker's own reading; 0: not
    #: observed) and its span, once it has one (at once in a head-sampled trace; else when the job logs,
    #: calls or dispatches, or afterwards when it failed or ran slow: see Worker._run)
    t0: float = 0.0
    span: Any = None
    #: claimed ahead (its row's started_at is NULL until the node writes when it started)
    ahead: bool = False
    #: when a job claimed ahead started (epoch seconds; 0: not yet)
    started_wall: float = 0.0
    #: holds a slot while its start is written before it starts (a job on its last attempt)
    reserved: bool = False
    #: (monotonic) its lease expires no earlier than this: the send time of the statement that
    #: claimed or last renewed it, plus the lease (PostgreSQL dates the lease at the statement's start)
    lease_due: float = 0.0
    #: the start of a job claimed ahead (started_wall) is in its row
    start_written: bool = False

    def started_at(self) -> dt.datetime:
        """When the attempt started: its claim's time, or (claimed ahead) when the node started it."""
        at = self.row["started_at"]
        return at if at is not None else dt.datetime.fromtimestamp(self.started_wall, dt.timezone.utc)


class RowTurns:
    """Turns at writing this node's running rows. The result-and-claim statements (one per claim
    lane: their rows are disjoint, so they may overlap) and the results-only REPORT write the rows
    of finished attempts in the order the attempts finished; RENEW locks every running row in id
    order. Run together, each could hold a row the other waits for - a deadlock PostgreSQL breaks
    after deadlock_timeout (1 s) by aborting one (in bench/jobs' worker-bound mode: about one in six
    renewals, and a claim loop stalled 1.2-1.5 s each time). So RENEW runs alone: it waits for the
    statements in flight and holds back new ones until it is done (one round trip a heartbeat)."""

    def __init__(self) -> None:
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: set while an exclusive turn is waiting or running; others wait for it
        self._exclusive: asyncio.Event | None = None

    @contextlib.asynccontextmanager
    async def shared(self) -> Any:
        while self._exclusive is not None:
            await self._exclusive.wait()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> Any:
        while self._exclusive is not None:
            await self._exclusive.wait()
        turn = self._exclusive = asyncio.Event()
        try:
            await self._idle.wait()
            yield
        finally:
            self._exclusive = None
            turn.set()


@attrs.define
class JobCall(Call):
    """A job invocation as middleware sees it; carries the job's ctx to the function."""

    ctx: Any = None


class Worker:
    """The runtime of the ``worker`` role on one node."""

    def __init__(self, node: Any, config: WorkerConfig) -> None:
        self.node = node
        self.config = config
        self.node_id: str = node.id
        #: what each job's task starts from (a copy each): the context the worker was made in
        self._job_context = contextvars.copy_context()
        #: node.pool is a transaction pooler: settings per transaction (SET LOCAL), not per session
        self.pooled: bool = node.pooled
        self.capabilities = list(node.capabilities)
        self.queues = list(config.queues)
        #: every row leased to this node: started, finished with the result unwritten, claimed ahead
        self.running: dict[int, Attempt] = {}
        #: jobs claimed ahead, not started: sorted so that pop() gives the next in claim order
        self.ready: list[Attempt] = []
        #: jobs claimed ahead on their last attempt: a slot is held while their start is written
        self.premark: list[Attempt] = []
        #: slots taken: jobs running (their function has not returned) and reserved ones
        self.active = 0
        #: (id, attempt, outcome, delay, error, started): started is the epoch start of a job
        #: claimed ahead (None: its claim dated it)
        self.reports: list[tuple[int, int, str, float, str | None, float | None]] = []
        self.report_event = asyncio.Event()
        self.reported = asyncio.Event()
        self.wake = asyncio.Event()
        self.slot_free = asyncio.Event()
        self.listening = False
        self.sleeping = False
        self.stopping = False
        self.next_due = 0.0  # monotonic time the next delayed job is due (0: check now)
        self.last_work = 0.0  # monotonic time a claim last found work
        #: unset: twice concurrency. Under a backlog the claim loop's statement writes the results
        #: of the jobs it last claimed and claims into their room while the jobs it claimed before
        #: run, so a statement carries about half of the rows a node may hold; each statement's
        #: round trip is mostly fixed cost (bench/jobs: 0.6 ms of PostgreSQL execution and ~0.3 ms
        #: of commit, flush and decoding for 50 jobs), so throughput follows the batch size
        floor = DEFAULT_PREFETCH_FACTOR * config.concurrency if config.prefetch is None else config.prefetch
        #: the reserve grows up to this while a backlog lasts and its round trips leave slots idle
        #: (_adapt); a fixed prefetch stays fixed unless prefetch_max says otherwise
        ceiling = config.prefetch_max if config.prefetch_max is not None else (
            DEFAULT_PREFETCH_MAX_FACTOR * config.concurrency if config.prefetch is None else floor)
        self._prefetch_floor = floor
        self._prefetch_ceiling = max(floor, ceiling)
        #: statements that may be in flight at once (claim_lanes); the second lane sends once
        #: _lane_batch results wait (see _lane_due)
        self._lanes = config.claim_lanes
        self._set_prefetch(floor)
        self._lane_kick = asyncio.Event()
        #: statements in flight, capacity they asked for and jobs they start at once (two lanes)
        self._in_flight = 0
        #: result-and-claim statements and REPORT share the running rows; RENEW takes them alone
        self._rows = RowTurns()
        self._claiming = 0
        self._starting = 0
        #: the last claim filled its capacity: more jobs are pending
        self._backlog = False
        self._reports_since = 0.0
        #: wall seconds the jobs that finished took (their function's run) and how many: the claim loop
        #: reads how long the jobs of a round trip ran (see _round_now, outlasted)
        self._run_seconds = 0.0
        self._runs = 0
        self.queue_limits = dict(config.queue_limits)
        self.type_limits = self._type_limits()
        self._limited_names = list(self.type_limits)
        self._limited_queues = list(self.queue_limits)
        self._claim_done: asyncio.Event = asyncio.Event()
        #: identities jobs run as, by (run_as JSON text, caller): see _auth
        self._auths: dict[tuple[str | None, str | None], Auth] = {}
        #: the time limits of running jobs: one timer for all of them (set up in start())
        self._deadlines: Deadlines | None = None
        self._chain = self._build_chain()
        self._finished_hook = self._finished_hook_impls()
        self._keep_history = config.history_retention > 0
        self._last_rescue = 0.0
        self._reporting = False
        self.stats = {"claimed": 0, "succeeded": 0, "failed": 0, "dead": 0, "cancelled": 0, "retry_later": 0,
                      "released": 0, "lost": 0, "progress_writes": 0, "statements": 0,
                      "overlapped": 0, "round_trip_s": 0.0, "prefetch_peak": self.prefetch,
                      #: times the reserve went back to prefetch; claims that came back with most of it waiting
                      "reserve_back": 0, "reserve_waited": 0,
                      #: rows the lease renewals wrote (RENEW); the others held were only read
                      "leases_renewed": 0}
        #: more channels to LISTEN on over this node's one listen connection (the workflow runtime's)
        self.extra_channels: dict[str, Callable[..., Any]] = {}
        #: called whenever the listen connection is (re)established
        self.on_listening: list[Callable[[], Any]] = []

    # --- set-up -------------------------------------------------------------------------
    def _set_prefetch(self, prefetch: int) -> None:
        """The reserve of jobs claimed ahead, and what follows from it."""
        self.prefetch = prefetch
        self.claim_batch = self.config.claim_batch or self.config.concurrency + prefetch
        #: the claim loop refills once the jobs claimed ahead are down to this many (with prefetch
        #: 0: always, as each result is written); results wait at most RESULTS_WAIT for a batch
        self._low_water = prefetch // 2
        #: rows this node may hold leased: running, finished with the result unwritten, claimed ahead
        self._held = self.config.concurrency + prefetch
        self._lane_batch = max(1, self._held // 4)

    def _adapt(self, got: int, capacity: int, starved: bool, outlasted: bool) -> None:
        """Size the reserve to the queue. A claim that filled its capacity while this node's slots
        waited for it (every job claimed ahead had started before its round trip ended) doubles
        the reserve, up to prefetch_max: the round trip, not the node, is the limit, and a larger
        reserve spreads it over more jobs. It goes back to prefetch when a claim found fewer jobs
        than it asked for (the queue is draining: an idle or shallow queue is not hoarded), and when
        the jobs outlast the round trip (``outlasted``: at least half of the jobs claimed ahead when
        the statement was sent still waited when it came back, and the jobs that ran meanwhile were
        long enough to explain it - not a node short of CPU), so a reserve grown on short
        jobs is not kept - and kept from other nodes and later higher-priority jobs - once the
        backlog turns into long ones."""
        if got < capacity or outlasted:
            if self.prefetch != self._prefetch_floor:
                self.stats["reserve_back"] += 1
                self._set_prefetch(self._prefetch_floor)
        elif starved and self.prefetch < self._prefetch_ceiling:
            self._set_prefetch(min(self._prefetch_ceiling, max(2 * self.prefetch, self.config.concurrency)))
            self.stats["prefetch_peak"] = max(self.stats["prefetch_peak"], self.prefetch)

    def _type_limits(self) -> dict[str, int]:
        out = {}
        for d in self.node.registry.of_kind("job", "cron"):
            limit = d.options.get("concurrency")
            if limit is not None:
                if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                    raise ForgeError(f"@job {d.name}: concurrency must be an integer >= 1, got {limit!r}")
                out[d.name] = limit
        return out

    def _build_chain(self) -> Callable[[Call], Any]:
        async def invoke(call: Call) -> Any:
            return await call.defn.fn(call.ctx, **call.args)

        chain: Callable[[Call], Any] = invoke
        for mw in reversed(getattr(self.node.executor, "middleware", []) or []):
            chain = (lambda m, nxt: (lambda c: m(c, nxt)))(mw, chain)
        return chain

    def _finished_hook_impls(self) -> list[tuple[Callable[..., Any], tuple[str, ...] | None]] | None:
        """The forge_job_finished implementations as (function, argument names), in the order pluggy
        calls them (last registered first); None when there are none; [(pluggy's call, None)] when a
        wrapper is registered. The worker calls them itself:
        pluggy's hook call checks the keyword names against the spec on every call, and for the one
        implementation of a default node (the scheduler's, which returns at once for jobs that are
        not cron runs) that check and pluggy's call loop were most of the hook's cost - about half
        of the job task's own samples (py-spy, bench/jobs drain). A wrapper implementation (pluggy
        runs the others inside it) falls back to pluggy's call."""
        hook = self.node.loader.hook.forge_job_finished
        impls = hook.get_hookimpls()
        if not impls:
            return None
        if any(i.hookwrapper or i.wrapper for i in impls):
            return [(lambda node, outcome: hook(node=node, outcome=outcome), None)]
        return [(i.function, tuple(i.argnames)) for i in reversed(impls)]

    async def start(self) -> None:
        await self.node.pool.execute(WAKE, self.node_id)
        if self._deadlines is None:
            self._deadlines = Deadlines(asyncio.get_running_loop(), self._timed_out)
        sup = self.node.supervisor
        self._claim_done.clear()
        sup.spawn("worker.listen", self._listen_loop, service="worker")
        sup.spawn("worker.report", self._report_loop, service="worker")
        sup.spawn("worker.lease", self._lease_loop, service="worker")
        sup.spawn("worker.claim", self._claim_loop, service="worker")

    async def stop(self) -> None:
        """Graceful stop: claim nothing more, let running jobs finish for ``shutdown_timeout``,
        release the rest to other workers, write every result."""
        self.stopping = True
        self.wake.set()
        self.slot_free.set()
        for a in self.ready + self.premark:  # claimed ahead: back to the queue at once
            self._drop_unstarted(a, "released")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._claim_done.wait(), 10)
        tasks = [a.task for a in self.running.values() if a.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.shutdown_timeout)
        left = [a for a in self.running.values() if a.task is not None and not a.task.done()]
        for a in left:
            a.cancel_reason = "shutdown"
            a.task.cancel()
        if left:
            await asyncio.wait([a.task for a in left], timeout=5)
            logger.info(f"worker released {len(left)} unfinished job(s) to other workers")
        # the report loop writes what is left; wait until it has
        deadline = time.monotonic() + 10
        while (self.reports or self._reporting) and time.monotonic() < deadline:
            self.reported.clear()
            self.report_event.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.reported.wait(), 1)
        with contextlib.suppress(*_DB_ERRORS):
            await asyncio.wait_for(self.node.pool.execute(WAKE, self.node_id), 5)
        if self._deadlines is not None:
            self._deadlines.close()  # no timer left behind on the loop

    # --- settings of the worker's own connections -------------------------------------------
    async def _session_settings(self, conn: asyncpg.Connection, settings: str) -> None:
        """Settings for every statement of a loop's connection (direct), made once per acquire."""
        if not self.pooled:
            await conn.execute(settings)

    def _planned(self, conn: asyncpg.Connection, settings: str) -> Any:
        """Where the statements inside must run under ``settings``: nothing to do on a direct
        connection (:meth:`_session_settings`), a transaction with SET LOCAL through a pooler."""
        return _local_settings(conn, settings) if self.pooled else contextlib.nullcontext()

    # --- claiming -------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        self._claim_done.clear()
        lane = None
        if self._lanes > 1:
            lane = asyncio.create_task(self._second_lane(), name="forge-worker-claim-lane")
        try:
            while not self.stopping:
                try:
                    async with self.node.pool.acquire() as conn:
                        await self._session_settings(conn, PLANNER_SETTINGS)
                        await self._claim_on(conn)
                except _DB_ERRORS as exc:
                    if self.stopping:
                        break
                    logger.warning(f"worker claim loop lost the database ({type(exc).__name__}: {exc}); retrying")
                    self.sleeping = False
                    await asyncio.sleep(0.2 + random.random() * 0.3)
        finally:
            # the second lane's statement in flight is waited for: jobs it claims are started or
            # released before stop() looks at the running jobs
            self._lane_kick.set()
            if lane is not None and self.stopping:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(lane), 10)
            if lane is not None and not lane.done():
                lane.cancel()
                with contextlib.suppress(BaseException):
                    await lane
            self._claim_done.set()
            self.report_event.set()  # results of jobs still running are written by the report loop now

    async def _second_lane(self) -> None:
        """With ``claim_lanes = 2``: a second connection that sends the same result-and-claim
        statement while the claim loop's is in flight, under a backlog only (see _lane_due). Most of
        a statement's round trip is its commit's WAL flush: with one statement at a time, results
        of jobs that finish during it wait for it to return, and their rows stay leased (so
        unclaimable for new work) that long. Two in flight commit in one flush (group commit) and
        halve that wait. Idle nodes never use it (the claim loop alone polls, sleeps and claims
        limited jobs)."""
        while not self.stopping:
            await self._lane_kick.wait()
            if self.stopping:
                return
            try:
                async with self.node.pool.acquire() as conn:
                    await self._session_settings(conn, PLANNER_SETTINGS)
                    while not self.stopping:
                        self._lane_kick.clear()
                        if not self._lane_due() or await self._round(conn) is None:
                            await self._lane_kick.wait()  # a finished job or a statement sent
            except _DB_ERRORS as exc:
                if self.stopping:
                    return
                logger.warning(f"worker claim lane lost the database ({type(exc).__name__}: {exc}); retrying")
                await asyncio.sleep(0.2 + random.random() * 0.3)

    def _lane_due(self) -> bool:
        """The second lane sends a statement now: a backlog (the last claim filled its capacity),
        the claim loop's statement in flight and none of the lane's own, and either jobs would
        soon wait for work (_urgent) or a quarter of the rows this node may hold are finished."""
        return (self._lanes > 1 and self._backlog and self._in_flight == 1 and not self.stopping
                and (self._urgent() or len(self.reports) >= self._lane_batch))

    async def _round(self, conn: asyncpg.Connection) -> tuple[int, int] | None:
        """One statement: write the finished attempts and claim into the room they leave (and the
        free room). Returns (jobs claimed, capacity asked), or None when there was nothing to send.
        Two lanes may run it at once: what one has in flight (capacity asked, jobs to start at
        once) is counted against the other's. Never while RENEW runs (RowTurns)."""
        async with self._rows.shared():
            return await self._round_now(conn)

    async def _round_now(self, conn: asyncpg.Connection) -> tuple[int, int] | None:
        cfg = self.config
        # finished attempts keep their rows leased until this statement writes their results;
        # the same statement may claim into their room, since both commit together
        batch, self.reports = self.reports, []
        capacity = min(self._held - len(self.running) - self._claiming + len(batch), self.claim_batch)
        premark = [a for a in self.premark if not a.finished]
        if capacity <= 0 and not batch and not premark:
            return None
        self.premark = []
        capacity = max(capacity, 0)
        # claimed jobs that start at once (the rest wait here, claimed ahead)
        start_now = max(0, min(capacity, cfg.concurrency - self.active - len(self.ready) - self._starting))
        self.wake.clear()
        self.slot_free.clear()
        self._in_flight += 1
        self._claiming += capacity
        self._starting += start_now
        if self._in_flight > 1:
            self.stats["overlapped"] += 1  # sent while the other lane's statement is in flight
        if self._backlog and self._in_flight == 1 and self._lane_due():
            self._lane_kick.set()
        sent_at = time.monotonic()
        ready_sent = len(self.ready)
        runs_sent, run_seconds_sent = self._runs, self._run_seconds
        try:
            async with self._planned(conn, PLANNER_SETTINGS):
                if capacity > 0 and sent_at >= self.next_due:
                    row = await conn.fetchrow(PROMOTE)
                    nxt = row["next_in"]
                    self.next_due = time.monotonic() + (min(float(nxt), cfg.poll_interval) if nxt is not None
                                                        else cfg.poll_interval)
                if batch or premark:
                    for a in premark:
                        a.started_wall = time.time()
                    cols = self._result_columns(batch)
                    marked = sorted(premark, key=_by_id)  # lock order as in RENEW
                    rows = await conn.fetch(WRITE_AND_CLAIM, *cols[:5], self.node_id,
                                            self._keep_history, cfg.lease, self.queues, self.capabilities,
                                            self._limited_names, self._limited_queues, capacity,
                                            cfg.durable_results or bool(premark), cols[5],
                                            _array([a.id for a in marked]), _array([a.attempt for a in marked]),
                                            _array(_micros(a.started_wall for a in marked)), start_now, _RUNNING)
                    if rows[0]["id"] is None:  # nothing claimed: the row that carried the commit setting
                        rows = []
                else:
                    rows = await conn.fetch(CLAIM, self.node_id, cfg.lease, self.queues, self.capabilities,
                                            self._limited_names, self._limited_queues, capacity, start_now)
        except BaseException:
            # written with the next statement
            self.reports[:0] = batch
            self.premark[:0] = premark
            raise
        finally:
            self._in_flight -= 1
            self._claiming -= capacity
            self._starting -= start_now
        self.stats["statements"] += 1
        self.stats["round_trip_s"] += time.monotonic() - sent_at
        # the slots waited for this statement: no job claimed ahead left to start in them
        starved = not self.ready and self.active < cfg.concurrency
        # ... or the jobs outlast the round trip: most of those claimed ahead at the send still wait,
        # because the jobs are long - the reserve at the send, run through the slots at the pace of
        # the jobs that finished meanwhile (none: every slot stayed busy), lasts the round trip. Not
        # because the node's own CPU was short (a busy machine delays its event loop and stretches
        # the round trip alike): short jobs then still wait in numbers, and shrinking the reserve
        # only cut the batch each round trip carries (bench/jobs bound mode under load: the reserve
        # fell back to prefetch every few statements, ~100 jobs a statement instead of ~200)
        outlasted = jobs_outlast(ready_sent, len(self.ready), self._runs - runs_sent,
                                 self._run_seconds - run_seconds_sent, time.monotonic() - sent_at, cfg.concurrency)
        if reserve_waited(ready_sent, len(self.ready)):
            self.stats["reserve_waited"] += 1
        for a in premark:  # their start is written: they start now, in the slot they hold
            a.start_written = True
            if self.stopping:
                self._drop_unstarted(a, "released")
            elif not a.finished:
                self._launch(a)
        self._written(batch)
        got = len(rows)
        self._start_jobs(rows, sent_at)
        if capacity > 0:
            self._backlog = got >= capacity
            self._adapt(got, capacity, starved, outlasted)
        return got, capacity

    async def _claim_on(self, conn: asyncpg.Connection) -> None:
        cfg = self.config
        limited = self._limited_names or self._limited_queues
        while not self.stopping:
            if not self._urgent():
                # jobs claimed ahead cover the next round trip: gather results and room for a
                # batch (poked once the reserve runs low), writing results at most RESULTS_WAIT late
                self.slot_free.clear()
                if not self.reports:
                    await self.slot_free.wait()
                    continue
                left = self._reports_since + RESULTS_WAIT - time.monotonic()
                if left > 0:
                    # a timer handle, not wait_for (a task per wait): this runs once per batch
                    timer = asyncio.get_running_loop().call_later(left, self.slot_free.set)
                    try:
                        await self.slot_free.wait()
                    finally:
                        timer.cancel()
                    if not self._urgent() and time.monotonic() - self._reports_since < RESULTS_WAIT:
                        continue
            sent = await self._round(conn)
            if sent is None:
                self.slot_free.clear()
                if self._held - len(self.running) - self._claiming <= 0 and not self.reports and not self.premark:
                    await self.slot_free.wait()
                continue
            got, capacity = sent
            if capacity <= 0:
                continue
            # limited jobs are never claimed ahead: a running count in PostgreSQL is a running job
            free = min(capacity - got, cfg.concurrency - self.active - len(self.ready) - self._starting)
            if limited and free > 0:
                got += await self._claim_limited(conn, free)
            now = time.monotonic()
            if got:
                self.last_work = now
            if got >= capacity:
                # a backlog: keep claiming, and stop asking enqueuers for NOTIFYs
                if self.sleeping:
                    await conn.execute(WAKE, self.node_id)
                    self.sleeping = False
                continue
            if self.reports:
                continue  # jobs finished meanwhile: write them now
            if cfg.spin_window and now - self.last_work < cfg.spin_window:
                # work arrived moments ago: more is likely. Look again shortly instead of asking
                # every enqueue for a wake-up hint - under steady load each look finds a batch,
                # and enqueues stay a single statement.
                if self.sleeping:
                    await conn.execute(WAKE, self.node_id)
                    self.sleeping = False
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), cfg.spin_interval)
                continue
            if not self.sleeping and self.listening:
                # announce we wait, then look once more: a job stored just before the announcement
                # sent no NOTIFY
                await conn.execute(SLEEP, self.node_id, self.queues, self.capabilities)
                self.sleeping = True
                continue
            timeout = max(0.0, min(cfg.poll_interval, self.next_due - time.monotonic()))
            if timeout > 0:
                # a hint, a finished job (its result to write, its slot to fill) or the poll
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout)

    @staticmethod
    def _result_columns(batch: list[tuple[int, int, str, float, str | None, float | None]]) -> tuple[str, ...]:
        """The batch's columns as array literals (see _RESULTS)."""
        ids, attempts, outcomes, delays, errors, started = zip(*batch) if batch else ((),) * 6
        return (_array(ids), _array(attempts), _text_array(outcomes), _array(delays), _text_array(errors),
                _array(_micros(started)))

    def _written(self, batch: list[tuple[int, int, str, float, str | None, float | None]]) -> None:
        """The results of ``batch`` are stored: their rows are no longer leased here (_free)."""
        running = self.running
        for r in batch:
            a = running.get(r[0])
            if a is not None and a.attempt == r[1] and a.finished:
                del running[r[0]]
        self.slot_free.set()

    async def _claim_limited(self, conn: asyncpg.Connection, capacity: int) -> int:
        """Claim from limited queues and types, each under the advisory locks of its limits."""
        got = 0
        groups: list[tuple[str | None, str | None]] = [(q, None) for q in self.queue_limits]
        groups += [(None, n) for n in self.type_limits]
        random.shuffle(groups)  # no group starves another when capacity is short
        for queue, name in groups:
            if capacity - got <= 0 or self.stopping:
                break
            if self.queues and queue is not None and queue not in self.queues:
                continue
            keys = sorted({f"queue:{queue}"} | {f"type:{n}" for n in self.type_limits}) if queue is not None \
                else [f"type:{name}"]
            sent_at = time.monotonic()
            async with conn.transaction():
                if self.pooled:
                    await conn.execute(PLANNER_SETTINGS.replace("SET ", "SET LOCAL "))
                for key in keys:  # sorted: every node takes them in the same order, no deadlock
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                                       "forge_worker.limit." + key)
                rows = await conn.fetch(
                    CLAIM_LIMITED, self.node_id, self.config.lease, self.queues, self.capabilities,
                    capacity - got, list(self.queue_limits), capacity - got, queue, name, self.type_limits,
                    self.queue_limits.get(queue) if queue is not None else None)
            self._start_jobs(rows, sent_at)
            got += len(rows)
        return got

    def _start_jobs(self, rows: list[Any], sent_at: float) -> None:
        """Take in the rows a claim sent at ``sent_at`` (monotonic) returned."""
        ahead = []
        lease_due = sent_at + self.config.lease
        for row in rows:
            a = Attempt(row["id"], row["attempt"], row, lease_due=lease_due)
            self.running[a.id] = a
            if row["started_at"] is not None:  # claimed into a free slot: its claim dated its start
                self._launch(a)
            else:
                a.ahead = True
                ahead.append(a)
        self.stats["claimed"] += len(rows)
        if ahead:
            if self.stopping:
                for a in ahead:
                    self._drop_unstarted(a, "released")
                return
            self.ready += ahead
            # pop() takes the highest priority, then the oldest: claim order across claims
            self.ready.sort(key=_ready_order)
            self._fill()

    def _launch(self, a: Attempt) -> None:
        if not a.reserved:
            self.active += 1
        a.reserved = False
        if a.ahead and not a.started_wall:
            a.started_wall = time.time()  # written by the next lease renewal, or with its result
        # no task name: formatting and setting one was ~3 % of a node's time per no-op job (py-spy);
        # the task's repr names its coroutine (Worker._run), and self.running maps job ids to tasks
        # a copy of the worker's own context, not of the caller's: a job claimed ahead starts from the
        # task of the job that ended (_fill), and must not inherit what that job set in its context
        # (an app's context variable, a span it left open)
        a.task = asyncio.create_task(self._run(a), context=self._job_context.copy())

    def _fill(self) -> None:
        """Start jobs claimed ahead into free slots. One on its last attempt holds a slot until the
        claim loop has written its start: a crash before that gives the attempt back (RESCUE)."""
        while self.ready and self.active < self.config.concurrency and not self.stopping:
            a = self.ready.pop()
            if a.attempt >= a.row["max_attempts"]:
                a.reserved = True
                self.active += 1
                self.premark.append(a)
                self.slot_free.set()  # the claim loop writes it now
                self.wake.set()
            else:
                self._launch(a)

    def _urgent(self) -> bool:
        """The claim loop's next statement cannot wait: a job waits for its start to be written,
        the jobs claimed ahead are running low (refill before they run dry), or nothing runs."""
        return bool(self.premark) or len(self.ready) <= self._low_water or not self.active

    def _poke(self) -> None:
        """Wake the claim loop only when its next statement is due (see _urgent): with jobs claimed
        ahead it lets results and claims gather into batches instead of one statement per job."""
        urgent = self._urgent()
        if urgent:
            self.slot_free.set()
            self.wake.set()
        if self._in_flight == 1 and self._backlog and self._lane_due():
            self._lane_kick.set()  # the claim loop's statement is in flight: the second lane sends

    def _drop_unstarted(self, a: Attempt, outcome: str) -> None:
        """A job claimed ahead leaves this node without starting: ``released`` (a graceful stop:
        back to pending, its attempt not counted), ``cancelled`` (on request) or ``lost`` (its
        lease went elsewhere)."""
        if a.finished or a.task is not None:
            return
        a.finished = True
        if a in self.ready:
            self.ready.remove(a)
        if a.reserved:
            a.reserved = False
            self.active -= 1
            if a in self.premark:
                self.premark.remove(a)
        self.stats[outcome] = self.stats.get(outcome, 0) + 1
        if outcome == "lost":
            self._free(a)
            return
        error = "cancelled on request" if outcome == "cancelled" else None
        if not self.reports:
            self._reports_since = time.monotonic()
        self.reports.append((a.id, a.attempt, outcome, 0.0, error, None))
        self.slot_free.set()
        self.wake.set()
        if self._claim_done.is_set():
            self.report_event.set()
        self._fill()

    # --- running ----------------------------------------------------------------------------
    async def _run(self, a: Attempt) -> None:
        ran_from = _monotonic()
        row = a.row
        started = a.started_at()
        outcome, delay, error = "succeeded", 0.0, None
        db = LazyDatabase(self.node.pool)
        tel = self.node.telemetry
        if tel.enabled:
            a.t0 = ran_from
        call = None
        try:
            defn = self.node.registry.get(row["name"])
            if defn is None or defn.kind not in ("job", "cron"):
                kind = f"a {defn.kind}, not a job" if defn is not None else "not registered on this node"
                raise _Fatal(f"unknown job type {row['name']!r}: {kind} (check [app] modules on worker "
                             f"{self.node_id}; retry it from dead letter once a worker knows it)")
            try:
                args = bind_arguments(defn, row["args"] or {})
            except ForgeError as exc:
                raise _Fatal(f"cannot run {row['name']!r}: {exc.message}") from None
            auth = self._auth(row["run_as"], row["caller"])  # the identity that dispatched it
            if self.node.executor.row_security:
                db.caller = auth
            call = JobCall(defn, args, auth, f"job-{a.id}-{a.attempt}")
            call.ctx = JobContext(self.node.executor, call, db, row, a)
            a.timeout = row["timeout"] or defn.timeout or self.config.job_timeout or None
            if a.t0:  # the head decision (Telemetry.head_sampled_remote's; a job without a traceparent inline)
                opts = row["options"]  # any JSON through raw SQL: only a dict's text traceparent counts
                remote = opts.get("traceparent") if type(opts) is dict else None
                if tel.head_sampled_remote(remote) if remote else _random() < tel.sample_rate:
                    job_span(tel, row, a, True)  # its SQL statements become spans: the trace is kept
            if a.timeout:
                # the node's one timer cancels the task once the limit passes (_timed_out)
                self._deadlines.watch((a.id, a.attempt), a.timeout)
                try:
                    await self._chain(call)
                finally:
                    self._deadlines.done((a.id, a.attempt))
            else:
                await self._chain(call)
        except asyncio.CancelledError:
            reason = a.cancel_reason
            if reason == "timeout":
                outcome, error, delay = self._failure(a, f"timed out after {a.timeout:g}s")
            elif reason == "cancel":
                outcome, error = "cancelled", "cancelled on request"
            elif reason == "shutdown":
                outcome, error = "released", None
            elif reason == "lease_lost":
                outcome = "lost"
            elif (task := asyncio.current_task()) is not None and task.cancelling():
                # cancelled from outside the worker (the loop going down): no result is written and the
                # row is no longer renewed, so its lease runs out and the rescue gives it to a worker
                outcome = "lost"
                self._free(a)
                raise
            else:
                # the job's own code let a CancelledError through (it awaited a task or future that
                # something else cancelled) while its task was not cancelled: a failure like any other
                # exception, retried by its policy (re-raised, the row would stay held and renewed here)
                outcome, error, delay = self._failure(a, "CancelledError: the job awaited a task or future that "
                                                         "was cancelled and did not handle it")
                logger.warning(f"job {row['id']} ({row['name']}) attempt {a.attempt}/{row['max_attempts']} failed: "
                               f"{error}")
        except RetryLater as exc:
            outcome, delay, error = "retry_later", exc.delay, exc.reason or None
        except JobCancelled as exc:
            outcome, error = "cancelled", str(exc) or "cancelled by the job"
        except _Fatal as exc:
            outcome, error = "dead", str(exc)
            logger.error(f"job {row['id']} ({row['name']}) cannot run: {exc}")
        except Exception as exc:
            tb = "".join(traceback.format_exception(exc)[-6:])
            outcome, error, delay = self._failure(a, f"{type(exc).__name__}: {exc}\n{tb}")
            logger.warning(f"job {row['id']} ({row['name']}) attempt {a.attempt}/{row['max_attempts']} failed: "
                           f"{storable_error(f'{type(exc).__name__}: {exc}', 2000)}")
        finally:
            if call is not None:
                # the call and its ctx point at each other: cut, the job's objects (ctx, its database,
                # the attempt, its task and row) are freed by reference counting as the job ends, not
                # by the cyclic collector (bench/jobs: 9 objects a job, ~3.5 us of collection per job)
                call.ctx = None
            a.finished = True
            self.active -= 1
            ran = _monotonic() - ran_from
            self._run_seconds += ran
            self._runs += 1
            # observed: counted; a span only for a sampled, failed or slow attempt (the next job's task
            # does not copy this context, see _launch: this job's span is not current in it either way)
            if a.t0:
                if a.span is not None or outcome not in _WENT_WELL or ran >= tel.keep_over:
                    self._span_ended(tel, row, a, outcome, error)
                # raw times: the observer works out queue waits for a whole batch at once. A success
                # (most attempts) goes into its job type's batch: Telemetry.job_ended's usual case
                # inline, three list appends (no event tuple, no Python call). A success ran its
                # registered function: its name (hashed once) is the row's, without a row lookup
                if outcome == "succeeded" and (batch := tel.ok_jobs.get(defn.name)) is not None \
                        and batch.queue == row["queue"] and len(batch) < MAX_JOB_BATCH:
                    batch.append(ran)
                    batch.due.append(row["run_at"])
                    batch.started.append(started)
                else:
                    tel.job_ended(row["name"], row["queue"], outcome, row["run_at"], started, ran)
            if self.ready:
                self._fill()  # the next job claimed ahead starts in the slot now, no round trip
            if db.taken:  # most jobs never touch the database: no coroutine, no suppress per job
                with contextlib.suppress(Exception):
                    await db.release()
        reported = False
        try:
            self.stats[outcome] = self.stats.get(outcome, 0) + 1
            if outcome != "lost":
                if not self.reports:
                    self._reports_since = time.monotonic()
                    self.slot_free.set()  # the claim loop times the batch from its first result
                if error is not None and (len(error) > MAX_ERROR_TEXT or "\x00" in error):
                    error = storable_error(error)
                self.reports.append((a.id, a.attempt, outcome, delay, error, a.started_wall or None))
                reported = True
                # the claim loop writes it with its next statement (claiming into the slot); once
                # the claim loop has stopped, the report loop does
                self._poke()
                if self._claim_done.is_set():
                    self.report_event.set()
                if outcome in ("failed", "retry_later") and delay > 0:
                    self.next_due = min(self.next_due, time.monotonic() + delay)
            if self._finished_hook is not None and outcome not in ("lost", "released"):
                pending = self._job_finished(row, a, outcome, started, error)
                if pending:  # most jobs: none (the scheduler's returns one for cron runs only)
                    await self._await_finished(a, pending)
        finally:
            if not reported:  # else the slot stays taken until its result is written
                self._free(a)

    def _free(self, a: Attempt) -> None:
        """Give ``a``'s row back. A finished job keeps its row leased to this node until its result
        is written, so a node killed at any moment holds at most ``concurrency + prefetch`` rows
        and the rescue re-runs at most that many of its jobs."""
        if self.running.get(a.id) is a:
            del self.running[a.id]
        self.slot_free.set()

    @staticmethod
    def _span_ended(tel: Any, row: Any, a: Attempt, outcome: str, error: str | None) -> None:
        """The end of the attempt's span: the one it had, or one made now for an attempt that failed
        or ran slow (tail sampling may keep it)."""
        span = a.span or job_span(tel, row, a)
        a.span = None
        tel.end_span(span, None if outcome in _WENT_WELL else (error or outcome))

    def _failure(self, a: Attempt, error: str) -> tuple[str, str, float]:
        """A failed attempt's outcome, error and delay: dead on its last attempt, else failed, to be
        retried after its backoff."""
        outcome = "dead" if a.attempt >= a.row["max_attempts"] else "failed"
        return outcome, error, (self._delay(a) if outcome == "failed" else 0.0)

    def _delay(self, a: Attempt) -> float:
        opts = a.row["options"] or {}
        backoff = opts.get("backoff") if isinstance(opts, dict) else None
        base, cap = self.config.backoff_base, self.config.backoff_max
        if isinstance(backoff, (int, float)) and not isinstance(backoff, bool):
            base = float(backoff)
        elif isinstance(backoff, dict):
            base = float(backoff.get("base", base))
            cap = float(backoff.get("max", cap))
        return backoff_delay(a.attempt, base, cap)

    def _job_finished(self, row: Any, a: Attempt, outcome: str, started: dt.datetime,
                      error: str | None) -> list[Any]:
        """Call the forge_job_finished implementations; returns the awaitables they gave (usually
        none: no coroutine per job for that). A failing implementation is logged, never fails the job."""
        status = "retry_later" if outcome == "retry_later" else outcome
        result = JobOutcome(job_id=a.id, name=row["name"], args=row["args"] or {}, options=row["options"] or {},
                            status=status, attempt=a.attempt, started_at=started,
                            finished_at=dt.datetime.now(dt.timezone.utc), error=error, node_id=self.node_id)
        pending: list[Any] = []
        try:
            for fn, names in self._finished_hook:
                if names is None:  # pluggy's own call (a wrapper is registered): every result
                    pending += [r for r in fn(self.node, result) if inspect.isawaitable(r)]
                    continue
                # positional, in the implementation's own order of the names it takes (as pluggy calls it)
                res = fn(self.node, result) if names == _NODE_OUTCOME else \
                    fn(*[self.node if n == "node" else result for n in names])
                if res is not None and inspect.isawaitable(res):
                    pending.append(res)
        except Exception as exc:  # a plugin's bookkeeping must never fail the job
            logger.opt(exception=exc).warning(f"forge_job_finished hook failed for job {a.id}: {exc}")
        return pending

    @staticmethod
    async def _await_finished(a: Attempt, pending: list[Any]) -> None:
        for res in pending:
            try:
                await res
            except Exception as exc:  # a plugin's bookkeeping must never fail the job
                logger.opt(exception=exc).warning(f"forge_job_finished hook failed for job {a.id}: {exc}")

    # --- reporting ------------------------------------------------------------------------
    async def _report_loop(self) -> None:
        """Writes results once the claim loop has stopped (a graceful stop: running jobs finish
        or are released after it); until then the claim loop writes them with its claims."""
        while True:
            await self.report_event.wait()
            self.report_event.clear()
            if not self._claim_done.is_set():
                continue
            try:
                async with self.node.pool.acquire() as conn:
                    settings = PLANNER_SETTINGS + ("" if self.config.durable_results else "; " + ASYNC_COMMIT)
                    await self._session_settings(conn, settings)
                    while self.reports:
                        batch, self.reports = self.reports, []
                        self._reporting = True
                        try:
                            async with self._rows.shared(), self._planned(conn, settings):
                                cols = self._result_columns(batch)
                                await conn.fetchrow(REPORT, *cols[:5], self.node_id, self._keep_history, cols[5],
                                                    _RUNNING)
                        except BaseException:
                            self.reports[:0] = batch  # written on the next try
                            raise
                        finally:
                            self._reporting = False
                        self._written(batch)
                    self.reported.set()
            except _DB_ERRORS as exc:
                logger.warning(f"worker could not write {len(self.reports)} job result(s) "
                               f"({type(exc).__name__}: {exc}); retrying")
                await asyncio.sleep(0.2 + random.random() * 0.3)
                self.report_event.set()

    # --- leases -----------------------------------------------------------------------------
    async def _lease_loop(self) -> None:
        cfg = self.config
        while True:
            try:
                async with self.node.pool.acquire() as conn:
                    await self._session_settings(conn, PLANNER_SETTINGS)
                    while True:
                        await self._renew(conn)
                        now = time.monotonic()
                        if cfg.rescue_interval and now - self._last_rescue >= cfg.rescue_interval:
                            self._last_rescue = now
                            async with self._planned(conn, PLANNER_SETTINGS):
                                rescued = await rescue_expired(conn, self.node.config.node.dead_after)
                            if rescued:
                                logger.warning(f"worker re-queued {len(rescued)} job(s) whose worker stopped "
                                               f"heartbeating: {[i for i, _ in rescued][:20]}")
                                self.wake.set()
                        await asyncio.sleep(cfg.heartbeat_interval)
            except _DB_ERRORS as exc:
                logger.warning(f"worker lease loop lost the database ({type(exc).__name__}: {exc}); retrying")
                await asyncio.sleep(0.2 + random.random() * 0.3)

    async def _renew(self, conn: asyncpg.Connection) -> None:
        """Renew the leases that need it, write progress and the starts of long jobs claimed ahead,
        and see cancellations and lost leases of every row held. Only rows with something to write
        are written (RENEW): a lease is renewed once it would be past half its length by the next
        heartbeat, not every heartbeat - under a backlog of short jobs a node holds up to
        ``concurrency + prefetch_max`` rows, each held for a fraction of a second, and renewing them
        all each second locked and rewrote hundreds of rows (a new row version and index entries
        each) while holding the claims back. The other rows are read (CHECK_LEASES), which locks
        nothing and runs beside the claims."""
        if not self.running:
            return
        cfg = self.config
        now, wall = time.monotonic(), time.time()
        renew_by = now + cfg.heartbeat_interval + cfg.lease / 2
        # a start is written once its job has run a heartbeat: most jobs end before, their result
        # writes it
        started_by = wall - cfg.heartbeat_interval
        # finished attempts are left to the result statements (written by the next one)
        write: list[Attempt] = []
        read: list[Attempt] = []
        for a in sorted((a for a in self.running.values() if not a.finished), key=_by_id):
            if a.lease_due <= renew_by or a.progress != a.written_progress or (
                    a.started_wall and not a.start_written and a.started_wall <= started_by):
                write.append(a)
            else:
                read.append(a)
        seen: dict[int, bool] = {}
        if write:
            # alone (RowTurns): a result statement in flight locks rows in another order
            async with self._rows.exclusive():
                # attempts that finished while the turn was awaited are left to their result
                write = [a for a in write if not a.finished]
                prog = [a.progress if a.progress != a.written_progress else None for a in write]
                starts = [a.started_wall if a.started_wall and not a.start_written else None for a in write]
                sent_at = time.monotonic()
                async with self._planned(conn, PLANNER_SETTINGS):
                    rows = await conn.fetch(RENEW, [a.id for a in write], [a.attempt for a in write],
                                            cfg.lease, [p[0] if p else None for p in prog],
                                            [p[1] if p else None for p in prog], self.node_id, starts, _RUNNING)
            seen.update((r["id"], r["cancel_requested"]) for r in rows)
            for a, p, start in zip(write, prog, starts):
                if a.id not in seen:
                    continue
                a.lease_due = sent_at + cfg.lease
                if start is not None:
                    a.start_written = True
                if p is not None:
                    a.written_progress = p
                    self.stats["progress_writes"] += 1
            self.stats["leases_renewed"] += len(seen)
        if read:
            async with self._planned(conn, PLANNER_SETTINGS):
                rows = await conn.fetch(CHECK_LEASES, _array([a.id for a in read]),
                                        _array([a.attempt for a in read]), self.node_id, _RUNNING)
            seen.update((r["id"], r["cancel_requested"]) for r in rows)
        for a in write + read:
            if a.task is None and not a.finished and self.running.get(a.id) is a:  # claimed ahead
                if a.id not in seen:
                    self._drop_unstarted(a, "lost")
                elif seen[a.id]:
                    self._drop_unstarted(a, "cancelled")
                continue
            if self.running.get(a.id) is not a or a.task is None or a.task.done() or a.finished:
                continue  # finished; its result is being written
            if a.id not in seen:
                logger.warning(f"job {a.id} lost its lease (re-queued elsewhere); stopping it here")
                self._cancel(a, "lease_lost")
            elif seen[a.id]:
                self._cancel(a, "cancel")

    def cancel_running(self, job_id: int) -> bool:
        """Stop job ``job_id`` if it runs here (a cancel request that came outside the database)."""
        a = self.running.get(job_id)
        if a is None or a.finished or a.cancel_reason is not None:
            return False
        self._cancel(a, "cancel")
        return True

    def activity(self) -> dict[str, Any]:
        running = [a for a in self.running.values() if not a.finished and a.task is not None]
        return {"jobs": {"running": len(running), "capacity": self.config.concurrency,
                         "ids": sorted(a.id for a in running)[:50], "stopping": self.stopping,
                         "claimed_ahead": len(self.ready) + len(self.premark), "prefetch": self.prefetch}}

    def _auth(self, run_as: str | None, caller: str | None) -> Auth:
        """The identity of a claimed job from its ``run_as`` text and ``caller``, decoded once per
        distinct pair (an ``Auth`` is immutable, so jobs can share it)."""
        key = (run_as, caller)
        auth = self._auths.get(key)
        if auth is None:
            if len(self._auths) >= 1024:  # many distinct users: keep the cache small
                self._auths.clear()
            auth = self._auths[key] = Auth.from_job(None if run_as is None else json.loads(run_as), caller)
        return auth

    def _timed_out(self, key: tuple[int, int]) -> None:
        a = self.running.get(key[0])
        if a is not None and a.attempt == key[1]:
            self._cancel(a, "timeout")

    def _cancel(self, a: Attempt, reason: str) -> None:
        if a.task is None and reason in ("cancel", "lease_lost"):  # claimed ahead, not started
            self._drop_unstarted(a, "cancelled" if reason == "cancel" else "lost")
            return
        if a.cancel_reason is None and not a.finished and a.task is not None and not a.task.done():
            a.cancel_reason = reason
            a.task.cancel()

    # --- wake-ups ------------------------------------------------------------------------------
    async def _listen_loop(self) -> None:
        while True:
            conn = None
            try:
                conn = await self.node.connect(timeout=10)
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _c: closed.set())
                await conn.add_listener(WAKE_CHANNEL, self._on_wake)
                await conn.add_listener(CANCEL_CHANNEL, self._on_cancel)
                for channel, callback in self.extra_channels.items():
                    await conn.add_listener(channel, callback)
                self.listening = True
                self.wake.set()  # anything stored while we were not listening
                for callback in self.on_listening:
                    callback()
                while not closed.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(closed.wait(), 15)
                    if not closed.is_set():
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), 10)  # a dead socket shows here
                raise ConnectionError("listen connection closed")
            except _DB_ERRORS as exc:
                self.listening = False
                self.sleeping = False  # re-announce once listening again
                logger.warning(f"worker listener lost the database ({type(exc).__name__}: {exc}); "
                               f"polling every {self.config.poll_interval:g}s until it is back")
                await asyncio.sleep(0.5 + random.random())
            finally:
                self.listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()

    def _on_wake(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload == self.node_id or payload == "*":
            self.wake.set()

    def _on_cancel(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            job_id = int(payload)
        except ValueError:
            return
        a = self.running.get(job_id)
        if a is not None:
            self._cancel(a, "cancel")


class _Fatal(Exception):
    """The job cannot run at all (unknown type, bad arguments): dead letter, no retries."""
