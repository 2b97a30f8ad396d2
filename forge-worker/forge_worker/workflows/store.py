"""The SQL of durable workflows. Every statement is one round trip with bind parameters; every
write of a claimed run is fenced by the claim it holds (``claims``), so a worker that lost its
lease (a zombie) writes nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Mapping, Sequence

import asyncpg

from forge_kernel.errors import InvalidArgument, NotFound
from forge_kernel.executor import WorkflowRequest

#: channel for "a run is due" hints; the payload names the node to wake
WAKE_CHANNEL = "forge_workflows"
#: channel telling the node running a run that it was cancelled; payload is the run id
CANCEL_CHANNEL = "forge_workflows_cancel"
#: statuses of runs that have ended
FINAL = ("succeeded", "failed", "cancelled")
LIVE = ("pending", "running", "waiting", "blocked")
#: the event a child run sends its parent when it ends
CHILD_EVENT = "forge.child:"

_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_KEY_LIMIT = 512

# --- starting runs ---------------------------------------------------------------------------
START = """
WITH req AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::timestamptz[], $8::text[], $9::int[], $10::uuid[], $11::text[], $13::text[])
         WITH ORDINALITY AS r(id, name, version, args, idempotency_key, correlation_key, run_at, caller,
                              max_recoveries, parent_id, parent_key, run_as, ord)
), ins AS (
    INSERT INTO forge_workflow_runs (id, name, version, args, status, run_at, idempotency_key, correlation_key,
                                     caller, max_recoveries, parent_id, parent_key, run_as)
    SELECT id, name, version, args::jsonb, 'pending', coalesce(run_at, now()), idempotency_key, correlation_key,
           caller, max_recoveries, parent_id, parent_key, run_as::jsonb
    FROM req ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id
), wake AS (
    SELECT pg_notify('forge_workflows', s.node_id)
    FROM (SELECT node_id FROM forge_workflow_sleepers ORDER BY random() LIMIT $12) s
    WHERE EXISTS (SELECT 1 FROM ins)
)
SELECT req.ord, ins.id AS inserted, (SELECT count(*) FROM wake) AS woke
FROM req LEFT JOIN ins ON ins.id = req.id ORDER BY req.ord
"""

BY_KEY = "SELECT idempotency_key, id FROM forge_workflow_runs WHERE idempotency_key = ANY($1::text[])"

# Events: bump the count of every live target (a run about to sleep sees it changed and looks
# again), make runs waiting for this name due now, store one mailbox row per target.
SEND_EVENT = """
WITH target AS (
    UPDATE forge_workflow_runs r SET events_sent = r.events_sent + 1, updated_at = now(),
        status = CASE WHEN r.status = 'waiting' AND $3 = ANY(r.wait_events) THEN 'pending' ELSE r.status END,
        run_at = CASE WHEN r.status = 'waiting' AND $3 = ANY(r.wait_events) THEN now() ELSE r.run_at END
    WHERE (r.id = $1::uuid OR r.correlation_key = $2) AND r.status IN ('pending', 'running', 'waiting', 'blocked')
    RETURNING r.id, r.status = 'pending' AS due
), ins AS (
    INSERT INTO forge_workflow_events (run_id, name, payload) SELECT id, $3, $4::text::jsonb FROM target RETURNING run_id
), wake AS (
    SELECT pg_notify('forge_workflows', s.node_id)
    FROM (SELECT node_id FROM forge_workflow_sleepers ORDER BY random() LIMIT 1) s
    WHERE EXISTS (SELECT 1 FROM target WHERE due)
)
SELECT (SELECT count(*) FROM ins) AS reached, (SELECT count(*) FROM wake) AS woke
"""

# Cancel runs (an operator's request): a running run is told (its worker stops it and compensates),
# any other live run becomes due as compensating. Runs already asked (compensating, or running with
# the request pending) are left alone, so asking again changes nothing. Locks in id order.
CANCEL = """
WITH asked AS (
    SELECT id, status, compensating FROM forge_workflow_runs
    WHERE id = ANY($1::uuid[]) AND status IN ('pending', 'running', 'waiting', 'blocked')
      AND NOT (cancel_requested AND (compensating OR status = 'running'))
    ORDER BY id FOR UPDATE
), r AS (
    UPDATE forge_workflow_runs w SET cancel_requested = true, updated_at = now(),
           compensating = CASE WHEN w.status = 'running' THEN w.compensating ELSE true END,
           error = CASE WHEN w.status = 'running' THEN w.error ELSE coalesce(w.error, 'cancelled on request') END,
           status = CASE WHEN w.status = 'running' THEN w.status ELSE 'pending' END,
           run_at = CASE WHEN w.status = 'running' THEN w.run_at ELSE now() END
    FROM asked WHERE w.id = asked.id
    RETURNING w.id, asked.status AS was, w.status, w.compensating
), told AS (
    SELECT pg_notify('forge_workflows_cancel', id::text) FROM r WHERE status = 'running'
), woke AS (
    SELECT pg_notify('forge_workflows', s.node_id)
    FROM (SELECT node_id FROM forge_workflow_sleepers ORDER BY random() LIMIT 1) s
    WHERE EXISTS (SELECT 1 FROM r WHERE status = 'pending')
)
SELECT r.id, r.was, r.status, r.compensating, (SELECT count(*) FROM told) + (SELECT count(*) FROM woke) AS hints
FROM r ORDER BY r.id
"""

# --- claiming and leases -------------------------------------------------------------------------
_CLAIMED = """SET status = 'running', node_id = $1, claims = r.claims + 1,
                  lease_until = now() + make_interval(secs => $2), started_at = coalesce(r.started_at, now()),
                  wait = NULL, wait_events = NULL, updated_at = now()"""
_RETURNING = """RETURNING r.id, r.name, r.version, r.args::text AS args, r.claims, r.steps_done, r.compensating, r.cancel_requested,
                          r.caller, r.run_as::text AS run_as, r.parent_id, r.error, r.events_sent"""

CLAIM = f"""
WITH c AS (
    SELECT id FROM forge_workflow_runs
    WHERE status IN ('pending', 'waiting') AND run_at <= now()
      AND name = ANY($3::text[]) AND NOT (name = ANY($4::text[]))
    ORDER BY run_at
    LIMIT $5
    FOR UPDATE SKIP LOCKED
)
UPDATE forge_workflow_runs r {_CLAIMED}
FROM c WHERE r.id = c.id
{_RETURNING}
"""

# Claims run with this setting (for their transaction only): with statistics that predate a burst
# of started runs (autovacuum analyzes a minute or more later; a big table may never cross its
# threshold) the planner expects a handful of due runs and reads every due run and sorts them for
# each claim (20 ms per claim of 50 with 20,000 due, bench/workflows) instead of walking the due
# index in run_at order and stopping at the limit (0.5 ms).
WALK_DUE_INDEX = "SET LOCAL enable_bitmapscan = off"

# One limited workflow ($3), under its advisory lock: claim up to its limit ($5) minus those running.
CLAIM_LIMITED = f"""
WITH c AS (
    SELECT id FROM forge_workflow_runs
    WHERE status IN ('pending', 'waiting') AND run_at <= now() AND name = $3
    ORDER BY run_at
    LIMIT GREATEST(0, LEAST($4::int, $5::int - (SELECT count(*) FROM forge_workflow_runs
                                                WHERE status = 'running' AND name = $3)::int))
    FOR UPDATE SKIP LOCKED
)
UPDATE forge_workflow_runs r {_CLAIMED}
FROM c WHERE r.id = c.id
{_RETURNING}
"""

NEXT_DUE = """SELECT extract(epoch FROM min(run_at) - now()) FROM forge_workflow_runs
              WHERE status IN ('pending', 'waiting') AND run_at IS NOT NULL AND name = ANY($1::text[])"""

# Renewals never wait for a run's lock, nor make a checkpoint wait for a disk flush: a run locked
# right now is being written (a checkpoint extends its lease itself) and is reported from the
# snapshot; the commit is asynchronous (a renewal a PostgreSQL crash forgets only shortens the
# lease, and a lost lease is fenced).
RENEW = """
WITH p AS MATERIALIZED (
    SELECT p.* FROM (SELECT set_config('synchronous_commit', 'off', true)) AS commit_mode,
                    unnest($1::uuid[], $2::int[]) AS p(id, claims)
), locked AS MATERIALIZED (
    SELECT r.id FROM forge_workflow_runs r WHERE r.id = ANY($1::uuid[]) ORDER BY r.id FOR NO KEY UPDATE SKIP LOCKED
), renewed AS (
    UPDATE forge_workflow_runs r SET lease_until = now() + make_interval(secs => $3)
    FROM p
    WHERE r.id = p.id AND r.claims = p.claims AND r.node_id = $4 AND r.status = 'running'
      AND r.id IN (SELECT id FROM locked)
    RETURNING r.id, r.cancel_requested
)
SELECT id, cancel_requested FROM renewed
UNION ALL
SELECT r.id, r.cancel_requested FROM forge_workflow_runs r JOIN p ON p.id = r.id
WHERE r.id NOT IN (SELECT id FROM locked) AND r.claims = p.claims AND r.node_id = $4 AND r.status = 'running'
"""

# Runs whose worker stopped heartbeating go back to pending (recovered), or fail once they have
# been recovered max_recoveries times (a run that kills its worker must not loop forever).
RESCUE = """
WITH lost AS (
    SELECT r.id FROM forge_workflow_runs r
    WHERE r.status = 'running'
      AND (r.lease_until < now()
           OR r.node_id IN (SELECT n.id FROM forge_nodes n
                            WHERE n.status IN ('stopped', 'dead')
                               OR n.last_heartbeat < now() - make_interval(secs => $1)))
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE forge_workflow_runs r SET
        status = CASE WHEN r.recoveries >= r.max_recoveries THEN 'failed' ELSE 'pending' END,
        error = CASE WHEN r.recoveries >= r.max_recoveries
                     THEN format('worker %s stopped during claim %s; the run had been recovered %s time(s) '
                                 '(max_recoveries)', r.node_id, r.claims, r.recoveries)
                     ELSE r.error END,
        finished_at = CASE WHEN r.recoveries >= r.max_recoveries THEN now() END,
        wait = jsonb_build_object('kind', 'recovered', 'node', r.node_id, 'claim', r.claims, 'at', now()),
        -- due since it was created: a recovered run is claimed before runs started after it (oldest first)
        recoveries = r.recoveries + 1, run_at = r.created_at, node_id = NULL, lease_until = NULL,
        updated_at = now()
    FROM lost WHERE r.id = lost.id
    RETURNING r.id, r.status, r.parent_id, r.error
), told AS (
    INSERT INTO forge_workflow_events (run_id, name, payload)
    SELECT parent_id, 'forge.child:' || id::text, jsonb_build_object('status', status, 'error', error)
    FROM moved WHERE status = 'failed' AND parent_id IS NOT NULL
    RETURNING run_id
), parents AS (
    UPDATE forge_workflow_runs p SET events_sent = p.events_sent + 1,
        status = CASE WHEN p.status = 'waiting' THEN 'pending' ELSE p.status END,
        run_at = CASE WHEN p.status = 'waiting' THEN now() ELSE p.run_at END
    FROM (SELECT DISTINCT run_id FROM told) t WHERE p.id = t.run_id
    RETURNING p.id
)
SELECT id, status FROM moved
"""

SLEEP = """INSERT INTO forge_workflow_sleepers (node_id) VALUES ($1)
           ON CONFLICT (node_id) DO UPDATE SET since = now()"""
AWAKE = "DELETE FROM forge_workflow_sleepers WHERE node_id = $1"

# --- writing a claimed run ------------------------------------------------------------------------
# The checkpoint: extend the lease and record one or more operations, in one statement, only while
# the claim is current. A row already final is never overwritten (recorded results are written once).
# One statement carries the checkpoints of many runs (the writer batches whatever is waiting): rows
# of a run whose claim is stale are dropped by the join. $3 is the transaction's synchronous_commit
# ([workflows] durable_steps), set inside the statement itself (set_config(..., true) lasts until
# its commit), so it costs no round trip.
CHECKPOINT = """
WITH locked AS MATERIALIZED (
    -- every statement that writes several runs locks them in id order first: no deadlocks between them
    SELECT r.id FROM forge_workflow_runs r
    WHERE r.id = ANY($4::uuid[]) ORDER BY r.id FOR NO KEY UPDATE
), run AS (
    UPDATE forge_workflow_runs r SET lease_until = now() + make_interval(secs => $1), steps_done = r.steps_done + 1,
           updated_at = now()
    FROM (SELECT DISTINCT id, claims FROM unnest($4::uuid[], $5::int[]) AS q(id, claims)) q
    WHERE r.id = q.id AND r.claims = q.claims AND r.status = 'running' AND r.id IN (SELECT id FROM locked)
    RETURNING r.id
)
INSERT INTO forge_workflow_steps AS s (run_id, key, name, kind, status, args, result, error, attempts, compensation,
                                       claim, node_id, started_at)
SELECT k.run_id, k.key, k.name, k.kind, k.status, k.args::jsonb, k.result::jsonb, k.error, k.attempts,
       k.compensation::jsonb, k.claim, $2, k.started_at
FROM (SELECT set_config('synchronous_commit', $3, true)) AS commit_mode,
     unnest($4::uuid[], $5::int[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
            $12::text[], $13::int[], $14::text[], $15::timestamptz[])
         AS k(run_id, claim, key, name, kind, status, args, result, error, attempts, compensation, started_at)
JOIN run ON run.id = k.run_id
ON CONFLICT (run_id, key) DO UPDATE SET status = EXCLUDED.status, result = EXCLUDED.result, error = EXCLUDED.error,
    attempts = EXCLUDED.attempts, compensation = EXCLUDED.compensation, claim = EXCLUDED.claim,
    node_id = EXCLUDED.node_id, finished_at = clock_timestamp()
    WHERE s.status IN ('retrying', 'waiting')
RETURNING s.run_id, s.key
"""

# An event wait: take the oldest matching unconsumed event and record it as the wait's result in
# the same statement, or record that the wait began (with its deadline). `seen` is read from the
# statement's snapshot, the same one the mailbox was read from: the run may only go to sleep if
# no event was sent since (SUSPEND compares it).
CONSUME = """
WITH run AS (
    UPDATE forge_workflow_runs SET lease_until = now() + make_interval(secs => $3), steps_done = steps_done + 1,
           updated_at = now()
    WHERE id = $1 AND claims = $2 AND status = 'running'
    RETURNING id
), seen AS (
    SELECT events_sent FROM forge_workflow_runs WHERE id = $1
), ev AS (
    SELECT e.id, e.name, e.payload FROM forge_workflow_events e
    WHERE e.run_id = $1 AND e.name = ANY($5::text[]) AND e.consumed_key IS NULL AND EXISTS (SELECT 1 FROM run)
    ORDER BY e.id LIMIT 1
    FOR UPDATE OF e
), used AS (
    UPDATE forge_workflow_events e SET consumed_key = $6, consumed_at = now() FROM ev WHERE e.id = ev.id
    RETURNING e.id
), step AS (
    INSERT INTO forge_workflow_steps AS s (run_id, key, name, kind, status, result, claim, node_id, started_at)
    SELECT run.id, $6, $7, 'event', CASE WHEN ev.id IS NULL THEN 'waiting' ELSE 'succeeded' END,
           CASE WHEN ev.id IS NULL THEN $8::text::jsonb
                ELSE jsonb_build_object('name', ev.name, 'payload', ev.payload, 'event_id', ev.id) END,
           $2, $4, $9
    FROM run LEFT JOIN ev ON true
    ON CONFLICT (run_id, key) DO UPDATE SET status = EXCLUDED.status, result = EXCLUDED.result,
        claim = EXCLUDED.claim, node_id = EXCLUDED.node_id, finished_at = clock_timestamp()
        WHERE s.status = 'waiting' AND EXCLUDED.status = 'succeeded'
    RETURNING s.key
)
SELECT (SELECT count(*) FROM run) AS owned, (SELECT events_sent FROM seen) AS seen,
       (SELECT count(*) FROM used) AS used, ev.id, ev.name, ev.payload::text AS payload
FROM (SELECT 1) one LEFT JOIN ev ON true
"""

# Give up the lease until run_at (NULL: until an event), unless an event arrived since `seen`
# ($6, NULL: do not check) or a cancellation was asked for.
SUSPEND = """
UPDATE forge_workflow_runs SET status = 'waiting', run_at = $3, wait = $4::text::jsonb, wait_events = $5::text[],
       node_id = NULL, lease_until = NULL, updated_at = now()
WHERE id = $1 AND claims = $2 AND status = 'running' AND NOT cancel_requested
  AND ($6::bigint IS NULL OR events_sent = $6)
RETURNING id
"""

STATE = "SELECT status, claims, cancel_requested, events_sent FROM forge_workflow_runs WHERE id = $1"

# Hand a run back (graceful shutdown): due at once, not counted as a recovery.
RELEASE = """UPDATE forge_workflow_runs SET status = 'pending', run_at = now(), node_id = NULL, lease_until = NULL,
                    updated_at = now()
             WHERE id = $1 AND claims = $2 AND status = 'running'"""

BLOCK = """UPDATE forge_workflow_runs SET status = 'blocked', wait = $3::text::jsonb, node_id = NULL, lease_until = NULL,
                  run_at = NULL, updated_at = now()
           WHERE id = $1 AND claims = $2 AND status = 'running' RETURNING id"""

START_COMPENSATING = """UPDATE forge_workflow_runs SET compensating = true, error = $3, updated_at = now()
                        WHERE id = $1 AND claims = $2 AND status = 'running' RETURNING id"""

# The end of runs (many at once, like checkpoints), with the operations each run recorded since
# its last checkpoint (its last step's result: one statement instead of a checkpoint and an
# ending); a child tells its parent in the same statement. A run whose claim is stale is not
# touched (and returns no row), nor are its operations recorded. $6: synchronous_commit.
FINISH = """
WITH f AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[]) AS f(id, claims, status, result, error)
), locked AS MATERIALIZED (
    SELECT r.id FROM forge_workflow_runs r WHERE r.id = ANY($1::uuid[]) ORDER BY r.id FOR NO KEY UPDATE
), k AS (
    SELECT * FROM unnest($7::uuid[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
                         $14::text[], $15::int[], $16::text[], $17::timestamptz[])
        WITH ORDINALITY AS k(run_id, key, name, kind, status, args, result, error, attempts, compensation, started_at, ord)
), run AS (
    UPDATE forge_workflow_runs r SET status = f.status, result = f.result::jsonb, error = f.error, finished_at = now(),
           lease_until = NULL, wait = NULL, wait_events = NULL, run_at = NULL, updated_at = now(),
           steps_done = r.steps_done + (EXISTS (SELECT 1 FROM k WHERE k.run_id = r.id))::int
    FROM f WHERE r.id = f.id AND r.claims = f.claims AND r.status = 'running' AND r.id IN (SELECT id FROM locked)
    RETURNING r.id, r.parent_id, r.claims, r.finished_at, f.status, f.result, f.error
), steps AS (
    -- finished when the run did (a timeline never shows a run ending before its last step)
    INSERT INTO forge_workflow_steps AS s (run_id, key, name, kind, status, args, result, error, attempts,
                                           compensation, claim, node_id, started_at, finished_at)
    SELECT k.run_id, k.key, k.name, k.kind, k.status, k.args::jsonb, k.result::jsonb, k.error, k.attempts,
           k.compensation::jsonb, run.claims, $18, k.started_at, run.finished_at
    FROM k JOIN run ON run.id = k.run_id ORDER BY k.ord
    ON CONFLICT (run_id, key) DO UPDATE SET status = EXCLUDED.status, result = EXCLUDED.result, error = EXCLUDED.error,
        attempts = EXCLUDED.attempts, compensation = EXCLUDED.compensation, claim = EXCLUDED.claim,
        node_id = EXCLUDED.node_id, finished_at = EXCLUDED.finished_at
        WHERE s.status IN ('retrying', 'waiting')
    RETURNING 1
), told AS (
    INSERT INTO forge_workflow_events (run_id, name, payload)
    SELECT parent_id, 'forge.child:' || id::text,
           jsonb_build_object('status', status, 'result', result::jsonb, 'error', error)
    FROM run WHERE parent_id IS NOT NULL
    RETURNING run_id, name
), parent AS (
    UPDATE forge_workflow_runs p SET events_sent = p.events_sent + t.n, updated_at = now(),
        status = CASE WHEN p.status = 'waiting' AND t.names && p.wait_events THEN 'pending' ELSE p.status END,
        run_at = CASE WHEN p.status = 'waiting' AND t.names && p.wait_events THEN now() ELSE p.run_at END
    FROM (SELECT run_id, count(*) AS n, array_agg(name) AS names FROM told GROUP BY run_id) t
    WHERE p.id = t.run_id
    RETURNING p.id, p.status = 'pending' AS due
), wake AS (
    SELECT pg_notify('forge_workflows', s.node_id)
    FROM (SELECT node_id FROM forge_workflow_sleepers ORDER BY random() LIMIT 1) s
    WHERE EXISTS (SELECT 1 FROM parent WHERE due)
)
SELECT run.id, (SELECT count(*) FROM wake) AS woke, set_config('synchronous_commit', $6, true) FROM run
"""

HISTORY = """SELECT key, name, kind, status, result::text AS result, error, attempts, finished_at
             FROM forge_workflow_steps WHERE run_id = $1 AND position('~' in key) = 0"""

COMPENSATIONS = """SELECT key, name, compensation::text AS compensation FROM forge_workflow_steps
                   WHERE run_id = $1 AND kind = 'step' AND status = 'succeeded' AND compensation IS NOT NULL
                     AND position('~' in key) = 0
                   ORDER BY finished_at DESC, seq DESC"""


#: one encoder for every value (json.dumps with options builds a new one per call)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# --- values --------------------------------------------------------------------------------------
def dumps(value: Any, what: str, limit: int | None = None) -> str:
    """JSON text for a jsonb column, or ``ValueError`` saying why it cannot be stored."""
    try:
        text = _ENCODER.encode(value)
        if not text.isascii():
            text.encode("utf-8")  # a lone surrogate cannot be stored
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-safe ({exc})") from None
    if "\\u0000" in text and _NUL.search(text):
        raise ValueError(f"{what} contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store")
    if limit is not None and len(text) > limit:
        raise ValueError(f"{what} is {len(text):,} bytes of JSON, more than [workflows] max_value_bytes "
                         f"({limit:,})")
    return text


def loads(value: str | None) -> Any:
    """A jsonb value selected as ``::text`` (so it reads the same with or without FORGE's codecs)."""
    return None if value is None else json.loads(value)


def as_uuid(value: Any) -> uuid.UUID | None:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


# --- the engine behind ctx.start_workflow / ctx.send_event ----------------------------------------
class WorkflowEngine:
    """The kernel's ``forge_workflow_engine``: starts runs and sends events on the caller's
    connection (inside its transaction, if any). ``max_recoveries`` maps workflow names to their
    ``@workflow(max_recoveries=...)``; others get ``default_max_recoveries``."""

    def __init__(self, max_recoveries: Mapping[str, int] | None = None, default_max_recoveries: int = 10,
                 max_value_bytes: int = 1_048_576) -> None:
        self.max_recoveries = dict(max_recoveries or {})
        self.default_max_recoveries = default_max_recoveries
        self.max_value_bytes = max_value_bytes

    async def start(self, conn: Any, requests: Sequence[WorkflowRequest], *,
                    ids: Sequence[uuid.UUID] | None = None, parent: tuple[uuid.UUID, str] | None = None) -> list[str]:
        if not requests:
            return []
        rows = [self._check(r) for r in requests]
        run_ids = list(ids) if ids is not None else [uuid.uuid4() for _ in requests]
        # a key given twice in one batch starts one run
        first: dict[str, int] = {}
        chosen = []
        for i, r in enumerate(requests):
            if r.idempotency_key is not None and r.idempotency_key in first:
                continue
            if r.idempotency_key is not None:
                first[r.idempotency_key] = i
            chosen.append(i)
        if isinstance(conn, asyncpg.Pool):
            async with conn.acquire() as held:
                return await self._start(held, requests, rows, run_ids, chosen, first, parent)
        return await self._start(conn, requests, rows, run_ids, chosen, first, parent)

    async def _start(self, conn: Any, requests: Sequence[WorkflowRequest], rows: list[str], run_ids: list[uuid.UUID],
                     chosen: list[int], first: dict[str, int], parent: tuple[uuid.UUID, str] | None) -> list[str]:
        reqs = [requests[i] for i in chosen]
        result = await conn.fetch(
            START, [run_ids[i] for i in chosen], [r.name for r in reqs], [r.version or "" for r in reqs],
            [rows[i] for i in chosen], [r.idempotency_key for r in reqs], [r.correlation_key for r in reqs],
            [r.run_at for r in reqs], [r.caller for r in reqs],
            [self.max_recoveries.get(r.name, self.default_max_recoveries) for r in reqs],
            [parent[0] if parent else None for _ in reqs], [parent[1] if parent else None for _ in reqs], len(reqs),
            [None if r.run_as is None else json.dumps(dict(r.run_as), separators=(",", ":")) for r in reqs])
        out: dict[int, str] = {}
        missing: list[str] = []
        for row in result:
            i = chosen[row["ord"] - 1]
            if row["inserted"] is not None:
                out[i] = str(row["inserted"])
            elif requests[i].idempotency_key is not None:
                missing.append(requests[i].idempotency_key)
            else:
                out[i] = str(run_ids[i])  # its id was taken: a child started again on replay
        if missing:
            # held by a run this statement's snapshot did not see: a new statement sees it
            found = {r["idempotency_key"]: str(r["id"]) for r in await conn.fetch(BY_KEY, missing)}
            for i in chosen:
                key = requests[i].idempotency_key
                if i not in out and key in found:
                    out[i] = found[key]
        ids = []
        for i, r in enumerate(requests):
            j = first.get(r.idempotency_key, i) if r.idempotency_key is not None else i
            if j not in out:
                raise InvalidArgument(f"workflow {r.name!r}: idempotency key {r.idempotency_key!r} is held by a run "
                                      f"that is not visible to this transaction yet; start it again")
            ids.append(out[j])
        return ids

    def _check(self, r: WorkflowRequest) -> str:
        problems = []
        if not isinstance(r.name, str) or not r.name:
            problems.append(f"name must be a non-empty string, got {r.name!r}")
        if not isinstance(r.args, Mapping):
            problems.append(f"args must be an object, got {type(r.args).__name__}")
        for what, key in (("idempotency_key", r.idempotency_key), ("correlation_key", r.correlation_key)):
            if key is not None and (not isinstance(key, str) or not key or len(key) > _KEY_LIMIT):
                problems.append(f"{what} must be a non-empty string of at most {_KEY_LIMIT} characters, got {key!r}")
        if r.run_at is not None and getattr(r.run_at, "tzinfo", None) is None:
            problems.append(f"run_at must be a timezone-aware datetime, got {r.run_at!r}")
        if problems:
            raise InvalidArgument(f"workflow {r.name!r}: " + "; ".join(problems))
        try:
            return dumps(dict(r.args), "its arguments", self.max_value_bytes)
        except ValueError as exc:
            raise InvalidArgument(f"workflow {r.name!r}: {exc}") from None

    async def send_event(self, conn: Any, target: str, name: str, payload: Any = None) -> int:
        if not isinstance(target, str) or not target or len(target) > _KEY_LIMIT:
            raise InvalidArgument(f"send_event: target must be a run id or a correlation key (a non-empty string of "
                                  f"at most {_KEY_LIMIT} characters), got {target!r}")
        if not isinstance(name, str) or not name or len(name) > 200:
            raise InvalidArgument(f"send_event: name must be a non-empty string of at most 200 characters, got {name!r}")
        if name.startswith("forge."):
            raise InvalidArgument(f"send_event: event names starting with 'forge.' are reserved, got {name!r}")
        try:
            text = dumps(payload, f"the payload of event {name!r}", self.max_value_bytes)
        except ValueError as exc:
            raise InvalidArgument(f"send_event: {exc}") from None
        row = await conn.fetchrow(SEND_EVENT, as_uuid(target), target, name, text)
        if not row["reached"]:
            raise NotFound(f"send_event: no live workflow run has the id or correlation key {target!r}")
        return row["reached"]
