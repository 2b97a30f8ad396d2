"""Property-based checks of batch enqueueing against a model (hypothesis, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge_kernel import migrations as migmod
from forge_kernel.db import connect, with_database
from forge_kernel.executor import JobRequest
from forge_kernel.kernel_plugin import forge_migrations as kernel_migrations
from forge_worker import store_jobs
from forge_worker.hooks import forge_migrations as worker_migrations

request_st = st.builds(
    lambda key, mode, prio, value, delayed: JobRequest(
        name="record", args={"value": value}, priority=prio, unique_key=key, on_conflict=mode,
        run_at=None),
    key=st.one_of(st.none(), st.sampled_from(["a", "b", "c"])),
    mode=st.sampled_from(["skip", "replace"]),
    prio=st.integers(-5, 5),
    value=st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=5),
    delayed=st.booleans(),
)
batches_st = st.lists(st.lists(request_st, min_size=1, max_size=12), min_size=1, max_size=4)


def _db(base: str) -> str:
    name = f"forge_p_{uuid.uuid4().hex[:10]}"

    async def make() -> None:
        admin = await asyncpg.connect(base)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await connect(with_database(base, name))
        try:
            await migmod.migrate(conn, kernel_migrations() + worker_migrations())
        finally:
            await conn.close()

    asyncio.run(make())
    return with_database(base, name)


def test_batches_match_the_model(forge_database_url):
    url = _db(forge_database_url)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batches=batches_st)
    def check(batches):
        asyncio.run(run(batches))

    async def run(batches):
        conn = await connect(url)
        try:
            await conn.execute("TRUNCATE forge_jobs")
            live: dict[str, tuple[int, dict]] = {}  # the model: unique key -> (id, args)
            for n_batch, batch in enumerate(batches):
                ids = await store_jobs(conn, batch)
                assert len(ids) == len(batch) and all(i > 0 for i in ids)
                plain = [i for r, i in zip(batch, ids) if r.unique_key is None]
                assert plain == sorted(plain) and len(set(plain)) == len(plain)
                # the model: skip requests run first (first per key wins), then replace (last wins)
                for r, i in zip(batch, ids):
                    if r.unique_key is not None and r.on_conflict == "skip":
                        if r.unique_key in live:
                            assert i == live[r.unique_key][0]
                        else:
                            live[r.unique_key] = (i, dict(r.args))
                replaced = {}
                for r in batch:
                    if r.unique_key is not None and r.on_conflict == "replace":
                        replaced[r.unique_key] = dict(r.args)
                for key, args in replaced.items():
                    if key in live:
                        live[key] = (live[key][0], args)
                    else:
                        first = next(i for r, i in zip(batch, ids) if r.unique_key == key and r.on_conflict == "replace")
                        live[key] = (first, args)
                for r, i in zip(batch, ids):
                    if r.unique_key is not None:
                        assert i == live[r.unique_key][0], (r, i, live)
                rows = await conn.fetch("SELECT id, unique_key, args FROM forge_jobs WHERE unique_key IS NOT NULL")
                assert {r["unique_key"]: (r["id"], r["args"]) for r in rows} == live
                assert await conn.fetchval("SELECT count(*) FROM forge_jobs WHERE unique_key IS NULL") == \
                    sum(1 for b in batches[: n_batch + 1] for r in b if r.unique_key is None)
        finally:
            await conn.close()

    check()


def test_nul_characters_are_rejected_clearly():
    import pytest

    from forge_kernel.errors import InvalidArgument
    from forge_worker.queue import _json

    with pytest.raises(InvalidArgument, match="NUL"):
        _json({"v": "a\x00b"}, "record", "args")
    with pytest.raises(InvalidArgument, match="JSON-safe"):
        _json({"v": "\udc00"}, "record", "args")
    assert _json({"v": "\\u0000"}, "record", "args") == '{"v":"\\\\u0000"}'


FATES = ("pending", "running", "cancelled", "dead", "discarded", "succeeded", "purged")


def test_ended_matches_the_model(forge_database_url):
    """``Dispatcher.ended`` (the ``forge_job_dispatcher`` hook's optional method): whatever
    became of each job - through the queue's own cancel, discard, purge and lease rescue - it
    reports exactly the jobs that ended, with their outcome; ``None`` for ids it has no record
    of; nothing for jobs still waiting or running."""
    from forge_worker.queue import Dispatcher, JobQueue
    from forge_worker.runtime import rescue_expired

    url = _db(forge_database_url)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(fates=st.lists(st.sampled_from(FATES), min_size=1, max_size=10),
           unknown=st.lists(st.integers(10**9, 10**9 + 100), max_size=3, unique=True))
    def check(fates, unknown):
        asyncio.run(run(fates, unknown))

    async def run(fates, unknown):
        conn = await connect(url)
        queue = JobQueue(conn)
        try:
            await conn.execute("TRUNCATE forge_jobs, forge_job_history, forge_nodes")
            await conn.execute("INSERT INTO forge_nodes (id, host, pid, version, status, last_heartbeat) "
                               "VALUES ('gone', 'h', 1, '0', 'dead', now())")
            ids = await store_jobs(conn, [JobRequest(name="record", args={"i": i}, max_attempts=1,
                                                     options={"cron_run": i}) for i in range(len(fates))])
            for job_id, fate in zip(ids, fates):
                if fate in ("running", "dead", "discarded"):
                    # claimed by a worker that died: a lapsed lease for "dead", a live one for "running"
                    await conn.execute(
                        "UPDATE forge_jobs SET status = 'running', attempt = 1, started_at = now(), node_id = $2, "
                        "lease_until = now() + make_interval(secs => $3) WHERE id = $1",
                        job_id, "gone" if fate != "running" else None, -1.0 if fate != "running" else 60.0)
                if fate in ("cancelled", "purged"):
                    assert await queue.cancel(job_id) == "cancelled"
                if fate == "succeeded":  # what a worker's result write leaves
                    await conn.execute(
                        """WITH gone AS (DELETE FROM forge_jobs WHERE id = $1 RETURNING *)
                           INSERT INTO forge_job_history (id, name, queue, args, priority, status, attempt, max_attempts,
                               unique_key, caller, options, node_id, last_error, created_at, run_at, started_at)
                           SELECT id, name, queue, args, priority, 'succeeded', 1, max_attempts, unique_key, caller,
                                  options, 'w1', NULL, created_at, run_at, now() FROM gone""", job_id)
            await rescue_expired(conn, 15)
            await queue.discard([i for i, f in zip(ids, fates) if f == "discarded"])
            await conn.execute("DELETE FROM forge_job_history WHERE id = ANY($1::bigint[])",
                               [i for i, f in zip(ids, fates) if f == "purged"])

            got = await Dispatcher().ended(conn, ids + unknown)
            want = {"cancelled": "cancelled", "dead": "dead", "discarded": "dead", "succeeded": "succeeded"}
            for job_id, fate in zip(ids, fates):
                if fate in ("pending", "running"):
                    assert job_id not in got, (fate, got.get(job_id))
                elif fate == "purged":
                    assert got[job_id] is None
                else:
                    o = got[job_id]
                    assert (o.job_id, o.status, o.options["cron_run"]) == (job_id, want[fate], ids.index(job_id))
                    assert o.finished_at is not None and (o.error is None) == (fate == "succeeded")
                    if fate == "discarded":
                        assert o.error.startswith("discarded from the dead-letter queue")
                    if fate == "dead":
                        assert "stopped heartbeating" in o.error
                    assert (o.started_at is None) == (fate == "cancelled")
            assert all(got[u] is None for u in unknown)
            assert set(got) == {i for i, f in zip(ids, fates) if f not in ("pending", "running")} | set(unknown)
        finally:
            await conn.close()

    check()


# --- Deadlines: the one timer behind every running job's time limit --------------------------------
class _Clock:
    """A loop's time and call_at, advanced by hand: timers fire in order of their time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[list] = []  # [when, callback, cancelled]

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback):
        timer = [when, callback, False]
        self.timers.append(timer)

        class Handle:
            def cancel(self) -> None:
                timer[2] = True
        return Handle()

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = sorted((t for t in self.timers if not t[2] and t[0] <= end), key=lambda t: t[0])
            if not due:
                break
            first = due[0]
            self.timers.remove(first)
            self.now = max(self.now, first[0])
            first[1]()
        self.now = end

    def armed(self) -> int:
        return sum(1 for t in self.timers if not t[2])


ops_st = st.lists(st.one_of(
    st.tuples(st.just("watch"), st.integers(0, 6), st.integers(1, 50)),   # key, limit in tenths of a second
    st.tuples(st.just("done"), st.integers(0, 6), st.just(0)),
    st.tuples(st.just("wait"), st.just(0), st.integers(0, 40)),
), max_size=40)


@given(ops_st)
@settings(max_examples=300, deadline=None)
def test_deadlines_expire_exactly_the_keys_past_their_limit(ops):
    """Against a model: every key still watched when its limit passes expires once, at its limit
    (not before, not later than the next time the clock moves); a key done in time never
    expires; one timer at most is armed, and none once nothing is watched."""
    from forge_worker.deadlines import Deadlines

    clock = _Clock()
    fired: list[tuple[int, float]] = []
    deadlines = Deadlines(clock, lambda key: fired.append((key, clock.now)))
    model: dict[int, float] = {}  # key -> its limit (absolute)
    expected: list[tuple[int, float]] = []
    for op, key, n in ops:
        if op == "watch":
            model[key] = clock.now + n / 10
            deadlines.watch(key, n / 10)
        elif op == "done":
            model.pop(key, None)
            deadlines.done(key)
        else:
            end = clock.now + n / 10
            for k, at in sorted(model.items(), key=lambda kv: kv[1]):
                if at <= end:
                    expected.append((k, at))
                    del model[k]
            clock.advance(n / 10)
        assert clock.armed() <= 1
        assert len(deadlines) == len(model)
    assert sorted(k for k, _ in fired) == sorted(k for k, _ in expected)
    for (key, when), (_, at) in zip(sorted(fired), sorted(expected)):
        assert abs(when - at) < 0.002, (key, when, at)
    deadlines.close()
    assert clock.armed() == 0 and len(deadlines) == 0


# --- the identity a claimed job runs as, decoded once per distinct run_as text -----------------------
run_as_st = st.one_of(
    st.none(),
    st.fixed_dictionaries({"kind": st.sampled_from(["user", "system", "anonymous", "service"])},
                          optional={"user_id": st.text(max_size=4), "roles": st.lists(st.text(max_size=3), max_size=3)}),
)


@given(st.lists(st.tuples(run_as_st, st.one_of(st.none(), st.text(max_size=3))), max_size=60),
       st.integers(1, 5))
@settings(max_examples=200, deadline=None)
def test_worker_identity_cache_matches_decoding_every_job(jobs, limit):
    """Worker._auth (the claim returns run_as as JSON text) gives every job the identity
    Auth.from_job gives its decoded run_as, with cache hits, misses and the cache emptied when
    full (a small limit here)."""
    import json
    import types

    from forge_kernel.executor import Auth
    from forge_worker import runtime

    worker = types.SimpleNamespace(_auths={})
    for run_as, caller in jobs:
        text = None if run_as is None else json.dumps(run_as)
        if len(worker._auths) > limit:
            worker._auths.clear()  # as when 1,024 identities are cached
        assert runtime.Worker._auth(worker, text, caller) == Auth.from_job(run_as, caller)


_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)
_offsets = st.timedeltas(min_value=dt.timedelta(hours=-23, minutes=-59), max_value=dt.timedelta(hours=23, minutes=59))
column_request_st = st.builds(
    JobRequest,
    name=_text.filter(bool), args=st.dictionaries(_text, _text, max_size=2), queue=_text.filter(bool),
    priority=st.integers(-(2 ** 31 - 1), 2 ** 31 - 1),
    run_at=st.one_of(st.none(), st.builds(lambda d, off: d.replace(tzinfo=dt.timezone(off)),
                                          st.datetimes(min_value=dt.datetime(1000, 1, 2), max_value=dt.datetime(9999, 12, 30)),
                                          _offsets)),
    max_attempts=st.integers(1, 2 ** 31 - 1), capability=st.one_of(st.none(), _text),
    timeout=st.one_of(st.none(), st.floats(min_value=1e-12, allow_nan=False, allow_infinity=True)),
    unique_key=st.one_of(st.none(), _text), caller=st.one_of(st.none(), _text),
    options=st.dictionaries(_text, st.one_of(_text, st.integers(-10, 10)), max_size=2),
    run_as=st.one_of(st.none(), st.dictionaries(_text, _text, max_size=2)),
)


def test_every_column_round_trips(forge_database_url):
    """``store_jobs`` sends each column of a batch as one array literal (``queue._literal``): whatever text,
    numbers, instants and NULLs a batch holds - the same value down a column or all different - each job's
    row holds exactly what its request said."""
    url = _db(forge_database_url)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batch=st.one_of(st.lists(column_request_st, min_size=1, max_size=6),
                           column_request_st.flatmap(lambda r: st.integers(1, 4).map(lambda n: [r] * n))))
    def check(batch):
        asyncio.run(run(batch))

    async def run(batch):
        conn = await connect(url)
        try:
            await conn.execute("TRUNCATE forge_jobs")
            ids = await store_jobs(conn, batch)
            rows = {r["id"]: r for r in await conn.fetch(
                "SELECT id, name, args, queue, priority, run_at, max_attempts, capability, timeout, unique_key,"
                " caller, options, run_as FROM forge_jobs WHERE id = ANY($1::bigint[])", ids)}
            for job_id, req in zip(ids, batch):
                if req.unique_key is not None and ids.count(job_id) > 1:
                    continue  # a key stored once per statement: the model test above checks which request won
                row = rows[job_id]
                assert (row["name"], row["args"], row["queue"], row["priority"], row["max_attempts"],
                        row["capability"], row["timeout"], row["unique_key"], row["caller"], row["options"]) == \
                    (req.name, req.args, req.queue, req.priority, req.max_attempts, req.capability, req.timeout,
                     req.unique_key, req.caller, req.options)
                assert row["run_as"] == req.run_as  # the pool's codec decodes jsonb
                if req.run_at is not None:
                    assert row["run_at"] == req.run_at
        finally:
            await conn.close()

    check()
