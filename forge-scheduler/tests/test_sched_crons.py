"""Deciding slots against a real database: exactly once, catch-up, overlap, pause/resume/trigger,
run history, atomicity with the job store, fencing."""

import asyncio
import datetime as dt

import pytest
from sched_fake_store import FakeDispatcher

from forge_kernel import cron
from forge_kernel.db import create_pool
from forge_kernel.executor import JobOutcome
from forge_kernel.telemetry import Telemetry
from forge_scheduler import api
from forge_scheduler.crons import CronEngine, plan_slots, record_outcome
from forge_scheduler.election import Leadership, NotLeader
from forge_scheduler.schedule import UTC
from forge_scheduler.settings import CronSettings


def settings_for(name, schedule="* * * * * *", **opts):
    async def fn(ctx) -> None:
        pass

    fn.__name__ = name
    return CronSettings.from_definition(cron(schedule, name=name, **opts)(fn).__forge__)


def utc(*a):
    return dt.datetime(*a, tzinfo=UTC)


# --- the plan (pure) ------------------------------------------------------------------------
def test_plan_on_time_slots_all_run():
    c = settings_for("c", grace=5)
    plan = plan_slots(c, utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 1, 0, 0, 4, 500))
    assert plan.run == [utc(2026, 1, 1, 0, 0, s) for s in (1, 2, 3, 4)]
    assert (plan.dropped, plan.missed) == (0, 0)


def test_plan_skip_drops_every_missed_slot():
    c = settings_for("c", grace=1, catch_up="skip")
    plan = plan_slots(c, utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 1, 0, 1, 0, 500000))
    # 00:00:59.5 is the cutoff: 00:01:00 is on time, 00:00:01..00:00:59 were missed
    assert plan.run == [utc(2026, 1, 1, 0, 1, 0)]
    assert (plan.missed, plan.dropped) == (59, 59)


def test_plan_catch_up_runs_the_most_recent_missed_slots():
    c = settings_for("c", grace=1, catch_up=3)
    plan = plan_slots(c, utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 1, 0, 1, 0, 500000))
    assert plan.run == [utc(2026, 1, 1, 0, 0, s) for s in (57, 58, 59)] + [utc(2026, 1, 1, 0, 1, 0)]
    assert (plan.missed, plan.dropped) == (59, 56)


def test_plan_catch_up_larger_than_the_outage_runs_all():
    c = settings_for("c", schedule="*/10 * * * *", grace=0, catch_up=10)
    plan = plan_slots(c, utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 0, 35))
    assert plan.run == [utc(2026, 1, 1, 0, m) for m in (10, 20, 30)]
    assert plan.dropped == 0


# --- against the database -----------------------------------------------------------------------
class Harness:
    def __init__(self, pool, crons, dispatcher=None):
        self.pool = pool
        self.dispatcher = dispatcher or FakeDispatcher()
        self.telemetry = Telemetry()
        self.telemetry.attach(lambda trace: None)
        self.engine = CronEngine(pool, {c.name: c for c in crons}, lambda: self.dispatcher, tick_interval=0.05,
                                 telemetry=self.telemetry)

    async def lead(self, node_id="n1"):
        row = await self.pool.fetchrow(
            """INSERT INTO forge_leaders (name, node_id, term, since, renewed_at) VALUES ('scheduler', $1, 1, now(), now())
               ON CONFLICT (name) DO UPDATE SET node_id = $1, term = forge_leaders.term + 1 RETURNING term, since""", node_id)
        return Leadership(node_id, row["term"], row["since"])

    async def rewind(self, name, seconds):
        await self.pool.execute("UPDATE forge_cron_state SET decided_until = clock_timestamp() - make_interval(secs => $2) "
                                "WHERE cron = $1", name, seconds)

    async def runs(self, name):
        return await self.pool.fetch("SELECT * FROM forge_cron_runs WHERE cron = $1 ORDER BY slot", name)

    async def jobs(self, name):
        return await self.pool.fetch("SELECT * FROM sched_fake_jobs WHERE name = $1 ORDER BY id", name)


@pytest.fixture
async def pool(sched_db):
    p = await create_pool(sched_db, min_size=1, max_size=8)
    yield p
    await p.close()


async def test_concurrent_deciders_never_enqueue_a_slot_twice(pool):
    c = settings_for("tick", grace=3600, catch_up=0)
    h = Harness(pool, [c])
    ld = await h.lead()
    async with pool.acquire() as conn:
        await h.engine.register(conn)
    await h.rewind("tick", 20)
    # many decisions at once, as two leaders overlapping or a retried tick would do
    await asyncio.gather(*(h.engine.decide("tick", ld) for _ in range(6)))
    runs = await h.runs("tick")
    jobs = await h.jobs("tick")
    assert len(runs) >= 20
    assert len({r["slot"] for r in runs}) == len(runs)
    assert sorted(j["options"]["cron_run"] for j in jobs) == sorted(r["id"] for r in runs)
    # rewinding the state by hand cannot make a decided slot run again
    await h.rewind("tick", 20)
    await h.engine.decide("tick", ld)
    again = await h.runs("tick")
    assert len({r["slot"] for r in again}) == len(again)
    assert len(await h.jobs("tick")) == len(again)


async def test_catch_up_bound_after_an_outage(pool):
    c = settings_for("tick", grace=1, catch_up=3)
    h = Harness(pool, [c])
    ld = await h.lead()
    async with pool.acquire() as conn:
        await h.engine.register(conn)
    await h.rewind("tick", 30)
    d = await h.engine.decide("tick", ld)
    # 3 most recent missed slots plus the 1-2 on time (within grace); the rest dropped
    assert 4 <= len(d.enqueued) <= 5
    assert 25 <= d.dropped <= 27
    state = await pool.fetchrow("SELECT dropped_total, last_dropped FROM forge_cron_state WHERE cron = 'tick'")
    assert state["dropped_total"] == d.dropped == state["last_dropped"]
    # the dropped slots reach the node's telemetry (forge_cron_missed_slots_total with forge-observe)
    assert [e for e in h.telemetry.drain() if e[0] == "cron.missed"] == [("cron.missed", ("tick", d.dropped))]
    slots = [r["slot"] for r in await h.runs("tick")]
    assert all((b - a) == dt.timedelta(seconds=1) for a, b in zip(slots, slots[1:]))  # the most recent, contiguous


async def test_overlap_skip_records_skipped_slots_until_the_run_finishes(pool):
    c = settings_for("slow", grace=3600, overlap="skip")
    h = Harness(pool, [c])
    ld = await h.lead()
    async with pool.acquire() as conn:
        await h.engine.register(conn)
    await h.rewind("slow", 3)
    await h.engine.decide("slow", ld)
    runs = await h.runs("slow")
    assert [r["status"] for r in runs][:1] == ["queued"]
    assert all(r["status"] == "skipped" for r in runs[1:]) and len(runs) >= 3
    assert "overlap" in runs[1]["error"]
    assert len(await h.jobs("slow")) == 1
    # the run finishes: the next slot is enqueued again
    first = runs[0]
    now = dt.datetime.now(UTC)
    await record_outcome(pool, JobOutcome(first["job_id"], "slow", {}, {"cron_run": first["id"]}, "succeeded", 1,
                                          now - dt.timedelta(seconds=2), now))
    await asyncio.sleep(1.1)
    d = await h.engine.decide("slow", ld)
    assert d.enqueued and len(await h.jobs("slow")) == 2


async def test_overlap_timeout_stops_a_lost_run_from_blocking(pool):
    c = settings_for("slow", grace=3600, overlap="skip", overlap_timeout=60)
    h = Harness(pool, [c])
    ld = await h.lead()
    async with pool.acquire() as conn:
        await h.engine.register(conn)
    # a run whose outcome never arrived (its report was lost), enqueued two minutes ago
    await pool.execute("INSERT INTO forge_cron_runs (cron, slot, kind, status, enqueued_at) "
                       "VALUES ('slow', now() - interval '2 minutes', 'scheduled', 'queued', now() - interval '2 minutes')")
    await h.rewind("slow", 1)
    d = await h.engine.decide("slow", ld)
    assert d.enqueued and not d.skipped


async def test_overlap_allow_enqueues_while_a_run_is_open(pool):
    c = settings_for("fast", grace=3600)
    h = Harness(pool, [c])
    ld = await h.lead()
    async with pool.acquire() as conn:
        await h.engine.register(conn)
    await h.rewind("fast", 3)
    await h.engine.decide("fast", ld)
    runs = await h.runs("fast")
    assert len(runs) >= 3 and {r["status"] for r in runs} == {"queued"}


async def test_a_failing_job_store_leaves_no_run_and_no_progress(pool):
    class Broken:
        async def dispatch(self, conn, requests):
            await conn.execute("INSERT INTO sched_fake_jobs (name, options) VALUES ('x', '{}')")
            raise RuntimeError("job store down")

    c = settings_for("tick", grace=3600)
    h = Harness(pool, [c], dispatcher=Broken())
    ld = await h.lead()
    async with pool.acquire() as conn:
        await h.engine.register(conn)
    await h.rewind("tick", 5)
    before = await pool.fetchval("SELECT decided_until FROM forge_cron_state WHERE cron = 'tick'")
    with pytest.raises(RuntimeError, match="job store down"):
        await h.engine.decide("tick", ld)
    assert await h.runs("tick") == []
    assert await pool.fetchval("SELECT count(*) FROM sched_fake_jobs") == 0
    assert await pool.fetchval("SELECT decided_until FROM forge_cron_state WHERE cron = 'tick'") == before


async def test_a_deposed_leader_decides_nothing(pool):
    c = settings_for("tick", grace=3600)
    h = Harness(pool, [c])
    old = await h.lead("n1")
    async with pool.acquire() as conn:
        await h.engine.register(conn)
    await h.lead("n2")  # a successor's term
    await h.rewind("tick", 5)
    with pytest.raises(NotLeader):
        await h.engine.decide("tick", old)
    assert await h.runs("tick") == []


async def test_pause_trigger_resume(pool):
    c = settings_for("tick", grace=3600)
    h = Harness(pool, [c])
    ld = await h.lead()
    async with pool.acquire() as conn:
        await h.engine.register(conn)
        assert await api.pause(conn, "tick", known=[c]) is True
        assert await api.pause(conn, "tick", known=[c]) is False
    await h.rewind("tick", 5)
    await h.engine.tick(ld)
    assert await h.runs("tick") == []  # paused: no scheduled slot runs
    async with pool.acquire() as conn:
        await api.trigger(conn, "tick", requested_by="test", known=[c])
    await h.engine.tick(ld)
    runs = await h.runs("tick")
    assert [(r["kind"], r["status"]) for r in runs] == [("manual", "queued")]  # trigger works while paused
    jobs = await h.jobs("tick")
    assert jobs[-1]["options"]["trigger"] == "manual" and jobs[-1]["options"]["cron_run"] == runs[0]["id"]
    await h.engine.tick(ld)
    assert len(await h.runs("tick")) == 1  # a trigger runs once
    async with pool.acquire() as conn:
        assert await api.resume(conn, "tick", known=[c]) is True
        assert await api.resume(conn, "tick", known=[c]) is False
    await asyncio.sleep(1.1)
    await h.engine.tick(ld)
    scheduled = [r for r in await h.runs("tick") if r["kind"] == "scheduled"]
    # resumed from now on: the slots of the pause were not caught up
    assert 1 <= len(scheduled) <= 2


async def test_unknown_names_are_refused(pool):
    async with pool.acquire() as conn:
        from forge_kernel.errors import InvalidArgument, NotFound

        with pytest.raises(NotFound, match="no cron named 'nope'"):
            await api.trigger(conn, "nope")
        with pytest.raises(InvalidArgument):
            await api.pause(conn, "")
        with pytest.raises(InvalidArgument, match="limit"):
            await api.history(conn, limit=0)


async def test_outcomes_update_history_and_a_final_status_stays(pool):
    c = settings_for("tick", grace=3600)
    h = Harness(pool, [c])
    ld = await h.lead()
    async with pool.acquire() as conn:
        await h.engine.register(conn)
    await h.rewind("tick", 2)
    await h.engine.decide("tick", ld)
    run = (await h.runs("tick"))[0]
    t0 = dt.datetime.now(UTC)

    def outcome(status, attempt, error=None, secs=0.25):
        return JobOutcome(run["job_id"], "tick", {}, {"cron_run": run["id"], "cron": "tick"}, status, attempt,
                          t0, t0 + dt.timedelta(seconds=secs), error, "w1")

    assert await record_outcome(pool, outcome("failed", 1, "ValueError: boom"))
    r = await pool.fetchrow("SELECT * FROM forge_cron_runs WHERE id = $1", run["id"])
    assert (r["status"], r["attempts"], r["error"], r["finished_at"]) == ("retrying", 1, "ValueError: boom", None)
    assert await record_outcome(pool, outcome("succeeded", 2, secs=1.5))
    r = await pool.fetchrow("SELECT * FROM forge_cron_runs WHERE id = $1", run["id"])
    assert (r["status"], r["attempts"], r["error"], r["node_id"]) == ("succeeded", 2, None, "w1")
    assert r["duration_ms"] == pytest.approx(1500.0) and r["finished_at"] is not None
    # a late "retry" report cannot reopen a finished run
    assert not await record_outcome(pool, outcome("failed", 1, "late"))
    assert (await pool.fetchrow("SELECT status FROM forge_cron_runs WHERE id = $1", run["id"]))["status"] == "succeeded"
    # jobs that are not cron runs are ignored
    assert not await record_outcome(pool, JobOutcome(1, "other", {}, {}, "succeeded", 1, t0, t0))
    hist = {h.id: h for h in await api.history(pool, "tick")}
    assert hist[run["id"]].status == "succeeded" and hist[run["id"]].duration_ms == pytest.approx(1500.0)
    listed = {ci.name: ci for ci in await api.list_crons(pool, [c])}
    assert listed["tick"].last_status in ("succeeded", "queued") and listed["tick"].next_slot is not None


async def test_one_broken_cron_does_not_hold_up_the_others(pool):
    class Picky:
        """Refuses jobs of one cron, as a job store with a bad setting for it would."""

        def __init__(self):
            self.inner = FakeDispatcher()

        async def dispatch(self, conn, requests):
            if any(r.name == "bad" for r in requests):
                raise ValueError("queue 'nope' does not exist")
            return await self.inner.dispatch(conn, requests)

    bad, good = settings_for("bad", grace=3600), settings_for("good", grace=3600)
    h = Harness(pool, [bad, good], dispatcher=Picky())
    ld = await h.lead()
    async with pool.acquire() as conn:
        await h.engine.register(conn)
    await h.rewind("bad", 3)
    await h.rewind("good", 3)
    await h.engine.tick(ld)
    assert len(await h.runs("good")) >= 3
    assert await h.runs("bad") == [] and h.engine.failures == {"bad": 1}


# --- successive decisions (property) ----------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expr=st.sampled_from(["* * * * * *", "*/7 * * * * *", "*/2 * * * *", "30 1 * * *"]),
       zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
       start=st.sampled_from([utc(2026, 3, 29, 0, 58), utc(2026, 10, 25, 0, 58), utc(2026, 11, 1, 5, 58),
                              utc(2026, 6, 1, 12)]),
       steps=st.lists(st.floats(0.01, 90), min_size=1, max_size=6),
       catch_up=st.integers(0, 4), grace=st.sampled_from([0, 1, 5, 30]))
def test_successive_decisions_partition_the_slots(expr, zone, start, steps, catch_up, grace):
    """Whatever the leader's tick times (short ticks, long outages, DST changes), every slot is
    decided exactly once - run or dropped - and a slot is dropped only when it was more than
    ``grace`` late and older than the ``catch_up`` most recent missed ones of that decision."""
    c = settings_for("p", expr, timezone=zone, catch_up=catch_up, grace=grace)
    decided, ran, dropped_total = start, [], 0
    now = start
    for step in steps:
        now = now + dt.timedelta(seconds=step)
        plan = plan_slots(c, decided, now)
        window = c.schedule.between(decided, now)
        missed = [s for s in window if s < now - dt.timedelta(seconds=grace)]
        on_time = [s for s in window if s >= now - dt.timedelta(seconds=grace)]
        assert plan.run == sorted(set(plan.run))
        assert set(plan.run) <= set(window)
        assert on_time == [s for s in plan.run if s in on_time]  # every on-time slot runs
        assert plan.run[:len(plan.run) - len(on_time)] == (missed[-catch_up:] if catch_up else [])
        assert plan.dropped == len(missed) - min(catch_up, len(missed))
        ran += plan.run
        dropped_total += plan.dropped
        decided = now
    everything = c.schedule.between(start, now)
    assert len(ran) == len(set(ran))
    assert len(ran) + dropped_total == len(everything)


# --- review findings of 2026-12-01 -------------------------------------------------------------
def test_plan_counts_drops_past_a_large_catch_up_and_says_when_it_stopped_counting():
    from forge_scheduler.crons import DROP_COUNT_CAP

    c = settings_for("c", grace=0, catch_up=1000)
    # a per-second cron down for six hours: 21,600 missed, the 1,000 most recent run
    plan = plan_slots(c, utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 1, 6, 0, 0, 500000))
    assert len(plan.run) == 1000 and plan.run[-1] == utc(2026, 1, 1, 6, 0, 0)
    # counting stops at the cap (plus what runs): the drop count is a floor, and says so
    assert plan.dropped == DROP_COUNT_CAP and plan.capped
    small = plan_slots(c, utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 1, 0, 30, 0, 500000))
    assert (small.missed, small.dropped, small.capped) == (1800, 800, False)


def test_catch_up_is_bounded_at_registration():
    from forge_kernel.errors import StartupError

    with pytest.raises(StartupError, match=r"cron 'greedy'.*catch_up.*0 to 1000"):
        settings_for("greedy", catch_up=50_000)
    with pytest.raises(StartupError, match=r"cron 'uniq'.*unknown setting\(s\) unique"):
        settings_for("uniq", unique=True)  # uniqueness is per dispatch; overlap="skip" is the cron's way


async def test_a_decision_longer_than_check_timeout_keeps_its_term(sched_db):
    """The decision's fence row lock must not block the leader's own renewal: with a job store
    that takes 1.5 s per dispatch and check_timeout 1 s, the term survives and runs commit
    (before the fix every renewal timed out behind the fence, each term rolled its decision
    back, and no run ever committed)."""
    from forge_kernel.db import connect
    from forge_scheduler.election import LeaderElection
    from forge_scheduler.settings import SchedulerConfig

    class SlowStore(FakeDispatcher):
        async def dispatch(self, conn, requests):
            await conn.execute("SELECT pg_sleep(1.5)")
            return await super().dispatch(conn, requests)

    pool = await create_pool(sched_db, min_size=1, max_size=8)
    engine = CronEngine(pool, {"tick": settings_for("tick", grace=5)}, SlowStore, tick_interval=0.1)

    async def connector(**kw):
        return await connect(sched_db, **kw)

    election = LeaderElection("n1", connector, SchedulerConfig(election_interval=0.1, renew_interval=0.2,
                                                               check_timeout=1.0))

    async def crons_loop(ld):
        await engine.run(election, ld)

    election.workers = [crons_loop]
    task = asyncio.create_task(election.run())
    try:
        # three committed decisions of 1.5 s each (how long they take depends on the machine's load)
        for _ in range(300):
            if await pool.fetchval("SELECT count(*) FROM forge_cron_runs") >= 3:
                break
            await asyncio.sleep(0.1)
        assert election.terms_won == 1 and election.is_leader
        assert await pool.fetchval("SELECT count(*) FROM forge_cron_runs") >= 3
        assert await pool.fetchval("SELECT term FROM forge_leaders") == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.close()


async def test_a_takeover_waits_for_a_decision_in_flight(sched_db):
    """FOR KEY SHARE (the fence) still holds up a successor's takeover (FOR UPDATE), so a
    deposed leader's decision is ordered entirely before the next term."""
    from forge_kernel.db import connect
    from forge_scheduler.election import LeaderElection, fence
    from forge_scheduler.settings import SchedulerConfig

    pool = await create_pool(sched_db, min_size=1, max_size=4)
    h = Harness(pool, [])
    old = await h.lead("n1")
    conn = await pool.acquire()
    tr = conn.transaction()
    await tr.start()
    await fence(conn, old)  # a decision of term 1 in flight

    async def connector(**kw):
        return await connect(sched_db, **kw)

    successor = LeaderElection("n2", connector, SchedulerConfig(election_interval=0.1, check_timeout=10.0))
    task = asyncio.create_task(successor.run())
    try:
        await asyncio.sleep(1.0)
        assert not successor.is_leader  # it holds the advisory lock but waits for the fenced decision
        # the old leader's renewal still works (under FOR SHARE it would wait, and time out here)
        await pool.execute("UPDATE forge_leaders SET renewed_at = now()", timeout=5)
        await tr.commit()
        await asyncio.wait_for(successor.elected.wait(), 5)
        assert (await pool.fetchrow("SELECT node_id, term FROM forge_leaders"))["term"] == old.term + 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.release(conn)
        await pool.close()


async def test_crons_the_leader_does_not_define_are_refused(pool):
    from forge_kernel.errors import NotFound

    c = settings_for("tick", grace=3600)
    h = Harness(pool, [c])
    ld = await h.lead()
    # a cron an earlier deployment registered, and that this one no longer has
    await pool.execute("INSERT INTO forge_cron_state (cron, schedule, timezone, decided_until, defined) "
                       "VALUES ('retired', '* * * * *', 'UTC', now(), true)")
    async with pool.acquire() as conn:
        await h.engine.register(conn)
    await h.engine.tick(ld)
    assert await pool.fetchval("SELECT defined FROM forge_cron_state WHERE cron = 'retired'") is False
    assert await pool.fetchval("SELECT defined FROM forge_cron_state WHERE cron = 'tick'") is True
    async with pool.acquire() as conn:
        for verb in (api.trigger, api.pause, api.resume):
            with pytest.raises(NotFound, match="'retired' is not defined by the running cluster.*earlier deployment"):
                await verb(conn, "retired")
        # the caller's app defines it, the running leader does not: deploy first
        with pytest.raises(NotFound, match="deploy it first"):
            await api.trigger(conn, "retired", known=[settings_for("retired")])
        assert await conn.fetchval("SELECT count(*) FROM forge_cron_triggers") == 0
        # its history stays readable; a name nobody knows is an error, not an empty list
        assert await api.history(conn, "retired") == []
        with pytest.raises(NotFound, match="no cron named 'nope'.*tick"):
            await api.history(conn, "nope")
        listed = {ci.name: ci for ci in await api.list_crons(conn, [c])}
        assert listed["retired"].defined is False and listed["retired"].next_slot is None
        assert listed["tick"].defined is True
    # a row the API wrote for a name only the caller's code knew is marked on the next tick
    async with pool.acquire() as conn:
        await api.trigger(conn, "newer", known=[settings_for("newer")])
    assert await pool.fetchval("SELECT defined FROM forge_cron_state WHERE cron = 'newer'") is None
    await h.engine.tick(ld)
    assert await pool.fetchval("SELECT defined FROM forge_cron_state WHERE cron = 'newer'") is False
    # a later term whose leader runs code older than the flag (a rollback) never writes it: what
    # an earlier term wrote says nothing then, and the name is accepted as before
    await pool.execute("UPDATE forge_leaders SET term = term + 1")
    async with pool.acquire() as conn:
        assert await api.pause(conn, "retired") is True
        assert {ci.name: ci.defined for ci in await api.list_crons(conn)}["retired"] is None


class EndedStore(FakeDispatcher):
    """A job store that can say how jobs ended: ``self.ended_as[job_id] = JobOutcome | None``."""

    def __init__(self):
        self.ended_as = {}
        self.asked = []

    async def ended(self, conn, job_ids):
        self.asked.append(list(job_ids))
        return {i: self.ended_as[i] for i in job_ids if i in self.ended_as}


def _ended(job_id, status, error=None):
    t = dt.datetime.now(UTC)
    return JobOutcome(job_id, "tick", {}, {}, status, 1, None if status == "cancelled" else t - dt.timedelta(seconds=1),
                      t, error, "w1")


async def _open_runs(pool, n, first_job=1):
    await pool.execute(
        """INSERT INTO forge_cron_runs (cron, slot, kind, status, job_id, enqueued_at)
           SELECT 'tick', now() - make_interval(secs => g), 'manual', 'queued', $1 + g, now() - interval '1 minute'
           FROM generate_series(0, $2 - 1) AS g""", first_job, n)


async def test_reconcile_pages_past_runs_that_are_still_waiting(pool, monkeypatch):
    """More waiting runs than one batch must not hide a newer run whose job has ended."""
    from forge_scheduler import crons as crons_mod

    monkeypatch.setattr(crons_mod, "RECONCILE_BATCH", 3)
    monkeypatch.setattr(crons_mod, "RECONCILE_BATCHES", 2)
    await _open_runs(pool, 10)  # jobs 1..10 still waiting, except the newest
    store = EndedStore()
    store.ended_as[10] = _ended(10, "cancelled")
    reconciler = crons_mod.RunReconciler(older_than=5)
    async with pool.acquire() as conn:
        closed = [await reconciler.run(conn, store) for _ in range(3)]
    assert sum(closed) == 1 and closed[:1] == [0]  # found on the second pass, two batches each
    assert await pool.fetchval("SELECT status FROM forge_cron_runs WHERE job_id = 10") == "cancelled"
    assert await pool.fetchval("SELECT count(*) FROM forge_cron_runs WHERE status = 'queued'") == 9


async def test_reconcile_never_overwrites_a_report_that_came_meanwhile(pool):
    """The store said "dead" for a job that was then retried and succeeded; the worker's report
    closed the run first. The older word from the store must not replace it."""
    from forge_scheduler.crons import RunReconciler

    await _open_runs(pool, 1, first_job=7)

    class RacingStore(EndedStore):
        async def ended(self, conn, job_ids):
            out = {7: _ended(7, "dead", "worker w1 stopped heartbeating")}
            await record_outcome(pool, attrs_evolve(_ended(7, "succeeded"), options={"cron_run": run_id}))
            return out

    from attrs import evolve as attrs_evolve

    run_id = await pool.fetchval("SELECT id FROM forge_cron_runs WHERE job_id = 7")
    async with pool.acquire() as conn:
        assert await RunReconciler(older_than=5).run(conn, RacingStore()) == 0
    assert await pool.fetchval("SELECT status FROM forge_cron_runs WHERE id = $1", run_id) == "succeeded"
